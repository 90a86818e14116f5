"""Which UNet layers a LoRA adapts: the network type and the layer preset (ESD-x, ESD-u, ...)."""

from __future__ import annotations

from collections.abc import Callable

from diffusers.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from torch import nn

from leco.errors import LecoError

# Each preset keeps a layer by its diffusers path. The reference tool tested the path of the
# enclosing transformer block instead, which never contains "attn1"/"attn2": its xattn and
# selfattn selected nothing and noxattn selected everything.
PRESETS: dict[str, Callable[[str], bool]] = {
    "full": lambda name: True,
    "xattn": lambda name: ".attn2." in name,  # ESD-x: cross-attention only
    "xattn-strict": lambda name: name.endswith((".attn2.to_k", ".attn2.to_v")),
    # Values alone: the attention weights stay the model's, so the cross-attention output moves
    # linearly with the strength and a slider's -1 end is the exact mirror of its +1 end.
    "xattn-values": lambda name: name.endswith(".attn2.to_v"),
    "noxattn": lambda name: ".attn2." not in name,  # ESD-u: everything but cross-attention
    "innoxattn": lambda name: ".attn2." not in name,  # the reference tool's alias of noxattn
    "selfattn": lambda name: ".attn1." in name,
}
NETWORK_TYPES = ("lierla", "c3lier", "all-linear", "all")
_CONV_BLOCKS = (ResnetBlock2D, Downsample2D, Upsample2D)
# The UNet's layers outside its blocks: the input and output convs, the timestep embedding and
# SDXL's size and pooled-text embedding. A1111, ComfyUI, kohya and diffusers apply them all.
OUTSIDE_BLOCKS = (
    "conv_in",
    "conv_out",
    "time_embedding.linear_1",
    "time_embedding.linear_2",
    "add_embedding.linear_1",
    "add_embedding.linear_2",
)


def adaptable_layers(unet: nn.Module, network_type: str = "c3lier") -> list[str]:
    """Paths of the Linear/Conv2d layers a network type may adapt, in module order.

    lierla: every Linear and 1x1 conv inside transformer blocks (attention q/k/v/out, feed-forward,
    proj_in/proj_out). c3lier (LoCon) adds the layers of resnets, downsamplers and upsamplers.
    all-linear: every Linear and 1x1 conv of the UNet, the layers outside the blocks too (ai-toolkit's
    `lora`); all: every Linear and conv of the UNet (ai-toolkit's `lora` with `conv`).
    """
    if network_type not in NETWORK_TYPES:
        raise LecoError(f"network.type: {network_type!r} is not known; use {', '.join(NETWORK_TYPES)}")
    blocks: tuple[type, ...] = (Transformer2DModel,)
    if network_type != "lierla":
        blocks += _CONV_BLOCKS
    names = []
    for block_name, block in unet.named_modules():
        if isinstance(block, blocks):
            for child_name, child in block.named_modules():
                if isinstance(child, (nn.Linear, nn.Conv2d)) and not _inside_lora(child_name):
                    # With a LoRA injected, the original layer is the wrapper's `base_layer`.
                    names.append(f"{block_name}.{child_name.removesuffix('.base_layer')}")
        elif network_type in ("all-linear", "all") and block_name in OUTSIDE_BLOCKS:
            names.append(block_name)
    if network_type == "all-linear":
        names = [name for name in names if not is_conv3x3(_base(unet.get_submodule(name)))]
    return names


def _base(layer: nn.Module) -> nn.Module:
    return getattr(layer, "base_layer", layer)


def select_layers(unet: nn.Module, network_type: str, preset: str) -> list[str]:
    """The layers a network adapts; a preset that keeps nothing is an error, never a no-op."""
    if preset not in PRESETS:
        raise LecoError(f"network.training_method: {preset!r} is not known; use one of {', '.join(PRESETS)}")
    keep = PRESETS[preset]
    names = [name for name in adaptable_layers(unet, network_type) if keep(name)]
    if not names:
        raise LecoError(
            f"network.training_method: {preset!r} with network.type {network_type!r} selects no layer "
            "of this UNet; choose another preset or type"
        )
    return names


def is_conv3x3(layer: nn.Module) -> bool:
    return isinstance(layer, nn.Conv2d) and tuple(layer.kernel_size) != (1, 1)


def _inside_lora(child_name: str) -> bool:
    return any(part in ("lora_A", "lora_B") for part in child_name.split("."))
