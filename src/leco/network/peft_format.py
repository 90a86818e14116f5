"""LoRAs in diffusers' and PEFT's key layout, read as the kohya files merge and convert work on.

`pipe.save_lora_weights` writes `unet.<module path>.lora_A.weight` / `lora_B.weight` (PEFT's names;
older diffusers wrote `...attn1.processor.to_q_lora.down.weight`), with the LoRA's alpha in the
file's `lora_adapter_metadata` (PEFT's LoraConfig, per model) or not at all (scale 1). diffusers
loads these for `leco generate`; kohya's layout names the same weights `lora_unet_<path with _>`
with `lora_down` / `lora_up` / `alpha`.

Not diffusers' `convert_state_dict_to_kohya`: it writes alpha = rank whatever the file's
`lora_adapter_metadata` says (a LoRA trained at another alpha would come out at the wrong strength)
and names SD1's text encoder `lora_te1`, where SD1 tools read `lora_te`.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from typing import Any

import torch

from leco.errors import LecoError

# Where each model's keys start in a diffusers file, and the kohya prefix they become (text encoders:
# SD1/SD2's one is lora_te_, SDXL's two are lora_te1_ / lora_te2_).
_MODELS = ("unet", "text_encoder", "text_encoder_2")
_PEFT_PARTS = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight"}
KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
# Other spellings of the same weights: a PEFT state dict that kept its adapter's name
# (lora_A.default.weight), and diffusers' older attention-processor names
_ADAPTER_NAMED = re.compile(r"\.lora_(A|B)\.[^.]+\.weight$")
_OLD_NAMES = [
    (_ADAPTER_NAMED, r".lora_\1.weight"),
    (re.compile(r"\.processor\."), "."),
    (re.compile(r"\.to_(q|k|v)_lora\.(down|up)\.weight$"), r".to_\1.lora_\2.weight"),
    (re.compile(r"\.to_out_lora\.(down|up)\.weight$"), r".to_out.0.lora_\1.weight"),
    (re.compile(r"\.(q|k|v|out)_proj\.lora_linear_layer\.(down|up)\.weight$"), r".\1_proj.lora_\2.weight"),
    (re.compile(r"\.lora_linear_layer\.(down|up)\.weight$"), r".lora_\1.weight"),
    (re.compile(r"\.lora\.(down|up)\.weight$"), r".lora_\1.weight"),
]


def diffusers_pipeline_reads(keys: list[str]) -> bool:
    """Whether diffusers' `pipe.load_lora_weights` finds every tensor of a diffusers-layout file: each
    key under its model's name, no adapter name kept. `unet.save_lora_adapter` and PEFT's
    `save_pretrained` write none (it would load nothing), PEFT state dicts may keep the adapter's
    name (it would leave those weights unset), and a module's own `.alpha` tensor (kohya's way, in
    this layout) stops diffusers with "Invalid LoRA checkpoint": leco reads such files itself (as_kohya)."""
    models = tuple(f"{model}." for model in _MODELS)
    return all(
        key.startswith(models) and not (_ADAPTER_NAMED.search(key) or key.endswith(".alpha")) for key in keys
    )


def is_diffusers_layout(keys: list[str]) -> bool:
    """Keys of diffusers' or PEFT's layout (not kohya's `lora_unet_...` / `lora_te...`)."""
    return any(key.startswith(tuple(f"{model}." for model in _MODELS)) for key in keys) or any(
        key.endswith((".lora_A.weight", ".lora_B.weight")) for key in keys
    )


def as_kohya(
    tensors: dict[str, torch.Tensor],
    metadata: dict[str, str],
    source: str,
    sdxl: bool | None = None,
    config_source: str | None = None,
) -> dict[str, torch.Tensor]:
    """The file's tensors under kohya's names, each module's alpha giving the scale diffusers applies.

    `sdxl`: whether the model has two text encoders, if known (else: whether the file names both).
    `config_source`: where the metadata's `lora_adapter_metadata` came from, if not the file itself
    (PEFT's adapter_config.json beside it), for messages."""
    config_name = config_source or f"{source}: its lora_adapter_metadata"
    configs = _adapter_configs(metadata, config_name)
    second = any(
        not key.startswith(KOHYA_PREFIXES) and _model_and_path(key)[0] == "text_encoder_2" for key in tensors
    )
    if second and sdxl is False:
        raise LecoError(f"{source}: has text_encoder_2 modules, so it was made for SDXL; use it with SDXL")
    text_encoders = 2 if (sdxl if sdxl is not None else second) else 1
    modules: dict[str, dict[str, torch.Tensor]] = {}
    paths: dict[str, tuple[str, str]] = {}  # kohya module -> (model, diffusers path), for its alpha
    read_as: dict[tuple[str, str], str] = {}  # (kohya module, part) -> the file's key for it
    for key, value in tensors.items():
        module, kohya_part, paths_key = _kohya_name(key, source, text_encoders)
        parts = modules.setdefault(module, {})
        if kohya_part in parts:  # e.g. kohya's lora_unet_... and PEFT's unet.... for one layer
            raise LecoError(
                f"{source}: {key} names the same layer as {read_as[(module, kohya_part)]}; the file mixes "
                "two namings, and which of them a tool applies (at which alpha) differs: keep one"
            )
        parts[kohya_part], read_as[(module, kohya_part)] = value, key
        paths[module] = paths_key
    result: dict[str, torch.Tensor] = {}
    for module, parts in modules.items():
        result.update({f"{module}.{part}": value for part, value in parts.items()})
        if "alpha" not in parts and "lora_down.weight" in parts:
            rank = parts["lora_down.weight"].shape[0]
            try:
                alpha = _alpha(configs.get(paths[module][0]), *paths[module], rank)
            except (ArithmeticError, TypeError, ValueError, re.error):
                raise LecoError(
                    f"{config_name} gives {module} no usable r / lora_alpha; the file is damaged"
                ) from None
            result[f"{module}.alpha"] = torch.tensor(alpha)
    return result


def _kohya_name(key: str, source: str, text_encoders: int) -> tuple[str, str, tuple[str, str]]:
    """A tensor's kohya module and part (lora_down.weight, lora_up.weight or alpha), and the model
    and module path PEFT's per-module patterns are matched against (for its alpha)."""
    if key.startswith(KOHYA_PREFIXES):  # kohya's module names with PEFT's part names
        model, path = "kohya", key
    else:
        model, path = _model_and_path(key)
    path = _in_current_names(path)
    module_path, _, part = path.rpartition(".lora_")
    kohya_part = _PEFT_PARTS.get(f"lora_{part}", f"lora_{part}")
    if path.endswith(".alpha"):  # diffusers' network_alphas form
        module_path, kohya_part = path.removesuffix(".alpha"), "alpha"
    elif kohya_part not in ("lora_down.weight", "lora_up.weight") or not module_path:
        raise LecoError(
            f"{source}: {key} is not a plain LoRA tensor (lora_A/lora_B, down/up); LyCORIS or DoRA "
            "files cannot be read"
        )
    paths_key = (model, module_path)  # PEFT's patterns are matched against the module as named here
    if model.startswith("text") and not module_path.startswith("text_model."):  # transformers 5's CLIP
        module_path = f"text_model.{module_path}"
    if model == "kohya":
        return module_path, kohya_part, paths_key
    return _kohya_prefix(model, text_encoders) + module_path.replace(".", "_"), kohya_part, paths_key


def unet_module_paths(keys: Iterable[str]) -> list[str]:
    """The UNet module paths (diffusers' names) that a diffusers/PEFT-layout file's LoRA tensors name;
    kohya-named keys and alphas are left out."""
    paths = set()
    for key in keys:
        if key.startswith(KOHYA_PREFIXES) or key.endswith(".alpha"):
            continue
        model, path = _model_and_path(key)
        module_path, found, _ = _in_current_names(path).rpartition(".lora_")
        if model == "unet" and found:
            paths.add(module_path)
    return sorted(paths)


def _in_current_names(path: str) -> str:
    for pattern, replacement in _OLD_NAMES:
        path = pattern.sub(replacement, path)
    return path


def _model_and_path(key: str) -> tuple[str, str]:
    path = key.removeprefix("base_model.model.")  # PEFT's save_pretrained of a model it wrapped
    for model in sorted(_MODELS, key=len, reverse=True):  # text_encoder_2 before text_encoder
        if path.startswith(f"{model}."):
            return model, path[len(model) + 1 :]
    text_encoder = path.startswith(("text_model.", "encoder.layers."))  # CLIP (transformers 4 / 5)
    return ("text_encoder" if text_encoder else "unet"), path


def _kohya_prefix(model: str, text_encoders: int) -> str:
    if model == "unet":
        return "lora_unet_"
    if text_encoders == 1:
        return "lora_te_"
    return "lora_te2_" if model == "text_encoder_2" else "lora_te1_"


def _adapter_configs(metadata: dict[str, str], config_name: str) -> dict[str, dict[str, Any]]:
    """PEFT's LoraConfig of each model, from diffusers' `lora_adapter_metadata` ("unet.r": 4, ...)."""
    text = metadata.get("lora_adapter_metadata")
    if not text:
        return {}
    try:
        flat = json.loads(text)
    except ValueError:
        raise LecoError(f"{config_name} is not JSON; the file is damaged") from None
    if isinstance(flat, dict) and "r" in flat:  # one model's LoraConfig (unet.save_lora_adapter, PEFT)
        return dict.fromkeys(_MODELS, flat)
    configs: dict[str, dict[str, Any]] = {}
    for key, value in flat.items() if isinstance(flat, dict) else ():
        model, _, name = key.partition(".")
        configs.setdefault(model, {})[name] = value
    return configs


def _alpha(config: dict[str, Any] | None, model: str, path: str, rank: int) -> float:
    """kohya's alpha for a module: diffusers scales it by lora_alpha / r (/ sqrt(r) with rsLoRA; PEFT's
    per-module patterns first), and kohya by alpha / rank; without a config the scale is 1, as
    diffusers loads it.

    A pattern names the module from the model PEFT wrapped: the UNet or a text encoder itself (as
    diffusers wraps them), or a module holding them, whose names start with `model`."""
    if not config:
        return float(rank)
    names = (path, f"{model}.{path}")
    r = float(_by_pattern(config.get("rank_pattern"), names, config.get("r", rank)))
    lora_alpha = float(_by_pattern(config.get("alpha_pattern"), names, config.get("lora_alpha", r)))
    if not r > 0:  # PEFT refuses such a config; read as it stands, it would turn the LoRA around
        raise ValueError(f"r = {r}")
    scale = lora_alpha / math.sqrt(r) if config.get("use_rslora") else lora_alpha / r  # PEFT's rsLoRA
    return scale * rank


def _by_pattern(patterns: Any, names: tuple[str, ...], default: Any) -> Any:
    """PEFT's rule: the first pattern that matches the end of the module's name (any of `names`)."""
    for pattern, value in (patterns or {}).items() if isinstance(patterns, dict) else ():
        if any(re.match(rf"(.*\.)?({pattern})$", name) for name in names):
            return value
    return default
