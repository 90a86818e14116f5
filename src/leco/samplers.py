"""The samplers leco names as A1111 does, as diffusers schedulers (and back, for the infotext)."""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DEISMultistepScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2AncestralDiscreteScheduler,
    KDPM2DiscreteScheduler,
    LCMScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    SchedulerMixin,
    UniPCMultistepScheduler,
)
from torch import Tensor

from leco.errors import LecoError, warn
from leco.models import sampler_from_config


@dataclass(frozen=True)
class Sampler:
    scheduler: type
    a1111: str  # its name in A1111's UI and infotext
    settings: dict[str, Any] = field(default_factory=dict)  # the algorithm's own choices
    k_diffusion: bool = True  # one of A1111's k-diffusion samplers, which take a "Schedule type"


def _takes(scheduler: type, setting: str) -> bool:
    return setting in inspect.signature(scheduler.__init__).parameters


def _takes_karras(sampler: Sampler) -> bool:
    return _takes(sampler.scheduler, "use_karras_sigmas")


SAMPLERS = {
    "ddim": Sampler(DDIMScheduler, "DDIM", k_diffusion=False),
    "ddpm": Sampler(DDPMScheduler, "DDPM", k_diffusion=False),
    "euler": Sampler(EulerDiscreteScheduler, "Euler"),
    "euler_a": Sampler(EulerAncestralDiscreteScheduler, "Euler a"),
    "dpm++": Sampler(
        DPMSolverMultistepScheduler,
        "DPM++ 2M",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "solver_type": "midpoint"},
    ),
    "dpm++_sde": Sampler(
        DPMSolverMultistepScheduler,
        "DPM++ 2M SDE",
        {"algorithm_type": "sde-dpmsolver++", "solver_order": 2, "solver_type": "midpoint"},
    ),
    "dpm++_sde_heun": Sampler(
        DPMSolverMultistepScheduler,
        "DPM++ 2M SDE Heun",
        {"algorithm_type": "sde-dpmsolver++", "solver_order": 2, "solver_type": "heun"},
    ),
    "dpm++_3m_sde": Sampler(
        DPMSolverMultistepScheduler,
        "DPM++ 3M SDE",
        {"algorithm_type": "sde-dpmsolver++", "solver_order": 3, "solver_type": "midpoint"},
    ),
    "deis": Sampler(DEISMultistepScheduler, "DEIS", k_diffusion=False),  # ComfyUI's deis
    "dpm2": Sampler(KDPM2DiscreteScheduler, "DPM2"),
    "dpm2_a": Sampler(KDPM2AncestralDiscreteScheduler, "DPM2 a"),
    "heun": Sampler(HeunDiscreteScheduler, "Heun"),
    "lms": Sampler(LMSDiscreteScheduler, "LMS"),
    # A1111's LCM and ComfyUI's lcm: made for LCM-distilled models (or an LCM LoRA), as there
    "lcm": Sampler(LCMScheduler, "LCM"),
    "plms": Sampler(PNDMScheduler, "PLMS", {"skip_prk_steps": True}, k_diffusion=False),
    # diffusers' UniPC, the bh2 variant: A1111's UniPC and ComfyUI's uni_pc default to bh1, which
    # diffusers 0.42 samples as NaN (UniPCMultistepScheduler(solver_type="bh1"), any model)
    "unipc": Sampler(UniPCMultistepScheduler, "UniPC", {"solver_type": "bh2"}, k_diffusion=False),
}


KARRAS = "_karras"  # a name's suffix: Karras sigmas (A1111's "DPM++ 2M Karras", or Schedule type: Karras)


# Other names users copy from their tools (compared in lower case, spaces collapsed): A1111's UI and
# infotext, its old k_ names (k_..._ka: Karras), ComfyUI's KSampler names.
SAMPLER_ALIASES = {
    **{sampler.a1111.lower(): key for key, sampler in SAMPLERS.items()},
    "euler_ancestral": "euler_a", "dpm_2": "dpm2", "dpm_2_a": "dpm2_a", "dpm_2_ancestral": "dpm2_a",
    "dpmpp_2m": "dpm++", "dpmpp_2m_sde": "dpm++_sde", "dpmpp_2m_sde_heun": "dpm++_sde_heun",
    "uni_pc": "unipc", "uni_pc_bh2": "unipc", "pndm": "plms",
    # ComfyUI's _gpu samplers are the same algorithms with their noise drawn on the GPU
    "dpmpp_2m_sde_gpu": "dpm++_sde", "dpmpp_2m_sde_heun_gpu": "dpm++_sde_heun",
    "dpmpp_3m_sde": "dpm++_3m_sde", "dpmpp_3m_sde_gpu": "dpm++_3m_sde",
}  # fmt: skip


# Samplers of A1111 and ComfyUI that diffusers has no faithful counterpart for: why, and the nearest
# one here (said instead of a bare "not known", since users copy these names from their tools).
_NO_RANDOM_STREAM = (
    "diffusers' version draws its noise from a random seed of its own (and needs torchsde), "
    "so an image would not repeat with its seed"
)


_NO_SCHEDULER = "diffusers has no scheduler for it"


_CFG_PP = "CFG++ changes how guidance is mixed in, which diffusers' pipelines do not do"


UNOFFERED_SAMPLERS = {
    "dpm++ sde": (_NO_RANDOM_STREAM, "DPM++ 2M SDE"), "dpmpp_sde": (_NO_RANDOM_STREAM, "dpmpp_2m_sde"),
    "dpmpp_sde_gpu": (_NO_RANDOM_STREAM, "dpmpp_2m_sde_gpu"),
    "dpm++ 2s a": (_NO_SCHEDULER, "DPM2 a"), "dpmpp_2s_ancestral": (_NO_SCHEDULER, "dpm_2_ancestral"),
    "dpm fast": (_NO_SCHEDULER, "DPM++ 2M"), "dpm_fast": (_NO_SCHEDULER, "dpmpp_2m"),
    "dpm adaptive": (_NO_SCHEDULER, "DPM++ 2M"), "dpm_adaptive": (_NO_SCHEDULER, "dpmpp_2m"),
    "heunpp2": (_NO_SCHEDULER, "heun"), "restart": (_NO_SCHEDULER, "Heun"),
    "ipndm": (_NO_SCHEDULER, "plms"), "ipndm_v": (_NO_SCHEDULER, "plms"),
    "res_multistep": (_NO_SCHEDULER, "dpmpp_2m"), "gradient_estimation": (_NO_SCHEDULER, "euler"),
    "er_sde": (_NO_SCHEDULER, "dpmpp_2m_sde"), "seeds_2": (_NO_SCHEDULER, "dpmpp_2m_sde"),
    "seeds_3": (_NO_SCHEDULER, "dpmpp_3m_sde"), "sa_solver": (_NO_SCHEDULER, "dpmpp_2m_sde"),
    "uni_pc_bh1": ("diffusers 0.42 samples the bh1 variant as NaN", "uni_pc_bh2"),
    "ddim cfg++": (_CFG_PP, "DDIM"), "euler_cfg_pp": (_CFG_PP, "euler"),
    "euler_ancestral_cfg_pp": (_CFG_PP, "euler_ancestral"), "dpmpp_2m_cfg_pp": (_CFG_PP, "dpmpp_2m"),
    "dpmpp_2s_ancestral_cfg_pp": (_CFG_PP, "dpm_2_ancestral"),
}  # fmt: skip


SAMPLER_HINT = (  # what --sampler and a spec's sampler take
    f"use model or one of {', '.join(SAMPLERS)} (or A1111's names, e.g. 'DPM++ 2M'); "
    "add ' Karras' for Karras sigmas (not with "
    + ", ".join(key for key, sampler in SAMPLERS.items() if not _takes_karras(sampler))
    + ")"
)


# What a model's scheduler config says of the model (its noise schedule, its prediction, where its
# timesteps lie), kept under any sampler; the rest (Karras sigmas, solver order, SDE) is the sampler's
# own, and a sampler named explicitly means its own defaults, not a model config's choices.
MODEL_SCHEDULE_KEYS = (
    "num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "prediction_type",
    "timestep_spacing", "steps_offset", "rescale_betas_zero_snr", "clip_sample", "clip_sample_range",
    "set_alpha_to_one",
)  # fmt: skip


def unknown_sampler(text: str) -> str:
    """Why `text` names no sampler here, and what to use: the nearest sampler for one of A1111's or
    ComfyUI's that diffusers cannot run faithfully, else every name there is."""
    name = " ".join(text.lower().split())
    karras = name.endswith(" karras")
    name = name.removesuffix(" karras")
    if name in UNOFFERED_SAMPLERS:
        reason, nearest = UNOFFERED_SAMPLERS[name]
        if karras and sampler_name(f"{nearest} Karras"):
            nearest += " Karras"
        return f"{text!r} is not offered: {reason}; the nearest here is {nearest!r}"
    return f"{text!r} is not known; {SAMPLER_HINT}"


def sampler_name(text: str) -> str | None:
    """The SAMPLERS key (or "model"), with KARRAS appended for Karras sigmas, that `text` names in
    ours, A1111's or ComfyUI's words; None if none."""
    name = " ".join(text.lower().split())
    karras = name.endswith((" karras", KARRAS)) or (name.startswith("k_") and name.endswith("_ka"))
    if karras:
        name = name.removesuffix("_ka") if name.endswith("_ka") else name[: -len(KARRAS)].rstrip()
    name = name.removeprefix("k_")
    name = SAMPLER_ALIASES.get(name, name)
    if name == "model":
        return None if karras else name
    if name not in SAMPLERS:
        return None
    if karras and not _takes_karras(SAMPLERS[name]):
        return None
    return name + KARRAS if karras else name


def make_scheduler(config: dict, sampler: str) -> SchedulerMixin:
    name = sampler_name(sampler)
    if name is None:
        raise LecoError(f"--sampler: {unknown_sampler(sampler)}")
    if name == "model":
        import diffusers

        cls = getattr(diffusers, str(config.get("_class_name")), None) or DDIMScheduler
        if config.get("rescale_betas_zero_snr") and not _takes(cls, "rescale_betas_zero_snr"):
            # the model's own choice, as diffusers would sample it (merge and previews use it too):
            # said, not refused
            warn(
                f"the model's own scheduler, {cls.__name__}, ignores its zero-terminal-SNR schedule "
                f"(rescale_betas_zero_snr) and samples it with the wrong noise levels; for images, name a "
                f"sampler that keeps it: {_zero_snr_samplers()}"
            )
        return sampler_from_config(cls, config)
    sampler = SAMPLERS[name.removesuffix(KARRAS)]
    settings = {**sampler.settings, **({"use_karras_sigmas": True} if name.endswith(KARRAS) else {})}
    model_schedule = {key: value for key, value in config.items() if key in MODEL_SCHEDULE_KEYS}
    if model_schedule.get("rescale_betas_zero_snr") and not _takes(
        sampler.scheduler, "rescale_betas_zero_snr"
    ):
        # diffusers' class would drop the key silently and sample a zero-SNR model with the wrong
        # noise levels (washed-out images), so refuse instead.
        raise LecoError(
            f"sampler {sampler.a1111}: cannot sample this model: its noise schedule is rescaled to zero "
            f"terminal SNR (rescale_betas_zero_snr), which {sampler.scheduler.__name__} ignores; "
            f"use one of {_zero_snr_samplers()}"
        )
    return sampler_from_config(sampler.scheduler, model_schedule, **settings)


def _zero_snr_samplers() -> str:
    return ", ".join(
        key for key, each in SAMPLERS.items() if _takes(each.scheduler, "rescale_betas_zero_snr")
    )


def a1111_sampler(scheduler: Any) -> dict[str, str]:
    """A1111's infotext words for this scheduler: `Sampler`, and `Schedule type` for its k-diffusion
    samplers or Karras sigmas (A1111 1.9+ reads a missing one as Automatic: Karras for DPM++ 2M)."""
    config, karras = scheduler.config, bool(scheduler.config.get("use_karras_sigmas"))
    for sampler in SAMPLERS.values():
        if type(scheduler) is sampler.scheduler and all(
            config.get(k) == v for k, v in sampler.settings.items()
        ):
            if not sampler.k_diffusion and not karras:
                return {"Sampler": sampler.a1111}
            return {"Sampler": sampler.a1111, "Schedule type": "Karras" if karras else "Uniform"}
    return {"Sampler": type(scheduler).__name__}


def training_alphas_cumprod(scheduler_config: dict[str, Any]) -> Tensor:
    """The training noise schedule's alpha_bar_t for t = 0 .. T-1."""
    config = {k: v for k, v in scheduler_config.items() if not k.startswith("_")}
    return DDPMScheduler.from_config(config).alphas_cumprod


def refuse_epsilon_at_zero_snr(scheduler_config: dict[str, Any], model: str) -> None:
    """A zero-terminal-SNR schedule with an epsilon model: at t = 999 the latent is pure noise, so its
    prediction says nothing of the image and every conversion from it divides by zero (the loss
    would turn nan at the first step)."""
    predicts = scheduler_config.get("prediction_type", "epsilon")
    if scheduler_config.get("rescale_betas_zero_snr") and predicts == "epsilon":
        raise LecoError(
            f"{model}: its scheduler rescales the noise schedule to zero terminal SNR "
            "(rescale_betas_zero_snr: true) but the model predicts epsilon, which cannot be trained "
            "there; such models predict v: set v_pred: true if it is one, else its scheduler config's "
            "rescale_betas_zero_snr is wrong (false for an epsilon model)"
        )
