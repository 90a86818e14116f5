"""Where the trained prediction should go: one small function per action.

Each action maps the frozen models' predictions at the sample's latents and timestep (noise for
epsilon models, v for v-prediction models: the algebra is the same) to the target of the trained
prediction for the entry's target prompt. The predictions are named by role:

- `positive`, `unconditional`: the concept's direction (from the teacher model in a transplant);
- `neutral`: where an erased concept should go (default: the unconditional prompt);
- `target`: the frozen model's own prediction for the target prompt;
- `empty`: the frozen model's prediction for "" (what a blank negative prompt gives).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

import torch.nn.functional as F
from torch import Tensor

Predictions = Mapping[str, Tensor]
# Roles that carry the concept; a transplant takes them from the teacher model, the rest from the
# frozen student, so only the concept's direction moves between models.
CONCEPT_ROLES = ("positive", "unconditional")


def erase(p: Predictions, guidance_scale: float) -> Tensor:
    """Steer away from the concept: neutral - g * (positive - unconditional) (ESD)."""
    return p["neutral"] - guidance_scale * (p["positive"] - p["unconditional"])


def enhance(p: Predictions, guidance_scale: float) -> Tensor:
    """Steer towards the concept: neutral + g * (positive - unconditional)."""
    return p["neutral"] + guidance_scale * (p["positive"] - p["unconditional"])


def distill(p: Predictions, guidance_scale: float) -> Tensor:
    """The guided prediction uncond + s * (cond - uncond), to be reached by the conditional one alone."""
    return guided(p["unconditional"], p["positive"], guidance_scale)


def imitate(p: Predictions, guidance_scale: float) -> Tensor:
    """Predict what the teacher predicts for the positive prompt: the concept as the teacher draws it
    (transplant), where `enhance` carries over only its direction."""
    return p["positive"]


def preserve(p: Predictions, guidance_scale: float) -> Tensor:
    """Stay what the original model predicts for this prompt."""
    return p["target"]


@dataclass(frozen=True)
class Objective:
    target: Callable[[Predictions, float], Tensor]
    roles: tuple[str, ...]  # the predictions `target` reads
    # Guidance of the rollout that makes the training latents; None: train.rollout_guidance_scale.
    # A distilled LoRA is used at guidance 1, so its latents are made that way.
    rollout_guidance: float | None = None


OBJECTIVES: dict[str, Objective] = {
    "erase": Objective(erase, ("positive", "neutral", "unconditional")),
    "enhance": Objective(enhance, ("positive", "neutral", "unconditional")),
    "distill": Objective(distill, ("positive", "unconditional"), rollout_guidance=1.0),
    "preserve": Objective(preserve, ("target",)),
    "imitate": Objective(imitate, ("positive",)),
}


def rescaled_like_neutral(objective: Objective) -> Objective:
    """The objective with its target moved to the neutral prediction's mean and standard deviation
    (over the sample), as ai-toolkit's Concept Slider trains (`rescale_target`)."""

    def target(p: Predictions, guidance_scale: float) -> Tensor:
        # in float32: in half precision the small constant below would round to 0
        unscaled, neutral = objective.target(p, guidance_scale).float(), p["neutral"].float()
        # the small constant keeps a flat target (a zero push on a constant prediction) finite
        standardized = (unscaled - unscaled.mean()) / (unscaled.std() + 1e-8)
        return standardized * neutral.std() + neutral.mean()

    return replace(objective, target=target, roles=tuple(dict.fromkeys((*objective.roles, "neutral"))))


def as_negative_prompt(conditional_target: Tensor, p: Predictions, cfg_scale: float) -> Tensor:
    """The prediction a NEGATIVE prompt must give so that CFG reaches what `conditional_target` would.

    Sampling with prompt c and negative N at scale s gives N + s * (c - N). We want the result the
    edited model gives with an empty negative prompt, empty + s * (T - empty), where T is the
    objective's target for c. Solving for N:  N = (empty + s * (T - empty) - s * c) / (1 - s).
    For erase (T = empty - g * (c - empty)) this is empty + s * (g + 1) / (s - 1) * (c - empty): the
    concept, amplified. For preserve (T = c) it is `empty`: the negative prompt then changes nothing.
    """
    empty, conditional = p["empty"], p["target"]
    s = cfg_scale
    return (empty + s * (conditional_target - empty) - s * conditional) / (1 - s)


def loss(student: Tensor, target: Tensor, weights: Tensor | None = None) -> Tensor:
    """Mean squared error in float32, whatever precision the UNet ran in; optional per-image weights."""
    if weights is None:
        return F.mse_loss(student.float(), target.float())
    per_image = (student.float() - target.float()).pow(2).flatten(1).mean(dim=1)
    return (weights * per_image).mean()


def min_snr_weights(alphas_cumprod: Tensor, timesteps: Tensor, gamma: float, v_prediction: bool) -> Tensor:
    """Min-SNR-gamma weights (Hang et al. 2023): min(snr, gamma) / snr for noise, / (snr + 1) for v.

    SNR from the alphas the trainer holds as a tensor, not diffusers' compute_snr, which wants a
    scheduler object."""
    alpha = alphas_cumprod.to(timesteps.device)[timesteps.long()]
    snr = alpha / (1 - alpha)
    return snr.clamp(max=gamma) / (snr + 1 if v_prediction else snr)


def min_snr_weighting(
    gamma: float | None, alphas_cumprod: Tensor, v_prediction: bool
) -> Callable[[Tensor], Tensor | None]:
    """Timesteps -> their min-SNR-gamma loss weights; no weights (None) without a gamma."""
    if gamma is None:
        return lambda timesteps: None
    return lambda timesteps: min_snr_weights(alphas_cumprod, timesteps, gamma, v_prediction)


def guided(unconditional: Tensor, conditional: Tensor, guidance_scale: float) -> Tensor:
    """Classifier-free guidance: uncond + s * (cond - uncond)."""
    return unconditional + guidance_scale * (conditional - unconditional)
