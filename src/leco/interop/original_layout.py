"""diffusers models -> one state dict in the original single-file layout (LDM for SD1/SD2, SGM for SDXL).

That is the layout AUTOMATIC1111, ComfyUI and kohya's scripts load: UNet under
`model.diffusion_model.`, text encoders under `cond_stage_model.` (SD1: transformers CLIP; SD2:
OpenCLIP) or `conditioner.embedders.0/1.` (SDXL), VAE under `first_stage_model.`. diffusers ships
only the opposite direction (`diffusers.loaders.single_file_utils`), so the names are mapped here
and the tests check that diffusers' `from_single_file` reads every tensor back unchanged.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from leco.models import LoadedModels
from leco.network.sgm_names import to_sgm_name

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
# (prefix, layout) of each text encoder, in the order LoadedModels holds them.
TEXT_ENCODER_LAYOUTS = {
    "sd1": [("cond_stage_model.transformer.", "clip")],
    "sd2": [("cond_stage_model.model.", "open_clip")],
    "sdxl": [
        ("conditioner.embedders.0.transformer.", "clip"),
        ("conditioner.embedders.1.model.", "open_clip"),
    ],
}

_VAE_TOP_LEVEL = {"conv_norm_out": "norm_out"}
_VAE_SAMPLERS = {"downsamplers": "downsample", "upsamplers": "upsample"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_OPEN_CLIP_LAYER_PARTS = {
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}
_OPEN_CLIP_TOP_LEVEL = {
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "final_layer_norm.weight": "ln_final.weight",
    "final_layer_norm.bias": "ln_final.bias",
}


def original_state_dict(models: LoadedModels, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """UNet, text encoder(s) and VAE of `models` under their single-file names, contiguous, on CPU."""
    if models.vae is None:
        raise ValueError("a single-file checkpoint needs the VAE: load the model with with_vae=True")
    state = {UNET_PREFIX + to_sgm_name(k, models.unet.config): v for k, v in models.unet.state_dict().items()}
    for (prefix, layout), encoder in zip(
        TEXT_ENCODER_LAYOUTS[models.family.arch], models.text_encoders, strict=True
    ):
        state.update(_clip_state(encoder, prefix) if layout == "clip" else _open_clip_state(encoder, prefix))
    if models.family.arch == "sd2":
        state.update(sd2_unused_text_weights(state, TEXT_ENCODER_LAYOUTS["sd2"][0][0]))
    num_up_blocks = len(models.vae.config.up_block_types)
    for key, value in models.vae.state_dict().items():
        name = vae_original_name(key, num_up_blocks)
        if name.split(".")[-2] in _VAE_ATTENTION.values() and value.ndim == 2:
            value = value[:, :, None, None]  # the original VAE's attention projections are 1x1 convs
        state[VAE_PREFIX + name] = value
    return {k: v.detach().to("cpu", dtype or v.dtype).contiguous() for k, v in state.items()}


def sd2_unused_text_weights(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Stand-ins for the parts of SD2's OpenCLIP-H that SD2 never uses and diffusers drops.

    SD2 reads the penultimate of OpenCLIP's 24 blocks, so diffusers keeps 23 and no projection.
    Tools that build the whole OpenCLIP model expect the rest; like kohya's converter, we add the
    last block as a copy of the one before, an identity projection and a logit scale. Only for the
    real 23-block encoder: diffusers skips exactly those names when it reads the file back.
    """
    block = f"{prefix}transformer.resblocks."
    if f"{block}22.ln_1.weight" not in state or f"{block}23.ln_1.weight" in state:
        return {}
    extra = {
        k.replace(f"{block}22.", f"{block}23."): v.clone()
        for k, v in state.items()
        if k.startswith(f"{block}22.")
    }
    width = state[f"{prefix}ln_final.weight"].shape[0]
    extra[f"{prefix}text_projection"] = torch.eye(width, dtype=state[f"{prefix}ln_final.weight"].dtype)
    extra[f"{prefix}logit_scale"] = torch.tensor(1.0)
    return extra


def vae_original_name(name: str, num_up_blocks: int) -> str:
    """A diffusers AutoencoderKL parameter path -> the LDM `first_stage_model` path (without prefix)."""
    side, _, rest = name.partition(".")
    if side in ("quant_conv", "post_quant_conv"):
        return name
    if match := re.fullmatch(r"(down|up)_blocks\.(\d+)\.(resnets|\w+samplers)\.(\d+)\.(.+)", rest):
        kind, block, part, index, tail = match.groups()
        block_index = int(block) if kind == "down" else num_up_blocks - 1 - int(block)  # LDM counts up from 0
        if part == "resnets":
            return f"{side}.{kind}.{block_index}.block.{index}.{_vae_resnet_tail(tail)}"
        return f"{side}.{kind}.{block_index}.{_VAE_SAMPLERS[part]}.{tail}"
    if match := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", rest):
        return f"{side}.mid.block_{int(match[1]) + 1}.{_vae_resnet_tail(match[2])}"
    if match := re.fullmatch(r"mid_block\.attentions\.0\.(.+)\.(weight|bias)", rest):
        return f"{side}.mid.attn_1.{_VAE_ATTENTION[match[1]]}.{match[2]}"
    first, _, tail = rest.partition(".")
    if first in ("conv_in", "conv_out", "conv_norm_out"):
        return f"{side}.{_VAE_TOP_LEVEL.get(first, first)}.{tail}"
    raise ValueError(f"no LDM name for VAE parameter {name!r}")


def _vae_resnet_tail(tail: str) -> str:
    return tail.replace("conv_shortcut", "nin_shortcut")


def _clip_state(encoder: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    # transformers 5 dropped the `text_model.` level from CLIPTextModel; single files keep it.
    return {
        prefix + "text_model." + k.removeprefix("text_model."): v
        for k, v in encoder.state_dict().items()
        if not k.endswith("position_ids")
    }


def _open_clip_state(encoder: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """The OpenCLIP layout (SD2's encoder, SDXL's second): fused q/k/v, resblocks, transposed projection."""
    state = {k.removeprefix("text_model."): v for k, v in encoder.state_dict().items()}
    out = {}
    for key, value in state.items():
        if key in _OPEN_CLIP_TOP_LEVEL:
            out[prefix + _OPEN_CLIP_TOP_LEVEL[key]] = value
        elif key == "text_projection.weight":
            out[prefix + "text_projection"] = value.T  # OpenCLIP multiplies from the right
        elif match := re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", key):
            layer, part, kind = match.groups()
            block = f"{prefix}transformer.resblocks.{layer}."
            if part == "self_attn.q_proj":
                fused = [state[f"encoder.layers.{layer}.self_attn.{p}_proj.{kind}"] for p in "qkv"]
                out[f"{block}attn.in_proj_{kind}"] = torch.cat(fused)
            elif part in ("self_attn.k_proj", "self_attn.v_proj"):
                continue  # fused into in_proj with q
            else:
                out[f"{block}{_OPEN_CLIP_LAYER_PARTS[part]}.{kind}"] = value
        elif not key.endswith("position_ids"):
            raise ValueError(f"no OpenCLIP name for text-encoder parameter {key!r}")
    return out
