"""Tiny random-initialised SD1 / SD2(-v) / SDXL pipelines with the real layouts, built offline.

For tests and benchmarks: they have the shapes and key names of the real families but know nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DiffusionPipeline,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from leco.models import ModelFamily, clip_tokenizers
from leco.network.sgm_names import to_sgm_name

BETAS = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
    "clip_sample": False,
    "set_alpha_to_one": False,
}


def _text_encoder(hidden: int, act: str, cls=CLIPTextModel, layers: int = 2) -> torch.nn.Module:
    config = CLIPTextConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_attention_heads=4,
        num_hidden_layers=layers,
        vocab_size=49408,
        max_position_embeddings=77,
        projection_dim=hidden,
        hidden_act=act,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
    )
    return cls(config)


def _unet(arch: str, channels: tuple[int, int] = (16, 32), sample_size: int = 8) -> UNet2DConditionModel:
    common = dict(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        norm_num_groups=8,
        block_out_channels=channels,
    )
    if arch == "sdxl":
        return UNet2DConditionModel(
            **common,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2),
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            cross_attention_dim=32 + 40,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=40 + 6 * 8,
        )
    return UNet2DConditionModel(
        **common,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=arch == "sd2",
        cross_attention_dim=32,
    )


def tiny_pipeline(
    arch: str = "sd1",
    v_pred: bool = False,
    seed: int = 0,
    channels: tuple[int, int] = (16, 32),
    sample_size: int = 8,
) -> DiffusionPipeline:
    """A diffusers pipeline of the family's layout with a few thousand random parameters per part."""
    torch.manual_seed(seed)
    unet = _unet(arch, channels, sample_size)
    vae = AutoencoderKL(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=16,
    )
    family = ModelFamily(arch, v_pred)
    tokenizers = clip_tokenizers(family)
    for tokenizer in tokenizers:
        # Short prompts padded to 77 tokens would drown in padding in a random model: pad to 10.
        tokenizer.model_max_length = 10
    prediction = "v_prediction" if v_pred else "epsilon"
    if arch == "sdxl":
        scheduler = EulerDiscreteScheduler(
            **{k: v for k, v in BETAS.items() if k not in ("clip_sample", "set_alpha_to_one")},
            prediction_type=prediction,
            timestep_spacing="leading",
        )
        return StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=_text_encoder(32, "quick_gelu"),
            text_encoder_2=_text_encoder(40, "gelu", CLIPTextModelWithProjection),
            tokenizer=tokenizers[0],
            tokenizer_2=tokenizers[1],
            unet=unet,
            scheduler=scheduler,
        )
    scheduler = DDIMScheduler(**BETAS, prediction_type=prediction)
    act = "gelu" if arch == "sd2" else "quick_gelu"
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=_text_encoder(32, act),
        tokenizer=tokenizers[0],
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def save_tiny_pipeline(
    folder: Path, arch: str = "sd1", v_pred: bool = False, seed: int = 0, **sizes: Any
) -> DiffusionPipeline:
    pipe = tiny_pipeline(arch, v_pred, seed, **sizes)
    pipe.save_pretrained(folder)
    return pipe


def _open_clip_state(encoder: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """The OpenCLIP (SD2 / SDXL second encoder) layout of a transformers CLIP text model."""
    text = getattr(encoder, "text_model", encoder)
    out = {
        prefix + "token_embedding.weight": text.embeddings.token_embedding.weight,
        prefix + "positional_embedding": text.embeddings.position_embedding.weight,
        prefix + "ln_final.weight": text.final_layer_norm.weight,
        prefix + "ln_final.bias": text.final_layer_norm.bias,
    }
    projection = getattr(encoder, "text_projection", None)
    out[prefix + "text_projection"] = (
        projection.weight.T if projection is not None else torch.eye(text.config.hidden_size)
    )
    for i, layer in enumerate(text.encoder.layers):
        block = f"{prefix}transformer.resblocks.{i}."
        attn = layer.self_attn
        out[block + "attn.in_proj_weight"] = torch.cat(
            [attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]
        )
        out[block + "attn.in_proj_bias"] = torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias])
        out[block + "attn.out_proj.weight"] = attn.out_proj.weight
        out[block + "attn.out_proj.bias"] = attn.out_proj.bias
        for ours, theirs in (("layer_norm1", "ln_1"), ("layer_norm2", "ln_2")):
            out[block + f"{theirs}.weight"] = getattr(layer, ours).weight
            out[block + f"{theirs}.bias"] = getattr(layer, ours).bias
        out[block + "mlp.c_fc.weight"] = layer.mlp.fc1.weight
        out[block + "mlp.c_fc.bias"] = layer.mlp.fc1.bias
        out[block + "mlp.c_proj.weight"] = layer.mlp.fc2.weight
        out[block + "mlp.c_proj.bias"] = layer.mlp.fc2.bias
    return out


def _clip_state(encoder: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    return {
        prefix + "text_model." + k.removeprefix("text_model."): v for k, v in encoder.state_dict().items()
    }


def ldm_state_dict(pipe: DiffusionPipeline, arch: str) -> dict[str, torch.Tensor]:
    """The pipeline's UNet and text encoder(s) in the original single-file layout."""
    state = {
        "model.diffusion_model." + to_sgm_name(k, pipe.unet.config): v
        for k, v in pipe.unet.state_dict().items()
    }
    if arch == "sd1":
        state.update(_clip_state(pipe.text_encoder, "cond_stage_model.transformer."))
    elif arch == "sd2":
        state.update(_open_clip_state(pipe.text_encoder, "cond_stage_model.model."))
    else:
        state.update(_clip_state(pipe.text_encoder, "conditioner.embedders.0.transformer."))
        state.update(_open_clip_state(pipe.text_encoder_2, "conditioner.embedders.1.model."))
    return {k: v.detach().contiguous().clone() for k, v in state.items()}


def save_single_file(path: Path, pipe: DiffusionPipeline, arch: str) -> Path:
    save_file(ldm_state_dict(pipe, arch), str(path))
    return path
