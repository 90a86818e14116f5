"""`leco merge`: bake LoRAs at given strengths into a model and save it as a checkpoint or a folder.

The weight change of each module is kohya's merge_lora math (`leco.network.kohya.delta_weight`),
times the strength (negative strengths invert the edit). LoRAs are read as `LoRANetwork.from_file`
reads them: kohya files, p1atdev/LECO and sliders files, text-encoder modules included.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save as safetensors_bytes

from leco.config import PretrainedModelConfig, typed_float
from leco.errors import LecoError, check_flags, warn
from leco.files import (
    atomic_folder,
    atomic_output,
    check_output,
    is_empty_folder,
    path_exists,
    safetensors_metadata,
)
from leco.ink_digits.judge import BUILD_REPORT, JUDGE_FILE, trained_inks
from leco.interop.original_layout import original_state_dict
from leco.models import (
    BUNDLED_MODELS,
    CARD_BEFORE_DISTILLATION,
    CLI_OPTION_NAMES,
    CONFIG_ROOT,
    MODEL_CARD,
    SAMPLING_BEFORE_DISTILLATION,
    SAMPLING_METADATA,
    V_PREDICTION_MARKER,
    ZERO_SNR_MARKER,
    LoadedModels,
    SamplingDefaults,
    load_models,
    recommended_sampling,
    resolve_bundled,
    sampling_before_distillation,
    single_file_sampling,
)
from leco.network import kohya
from leco.network.text_encoders import TextEncoderLoRA
from leco.preservation import KNOWN_PROMPTS_FILE

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
FOLDER_METADATA = "modelspec.json"  # diffusers folders have no header: the same keys go in this file
MERGE_FILES = "leco.merge_files"  # in FOLDER_METADATA: the top-level names a merge wrote
DISTILLATION_NOTE = "**Merged with a CFG-distilled LoRA"  # a distilled merge's card opens so (not its undo)


@dataclass(frozen=True)
class LoraStrength:
    path: Path
    strength: float = 1.0

    @property
    def title(self) -> str:
        return self.path.stem


def _as_lora_strength(lora: LoraStrength | str | os.PathLike) -> LoraStrength:
    """What Python callers give merge: LoraStrength, or a path (`FILE:STRENGTH` too, as --lora)."""
    if isinstance(lora, LoraStrength):
        return LoraStrength(Path(lora.path), lora.strength)
    if isinstance(lora, os.PathLike):
        return LoraStrength(Path(lora))
    if isinstance(lora, str):
        return parse_lora_argument(lora)
    raise LecoError(
        f"loras: {lora!r}; give LoRA files (paths, FILE:STRENGTH) or LoraStrength(path, strength)"
    )


def parse_lora_argument(text: str) -> LoraStrength:
    """`FILE` or `FILE:STRENGTH` (e.g. `erase.safetensors:-0.5`); a Windows drive colon is no strength."""
    path, sep, strength = text.rpartition(":")
    if sep and path:
        try:
            value = typed_float(strength)
        except ValueError:
            if Path(path).is_file() and not Path(text).exists():
                raise LecoError(
                    f"--lora: strength {strength!r} in {text!r} is not a number; write FILE:STRENGTH, "
                    f"e.g. {path}:0.5"
                ) from None
            return LoraStrength(Path(text))
        if not math.isfinite(value):
            raise LecoError(f"--lora: strength {strength!r} in {text!r} is not a finite number")
        if Path(text).is_file() and not Path(path).exists():  # a file whose name ends in ":0.5"
            raise LecoError(
                f"--lora: {text!r} reads as the file {path} at strength {strength}, and there is no such "
                f"file (there is one named {text}); give its strength after it: {text}:1"
            )
        return LoraStrength(Path(path), value)
    return LoraStrength(Path(text))


@torch.no_grad()
def bake(models: LoadedModels, lora: LoraStrength) -> None:
    """Add one LoRA's weight changes, times its strength, to the UNet and text encoders in place."""
    source = str(lora.path)
    tensors, metadata = kohya.read_lora_file(lora.path, models.family)
    unet_tensors, text_tensors = kohya.split_by_model(tensors, source)
    text_lora = TextEncoderLoRA(text_tensors, source)
    with kohya.naming_its_model(metadata, models.source):  # every key checked before any weight changes
        modules = kohya.canonical_unet_modules(unet_tensors, models.unet, models.family, source)
        text_lora.fitted(models.text_encoders, models.family)
    mislabelled = kohya.mislabelled_family(metadata, models.family)
    if mislabelled:
        warn(f"--lora: {lora.path}: {mislabelled}")
    other = kohya.other_prediction(metadata, models.family)
    if other:
        warn(f"--lora: {lora.path} {other}")
    layers = kohya.unet_layer_keys(models.unet, models.family)
    for key, weights in modules.items():
        weight = models.unet.get_submodule(layers[key]).weight
        weight += lora.strength * kohya.delta_weight(weights, weight.shape).to(weight.dtype)
    text_lora.merge_into(models.text_encoders, models.family, lora.strength)


def merge(
    model: PretrainedModelConfig | str | Path,
    loras: Sequence[LoraStrength | str | Path] | LoraStrength | str | Path,
    out: str | Path,
    *,
    precision: str = "fp16",
    overwrite: bool = False,
) -> Path:
    """Load `model`, bake `loras` into it (fp32 math) and write `out` in `precision`.

    `out` ending in .safetensors is a single-file checkpoint in the original layout; any other
    path is a diffusers folder. An existing `out` is replaced only with `overwrite`.
    """
    check_flags(overwrite=overwrite)
    spec = (
        PretrainedModelConfig(name_or_path=os.fspath(model))
        if isinstance(model, (str, os.PathLike))
        else model
    )
    if not isinstance(spec, PretrainedModelConfig):
        raise LecoError(f"model: a {type(spec).__name__}; give a path, a repo id or a PretrainedModelConfig")
    loras = [
        _as_lora_strength(lora)
        for lora in ([loras] if isinstance(loras, (str, os.PathLike, LoraStrength)) else loras)
    ]
    model_path = resolve_bundled(spec.name_or_path)
    inputs = [lora.path for lora in loras] + ([model_path] if path_exists(model_path) else [])
    out = _check_output(Path(out), overwrite, inputs)
    if precision not in PRECISIONS:
        raise LecoError(f"--precision: {precision!r} is not known; use one of {', '.join(PRECISIONS)}")
    if not loras:
        raise LecoError("--lora: give at least one LoRA to merge (FILE or FILE:STRENGTH)")
    for lora in loras:  # unreadable files fail before the (slow) model load
        try:
            kohya.split_by_model(kohya.read_lora_file(lora.path)[0], str(lora.path))
        except LecoError as error:
            raise LecoError(f"--lora: {error}") from None
    _warn_of_repeats(loras)
    _warn_of_clip_skips(loras)
    models = load_models(spec, dtype=torch.float32, with_vae=True, names=CLI_OPTION_NAMES)
    for index, lora in enumerate(loras):
        try:
            bake(models, lora)
        except LecoError as error:
            if index and kohya.ANOTHER_MODEL in str(error):  # the model it names would refuse the first
                raise LecoError(
                    f"{error} ({loras[0].path} fits --model {spec.name_or_path}: LoRAs made for different "
                    "models cannot be merged into one; merge each into its own model)"
                ) from None
            raise
    _check_finite(models, PRECISIONS[precision], loras)
    metadata = merge_metadata(models, spec.name_or_path, loras, out)
    merged = _sampling_after_merge(models, loras)
    if _is_single_file(out):
        _warn_if_layout_is_its_own(models, spec.name_or_path)
        if merged.sampling is not None:
            metadata[SAMPLING_METADATA] = json.dumps(merged.sampling.as_card_parameters())
        if merged.before is not None:
            metadata[SAMPLING_BEFORE_DISTILLATION] = json.dumps(merged.before.as_card_parameters())
        return _save_single_file(models, out, metadata, PRECISIONS[precision])
    return _save_folder(models, out, metadata, PRECISIONS[precision], merged)


@dataclass(frozen=True)
class MergedSampling:
    """How the merged model is to be sampled, where that is not its card's."""

    sampling: SamplingDefaults | None  # what it recommends; None: its card (or config folder's) holds
    distilled: bool = False  # a CFG-distilled LoRA is baked in: it guides itself
    before: SamplingDefaults | None = None  # distilled: what it recommended before, for an undo


def _sampling_after_merge(models: LoadedModels, loras: Sequence[LoraStrength]) -> MergedSampling:
    """The merged model's recommended sampling where it is not its card's: guidance 1 where a
    CFG-distilled LoRA is baked in at a positive strength (the model then guides itself), what it
    recommended before where one is baked out of a distilled merge, or what a single file merged
    into declared (a distilled merge merged again)."""
    from leco.lora_files import distillation_of

    inherited = single_file_sampling(models)
    before = sampling_before_distillation(models)  # a distilled merge's record of it
    found = [(lora, distillation_of(lora.path)) for lora in loras if lora.strength != 0]
    distilled = [(lora, d) for lora, d in found if d is not None]
    for lora in {lora.path.resolve(): lora for lora, d in distilled if d.mixed}.values():  # each file once
        warn(
            f"--lora {lora.path.name}: partly CFG-distilled (with entries trained for guided sampling): "
            "the merged model keeps the model's recommended guidance; its distill entries work at 1"
        )
    # A file given more than once is baked at its summed strength: judged, and said, once at that.
    net: dict[Path, float] = {}
    first_of: dict[Path, tuple] = {}  # (the first LoraStrength, its Distillation)
    for lora, distillation in distilled:
        if not distillation.mixed:
            file = lora.path.resolve()
            net[file] = net.get(file, 0.0) + lora.strength
            first_of.setdefault(file, (lora, distillation))
    whole = [(*first_of[file], strength) for file, strength in net.items() if strength > 0]
    undone = [(first_of[file][0], strength) for file, strength in net.items() if strength < 0]
    # A distilled merge with distillation taken out again guides as it did before (as recorded;
    # a single file merged by a release that kept no record: as its card says).
    after_undoing = before or (None if inherited is not None and inherited.guidance == 1 else inherited)
    outcome = ""  # with another file distilling it, the merged model follows that one (below)
    if undone and not whole:  # the card read once, however many files are baked out
        guidance = (after_undoing or recommended_sampling(models.folder)).guidance
        outcome = f"; the merged model is sampled at guidance {guidance:g}, the model's recommended"
    for lora, strength in undone:
        warn(
            f"--lora {lora.path.name}: CFG-distilled, baked at strength {strength:g}: that undoes "
            f"distillation rather than adding it{outcome}"
        )
    if not whole:
        if undone:
            return MergedSampling(after_undoing)
        # a distilled merge merged again stays distilled, said in whichever form it is written
        # (one from a release that kept no record: its guidance 1 says so)
        distilled = before is not None or (inherited is not None and inherited.guidance == 1)
        return MergedSampling(
            inherited or (recommended_sampling(models.folder) if before else None), distilled, before
        )
    for lora, distillation, strength in whole:
        share = ""
        if strength < 1:
            share = f"; at strength {strength:g} it is distilled only in part"
        elif strength > 1:
            share = f"; at strength {strength:g} it goes past the guidance it was trained for"
        warn(
            f"--lora {lora.path.name}: CFG-distilled (at guidance 1 it draws what the model draws at "
            f"{distillation.reproduces()}): the merged model recommends guidance 1 (leco generate and eval "
            f"default to it){share}"
        )
    # the steps the model as loaded recommends (sampling_for, without reading the file a second time)
    as_loaded = inherited or recommended_sampling(models.folder)
    if before is None and as_loaded.guidance != 1:  # (1: distilled by a release that kept no record)
        before = as_loaded
    return MergedSampling(SamplingDefaults(as_loaded.steps, 1.0), True, before)


def _warn_of_clip_skips(loras: Sequence[LoraStrength]) -> None:
    """A LoRA trained at another clip skip shows its effect only sampled that way, and a model's
    weights cannot say which layer to read: the user must (leco generate reads it from the LoRA)."""
    from leco.lora_files import trained_clip_skip

    for lora in loras:
        skip = trained_clip_skip(lora.path)
        if lora.strength != 0 and skip is not None and skip != 1:
            warn(
                f"--lora {lora.path.name}: trained with clip skip {skip}, which the merged weights cannot "
                f"carry: sample the merged model with --clip-skip {skip} (A1111, ComfyUI: clip skip {skip})"
            )


def _warn_of_repeats(loras: Sequence[LoraStrength]) -> None:
    """The same file twice is baked twice (its strengths add up), and strength 0 bakes nothing:
    allowed, but rarely meant."""
    strengths: dict[Path, list[float]] = {}
    for lora in loras:
        strengths.setdefault(lora.path.resolve(), []).append(lora.strength)
    for lora in loras:
        if lora.strength == 0:
            warn(f"--lora: {lora.path.name} at strength 0 changes nothing; it is left out of the weights")
    for path, given in strengths.items():
        if len(given) > 1:
            total = kohya.metadata_number(sum(given))
            warn(f"--lora: {path.name} is given {len(given)} times; it is baked at strength {total} in all")


def merge_metadata(
    models: LoadedModels, model_name: str, loras: Sequence[LoraStrength], out: Path
) -> dict[str, str]:
    """ModelSpec keys of the merged checkpoint; `merged_from` lists the model and each LoRA:strength."""
    implementation = kohya.STABILITY_IMPLEMENTATION if _is_single_file(out) else "diffusers"
    metadata = kohya.modelspec_metadata(
        models.family, models.resolution, kohya.model_architecture(models.family), implementation
    )
    base_title = Path(model_name.rstrip("/")).stem or model_name
    titles = {lora.path.resolve(): _lora_title(lora) for lora in loras}  # each file's header read once
    names = [_distinct_name(lora, loras, titles) for lora in loras]
    merged_from = [base_title] + [
        f"{name}:{kohya.metadata_number(lora.strength)}" for lora, name in zip(loras, names, strict=True)
    ]
    metadata["modelspec.title"] = out.stem
    metadata["modelspec.merged_from"] = ", ".join(merged_from)
    metadata["leco.merge"] = kohya.json_metadata(
        {"model": base_title, "loras": [{"file": x.path.name, "strength": x.strength} for x in loras]}
    )
    return metadata


def _distinct_name(lora: LoraStrength, loras: Sequence[LoraStrength], titles: dict[Path, str]) -> str:
    """The LoRA's title; its file name where another file has that title (two runs of one config),
    with its folder where the file names are alike too (run1/lora, run2/lora)."""
    others = [other for other in loras if other.path.resolve() != lora.path.resolve()]
    title = titles[lora.path.resolve()]
    if all(titles[other.path.resolve()] != title for other in others):
        return title
    if all(other.path.stem != lora.path.stem for other in others):
        return lora.path.stem
    return f"{lora.path.parent.name}/{lora.path.stem}"


def _lora_title(lora: LoraStrength) -> str:
    # the header alone (a .pt LoRA has no metadata): the tensors were read and checked already
    return safetensors_metadata(lora.path).get("modelspec.title") or lora.title


def _check_finite(models: LoadedModels, dtype: torch.dtype, loras: Sequence[LoraStrength]) -> None:
    """A strength far too large overflows weights (to inf, or in fp16 past 65504): say so, write nothing."""
    for module in (models.unet, *models.text_encoders):
        for name, weight in module.named_parameters():
            if not weight.detach().to(dtype).isfinite().all():
                strengths = ", ".join(f"{lora.path.name}:{lora.strength:g}" for lora in loras)
                raise LecoError(
                    f"--lora: merging {strengths} makes {name} overflow in {dtype}; use strengths of "
                    "a usual size (about -2 to 2)"
                )


def _is_single_file(out: Path) -> bool:
    return out.suffix.lower() == ".safetensors"


def _check_output(out: Path, overwrite: bool, inputs: Sequence[Path]) -> Path:
    if out.suffix.lower() in kohya.PICKLED_LORA_SUFFIXES:
        raise LecoError(f"--out: {out} would be a pickle; write a .safetensors file or a folder path")
    out = check_output(out, overwrite=overwrite, inputs=inputs, folder_marker=FOLDER_METADATA)
    if out.exists() and out.is_dir() == _is_single_file(out):
        kind = "folder" if out.is_dir() else "file"
        raise LecoError(f"--out: {out} is a {kind}; --overwrite replaces like with like only")
    if out.is_file() and "leco.merge" not in safetensors_metadata(out):
        raise LecoError(
            f"--out: {out} is not a model leco merge wrote (a LoRA, or another program's file); --overwrite "
            "replaces only such an output, so choose another path"
        )
    if out.is_dir() and not is_empty_folder(out) and "leco.merge" not in _folder_metadata(out):
        # a model_index.json alone says diffusers, not leco merge: it may be the user's own model
        raise LecoError(
            f"--out: {out} is not a model folder leco merge wrote (its {FOLDER_METADATA} has no leco.merge); "
            "--overwrite replaces only such an output, so choose a new or empty folder"
        )
    return out


def _folder_metadata(folder: Path) -> dict:
    try:
        metadata = json.loads((folder / FOLDER_METADATA).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return metadata if isinstance(metadata, dict) else {}


def _save_single_file(models: LoadedModels, out: Path, metadata: dict[str, str], dtype: torch.dtype) -> Path:
    state = original_state_dict(models, dtype)
    # What the model predicts, as the keys ComfyUI reads (an SDXL file without them is epsilon there)
    if models.family.v_pred:
        state[V_PREDICTION_MARKER] = torch.tensor([])
    if models.scheduler_config.get("rescale_betas_zero_snr"):
        state[ZERO_SNR_MARKER] = torch.tensor([])
    with atomic_output(out) as file:
        file.write(safetensors_bytes(state, metadata))
    return out


def _save_folder(
    models: LoadedModels,
    out: Path,
    metadata: dict[str, str],
    dtype: torch.dtype,
    merged: MergedSampling | None = None,
) -> Path:
    from leco.generate import build_pipeline

    for module in (models.unet, models.vae, *models.text_encoders):
        module.to(dtype)
    pipe = build_pipeline(models)
    with atomic_folder(out) as staging:
        pipe.save_pretrained(staging)
        _copy_model_files(Path(models.folder), staging)  # a single file's: its config folder's
        if merged is not None and merged.sampling is not None:
            _recommend_in_card(staging / MODEL_CARD, merged)
        written = sorted({entry.name for entry in staging.iterdir()} | {FOLDER_METADATA})
        # What this merge wrote, so that an --overwrite later replaces that and nothing else.
        metadata = {**metadata, MERGE_FILES: json.dumps(written)}
        (staging / FOLDER_METADATA).write_text(json.dumps(metadata, indent=2, sort_keys=True) + "\n")
        for kept in _not_written_by_merge(out, written):  # --overwrite replaces only what merge wrote
            _link_or_copy(kept, staging / kept.name)
    return out


def _not_written_by_merge(folder: Path, written_now: list[str]) -> list[Path]:
    """What the user put into an earlier merge's folder: anything neither that merge nor this one
    wrote (a merge before leco recorded its files: its model_index.json components and the files
    merge writes beside them)."""
    if not folder.is_dir():
        return []
    try:
        written = set(json.loads(_folder_metadata(folder)[MERGE_FILES]))
    except (KeyError, TypeError, ValueError):
        try:
            index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            index = {}
        written = (
            {name for name, value in index.items() if isinstance(value, list)}
            if isinstance(index, dict)
            else set()
        )
        written |= {
            "model_index.json",
            FOLDER_METADATA,
            MODEL_CARD,
            KNOWN_PROMPTS_FILE,
            JUDGE_FILE,
            BUILD_REPORT,
        }
    return sorted(entry for entry in folder.iterdir() if entry.name not in written | set(written_now))


def _link_or_copy(source: Path, target: Path) -> None:
    """Kept files are hard-linked into the new folder where the file system allows (no second copy
    of a large samples folder on the disk), else copied."""

    def link(one: str, other: str) -> None:
        try:
            os.link(one, other)
        except OSError:
            shutil.copy2(one, other)

    try:
        if source.is_dir() and not source.is_symlink():
            shutil.copytree(source, target, symlinks=True, copy_function=link)
        else:
            link(str(source), str(target))
    except OSError as error:
        raise LecoError(
            f"--out: cannot keep {source} in the new folder ({error.strerror or error}); nothing was replaced"
        ) from None


def _copy_model_files(source: Path, staging: Path) -> None:
    """The files leco reads from a model folder beside its weights, which save_pretrained does not
    write: the model card (recommended steps and guidance), the prompt list (automatic anchors,
    `keep: all`) and the ink-digits judge. Without them the merged folder samples with generic
    settings and anchors, silently. Nothing else is copied: a folder may also hold the unmerged
    weights as a single file, which must not come along. Of an ink-digits build report only the inks
    the model draws carry over (what `keep: all` judges); its timings and quality were the source's."""
    for name in (MODEL_CARD, KNOWN_PROMPTS_FILE, JUDGE_FILE):
        if (source / name).is_file():
            shutil.copy2(source / name, staging / name)
    try:
        inks = trained_inks(source)
    except LecoError:  # not an ink-digits build: nothing to carry over
        return
    report = {"inks": list(inks), "merged_from": str(source)}
    (staging / BUILD_REPORT).write_text(json.dumps(report, indent=2) + "\n")


def _recommend_in_card(card_path: Path, merged: MergedSampling) -> None:
    """The card's recommended steps and guidance (the Hub widget's front matter, which leco reads).
    Distilled: with a line above the source's text, whose own recommendation no longer holds, and
    the card's `inference` as it was kept for an undo; distillation baked out again: that restored."""
    from huggingface_hub import ModelCard
    from huggingface_hub.utils import logging as hub_logging

    saved = hub_logging.get_verbosity()
    hub_logging.set_verbosity_error()  # a card without front matter is no fault here, as the hub logs it
    try:
        card = ModelCard.load(card_path) if card_path.is_file() else ModelCard("")
    finally:
        hub_logging.set_verbosity(saved)
    sampling, record = merged.sampling, card.data.get(CARD_BEFORE_DISTILLATION)
    text = _without_distillation_note(card.text.lstrip("\n"))
    if not merged.distilled:
        if isinstance(record, dict):  # the source's own inference settings, whatever they held
            card.data.pop(CARD_BEFORE_DISTILLATION)
            card.data.pop("inference", None)
            if record.get("inference") is not None:
                card.data.inference = record["inference"]
        else:
            card.data.inference = {"parameters": sampling.as_card_parameters()}
        card.text = f"\n{text}"  # as the hub writes a card: a blank line below the front matter
        card.save(card_path)
        return
    if merged.before is not None and not isinstance(record, dict):
        original = card.data.get("inference")
        card.data[CARD_BEFORE_DISTILLATION] = {
            "recommended": merged.before.as_card_parameters(),
            "inference": original,
        }
    card.data.inference = {"parameters": sampling.as_card_parameters()}
    note = f"{DISTILLATION_NOTE}: sample at guidance {sampling.guidance:g}, {sampling.steps} steps**" + (
        " (what follows describes the model it was merged into)" if text.strip() else ""
    )
    card.text = f"{note}.\n\n{text}" if text.strip() else f"{note}.\n"
    card.save(card_path)


def _without_distillation_note(text: str) -> str:
    """A card's text without the line an earlier distilled merge put above it."""
    first, _, rest = text.partition("\n")
    return rest.lstrip("\n") if first.startswith(DISTILLATION_NOTE) else text


def _warn_if_layout_is_its_own(models: LoadedModels, name: str) -> None:
    # A single file carries weights, not the UNet's shape: loaders rebuild it from the family's
    # standard configuration, which a small model of its own layout (ink-digits) does not fit.
    standard = json.loads((CONFIG_ROOT / models.family.arch / "unet" / "config.json").read_text())
    keys = ("block_out_channels", "cross_attention_dim", "layers_per_block")
    if any(_as_list(models.unet.config.get(k)) != _as_list(standard.get(k)) for k in keys):
        # A bundled model, or a file leco recognised as one of their layouts when it loaded it.
        bundled = {resolve_bundled(known).resolve() for known in BUNDLED_MODELS}
        where = (
            "leco reads it back (it knows the bundled layouts); other tools need"
            if Path(models.folder).resolve() in bundled
            else "leco needs pretrained_model.config, other tools"
        )
        warn(
            f"{name} is not laid out as a standard {models.family.arch} model, and a single file does "
            f"not carry its layout: {where} the model's folder as config (diffusers' "
            "from_single_file(config=...)); a folder (--out without .safetensors) loads anywhere"
        )


def _as_list(value: object) -> object:
    return list(value) if isinstance(value, list | tuple) else value
