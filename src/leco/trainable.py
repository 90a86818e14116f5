"""What a run trains, behind one small interface: a LoRA on the UNet or on the text encoders, or a
token embedding.

The training loop, checkpoints, exact resume, Ctrl-C and previews only talk to this interface, so
they work the same for all three.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from leco.conditioning import Conditioning, conditioning_for, predict
from leco.config import ConfigError, LecoConfig
from leco.models import LoadedModels
from leco.objectives import Predictions, guided


class Trainable(Protocol):
    extra_roles: tuple[str, ...]  # frozen predictions `training_target` needs besides the objective's

    def parameters(self) -> list[nn.Parameter]: ...

    def weight_modules(self) -> list[nn.Module] | None:
        """The Linear/Conv2d modules whose weights are `parameters()`, in that order (several steps'
        gradients from one backward, leco.step_gradients); None where the trained part is not so."""

    def strength(self, value: float) -> AbstractContextManager:
        """Apply the trained part at `value` (0: the original model) inside the block."""

    def edited_conditions(
        self, texts: list[str], cached: Mapping[str, Conditioning]
    ) -> dict[str, Conditioning]:
        """How the edited model reads prompt texts: their `cached` encodings, or read anew through
        trained text encoders at the current strength."""

    def student_condition(self, target: Conditioning) -> Conditioning:
        """The conditioning whose prediction is trained (the target prompt, or the trained token)."""

    def negative_condition(self, unconditional: Conditioning) -> Conditioning:
        """The negative side of classifier-free guidance when the edited model samples."""

    def training_target(self, conditional_target: Tensor, frozen: Predictions) -> Tensor:
        """Where the trained prediction must go, given what the target prompt's prediction should be."""

    def negative_prompt(self, strength: float, negative: str = "") -> str:
        """The negative prompt to sample with at `strength`."""

    def text_state_change(self, moments: Tensor, texts: list[str]) -> Tensor:
        """How much the anchor prompts `texts` (whose token states have these second moments) change
        in what the UNet reads of them, relative to its size (anchors.text_weight)."""

    def state_dict(self) -> dict[str, Tensor]: ...

    def load_state_dict(self, tensors: dict[str, Tensor], source: str = "state dict") -> None: ...

    def save(
        self,
        path: str | Path,
        *,
        dtype: torch.dtype = torch.float32,
        resolution: int,
        title: str | None = None,
        extra_metadata: dict[str, Any] | None = None,
    ) -> Path: ...

    def remove(self) -> None:
        """Take the trained part out of the models again."""


def create_trainable(models: LoadedModels, config: LecoConfig, device: torch.device) -> Trainable:
    """A fresh LoRA (identity at start) on the UNet or, with `training_method: text-encoder`, on the
    text encoders, or a token embedding (`network.type: embedding`)."""
    network = config.network
    if network.training_method == "text-encoder" and network.type != "embedding":
        from leco.network.text_encoder_lora import TextEncoderLoRANetwork

        for encoder in models.text_encoders:  # prompts are read through the trained encoders every step
            encoder.to(device)
        return TextEncoderLoRANetwork(models, network.rank, network.alpha, config.pretrained_model.clip_skip)
    if network.type == "embedding":
        from leco.embedding import TokenEmbedding

        for encoder in models.text_encoders:  # the trained token is encoded at every step
            encoder.to(device)
        return TokenEmbedding(
            models,
            network.token,
            network.vectors,
            network.init_text,
            config.pretrained_model.clip_skip,
            cfg_scale=config.train.rollout_guidance_scale,
        )
    from leco.network import LoRANetwork

    # The 4-D form exists for SD2's Linear projections only.
    if config.save.sd2_proj_4d and models.family.arch != "sd2":
        raise ConfigError(
            f"save.sd2_proj_4d: only for SD2, whose Linear proj_in/proj_out kohya's SD2 scripts build as 1x1 "
            f"convs; {models.source} is {models.family.name}, read in the one form by every tool; remove it"
        )
    lora = LoRANetwork.create(models.unet, models.family, network)
    lora.proj_4d = config.save.sd2_proj_4d
    return lora


@dataclass
class EditedModel:
    """The UNet with the trained part applied: what rollouts sample with and what the loss trains."""

    unet: nn.Module
    trainable: Trainable
    embeddings: dict[str, Conditioning]  # prompt text -> its encoding (cached once)
    sdxl: bool
    autocast: Callable[[], AbstractContextManager]

    def predict(self, latents: Tensor, timesteps: Tensor, cond: Conditioning) -> Tensor:
        return predict(self.unet, latents, timesteps, cond)

    def condition(
        self, embeds: Conditioning, batch: int, size: tuple[int, int], crop: tuple[int, int]
    ) -> Conditioning:
        return conditioning_for(embeds, batch, size, crop, self.sdxl)

    def student(self, samples: list, targets: list[tuple[int, str]]) -> list[Tensor]:
        """The trained predictions for (sample index, target text) pairs, in one UNet call."""
        with self.autocast():
            edited = self.trainable.edited_conditions([text for _, text in targets], self.embeddings)
        conds = {text: self.trainable.student_condition(edited[text]) for text in edited}
        picked = [samples[index] for index, _ in targets]
        cond = Conditioning.cat(
            [
                self.condition(conds[text], len(s.latents), s.size, s.crop)
                for (_, text), s in zip(targets, picked, strict=True)
            ]
        )
        latents, timesteps = torch.cat([s.latents for s in picked]), torch.cat([s.timesteps for s in picked])
        with self.autocast():
            predictions = self.predict(latents, timesteps, cond)
        return list(predictions.split([len(s.latents) for s in picked]))

    def guided(
        self,
        target: str,
        unconditional: str,
        scale: float,
        size: tuple[int, int],
        crop: tuple[int, int],
        batch: int,
        edited: bool = True,
    ) -> Callable[[Tensor, Tensor], Tensor]:
        """Sampling `target` with classifier-free guidance against the trainable's negative side (the
        plain `unconditional` where not `edited`: the frozen model samples). The texts are read as
        the edited model reads them at the strength set when this is called."""
        texts = [target, unconditional]
        if edited:
            with self.autocast():
                read = self.trainable.edited_conditions(texts, self.embeddings)
        else:
            read = {text: self.embeddings[text] for text in texts}
        positive = self.condition(read[target], batch, size, crop)
        negative = self.trainable.negative_condition(read[unconditional]) if edited else read[unconditional]
        both = Conditioning.cat([self.condition(negative, batch, size, crop), positive])

        def model(latents: Tensor, timestep: Tensor) -> Tensor:
            with self.autocast():
                if scale == 1.0:  # no guidance, no doubled batch
                    return self.predict(latents, timestep, positive)
                negative_prediction, prediction = self.predict(
                    torch.cat([latents, latents]), timestep, both
                ).chunk(2)
            return guided(negative_prediction, prediction, scale)

        return model
