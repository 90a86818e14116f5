"""The LECO/ESD objective: where the edited model's prediction for `target` should go.

All arguments are predictions of the frozen model (noise for epsilon models, v for v-prediction
models: the algebra is the same) at the same latents and timestep.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def erase_target(neutral: Tensor, positive: Tensor, unconditional: Tensor, guidance_scale: float) -> Tensor:
    """Steer away from the concept: neutral - g * (positive - unconditional)."""
    return neutral - guidance_scale * (positive - unconditional)


def enhance_target(neutral: Tensor, positive: Tensor, unconditional: Tensor, guidance_scale: float) -> Tensor:
    """Steer towards the concept: neutral + g * (positive - unconditional)."""
    return neutral + guidance_scale * (positive - unconditional)


def leco_target(
    action: str, neutral: Tensor, positive: Tensor, unconditional: Tensor, guidance_scale: float
) -> Tensor:
    objective = {"erase": erase_target, "enhance": enhance_target}[action]
    return objective(neutral.float(), positive.float(), unconditional.float(), guidance_scale)


def leco_loss(student: Tensor, target: Tensor) -> Tensor:
    """Mean squared error in float32, whatever precision the UNet ran in."""
    return F.mse_loss(student.float(), target.float())


def guided(unconditional: Tensor, conditional: Tensor, guidance_scale: float) -> Tensor:
    """Classifier-free guidance: uncond + s * (cond - uncond)."""
    return unconditional + guidance_scale * (conditional - unconditional)
