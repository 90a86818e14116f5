"""The kohya LoRA `.safetensors` format that A1111, ComfyUI and diffusers load.

Keys: `lora_unet_<module path with _>.{lora_down.weight, lora_up.weight, alpha}`; SD1/SD2 use
diffusers module paths, SDXL the SGM paths (as kohya's own SDXL trainer writes them). Metadata
values are strings; A1111 shows a file only for the family `ss_base_model_version` names.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes
from torch import nn

from leco._version import __version__
from leco.config import read_config_text
from leco.errors import LecoError, first_line, warn
from leco.files import atomic_output, load_torch_file
from leco.models import ModelFamily, is_embedding, model_name, modelspec_v_prediction
from leco.network.layers import OUTSIDE_BLOCKS, adaptable_layers
from leco.network.peft_format import KOHYA_PREFIXES, as_kohya, is_diffusers_layout
from leco.network.sgm_names import to_sgm_name

UNET_PREFIX, TEXT_ENCODER_PREFIXES = KOHYA_PREFIXES[0], KOHYA_PREFIXES[1:]
IMPLEMENTATION_VERSION = f"leco/{__version__}"
STABILITY_IMPLEMENTATION = "https://github.com/Stability-AI/generative-models"
_PARTS = ("lora_down.weight", "lora_up.weight", "alpha")
PICKLED_LORA_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")
_LEGACY_HASH_START, _LEGACY_HASH_END = 0x100000, 0x110000
_PLACEHOLDER_HASH = "0" * 8
ANOTHER_MODEL = "the LoRA was trained for another model"  # what a file that does not fit the model says


class LoraDoesNotFit(LecoError):
    """A LoRA file whose layers or shapes are not this model's."""


def kohya_key(module_name: str, family: ModelFamily, unet_config: dict[str, Any]) -> str:
    path = to_sgm_name(module_name, unet_config) if family.is_sdxl else module_name
    return UNET_PREFIX + path.replace(".", "_")


def model_architecture(family: ModelFamily) -> str:
    """The ModelSpec architecture of a family's models; LoRAs for it add "/lora"."""
    if family.arch == "sdxl":
        return "stable-diffusion-xl-v1-base"
    if family.arch == "sd2":
        return "stable-diffusion-v2-768-v" if family.v_pred else "stable-diffusion-v2-512"
    return "stable-diffusion-v1"


def modelspec_metadata(
    family: ModelFamily, resolution: int, architecture: str, implementation: str
) -> dict[str, str]:
    """The ModelSpec 1.0.1 keys kohya writes, for a LoRA or a checkpoint."""
    return {
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": architecture,
        "modelspec.implementation": implementation,
        "modelspec.implementation_version": IMPLEMENTATION_VERSION,
        "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.prediction_type": "v" if family.v_pred else "epsilon",
        "modelspec.date": datetime.now(timezone.utc).replace(microsecond=0).isoformat(),
    }


def family_metadata(family: ModelFamily, resolution: int) -> dict[str, str]:
    """What A1111 and ModelSpec readers use to decide which model a LoRA belongs to."""
    if family.arch == "sdxl":
        base, implementation = "sdxl_base_v1-0", STABILITY_IMPLEMENTATION
    elif family.arch == "sd2":
        base, implementation = ("sd_v2_v" if family.v_pred else "sd_v2"), "diffusers"
    else:
        base, implementation = "sd_v1", "diffusers"
    return {
        "ss_v2": str(family.arch == "sd2"),
        "ss_base_model_version": base,
        **modelspec_metadata(family, resolution, model_architecture(family) + "/lora", implementation),
    }


def save_lora_file(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    """Write tensors + metadata with the additional-networks hashes, atomically (temp file + rename)."""
    path = Path(path)
    metadata = {k: str(v) for k, v in metadata.items()}
    data_hash = _data_hash(safetensors_bytes(tensors, metadata))
    metadata.update(
        {
            "sshs_model_hash": data_hash,
            "modelspec.hash_sha256": "0x" + data_hash,
            "sshs_legacy_hash": _PLACEHOLDER_HASH,
        }
    )
    # The legacy hash reads file bytes [1 MiB, 1 MiB + 64 KiB); a placeholder of the same length
    # keeps the header size, so the hash computed here is the one of the final file.
    metadata["sshs_legacy_hash"] = legacy_hash(safetensors_bytes(tensors, metadata))
    with atomic_output(path) as file:
        file.write(safetensors_bytes(tensors, metadata))
    return path


def does_not_fit(why: str, metadata: dict[str, str], model: str | None = None) -> str:
    """`why` a LoRA does not fit `model`, and what to do: use it with its own model, which its
    metadata may name; or, where that name is this model's, know that the file was changed since."""
    name = metadata.get("ss_sd_model_name", "").strip()
    if name and model is not None and model_name(name, on_disk=False).lower() == model_name(model).lower():
        guesses = (f"; {ANOTHER_MODEL}", "; it was made for another model")
        for guess in (*(f"{guess} family" for guess in guesses), *guesses):
            why = why.removesuffix(guess)
        return (
            f"{why}; yet its metadata names this very model ({name!r}): the file was changed after "
            "training (damaged, or converted or resized for another model); use the file as it was saved"
        )
    if name:  # kohya and leco write the model's file or folder name, not a path --model could take
        return f"{why}; use it with the model it was trained on (its metadata names {name!r})"
    if model is not None:  # the user gave one: say it is not the one, not "give --model"
        return f"{why}; use it with the model it was trained on, not {model}"
    return f"{why}; give --model the model it was trained on"


def arch_from_metadata(metadata: dict[str, str]) -> str | None:
    """The family `ss_base_model_version` names (sd_v1, sd_v2, sd_v2_v, sdxl_base_v1-0), if any."""
    version = metadata.get("ss_base_model_version", "")
    for prefix, arch in (("sdxl", "sdxl"), ("sd_v2", "sd2"), ("sd_v1", "sd1")):
        if version.startswith(prefix):
            return arch
    return None


def mislabelled_family(metadata: dict[str, str], family: ModelFamily) -> str | None:
    """What to say of a LoRA whose layers fit the model but whose metadata names another family."""
    said = arch_from_metadata(metadata)
    if said is None or said == family.arch:
        return None
    return (
        f"its metadata says {said} (ss_base_model_version), but its layers fit this {family.name} "
        "model; applied"
    )


def other_prediction(metadata: dict[str, str], family: ModelFamily) -> str | None:
    """What to say of a LoRA trained on a model of the other prediction type (its ModelSpec says so)."""
    said = modelspec_v_prediction(metadata)
    if said is None or said == family.v_pred:
        return None
    trained = "a v-prediction" if said else "an epsilon-prediction"
    return (
        f"was trained on {trained} model and this {family.name} model predicts {family.prediction_type}; "
        "its edit may not carry over"
    )


@contextmanager
def naming_its_model(metadata: dict[str, str], model: str | None = None) -> Iterator[None]:
    """A LoRA that fits no layer (or a layer's shape) of `model` says which model to give instead."""
    try:
        yield
    except LoraDoesNotFit as error:
        raise LecoError(does_not_fit(str(error), metadata, model)) from None


def file_in_folder(folder: Path) -> str:
    """ ": FILE" for the LoRA file PEFT's save_pretrained or diffusers' save_lora_weights wrote in
    `folder` (what a user naming the folder means), else ""."""
    for name in ("adapter_model.safetensors", "pytorch_lora_weights.safetensors"):
        if (folder / name).is_file():
            return f": {folder / name}"
    return ""


def read_lora_file(
    path: str | Path, family: ModelFamily | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a LoRA: `.safetensors`, or a `.pt` state dict (sliders) read weights-only.

    A file in diffusers' layout comes back under kohya's names; `family` (when known) decides which
    text encoder an SDXL file's `text_encoder.*` keys belong to when it names no second one."""
    path = Path(path)
    if not path.is_file():
        if path.is_dir():
            raise LecoError(f"{path}: is a folder; give the LoRA's .safetensors file{file_in_folder(path)}")
        raise LecoError(f"{path}: LoRA file not found; check the path")
    if path.suffix.lower() in PICKLED_LORA_SUFFIXES:
        tensors, metadata = _read_pickled_state_dict(path), {}
    else:
        try:
            with safe_open(str(path), framework="pt") as file:
                metadata = dict(file.metadata() or {})
                tensors = {key: file.get_tensor(key) for key in file.keys()}  # noqa: SIM118
        except Exception as error:  # safetensors has its own error types for damaged headers
            raise LecoError(f"{path}: not a readable .safetensors LoRA ({first_line(error, None)})") from None
    refuse_whole_numbers(
        {key: str(t.dtype).removeprefix("torch.") for key, t in tensors.items() if not t.is_floating_point()},
        path,
    )
    if is_diffusers_layout(list(tensors)):  # what pipe.save_lora_weights writes
        config = path.with_name("adapter_config.json")  # PEFT's save_pretrained keeps the alpha there
        beside = path.stem == "adapter_model" and "lora_adapter_metadata" not in metadata and config.is_file()
        if beside:
            metadata = {**metadata, "lora_adapter_metadata": read_config_text(config, "JSON")}
        sdxl = family.is_sdxl if family else None
        tensors = as_kohya(tensors, metadata, str(path), sdxl, config_source=str(config) if beside else None)
    return tensors, metadata


def refuse_whole_numbers(not_float: dict[str, str], source: str | Path) -> None:
    """LoRA weights are floating-point numbers; integer or boolean tensors mean a damaged file or
    not a LoRA (nothing could load what a conversion would write). An alpha may be a whole number."""
    not_float = {key: dtype for key, dtype in not_float.items() if not key.endswith(".alpha")}
    if not_float:
        key, dtype = next(iter(not_float.items()))
        raise LecoError(
            f"{source}: {key} holds {dtype} values, not floating-point weights; the file is damaged "
            "or not a LoRA"
        )


def _read_pickled_state_dict(path: Path) -> dict[str, torch.Tensor]:
    # weights_only refuses any pickled object but tensors and plain containers: no code runs.
    try:
        state = load_torch_file(path)  # never retried unsafely
    except LecoError as reason:
        raise LecoError(
            f"{path}: cannot be read safely as a plain state dict ({reason}); only tensors are accepted"
        ) from None
    if isinstance(state, dict) and "string_to_param" in state:
        raise LecoError(
            f"{path}: an A1111 textual-inversion embedding, not a LoRA; an embedding is used as it is "
            "(leco generate/eval --embedding), not merged or converted"
        )
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise LecoError(f"{path}: not a LoRA state dict (expected a dict of named tensors)")
    return dict(state)


def data_hash_of_file(path: str | Path) -> str:
    return _data_hash(Path(path).read_bytes())


def legacy_hash(blob: bytes) -> str:
    return hashlib.sha256(blob[_LEGACY_HASH_START:_LEGACY_HASH_END]).hexdigest()[:8]


def _data_hash(blob: bytes) -> str:
    # The additional-networks model hash covers the tensor bytes only, not the JSON header.
    header_length = int.from_bytes(blob[:8], "little")
    return hashlib.sha256(blob[8 + header_length :]).hexdigest()


def metadata_number(value: float) -> str:
    """A number as kohya writes it in metadata: "4" for 4.0, "0.5" for 0.5."""
    return str(int(value)) if float(value).is_integer() else str(value)


def json_metadata(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, sort_keys=True, default=str)


# ---------------------------------------------------------------------------------------------
# Files other trainers wrote: which model each module belongs to, and one canonical form


@dataclass(frozen=True)
class ModuleWeights:
    """One LoRA module of a file: delta = up @ down * alpha / rank."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]


# Keys of a whole model in the original single-file layout (SD1/SD2/SDXL), which users mistake for a LoRA.
CHECKPOINT_PREFIXES = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.", "conditioner.")


def is_one_token_embedding(shapes: Mapping[str, Sequence[int]]) -> bool:
    """diffusers' embedding file: one tensor, {token: [vectors, width]} (or [width] for one vector)."""
    if len(shapes) != 1:
        return False
    (key, shape), *_ = shapes.items()
    return len(shape) in (1, 2) and not key.startswith(("lora_", "lycoris_"))


def check_values(tensors: Iterable[tuple[str, torch.Tensor]], source: str) -> None:
    """A LoRA holding NaN or inf breaks every image it touches, silently: name the first such key.
    An alpha of 0 is said: the tools disagree on it, and here it makes its module change nothing."""
    zero_alphas = []
    for key, value in tensors:
        if value.is_floating_point() and not value.isfinite().all():
            raise LecoError(f"{source}: {key} holds NaN or inf values; the file is damaged: train it again")
        if key.endswith(".alpha") and value.numel() == 1 and float(value) == 0:
            zero_alphas.append(key)
    if zero_alphas:
        more = f" and {len(zero_alphas) - 1} more" if len(zero_alphas) > 1 else ""
        warn(
            f"{source}: alpha 0 in {zero_alphas[0]}{more}: those modules change nothing here, in A1111, "
            "ComfyUI and diffusers (scale alpha/rank), while kohya's scripts read alpha 0 as alpha = rank; "
            "if the file was made for kohya's, set each alpha to its rank"
        )


def split_by_model(
    tensors: dict[str, torch.Tensor], source: str
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(UNet tensors, text-encoder tensors); any other key is not a kohya LoRA key."""
    if is_embedding(tensors):
        raise LecoError(
            f"{source}: is a textual-inversion embedding ({', '.join(sorted(tensors))}), not a LoRA: it "
            "changes no weights to merge or convert; use it with leco generate or eval --embedding and "
            "its token in a prompt"
        )
    if not tensors:
        raise LecoError(f"{source}: holds no tensors, so it is no LoRA (an empty or unfinished file?)")
    (first_key, first), *_ = tensors.items()
    if any(key.startswith(CHECKPOINT_PREFIXES) for key in tensors):
        raise LecoError(
            f"{source}: is a model checkpoint (keys like {first_key}), not a LoRA; give it as --model"
        )
    if is_one_token_embedding({key: value.shape for key, value in tensors.items()}):
        raise LecoError(  # diffusers' learned_embeds
            f"{source}: holds one tensor, {first_key!r} {list(first.shape)}: a textual-inversion embedding "
            "(diffusers' form), not a LoRA; use it with leco generate or eval --embedding and its token "
            "in a prompt"
        )
    unet, text = {}, {}
    check_values(tensors.items(), source)
    refuse_other_keys(tensors, source)
    unet = {key: value for key, value in tensors.items() if key.startswith(UNET_PREFIX)}
    text = {key: value for key, value in tensors.items() if key.startswith(TEXT_ENCODER_PREFIXES)}
    return unet, text


def refuse_other_keys(keys: Iterable[str], source: str) -> None:
    """Keys read as kohya's (diffusers' and PEFT's layouts come here converted): any other is an error."""
    for key in keys:
        if not key.startswith((UNET_PREFIX, *TEXT_ENCODER_PREFIXES)):
            layout = " (ComfyUI's diffusion_model. layout)" if key.startswith("diffusion_model.") else ""
            raise LecoError(
                f"{source}: {key}{layout} is not a kohya LoRA key (they start with {UNET_PREFIX} or "
                "lora_te); this file is not a LoRA leco can read"
            )


def refuse_lycoris(keys: Iterable[str], source: str) -> None:
    """One line for a tensor of another kind of network (LoHa, LoKr, DoRA's dora_scale...), which
    neither merging nor sampling may drop without a word."""
    for key in keys:
        if key.partition(".")[2] not in _PARTS:
            raise LecoError(
                f"{source}: {key} is not a plain LoRA tensor (lora_down/lora_up/alpha); "
                "LyCORIS (LoHa, LoKr, DoRA, CP) files cannot be read"
            )


def group_modules(tensors: dict[str, torch.Tensor], source: str) -> dict[str, ModuleWeights]:
    """Group `<module>.lora_down.weight / .lora_up.weight / .alpha` by module; alpha defaults to rank."""
    refuse_lycoris(tensors, source)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        module, _, part = key.partition(".")
        parts.setdefault(module, {})[part] = value
    modules = {}
    for module, found in sorted(parts.items()):
        if "lora_down.weight" not in found or "lora_up.weight" not in found:
            missing = "lora_up" if "lora_down.weight" in found else "lora_down"
            raise LecoError(f"{source}: {module} has no {missing}.weight; the file is incomplete")
        down, up = found["lora_down.weight"], found["lora_up.weight"]
        check_ranks(module, list(down.shape), list(up.shape), source)
        alpha = found.get("alpha")
        if alpha is not None:
            check_alpha(module, list(alpha.shape), source)
        # Missing alpha means scale 1 in A1111, ComfyUI and diffusers, i.e. alpha = rank.
        modules[module] = ModuleWeights(down, up, float(alpha.item()) if alpha is not None else down.shape[0])
    return modules


def check_ranks(module: str, down: list[int], up: list[int], source: str) -> None:
    """lora_down's rows and lora_up's columns are the same rank, or the file is damaged."""
    if len(down) < 2 or len(up) < 2 or down[0] != up[1]:
        raise LecoError(
            f"{source}: {module} has lora_down {down} and lora_up {up}, whose ranks differ; the file is "
            "damaged or was written wrongly (no tool can apply it)"
        )
    if down[0] == 0:  # its scale alpha / rank is undefined, and it changes nothing
        raise LecoError(
            f"{source}: {module} has rank 0 (lora_down {down}), so no weights; the file is damaged or "
            "was written wrongly: train or convert it again"
        )


def check_alpha(module: str, shape: list[int], source: str) -> None:
    """An alpha is one number (a 0-d or one-element tensor)."""
    if math.prod(shape) != 1:
        raise LecoError(f"{source}: {module}.alpha holds {math.prod(shape)} values, expected one number")


def flatten_modules(
    modules: dict[str, ModuleWeights], dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """Back to file tensors; alpha always written, as fp32 0-d tensors."""
    tensors = {}
    for module, weights in modules.items():
        tensors[f"{module}.lora_down.weight"] = weights.down.to(dtype or weights.down.dtype).contiguous()
        tensors[f"{module}.lora_up.weight"] = weights.up.to(dtype or weights.up.dtype).contiguous()
        tensors[f"{module}.alpha"] = torch.tensor(weights.alpha, dtype=torch.float32)
    return tensors


def unet_layer_keys(unet: nn.Module, family: ModelFamily) -> dict[str, str]:
    """Every key a LoRA file may use for a UNet layer -> its diffusers module path.

    SDXL files name layers by SGM paths (kohya, ours) or by diffusers paths (p1atdev/LECO,
    sliders); kohya's SDXL loader accepts both, and so does this table.
    """
    keys = {}
    # Beyond what leco trains, the layers outside the blocks that LyCORIS' full presets train and that
    # A1111, ComfyUI and diffusers apply: a file that changes them loads and merges whole.
    outside_blocks = [name for name in OUTSIDE_BLOCKS if _has_module(unet, name)]
    for name in [*adaptable_layers(unet, "c3lier"), *outside_blocks]:
        keys[kohya_key(name, family, unet.config)] = name
        keys[UNET_PREFIX + name.replace(".", "_")] = name
    return keys


def unet_layer_keys_of_file(
    shapes: Mapping[str, Sequence[int]], unet: nn.Module, family: ModelFamily
) -> dict[str, str]:
    """unet_layer_keys for one file (`shapes`: its tensors' shapes by key), with an SD1/SD2 file
    named wholly by the original LDM paths (input_blocks_4_1_..., which A1111 and ComfyUI apply as
    they apply diffusers-named ones) read by those paths. Only where every module is such a path of
    this model and fits its layer: an SDXL file's SGM names are LDM paths too, of other layers."""
    by_key = unet_layer_keys(unet, family)
    modules = {key.partition(".")[0] for key in shapes if key.startswith(UNET_PREFIX)}
    if family.is_sdxl or not modules or modules & by_key.keys():
        return by_key
    ldm = {UNET_PREFIX + to_sgm_name(name, unet.config).replace(".", "_"): name for name in by_key.values()}
    if not modules <= ldm.keys():
        return by_key
    for module in modules:
        down, up = shapes.get(f"{module}.lora_down.weight"), shapes.get(f"{module}.lora_up.weight")
        if down is None or up is None:
            return by_key
        try:
            fitted_shapes(down, up, unet.get_submodule(ldm[module]), module)
        except LoraDoesNotFit:
            return by_key
    return {**by_key, **ldm}


def _has_module(unet: nn.Module, name: str) -> bool:
    try:
        return isinstance(unet.get_submodule(name), nn.Linear | nn.Conv2d)
    except AttributeError:
        return False


def canonical_unet_modules(
    tensors: dict[str, torch.Tensor], unet: nn.Module, family: ModelFamily, source: str
) -> dict[str, ModuleWeights]:
    """A file's UNet modules under the keys we write, with the tensor shapes each layer needs.

    kohya's SD2 trainer writes 4-D proj_in/proj_out tensors for what diffusers builds as Linear;
    a 2-D tensor for a 1x1 conv is the reverse case. Both are reshaped; anything that still does
    not fit the layer is an error naming the key.
    """
    by_key = unet_layer_keys_of_file({key: value.shape for key, value in tensors.items()}, unet, family)
    grouped = group_modules(tensors, source)
    unknown = [key for key in grouped if key not in by_key]
    if unknown and len(unknown) < len(grouped):  # a model of another layout, or a misnamed layer
        raise LoraDoesNotFit(  # naming_its_model adds which model to give, or that the file changed
            f"{source}: {unknown[0]} matches no layer of this {family.name} UNet, though "
            f"{len(grouped) - len(unknown)} of its other modules do; it was made for a model of another "
            "layout, or the file is damaged or names layers in a way leco cannot read (leco generate "
            "applies the modules this model has, where their shapes fit, and names the others)"
        )
    if unknown:
        raise LoraDoesNotFit(
            f"{source}: {unknown[0]} matches no layer of this {family.name} UNet; {ANOTHER_MODEL} family"
        )
    canonical = canonical_keys(grouped, by_key, family, unet.config, source)
    modules: dict[str, ModuleWeights] = {}
    for key, weights in grouped.items():
        layer = unet.get_submodule(by_key[key])
        layer = getattr(layer, "base_layer", layer)
        modules[canonical[key]] = fit_to_layer(weights, layer, f"{source}: {key}")
    return modules


def canonical_keys(
    keys: Iterable[str], by_key: dict[str, str], family: ModelFamily, unet_config: dict[str, Any], source: str
) -> dict[str, str]:
    """Each of a file's module keys that names a UNet layer (`by_key`: unet_layer_keys) -> the key
    leco writes for that layer (SGM names for SDXL); a layer named twice, once in each of SDXL's two
    namings, is refused naming the key that is not the one leco writes."""
    canonical: dict[str, str] = {}
    named_by: dict[str, str] = {}  # canonical key -> the file's key for it
    for key in keys:
        if key not in by_key:
            continue
        name = kohya_key(by_key[key], family, unet_config)
        if name in named_by:
            twice = key if key != name else named_by[name]
            raise LecoError(
                f"{source}: {twice} names the same layer as another key; the file mixes two namings"
            )
        named_by[name], canonical[key] = key, name
    return canonical


def fitted_shapes(
    down: Sequence[int], up: Sequence[int], layer: nn.Module, where: str = ""
) -> tuple[list[int], list[int]]:
    """The shapes of a module's lora_down and lora_up in the form `layer` takes (fit_to_layer on
    shapes alone: no tensor is read)."""
    empty = ModuleWeights(torch.empty(down, device="meta"), torch.empty(up, device="meta"), 1.0)
    fitted = fit_to_layer(empty, getattr(layer, "base_layer", layer), where)
    return list(fitted.down.shape), list(fitted.up.shape)


def fit_to_layer(weights: ModuleWeights, layer: nn.Module, where: str) -> ModuleWeights:
    """Reshape 1x1 tensors between Linear and 1x1-conv form; refuse shapes the layer cannot take."""
    down, up = weights.down, weights.up
    if isinstance(layer, nn.Linear):  # each tensor on its own, as A1111 and ComfyUI reshape them
        down = down.flatten(1) if down.ndim == 4 and down.shape[2:] == (1, 1) else down
        up = up.flatten(1) if up.ndim == 4 and up.shape[2:] == (1, 1) else up
        expected_down = (weights.rank, layer.in_features)
        expected_up = (layer.out_features, weights.rank)
    else:
        kernel = tuple(layer.kernel_size)
        if down.ndim == 2 and kernel == (1, 1):
            down = down[:, :, None, None]
        if up.ndim == 2:
            up = up[:, :, None, None]
        expected_down = (weights.rank, layer.in_channels, *kernel)
        expected_up = (layer.out_channels, weights.rank, 1, 1)
    fitted = (("lora_down", down, weights.down, expected_down), ("lora_up", up, weights.up, expected_up))
    for part, value, as_stored, expected in fitted:
        if tuple(value.shape) != expected:
            raise LoraDoesNotFit(
                f"{where}.{part}.weight has shape {list(as_stored.shape)} but the layer needs "
                f"{list(expected)}; {ANOTHER_MODEL}"
            )
    return ModuleWeights(down, up, weights.alpha)


def delta_weight(
    weights: ModuleWeights, shape: torch.Size, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The change a module makes to its layer's weight at strength 1 (kohya's merge_lora math)."""
    down, up = weights.down.to(dtype), weights.up.to(dtype)
    scale = weights.alpha / weights.rank
    if len(shape) == 2:
        delta = up.flatten(1) @ down.flatten(1)
    elif tuple(shape[2:]) == (1, 1):
        delta = (up.flatten(1) @ down.flatten(1))[:, :, None, None]
    else:
        # A 3x3 down conv followed by a 1x1 up conv is one 3x3 conv: convolve down's kernels by up.
        delta = torch.nn.functional.conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3)
    return (delta * scale).reshape(shape)
