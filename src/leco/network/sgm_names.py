"""diffusers UNet module/parameter paths -> the original LDM/SGM paths (input_blocks, ...).

kohya writes SDXL LoRA keys with the SGM names of Stability's repo, and A1111/ComfyUI expect
them; diffusers' own single-file converter (`convert_ldm_unet_checkpoint`) maps such names back,
and the tests use it as the oracle for this mapping. diffusers ships only the other direction,
hence this module.
"""

from __future__ import annotations

import re
from typing import Any

_RESNET_PARTS = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_TOP_LEVEL = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_MID_BLOCK = {"resnets.0": "middle_block.0", "attentions.0": "middle_block.1", "resnets.1": "middle_block.2"}


def to_sgm_name(name: str, unet_config: dict[str, Any]) -> str:
    """Map a diffusers UNet path (module or parameter) to its LDM/SGM path."""
    per_block = unet_config["layers_per_block"]
    if not isinstance(per_block, int):
        raise ValueError("only UNets with one layers_per_block for all blocks have LDM/SGM names")
    stride = per_block + 1  # SGM numbers a downsampler (down) or an extra resnet (up) per block
    for prefix, sgm in _TOP_LEVEL.items():
        if name == prefix or name.startswith(prefix + "."):
            return sgm + name[len(prefix) :]

    if match := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)(\..+)?", name):
        block, kind, layer, tail = int(match[1]), match[2], int(match[3]), match[4] or ""
        return _block_name("input_blocks", 1 + stride * block + layer, kind, tail)
    if match := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv(\..+)?", name):
        return f"input_blocks.{stride * (int(match[1]) + 1)}.0.op{match[2] or ''}"
    if match := re.fullmatch(r"mid_block\.(resnets\.\d+|attentions\.\d+)(\..+)?", name):
        kind = match[1].split(".")[0]
        sgm_block = _MID_BLOCK[match[1]]
        tail = match[2] or ""
        return sgm_block + (_resnet_tail(tail) if kind == "resnets" else tail)
    if match := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)(\..+)?", name):
        block, kind, layer, tail = int(match[1]), match[2], int(match[3]), match[4] or ""
        return _block_name("output_blocks", stride * block + layer, kind, tail)
    if match := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv(\..+)?", name):
        block = int(match[1])
        # After the resnet (slot 0) and, in cross-attention blocks, the transformer (slot 1).
        slot = 2 if "CrossAttn" in unet_config["up_block_types"][block] else 1
        return f"output_blocks.{stride * block + per_block}.{slot}.conv{match[2] or ''}"
    raise ValueError(f"no LDM/SGM name for UNet path {name!r}")


def _block_name(group: str, index: int, kind: str, tail: str) -> str:
    if kind == "resnets":
        return f"{group}.{index}.0{_resnet_tail(tail)}"
    return f"{group}.{index}.1{tail}"


def _resnet_tail(tail: str) -> str:
    if not tail:
        return tail
    first, _, rest = tail[1:].partition(".")
    mapped = _RESNET_PARTS.get(first, first)
    return f".{mapped}" + (f".{rest}" if rest else "")
