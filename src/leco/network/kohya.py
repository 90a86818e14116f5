"""The kohya LoRA `.safetensors` format that A1111, ComfyUI and diffusers load.

Keys: `lora_unet_<module path with _>.{lora_down.weight, lora_up.weight, alpha}`; SD1/SD2 use
diffusers module paths, SDXL the SGM paths (as kohya's own SDXL trainer writes them). Metadata
values are strings; A1111 shows a file only for the family `ss_base_model_version` names.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

from leco.errors import LecoError
from leco.files import atomic_output
from leco.models import ModelFamily
from leco.network.sgm_names import to_sgm_name

UNET_PREFIX = "lora_unet_"
_LEGACY_HASH_START, _LEGACY_HASH_END = 0x100000, 0x110000
_PLACEHOLDER_HASH = "0" * 8


def kohya_key(module_name: str, family: ModelFamily, unet_config: dict[str, Any]) -> str:
    path = to_sgm_name(module_name, unet_config) if family.is_sdxl else module_name
    return UNET_PREFIX + path.replace(".", "_")


def family_metadata(family: ModelFamily, resolution: int) -> dict[str, str]:
    """What A1111 and ModelSpec readers use to decide which model a LoRA belongs to."""
    if family.arch == "sdxl":
        base, architecture = "sdxl_base_v1-0", "stable-diffusion-xl-v1-base/lora"
        implementation = "https://github.com/Stability-AI/generative-models"
    elif family.arch == "sd2":
        base = "sd_v2_v" if family.v_pred else "sd_v2"
        architecture = "stable-diffusion-v2-768-v/lora" if family.v_pred else "stable-diffusion-v2-512/lora"
        implementation = "diffusers"
    else:
        base, architecture, implementation = "sd_v1", "stable-diffusion-v1/lora", "diffusers"
    return {
        "ss_v2": str(family.arch == "sd2"),
        "ss_base_model_version": base,
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": architecture,
        "modelspec.implementation": implementation,
        "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.prediction_type": "v" if family.v_pred else "epsilon",
        "modelspec.date": datetime.now(timezone.utc).replace(microsecond=0).isoformat(),
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


def read_lora_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    path = Path(path)
    if not path.is_file():
        raise LecoError(f"{path}: LoRA file not found; check the path")
    try:
        with safe_open(str(path), framework="pt") as file:
            metadata = dict(file.metadata() or {})
            tensors = {key: file.get_tensor(key) for key in file.keys()}  # noqa: SIM118
    except Exception as error:  # safetensors has its own error types for damaged headers
        raise LecoError(f"{path}: not a readable .safetensors LoRA ({str(error).splitlines()[0]})") from None
    return tensors, metadata


def data_hash_of_file(path: str | Path) -> str:
    return _data_hash(Path(path).read_bytes())


def legacy_hash(blob: bytes) -> str:
    return hashlib.sha256(blob[_LEGACY_HASH_START:_LEGACY_HASH_END]).hexdigest()[:8]


def _data_hash(blob: bytes) -> str:
    # The additional-networks model hash covers the tensor bytes only, not the JSON header.
    header_length = int.from_bytes(blob[:8], "little")
    return hashlib.sha256(blob[8 + header_length :]).hexdigest()


def json_metadata(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, sort_keys=True, default=str)
