"""Closed-form erasure: one least-squares solve on the cross-attention key/value layers, saved as a LoRA.

The text reaches the UNet only through the cross-attention key and value projections W (to_k,
to_v of every attn2). For an erased prompt e with guide (neutral) prompt g, and kept prompts k,
the edit (the closed form of Unified Concept Editing, Gandikota et al. 2024) is the W minimising

    sum_e |W c_e - W0 c_g|^2  +  s * sum_k |W c_k - W0 c_k|^2  +  lambda * |W - W0|_F^2

over the text states c: of e and g from the erased prompt's last word on (the word and the
states after it, which carry the prompt), of k at every position. Its solution is
W - W0 = W0 (C_ge - C_ee) (lambda I + C_ee + s C_kk)^-1 with C_xy = sum c_x c_y^T. The change is
cut to the LoRA's rank by SVD (up = U S, down = V^T, alpha = rank), so the result is an ordinary
kohya LoRA file, applied at any strength in A1111, ComfyUI and diffusers. No sampling, no steps:
seconds on a CPU.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from leco.checkpoints import RunFolder, kohya_leco_metadata
from leco.conditioning import NO_EMBEDDINGS_IN_TRAINING, PromptEncoder, warn_if_misread
from leco.config import LecoConfig, NetworkConfig, as_read
from leco.errors import LecoError, is_main_process, warn
from leco.models import DTYPES, LoadedModels, load_models, recorded_model_name
from leco.network import LoRANetwork
from leco.preservation import anchor_prompts


def edit(config: LecoConfig, *, overwrite: bool = False) -> tuple[Path, LoRANetwork, dict[str, float]]:
    """Solve, export and save; returns the file, the network (on the loaded UNet) and fit figures."""
    folder = RunFolder(config.save.path, config.save.name)
    main = is_main_process()  # started by `accelerate launch`: every process solves, one writes
    if main:
        folder.check(overwrite=overwrite)
    models = load_models(config.pretrained_model, dtype=torch.float32)
    erased, guides, kept = edit_prompts(config, models)
    warn_if_misread(models, [*erased, *guides, *kept], embedding_hint=NO_EMBEDDINGS_IN_TRAINING)
    states = text_states(models, config.pretrained_model.clip_skip, [*erased, *guides, *kept])
    erase_rows, guide_rows = aligned_states(models, states, erased, guides)
    keep_rows = torch.cat([states[text] for text in kept]) if kept else erase_rows[:0]
    network = LoRANetwork.create(models.unet, models.family, lora_settings(config.network))
    fit = solve_into(network, erase_rows, guide_rows, keep_rows, config)
    if not main:
        return folder.file("last"), network, fit
    folder.open(overwrite=overwrite)
    try:
        folder.clear_replaced()
        path = network.save(
            folder.file("last"),
            dtype=DTYPES[config.save.precision],
            resolution=models.resolution,
            title=config.save.name,
            extra_metadata={
                "leco.config": config.model_dump(mode="json"),
                "leco.method": "closed_form",
                "leco.kept_prompts": str(len(kept)),
                "ss_sd_model_name": recorded_model_name(config.pretrained_model.name_or_path),
                "ss_clip_skip": str(config.pretrained_model.clip_skip),
                **kohya_leco_metadata(config, config.prompts),
            },
        )
    finally:
        folder.close()
    return path, network, fit


def lora_settings(network: NetworkConfig) -> NetworkConfig:
    """The cross-attention key/value layers at the configured rank, scale 1 (alpha = rank)."""
    return network.model_copy(update={"training_method": "xattn-strict", "alpha": float(network.rank)})


def edit_prompts(config: LecoConfig, models: LoadedModels) -> tuple[list[str], list[str], list[str]]:
    """(erased prompts, their guides, kept prompts); kept: preserve entries and the anchors."""
    erased, guides, kept = [], [], []
    for entry in config.prompts:
        if entry.action == "erase":
            erased += entry.targets
            guides += [entry.role_text("neutral", i) for i in range(len(entry.targets))]
        else:
            kept += entry.targets
    kept += anchor_prompts(config.anchors, config.prompts, models.folder)
    same = [text for text, guide in zip(erased, guides, strict=True) if as_read(text) == as_read(guide)]
    if same:  # the solve would map the prompt onto itself: an all-zero file
        raise LecoError(
            f"prompts: {same[0]!r} is its own neutral, so the closed-form edit has nothing to move it to; "
            'give the erase entry a neutral that lacks the concept (e.g. neutral: "a digit")'
        )
    if not kept or not config.closed_form.preserve_scale:
        warn(
            "closed form: no prompt is kept (no anchors or preserve entries, or closed_form.preserve_scale "
            "0), so whatever shares the erased prompts' words may change with them; add anchors: "
            "{prompts: auto}"
        )
    return erased, guides, list(dict.fromkeys(kept))


@torch.no_grad()
def text_states(models: LoadedModels, clip_skip: int | None, texts: list[str]) -> dict[str, Tensor]:
    """Every position's text state [tokens, dim] (float64) as the UNet's cross-attention reads it."""
    texts = list(dict.fromkeys(texts))
    encoder = PromptEncoder(models, clip_skip)
    states = {}
    for start in range(0, len(texts), 256):
        chunk = texts[start : start + 256]
        hidden = encoder.encode(chunk).hidden_states.double()
        states.update({text: hidden[i] for i, text in enumerate(chunk)})
    return states


def last_word(models: LoadedModels, text: str) -> int:
    """The position of a prompt's last token before the end token (start token at 0), in the prompt
    as the text encoder reads it: cut at the tokenizer's length (the states past it do not exist)."""
    tokenizer = models.tokenizers[0]
    ids = tokenizer(text, truncation=True, max_length=tokenizer.model_max_length).input_ids
    return max(1, len(ids) - 2)


def aligned_states(
    models: LoadedModels, states: dict[str, Tensor], erased: list[str], guides: list[str]
) -> tuple[Tensor, Tensor]:
    """Erased and guide states from each one's last word on, cut to a common length."""
    erase_rows, guide_rows = [], []
    for text, guide in zip(erased, guides, strict=True):
        a, b = last_word(models, text), last_word(models, guide)
        length = states[text].shape[0] - max(a, b)
        erase_rows.append(states[text][a : a + length])
        guide_rows.append(states[guide][b : b + length])
    return torch.cat(erase_rows), torch.cat(guide_rows)


@torch.no_grad()
def solve_into(
    network: LoRANetwork, erase: Tensor, guide: Tensor, keep: Tensor, config: LecoConfig
) -> dict[str, float]:
    """Write each layer's rank-r edit into the LoRA; returns how much of the edit the rank keeps."""
    settings = config.closed_form
    dim = erase.shape[1]
    gram = settings.regularization * torch.eye(dim, dtype=torch.float64) + erase.T @ erase
    if len(keep):
        gram += settings.preserve_scale * keep.T @ keep
    # W - W0 = W0 M with M = (C_ge - C_ee) gram^-1 = ((gram^-1) E^T (G - E))^T, gram being symmetric;
    # the same M serves every layer, since all of them read the same text states.
    shift = torch.linalg.solve(gram, erase.T @ (guide - erase)).T
    kept_energy, total_energy = 0.0, 0.0
    rank = config.network.rank
    for layer in network.layers.values():
        base = layer.get_base_layer().weight.double()
        delta = base @ shift
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        kept = min(rank, len(s))  # a rank above the layer's own leaves the rest at zero
        up, down = layer.lora_B["leco"].weight, layer.lora_A["leco"].weight
        up.zero_()
        down.zero_()
        up[:, :kept] = (u[:, :kept] * s[:kept]).float()
        down[:kept] = vh[:kept].float()
        kept_energy += float((s[:rank] ** 2).sum())
        total_energy += float((s**2).sum())
    return {"rank_share": kept_energy / max(total_energy, 1e-30), "erased_states": float(len(erase))}
