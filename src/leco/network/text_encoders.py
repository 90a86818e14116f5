"""Text-encoder modules of kohya LoRA files (`lora_te_*`, `lora_te1_*`, `lora_te2_*`).

leco trains UNet LoRAs only, but files from other trainers may also change the text encoder(s).
They are kept as plain tensors beside the UNet network (`LoRANetwork.text_encoder_lora`) so that
`leco merge` bakes them in, and `leco generate` / `leco eval` add them to the encoders' weights at
the strength asked (diffusers, which loads the UNet part, drops some text-encoder modules).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from leco.errors import LecoError
from leco.models import ModelFamily
from leco.network.kohya import (
    ANOTHER_MODEL,
    TEXT_ENCODER_PREFIXES,
    LoraDoesNotFit,
    ModuleWeights,
    delta_weight,
    fit_to_layer,
    group_modules,
)


def text_encoder_prefixes(family: ModelFamily) -> tuple[str, ...]:
    """The key prefix of each text encoder, in the order LoadedModels holds them."""
    return ("lora_te1_", "lora_te2_") if family.is_sdxl else ("lora_te_",)


def text_encoder_layer_names(
    text_encoders: Sequence[nn.Module], family: ModelFamily
) -> dict[str, tuple[int, str]]:
    """kohya key -> (which encoder, the module path in it) of every Linear layer of the encoders'
    transformer blocks (attention q/k/v/out, MLP): the layers kohya's LoRA adapts.

    Keys use the canonical `text_model_encoder_...` path: transformers 5 dropped the `text_model.`
    level from CLIPTextModel (not from CLIPTextModelWithProjection), files never did.
    """
    names = {}
    for index, (prefix, encoder) in enumerate(
        zip(text_encoder_prefixes(family), text_encoders, strict=False)
    ):
        for name, module in encoder.named_modules():
            if isinstance(module, nn.Linear) and ".layers." in f".{name}" and not _inside_lora(name):
                name = name.removesuffix(".base_layer")  # a LoRA injected: the original layer's path
                path = "text_model." + name.removeprefix("text_model.")
                names[prefix + path.replace(".", "_")] = (index, name)
    return names


def text_encoder_layers(text_encoders: Sequence[nn.Module], family: ModelFamily) -> dict[str, nn.Linear]:
    """kohya key -> Linear layer of the encoders' transformer blocks (see text_encoder_layer_names)."""
    layers = {}
    for key, (index, name) in text_encoder_layer_names(text_encoders, family).items():
        module = text_encoders[index].get_submodule(name)
        layers[key] = getattr(module, "base_layer", module)
    return layers


def _with_text_model(key: str) -> str:
    """A kohya text-encoder key in the canonical `text_model_encoder_...` form: kohya's scripts name
    keys by the loaded model's module paths, and under transformers 5 CLIPTextModel has no
    `text_model.` level, so `lora_te_encoder_layers_...` names the same layer."""
    for prefix in TEXT_ENCODER_PREFIXES:
        if key.startswith(f"{prefix}encoder_layers_"):
            return f"{prefix}text_model_{key.removeprefix(prefix)}"
    return key


def _inside_lora(name: str) -> bool:
    return any(part in ("lora_A", "lora_B") for part in name.split("."))


class TextEncoderLoRA:
    """The text-encoder modules of a LoRA file, as tensors, ready to be checked and baked in."""

    def __init__(self, tensors: dict[str, torch.Tensor], source: str) -> None:
        self.source = source
        self.modules: dict[str, ModuleWeights] = {}
        for key, weights in group_modules(tensors, source).items():
            canonical = _with_text_model(key)
            if canonical in self.modules:
                raise LecoError(
                    f"{source}: {key} names the same layer as {canonical}; the file mixes two namings"
                )
            self.modules[canonical] = weights

    def __len__(self) -> int:
        return len(self.modules)

    def fitted(self, text_encoders: Sequence[nn.Module], family: ModelFamily) -> dict[str, ModuleWeights]:
        """The modules reshaped to their layers; a key with no layer is an error naming it."""
        layers = text_encoder_layers(text_encoders, family)
        fitted = {}
        for key, weights in self.modules.items():
            if key not in layers:
                raise LoraDoesNotFit(
                    f"{self.source}: {key} matches no text-encoder layer of this {family.name} model; "
                    f"{ANOTHER_MODEL} family"
                )
            fitted[key] = fit_to_layer(weights, layers[key], f"{self.source}: {key}")
        return fitted

    def fitted_layers(
        self, text_encoders: Sequence[nn.Module], family: ModelFamily
    ) -> list[tuple[torch.Tensor, ModuleWeights]]:
        """(the layer's weight, its module reshaped to it) for every module."""
        layers = text_encoder_layers(text_encoders, family)
        return [(layers[key].weight, weights) for key, weights in self.fitted(text_encoders, family).items()]

    @torch.no_grad()
    def merge_into(self, text_encoders: Sequence[nn.Module], family: ModelFamily, strength: float) -> None:
        """Add the modules' deltas times `strength` to the encoders' weights."""
        for weight, weights in self.fitted_layers(text_encoders, family):
            weight += strength * delta_weight(weights, weight.shape).to(weight.dtype)


class AppliedTextEncoderLoRA:
    """A file's text-encoder modules added to the encoders' weights at a strength that may change;
    `apply(0)` puts the loaded weights back exactly (sampling, where the encoders are shared)."""

    def __init__(
        self, lora: TextEncoderLoRA | None, text_encoders: Sequence[nn.Module], family: ModelFamily
    ) -> None:
        # (weight, its loaded values kept on the CPU, the module's low-rank factors on its device):
        # a full-size delta per layer would double the encoders' GPU memory (SDXL's: gigabytes).
        self.layers: list[tuple[torch.Tensor, torch.Tensor, ModuleWeights]] = []
        for weight, weights in lora.fitted_layers(text_encoders, family) if lora else []:
            factors = ModuleWeights(
                weights.down.to(weight.device), weights.up.to(weight.device), weights.alpha
            )
            self.layers.append((weight, weight.detach().to("cpu", copy=True), factors))

    @torch.no_grad()
    def apply(self, strength: float) -> None:
        """Each weight set to its loaded value plus `strength` times the module's change, added in
        fp32 as `leco merge` adds it."""
        for weight, original, factors in self.layers:
            value = original.to(weight.device)
            if strength != 0:
                value = (value.float() + strength * delta_weight(factors, weight.shape)).to(weight.dtype)
            weight.copy_(value)
