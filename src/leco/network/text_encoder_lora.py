"""A LoRA on the text encoder(s) (`network.training_method: text-encoder`): the edit changes what
the UNet reads of a prompt, not how it draws.

A text encoder is a transformer, so what it makes of each token depends on the whole prompt: a
LoRA there can turn "a digit five" red and leave "a digit five in green ink" and "a digit three"
as they are. A LoRA on the UNet's cross-attention keys and values is linear in the text states, and
as far as those add up (digit part + ink part) it cannot tell these prompts apart (docs/sliders.md).

The file holds kohya's `lora_te_*` modules (SDXL: `lora_te1_*`, `lora_te2_*`) and no UNet module;
A1111, ComfyUI, kohya's scripts and `leco generate` / `eval` / `merge` apply them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from torch import Tensor, nn

from leco.conditioning import Conditioning, PromptEncoder, layers_read
from leco.errors import LecoError
from leco.models import LoadedModels, ModelFamily
from leco.network import kohya
from leco.network.lora import (
    ADAPTER,
    SwitchableLoRA,
    forget_adapter,
    load_lora_tensors,
    lora_tensors,
    network_metadata,
    with_extra_metadata,
)
from leco.network.text_encoders import text_encoder_layer_names

TRAINING_METHOD = "text-encoder"
# Strengths at which anchors' text states are kept (anchors.text_weight): a LoRA file is used at
# negative strengths too, and through the encoder's nonlinearity -1 is not the mirror of +1.
KEPT_AT = (1.0, -1.0)


class TextEncoderLoRANetwork(SwitchableLoRA):
    """LoRA modules on every attention and MLP Linear layer of the text encoder(s).

    Implements `leco.trainable.Trainable`: the edited model is the UNet reading prompts through the
    encoders with the LoRA on, for every prompt (the empty negative prompt included, as A1111 and
    diffusers apply a text-encoder LoRA to both sides of guidance).
    """

    extra_roles: tuple[str, ...] = ()
    network_type = "lierla"
    training_method = TRAINING_METHOD

    def __init__(self, models: LoadedModels, rank: int, alpha: float, clip_skip: int | None) -> None:
        self.models, self.family = models, models.family
        self.encoder = PromptEncoder(models, clip_skip)
        names = trained_layers(models.text_encoders, models.family, clip_skip)
        smallest = min(min(models.text_encoders[i].get_submodule(n).weight.shape) for i, n in names.values())
        if rank > smallest:
            raise LecoError(
                f"network.rank: above the size of the text encoder's layers (the smallest allows "
                f"{smallest}); use at most {smallest}"
            )
        self.rank, self.alpha = rank, float(alpha or rank)  # kohya: alpha 0 means alpha = rank
        for index, encoder in enumerate(models.text_encoders):
            paths = [name for i, name in names.values() if i == index]
            if not paths:  # clip skip passes every layer of this encoder by (SDXL's first at 12)
                continue
            config = LoraConfig(
                r=rank, lora_alpha=self.alpha, target_modules=paths, lora_dropout=0.0, init_lora_weights=True
            )
            inject_adapter_in_model(config, encoder, adapter_name=ADAPTER)
        self.layers: dict[str, LoraLayer] = {
            key: models.text_encoders[i].get_submodule(name) for key, (i, name) in names.items()
        }
        for parameter in self.parameters():
            parameter.data = parameter.data.float()  # trained in fp32 whatever the encoders' dtype
            parameter.requires_grad_(True)
        self._multiplier = 1.0
        self._kept: dict[str, list[Tensor]] = {}  # text -> what the UNet reads of it, frozen

    # -- how the trainer uses it ----------------------------------------------------------------

    def edited_conditions(
        self, texts: list[str], cached: Mapping[str, Conditioning]
    ) -> dict[str, Conditioning]:
        """The texts read through the encoders at the current strength (gradients where allowed)."""
        distinct = sorted(set(texts))
        encoded = self.encoder.encode(distinct)
        return {text: encoded.row(i) for i, text in enumerate(distinct)}

    def text_state_change(self, moments: Tensor, texts: list[str]) -> Tensor:
        """The relative change of the anchors' text (and the empty prompt's, every image's negative
        side) at strengths +1 and -1: the mean squared change over the mean square, of the token
        states and, for SDXL, of the pooled text."""
        texts = sorted({*texts, ""})
        frozen = self._frozen(texts)
        changes = []
        for strength in KEPT_AT:
            with self.strength(strength):
                now = _read_by_unet(self.encoder.encode(texts))
            for state, kept in zip(now, frozen, strict=True):
                changes.append((state - kept).pow(2).mean() / kept.pow(2).mean())
        return torch.stack(changes).mean()

    def _frozen(self, texts: list[str]) -> list[Tensor]:
        """What the UNet reads of `texts` without the LoRA, each text encoded once per run (the
        anchors come a window at a time, so a cache of one window would encode them every step)."""
        missing = [text for text in texts if text not in self._kept]
        if missing:
            with torch.no_grad(), self.strength(0.0):
                read = _read_by_unet(self.encoder.encode(missing))
            self._kept.update({text: [t[i : i + 1] for t in read] for i, text in enumerate(missing)})
        kinds = len(self._kept[texts[0]])
        return [torch.cat([self._kept[text][kind] for text in texts]) for kind in range(kinds)]

    # -- weights --------------------------------------------------------------------------------

    def weight_modules(self) -> None:
        return None  # the encoders serve every step of a batch alike: one step per backward

    def state_dict(self) -> dict[str, Tensor]:
        return self.kohya_state_dict(torch.float32)

    def kohya_state_dict(self, dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
        return lora_tensors(self._by_key(), dtype)

    def load_state_dict(self, tensors: dict[str, Tensor], source: str = "state dict") -> None:
        load_lora_tensors(self._by_key(), tensors, source)

    def _by_key(self) -> dict[str, tuple[LoraLayer, float]]:
        return {key: (layer, self.alpha) for key, layer in self.layers.items()}

    def save(
        self,
        path: str | Path,
        *,
        dtype: torch.dtype = torch.float32,
        resolution: int,
        title: str | None = None,
        extra_metadata: dict[str, Any] | None = None,
    ) -> Path:
        path = Path(path)
        ranks = [(self.rank, self.alpha)]
        metadata = network_metadata(
            ranks, self.family, resolution, title or path.stem, self.network_type, self.training_method
        )
        return kohya.save_lora_file(
            path, self.kohya_state_dict(dtype), with_extra_metadata(metadata, extra_metadata)
        )

    def remove(self) -> None:
        """Take the LoRA out of the encoders again, restoring the original layers."""
        names = text_encoder_layer_names(self.models.text_encoders, self.family)
        for key, layer in self.layers.items():
            index, name = names[key]
            encoder = self.models.text_encoders[index]
            parent, _, child = name.rpartition(".")
            setattr(encoder.get_submodule(parent), child, layer.get_base_layer())
        self.layers = {}
        for encoder in self.models.text_encoders:
            forget_adapter(encoder)


def _read_by_unet(encoded: Conditioning) -> list[Tensor]:
    """The text the UNet reads: the token states, and SDXL's pooled text (from the second encoder's
    last layer, which only it reaches)."""
    return [t.float() for t in (encoded.hidden_states, encoded.pooled) if t is not None]


def trained_layers(
    text_encoders: Sequence[nn.Module], family: ModelFamily, clip_skip: int | None
) -> dict[str, tuple[int, str]]:
    """kohya key -> (encoder, module path) of the layers a text-encoder LoRA trains: every attention
    and MLP Linear whose output reaches the UNet (a layer clip skip passes by would train nothing)."""
    read = layers_read(text_encoders, family.is_sdxl, clip_skip)
    return {
        key: (index, name)
        for key, (index, name) in text_encoder_layer_names(text_encoders, family).items()
        if int(re.search(r"\.layers\.(\d+)\.", f".{name}").group(1)) < read[index]
    }
