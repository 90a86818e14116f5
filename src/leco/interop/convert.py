"""`leco convert`: LoRAs other trainers wrote -> kohya files with our metadata.

p1atdev/LECO (.safetensors) and rohitgandikota/sliders (.pt state dicts, read weights-only) write
`lora_unet_<diffusers module path>` keys with no metadata. For SD1/SD2 those are kohya's names
already; for SDXL they are mapped to the SGM names A1111 and ComfyUI expect. A key that names no
layer of the model is an error, never dropped. The output gets the `ss_*`, ModelSpec and
additional-networks hash metadata that A1111 needs to show the file for the right model.

`--sd2-proj 4d` writes SD2's proj_in/proj_out as 1x1-conv (4-D) tensors, the form kohya's
scripts build for SD2 checkpoints; diffusers needs the default 2-D form (see README).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from accelerate import init_empty_weights
from diffusers import UNet2DConditionModel
from safetensors import safe_open
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from leco.errors import LecoError, check_flags, warn
from leco.files import check_output
from leco.models import (
    CLI_OPTION_NAMES,
    CONFIG_ROOT,
    ModelFamily,
    arch_from_unet_config,
    load_models,
    resolve_bundled,
    says_v_prediction,
)
from leco.network import kohya
from leco.network.text_encoders import TextEncoderLoRA

FAMILIES = {
    "sd1": ModelFamily("sd1"),
    "sd2": ModelFamily("sd2"),
    "sd2-v": ModelFamily("sd2", v_pred=True),
    "sdxl": ModelFamily("sdxl"),
}
SD2_PROJ_FORMS = ("2d", "4d")
# Written for the output, never copied: hashes of its tensors, the form its SD2 tensors take, and
# diffusers' PEFT config of a file in its layout (diffusers would read it instead of the alphas).
_RECOMPUTED = (
    "sshs_model_hash",
    "sshs_legacy_hash",
    "modelspec.hash_sha256",
    "leco.sd2_proj",
    "lora_adapter_metadata",
)


@dataclass
class ModelSkeleton:
    """What a conversion checks names and shapes against: the modules, not their weights."""

    family: ModelFamily
    unet: nn.Module
    text_encoders: list[nn.Module]
    resolution: int


def _is_lora_file(path: Path) -> bool:
    try:
        with safe_open(str(path), framework="pt") as file:
            return any(".lora_" in key or key.endswith(".alpha") for key in file.keys())  # noqa: SIM118
    except Exception:  # not a safetensors file at all: safetensors raises its own error types
        return False


def convert(
    source: str | Path,
    out: str | Path,
    *,
    model: str | None = None,
    family: str | None = None,
    sd2_proj: str = "2d",
    overwrite: bool = False,
) -> Path:
    """Write `source` (any kohya-style LoRA file) as a kohya file with full metadata at `out`."""
    check_flags(overwrite=overwrite)
    source, out = Path(source), Path(out)
    if out.suffix.lower() != ".safetensors":
        raise LecoError(f"--out: {out} must end in .safetensors (the LoRA format A1111 and ComfyUI load)")
    if out.is_dir():
        raise LecoError(f"--out: {out} is a folder; name the .safetensors file to write")
    out = check_output(out, overwrite=overwrite, inputs=[source])
    if out.is_file() and not _is_lora_file(out):
        raise LecoError(
            f"--out: {out} is not a LoRA (a model, an embedding, or another program's file); --overwrite "
            "replaces only a LoRA, so choose another path"
        )
    if sd2_proj not in SD2_PROJ_FORMS:
        raise LecoError(f"--sd2-proj: {sd2_proj!r} is not known; use 2d or 4d")
    if model is None and family is None:  # what is wrong with the file itself comes first
        kohya.split_by_model(kohya.read_lora_file(source)[0], str(source))
    skeleton = model_skeleton(model, family)
    if sd2_proj == "4d" and skeleton.family.arch != "sd2":
        raise LecoError(
            f"--sd2-proj 4d: only for SD2, whose Linear proj_in/proj_out kohya's SD2 scripts build as 1x1 "
            f"convs; this is {skeleton.family.name}"
        )

    tensors, metadata = kohya.read_lora_file(source, skeleton.family)
    unet_tensors, text_tensors = kohya.split_by_model(tensors, str(source))
    with kohya.naming_its_model(metadata, model):
        unet_modules = kohya.canonical_unet_modules(unet_tensors, skeleton.unet, skeleton.family, str(source))
        text_modules = TextEncoderLoRA(text_tensors, str(source)).fitted(
            skeleton.text_encoders, skeleton.family
        )
    _warn_of_other_model_in_metadata(metadata, skeleton.family, source)
    if sd2_proj == "4d":
        projections = [key for key in unet_modules if key.endswith(("_proj_in", "_proj_out"))]
        if not projections:  # a text-encoder LoRA, or one trained on the cross-attention alone
            warn(f"--sd2-proj 4d: {source} has no proj_in/proj_out; written as it is")
            sd2_proj = "2d"
        unet_modules = {key: _as_conv(key, weights) for key, weights in unet_modules.items()}
    output = kohya.flatten_modules(unet_modules) | kohya.flatten_modules(text_modules)
    new_metadata = {k: v for k, v in metadata.items() if k not in _RECOMPUTED}
    said = (metadata.get("ss_network_dim"), metadata.get("ss_network_alpha"))
    new_metadata.update(lora_metadata(unet_modules | text_modules, skeleton, out.stem, said))
    for key in ("modelspec.title", "modelspec.date"):  # the same LoRA in another form: its name and date
        if metadata.get(key):
            new_metadata[key] = metadata[key]
    new_metadata["leco.converted_from"] = source.name
    if sd2_proj == "4d":
        new_metadata["leco.sd2_proj"] = "4d"
    return kohya.save_lora_file(out, output, new_metadata)


def _warn_of_other_model_in_metadata(metadata: dict[str, str], family: ModelFamily, source: Path) -> None:
    # The converted file's metadata is written for `family`: what the source said otherwise is told,
    # as generate and merge tell it, not replaced without a word.
    mislabelled = kohya.mislabelled_family(metadata, family)
    if mislabelled:
        warn(f"{source}: {mislabelled.removesuffix('; applied')}; written as {family.name}")
    other = kohya.other_prediction(metadata, family)
    if other:
        warn(f"{source} {other}; written as {family.prediction_type}")


def lora_metadata(
    modules: dict[str, kohya.ModuleWeights],
    skeleton: ModelSkeleton,
    title: str,
    said: tuple[str | None, str | None] = (None, None),
) -> dict[str, str]:
    """ss_* and ModelSpec keys, with rank and alpha read from the tensors: the most common pair, and
    of pairs as common the one the file `said` (its ss_network_dim and ss_network_alpha)."""
    convs = {k: w for k, w in modules.items() if w.down.ndim == 4 and w.down.shape[2:] != (1, 1)}
    plain = [(w.rank, w.alpha) for k, w in modules.items() if k not in convs]
    counts = Counter(plain or [(w.rank, w.alpha) for w in convs.values()]).most_common()
    tied = [pair for pair, count in counts if count == counts[0][1]]
    rank, alpha = next((pair for pair in tied if _is_said(pair, said)), tied[0])
    args = {}
    if convs:
        (conv_rank, conv_alpha), _ = Counter((w.rank, w.alpha) for w in convs.values()).most_common(1)[0]
        args = {"conv_dim": str(conv_rank), "conv_alpha": kohya.metadata_number(conv_alpha)}
    return {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": kohya.metadata_number(alpha),
        "ss_network_args": kohya.json_metadata(args),
        "ss_output_name": title,
        **kohya.family_metadata(skeleton.family, skeleton.resolution),
        "modelspec.title": title,
    }


def model_skeleton(model: str | None, family: str | None) -> ModelSkeleton:
    """The family's modules on the meta device (no weights), from --family or the --model's configs."""
    if model is not None and family is not None:
        raise LecoError(
            "convert: give --model or --family, not both (--model reads the family from the model)"
        )
    if model is None and family is None:
        raise LecoError(
            "convert: give the model the LoRA is for, either --model M or --family sd1|sd2|sd2-v|sdxl"
        )
    if family is not None:
        if family not in FAMILIES:
            raise LecoError(f"--family: {family!r} is not known; use one of {', '.join(FAMILIES)}")
        return _skeleton_from_configs(CONFIG_ROOT / family, FAMILIES[family])
    folder = resolve_bundled(model)
    if (folder / "unet" / "config.json").is_file():
        unet_config = json.loads((folder / "unet" / "config.json").read_text())
        scheduler_file = folder / "scheduler" / "scheduler_config.json"
        try:
            scheduler = json.loads(scheduler_file.read_text())
        except (OSError, ValueError) as error:
            raise LecoError(
                f"--model: {scheduler_file} cannot be read ({error}); is {folder} a whole model folder?"
            ) from None
        v_pred = says_v_prediction(scheduler, scheduler_file)
        return _skeleton_from_configs(folder, ModelFamily(arch_from_unet_config(unet_config), v_pred))
    # A single file or a repo id: only the weights tell the family.
    models = load_models(model, names=CLI_OPTION_NAMES)
    return ModelSkeleton(models.family, models.unet, models.text_encoders, models.resolution)


def _skeleton_from_configs(folder: Path, family: ModelFamily) -> ModelSkeleton:
    encoders = [("text_encoder", CLIPTextModel)]
    if family.is_sdxl:
        encoders.append(("text_encoder_2", CLIPTextModelWithProjection))
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder, subfolder="unet"))
        text_encoders = [cls(CLIPTextConfig.from_pretrained(folder, subfolder=sub)) for sub, cls in encoders]
    vae_config = json.loads((folder / "vae" / "config.json").read_text())
    resolution = unet.config.sample_size * 2 ** (len(vae_config["block_out_channels"]) - 1)
    return ModelSkeleton(family, unet, text_encoders, resolution)


def _as_conv(key: str, weights: kohya.ModuleWeights) -> kohya.ModuleWeights:
    if not key.endswith(("_proj_in", "_proj_out")) or weights.down.ndim != 2:
        return weights
    return kohya.ModuleWeights(weights.down[:, :, None, None], weights.up[:, :, None, None], weights.alpha)


def _is_said(pair: tuple[int, float], said: tuple[str | None, str | None]) -> bool:
    try:
        return said[0] is not None and int(said[0]) == pair[0] and float(said[1] or "nan") == pair[1]
    except ValueError:  # metadata another tool wrote as it liked
        return False
