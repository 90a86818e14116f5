"""Images from a model with a LoRA at several strengths, as users compare them in A1111's X/Y plot."""

from __future__ import annotations

import inspect
import json
import math
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DEISMultistepScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2AncestralDiscreteScheduler,
    KDPM2DiscreteScheduler,
    LCMScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)
from PIL import Image
from tqdm.auto import tqdm

from leco import __version__
from leco.conditioning import checked_clip_skip, encode_text, warn_if_misread, words_a_token_spells
from leco.config import MAX_STRENGTH, typed_float
from leco.errors import LecoError, warn
from leco.files import GRID, load_torch_file, refuse_earlier_outputs, safetensors_metadata
from leco.images import (
    ImageRequest,
    format_strength,
    make_grid,
    save_image,
    strengths_named_alike,
    unique_slugs,
)
from leco.models import (
    CHECKPOINT_SUFFIXES,
    LoadedModels,
    ModelFamily,
    quiet_library_logs,
    sampler_from_config,
)
from leco.network import kohya
from leco.network.peft_format import diffusers_pipeline_reads, is_diffusers_layout, unet_module_paths
from leco.network.text_encoders import AppliedTextEncoderLoRA, TextEncoderLoRA


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


ADAPTER = "lora"
# Images per pipeline call when the user sets none: 8 at 512x512, 2 at 1024x1024 (CFG doubles the
# UNet batch), and at most MAX_AUTO_BATCH for small models, where bigger batches stop paying off.
AUTO_BATCH_PIXELS = 8 * 512 * 512
MAX_AUTO_BATCH = 64
MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes seeds below 2**64
MAX_SEEDS = 10_000  # one --seeds list; more is a typo, not a plan
# Key parts of every LoRA layout diffusers loads (kohya, diffusers/peft, older diffusers).
LORA_KEY_MARKERS = ("lora_down", "lora_up", "lora_A", "lora_B", "lora.down", "lora.up", "lora_linear_layer")


def is_embedding_file(path: str | Path) -> bool:
    """Whether `path` is a readable textual-inversion file: .safetensors, or A1111's .pt / .bin."""
    path = Path(path)
    if path.suffix.lower() not in (".safetensors", ".pt", ".bin") or not path.is_file():
        return False
    if path.suffix.lower() != ".safetensors":
        try:  # an embedding is a few KB; anything read_embedding refuses (a LoRA .pt) is none
            return path.stat().st_size < 16 * 2**20 and bool(read_embedding(path))
        except (LecoError, OSError):
            return False
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as file:
            shapes = {key: file.get_slice(key).get_shape() for key in file.keys()}  # noqa: SIM118
            return kohya.is_embedding(list(shapes)) or kohya.is_one_token_embedding(shapes)
    except (SafetensorError, OSError):
        return False  # read_lora_header names the damage


def _has_lora_keys(keys: Iterable[str]) -> bool:
    """Whether any key names a LoRA layer, in any layout diffusers loads."""
    return any(marker in key for key in keys for marker in LORA_KEY_MARKERS)


MAX_SAMPLING_STEPS = 1000  # the samplers take at most one step per training timestep


def is_image_side(pixels: int) -> bool:
    """A height or width diffusers draws: a positive multiple of 8 (the VAE's), at most MAX_SIDE."""
    from leco.config import MAX_SIDE

    return 0 < pixels <= MAX_SIDE and pixels % 8 == 0


def is_guidance(scale: float) -> bool:
    from leco.config import MAX_GUIDANCE

    return math.isfinite(scale) and 0 <= scale <= MAX_GUIDANCE


@dataclass
class SamplingSettings:
    steps: int = 30
    guidance: float = 7.0
    height: int | None = None  # None: the model's native size
    width: int | None = None
    negative_prompt: str = ""
    sampler: str = "model"  # the model's own scheduler, or one of SAMPLERS
    batch_size: int | None = None  # images per pipeline call; None: as many as AUTO_BATCH_PIXELS allows
    clip_skip: int = 1  # A1111's: 1 = the text encoder's last layer, 2 = the penultimate one

    def __post_init__(self) -> None:
        """What `leco generate` checks of its options, for callers of the Python API (one line, not
        a ZeroDivisionError or diffusers' error halfway through)."""
        from leco.config import MAX_GUIDANCE, MAX_SIDE

        if not 1 <= self.steps <= MAX_SAMPLING_STEPS:
            raise LecoError(
                f"steps: {self.steps}; sampling takes 1 to {MAX_SAMPLING_STEPS} steps (one per "
                "training timestep)"
            )
        if not is_guidance(self.guidance):
            raise LecoError(f"guidance: {self.guidance}; a number from 0 to {MAX_GUIDANCE:g}, e.g. 3 or 7.5")
        for name in ("height", "width"):
            side = getattr(self, name)
            if side is not None and not is_image_side(side):
                raise LecoError(f"{name}: {side}; image sides are positive multiples of 8 up to {MAX_SIDE}")
        if self.batch_size is not None and self.batch_size < 1:
            raise LecoError(f"batch_size: {self.batch_size}; a pipeline call makes at least 1 image")
        if self.clip_skip < 1:
            raise LecoError(f"clip_skip: {self.clip_skip}; it counts from 1 (the last layer), as A1111's")


def build_pipeline(models: LoadedModels, sampler: str = "model") -> DiffusionPipeline:
    """A diffusers text-to-image pipeline over already loaded parts (VAE included)."""
    if models.vae is None:
        raise LecoError("generation needs the VAE: load the model with with_vae=True")
    # Imported here, quietly: the pipelines import transformers' image processors, which print a
    # notice when torchvision is absent (the Python API too, not only the CLI, stays quiet).
    with quiet_library_logs():
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    scheduler = make_scheduler(models.scheduler_config, sampler)
    parts = {"vae": models.vae, "unet": models.unet, "scheduler": scheduler}
    if models.family.is_sdxl:
        pipe = StableDiffusionXLPipeline(
            text_encoder=models.text_encoders[0],
            text_encoder_2=models.text_encoders[1],
            tokenizer=models.tokenizers[0],
            tokenizer_2=models.tokenizers[1],
            **parts,
        )
    else:
        pipe = StableDiffusionPipeline(
            text_encoder=models.text_encoders[0],
            tokenizer=models.tokenizers[0],
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
            **parts,
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def make_scheduler(config: dict, sampler: str):
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


@contextmanager
def lora_strengths(
    pipe: DiffusionPipeline, lora: str | Path | None, family: ModelFamily, model: str | None = None
) -> Iterator[Callable[[float], None]]:
    """Load a LoRA the way diffusers users do; yields a function that sets its strength.

    The LoRA is unloaded on exit: the pipeline shares its UNet with the caller's loaded models,
    which must come back unchanged (a second evaluation on them would otherwise find it there).
    """
    if lora is None:
        yield lambda strength: None
        return
    path = Path(lora)
    header = read_lora_header(path, family)
    check_lora_fits(header, pipe.unet, family, model)
    check_lora_finite(path)
    unet_part, text_part = _as_diffusers_loads_it(header, pipe.unet, family)
    # diffusers 0.42 with transformers 5 keeps a kohya file's text-encoder MLP modules but drops its
    # attention ones (q/k/v/out, "unexpected keys" it logs and goes on), where A1111, ComfyUI and
    # `leco merge` apply them all: leco applies every text-encoder module itself.
    encoders = [encoder for _, encoder in _text_encoders(pipe)]
    text_lora = TextEncoderLoRA(text_part, f"--lora: {path}") if text_part else None
    text_deltas = AppliedTextEncoderLoRA(text_lora, encoders, family)
    if unet_part is not None:
        try:
            with quiet_library_logs(errors=False):  # diffusers logs the error it raises, and more
                pipe.load_lora_weights(unet_part, adapter_name=ADAPTER)
        except KeyError as error:
            raise LecoError(_unread_settings(path, header, error)) from None
        except (OSError, ValueError, RuntimeError) as error:
            raise LecoError(
                f"--lora: {path} cannot be applied to this model ({str(error).splitlines()[0][:160]})"
            ) from None

    def set_strength(strength: float) -> None:
        if unet_part is not None:
            pipe.set_adapters([ADAPTER], adapter_weights=[float(strength)])
        text_deltas.apply(strength)

    try:
        yield set_strength
    finally:
        text_deltas.apply(0.0)
        if unet_part is not None:
            pipe.unload_lora_weights()


def _unread_settings(path: Path, header: LoraHeader, error: KeyError) -> str:
    """What to say when diffusers finds a key missing: in a PEFT file, its adapter settings."""
    if "lora_adapter_metadata" in header.metadata:
        return (
            f"--lora: {path}: its lora_adapter_metadata (the adapter settings diffusers reads) lacks "
            f"{error}; save the file again with diffusers' save_lora_weights, or remove that metadata"
        )
    return f"--lora: {path} cannot be applied to this model (no {error} where diffusers looks for it)"


def _as_diffusers_loads_it(
    header: LoraHeader, unet: torch.nn.Module, family: ModelFamily
) -> tuple[str | dict | None, dict[str, torch.Tensor]]:
    """(what diffusers loads: the file's path, or its UNet tensors, None if it has none; the
    text-encoder tensors, which leco applies itself: see lora_strengths).

    The UNet tensors are changed where diffusers would apply them otherwise than kohya's formula
    does (every other tensor handed over as it is, for diffusers to read):

    - kohya's SD2 trainers (and `leco convert --sd2-proj 4d`) write the Linear proj_in/proj_out as
      1x1 convs, and some tools write a conv's 1x1 tensors as 2-D, which diffusers refuses where
      A1111 and ComfyUI reshape them: reshaped to the layer's form;
    - where the modules' alphas differ (resized or merged LoRAs), diffusers files the attention
      layers' alphas under names no layer has, so those layers get the most common alpha: each
      module's alpha/rank is folded into its lora_up and the alphas left out (scale 1 each);
    - SDXL modules named by diffusers paths (p1atdev/LECO, sliders) take their SGM names, the ones
      diffusers' kohya reader knows (it has no rule for add_embedding and drops it without a word).
    """
    by_key = kohya.unet_layer_keys(unet, family)
    reshaped = _modules_in_another_form(header, unet, by_key)
    renamed = _sgm_names(header, unet, family, by_key)
    alphas = _module_alphas(header)
    plain = all(
        key.partition(".")[2] in ("lora_down.weight", "lora_up.weight", "alpha") for key in header.shapes
    )
    fold = len(set(alphas.values())) > 1 and plain  # DoRA and other kinds: diffusers' reading stands
    has_text = any(key.startswith(kohya.TEXT_ENCODER_PREFIXES) for key in header.shapes)
    if not reshaped and not fold and not has_text and not renamed and header.tensors is None:
        return str(header.path), {}
    from safetensors.torch import load_file

    tensors = dict(header.tensors) if header.tensors is not None else load_file(str(header.path))
    text = {key: tensors.pop(key) for key in list(tensors) if key.startswith(kohya.TEXT_ENCODER_PREFIXES)}
    for module, shapes in reshaped.items():
        for part, shape in zip(("lora_down.weight", "lora_up.weight"), shapes, strict=True):
            tensors[f"{module}.{part}"] = tensors[f"{module}.{part}"].reshape(shape)
    if fold:
        for module, alpha in alphas.items():
            if f"{module}.lora_up.weight" not in tensors:
                continue  # a text-encoder module, applied by leco
            up = tensors[f"{module}.lora_up.weight"]
            tensors[f"{module}.lora_up.weight"] = up * (
                alpha / header.shapes[f"{module}.lora_down.weight"][0]
            )
            tensors.pop(f"{module}.alpha", None)
    for key in list(tensors):
        module, _, part = key.partition(".")
        if module in renamed:
            tensors[f"{renamed[module]}.{part}"] = tensors.pop(key)
    return (tensors or None), text


def _sgm_names(
    header: LoraHeader, unet: torch.nn.Module, family: ModelFamily, by_key: dict[str, str]
) -> dict[str, str]:
    """An SDXL file's modules named by diffusers paths -> their SGM names (a file naming one layer
    both ways is refused, as `leco merge` refuses it)."""
    if not family.is_sdxl:
        return {}
    modules = dict.fromkeys(key.partition(".")[0] for key in header.shapes)  # text encoders: in no by_key
    canonical = kohya.canonical_keys(modules, by_key, family, unet.config, f"--lora: {header.path}")
    return {module: sgm for module, sgm in canonical.items() if sgm != module}


def _modules_in_another_form(
    header: LoraHeader, unet: torch.nn.Module, by_key: dict[str, str]
) -> dict[str, tuple[list[int], list[int]]]:
    """The file's modules whose 1x1 tensors are in the other form than their layer's (Linear layers
    given as 1x1 convs, kohya's SD2 form; 1x1 convs or a conv's lora_up given as 2-D), with the
    shapes diffusers needs for them (it refuses either form where A1111 and ComfyUI reshape)."""
    reshaped = {}
    for key, down in header.shapes.items():
        module, _, part = key.partition(".")
        up = header.shapes.get(f"{module}.lora_up.weight")
        if part != "lora_down.weight" or module not in by_key or up is None:
            continue
        shapes = _fitted_shapes(down, up, unet.get_submodule(by_key[module]))
        if shapes != (down, up):
            reshaped[module] = shapes
    return reshaped


def _module_alphas(header: LoraHeader) -> dict[str, float]:
    """Each kohya module's alpha (its rank where the file gives none, as every tool reads it)."""
    from safetensors import safe_open

    ranks = {k.partition(".")[0]: s[0] for k, s in header.shapes.items() if k.endswith(".lora_down.weight")}
    alphas: dict[str, float] = {module: float(rank) for module, rank in ranks.items()}
    if header.tensors is not None:
        given = {module: header.tensors.get(f"{module}.alpha") for module in ranks}
        return {module: alphas[module] if alpha is None else float(alpha) for module, alpha in given.items()}
    with safe_open(str(header.path), framework="pt") as file:
        for module in ranks:
            if f"{module}.alpha" in header.shapes:
                alphas[module] = float(file.get_tensor(f"{module}.alpha").item())
    return alphas


def check_lora_finite(path: Path) -> None:
    """A LoRA holding NaN draws black images without a word from diffusers; name it instead."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as file:
        kohya.check_finite(((key, file.get_tensor(key)) for key in file.keys()), f"--lora: {path}")  # noqa: SIM118


def with_tokens_in_their_case(pipe: DiffusionPipeline, texts: list[str]) -> list[str]:
    """`texts` with the loaded embeddings' tokens (lower case) written so, wherever a prompt writes
    them in another case: A1111 finds EasyNegative in any case, diffusers only as loaded."""
    tokenizer = pipe.tokenizer
    special = set(tokenizer.all_special_tokens)
    tokens = [t for t in tokenizer.get_added_vocab() if t not in special and t == t.lower()]
    if not tokens:
        return list(texts)
    longest_first = sorted(tokens, key=len, reverse=True)  # easynegativev2 before easynegative
    pattern = re.compile("|".join(map(re.escape, longest_first)), re.IGNORECASE)
    return [pattern.sub(lambda match: match.group().lower(), text) for text in texts]


@torch.no_grad()
def generate(
    pipe: DiffusionPipeline,
    requests: list[ImageRequest],
    settings: SamplingSettings,
    set_strength: Callable[[float], None],
    progress: bool = True,
    refuse_nan: bool = True,
) -> Iterator[tuple[ImageRequest, Image.Image]]:
    """One image per request, many per pipeline call (requests of one strength, any prompts and seeds).

    Images that come out NaN are an error (`refuse_nan`), or black (a training preview must not stop
    the training it shows).

    Each image gets its own CPU generator seeded with its seed, so it starts from the same noise as
    when rendered alone, on every device; batched kernels may round the last float bits differently.
    Yields in batch order: requests grouped by strength, each group in the order given.
    """
    size = images_per_call(pipe, settings)
    height, width = image_size(pipe, settings)
    _check_step_count(pipe.scheduler, settings.steps)
    (negative,) = with_tokens_in_their_case(pipe, [settings.negative_prompt])
    with tqdm(total=len(requests), desc="images", disable=not progress, dynamic_ncols=True) as bar:
        for batch in strength_batches(requests, size):
            set_strength(batch[0].strength)
            prompts = with_tokens_in_their_case(pipe, [request.prompt for request in batch])
            # "" given, not None: SDXL pipelines replace a missing negative prompt by zeros, where
            # training reads the encoded "" as the unconditional prediction (as ComfyUI's empty text
            # does); SD1/SD2 pipelines encode "" for None anyway
            texts = _texts(pipe, prompts, [negative] * len(batch), settings.clip_skip)
            images = pipe(
                texts.pop("prompt", None),
                **texts,
                num_inference_steps=settings.steps,
                guidance_scale=settings.guidance,
                height=height,
                width=width,
                generator=[torch.Generator("cpu").manual_seed(request.seed) for request in batch],
                output_type="np",  # checked before it becomes pixels: NaN would turn silently black
            ).images
            if not np.isfinite(images).all():
                if refuse_nan:
                    raise LecoError(
                        f"strength {batch[0].strength:g}: the images came out as NaN (black); a LoRA at this "
                        "strength breaks the model: use strengths of a usual size (about -2 to 2)"
                    )
                images = np.nan_to_num(images)
            bar.update(len(batch))
            yield from zip(batch, pipe.image_processor.numpy_to_pil(images), strict=True)


def _texts(pipe: DiffusionPipeline, prompts: list[str], negatives: list[str], clip_skip: int) -> dict:
    """The pipeline's text arguments at A1111's `clip_skip`.

    Past 1 the states are encoded here, as training encodes them (multi-vector tokens spelled out):
    diffusers' own clip skip reads `text_encoder.text_model` on SD1/SD2, which CLIPTextModel no longer
    has (transformers >= 5.6), and on SDXL skips layers for the prompt but not the negative prompt."""
    if clip_skip == 1:
        return {"prompt": prompts, "negative_prompt": negatives}
    sdxl = getattr(pipe, "text_encoder_2", None) is not None
    tokenizers = [pipe.tokenizer, pipe.tokenizer_2] if sdxl else [pipe.tokenizer]
    encoders = [pipe.text_encoder, pipe.text_encoder_2] if sdxl else [pipe.text_encoder]
    with torch.no_grad():
        spelled = [pipe.maybe_convert_prompt(text, pipe.tokenizer) for text in [*prompts, *negatives]]
        both, n = encode_text(tokenizers, encoders, spelled, clip_skip), len(prompts)
    texts = {"prompt_embeds": both.hidden_states[:n], "negative_prompt_embeds": both.hidden_states[n:]}
    if sdxl:
        texts |= {"pooled_prompt_embeds": both.pooled[:n], "negative_pooled_prompt_embeds": both.pooled[n:]}
    return texts


def _check_step_count(scheduler: Any, steps: int) -> None:
    """A sampler with "leading" spacing and steps_offset 1 (SD 1.x's) asks the UNet for timestep
    1000 at 1000 steps, which diffusers answers with an IndexError mid-run: said before instead."""
    scheduler.set_timesteps(steps)
    last = int(max(float(t) for t in scheduler.timesteps))
    trained = int(scheduler.config.num_train_timesteps)
    if last >= trained:
        raise LecoError(
            f"{steps} sampling steps: this model's sampler would ask for timestep {last}, but it was "
            f"trained on 0-{trained - 1}; use fewer steps (e.g. {steps - (last - trained + 1)})"
        )


def image_size(pipe: DiffusionPipeline, settings: SamplingSettings) -> tuple[int, int]:
    """(height, width): the ones set, the model's native size for the others. Said here, because
    diffusers drops a height given without a width (and the reverse) for the native size."""
    native = int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)
    return settings.height or native, settings.width or native


def images_per_call(pipe: DiffusionPipeline, settings: SamplingSettings) -> int:
    """The batch size: the user's, or what AUTO_BATCH_PIXELS allows at the image size."""
    if settings.batch_size:
        return settings.batch_size
    height, width = image_size(pipe, settings)
    return max(1, min(MAX_AUTO_BATCH, AUTO_BATCH_PIXELS // (height * width)))


def strength_batches(requests: list[ImageRequest], size: int) -> Iterator[list[ImageRequest]]:
    """Requests grouped by strength (one LoRA strength per call), in chunks of at most `size`."""
    groups: dict[float, list[ImageRequest]] = {}
    for request in requests:
        groups.setdefault(request.strength, []).append(request)
    for group in groups.values():
        for start in range(0, len(group), size):
            yield group[start : start + size]


@dataclass(frozen=True)
class LoraHeader:
    """What a LoRA file's safetensors header says: enough to refuse it before diffusers reads it."""

    path: Path
    shapes: dict[str, list[int]]
    metadata: dict[str, str]
    # A file diffusers' pipeline loader would read wrongly (leco.network.peft_format), read by leco under
    # kohya's names: `shapes` are theirs, and these tensors are what diffusers loads.
    tensors: dict[str, torch.Tensor] | None = None


# safetensors' names of the whole-number dtypes, as torch spells them (messages say "int32" either way).
_SAFETENSORS_DTYPES = {
    "BOOL": "bool",
    "U8": "uint8",
    "I8": "int8",
    "I16": "int16",
    "U16": "uint16",
    "I32": "int32",
    "U32": "uint32",
    "I64": "int64",
    "U64": "uint64",
}


def read_lora_header(path: str | Path, family: ModelFamily | None = None) -> LoraHeader:
    """Read and check a LoRA file's header; missing, damaged and non-LoRA files are one-line errors.

    diffusers answers each of these with a long traceback (or a vague "Invalid LoRA checkpoint"),
    so the file is checked with safetensors first; the header holds every name and shape.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "is not a regular file" if path.exists() else "not found"
        raise LecoError(f"--lora: {path} {what}; give the LoRA's .safetensors file")
    if path.suffix.lower() != ".safetensors":
        if is_embedding_file(path):  # A1111's .pt embeddings
            raise LecoError(
                f"--lora: {path} is a textual-inversion embedding, not a LoRA; give it as --embedding "
                "and put its token in --prompt or --negative"
            )
        raise LecoError(
            f"--lora: {path} is not a .safetensors file; LoRAs load from .safetensors "
            "(convert a .pt LoRA with leco convert)"
        )
    try:
        with safe_open(str(path), framework="pt") as file:
            metadata = dict(file.metadata() or {})
            shapes = {key: list(file.get_slice(key).get_shape()) for key in file.keys()}  # noqa: SIM118
            dtypes = {key: file.get_slice(key).get_dtype() for key in shapes}
    except (SafetensorError, OSError) as error:
        raise LecoError(
            f"--lora: {path} is not a readable .safetensors file ({_first_line(error)}); it may be "
            "truncated or damaged: download it or train it again"
        ) from None
    whole = {key: _SAFETENSORS_DTYPES.get(t, t) for key, t in dtypes.items() if not t.startswith(("F", "BF"))}
    kohya.refuse_whole_numbers(whole, f"--lora: {path}")
    for key, shape in shapes.items():
        module, _, part = key.partition(".")
        if part == "lora_down.weight" and f"{module}.lora_up.weight" in shapes:
            kohya.check_ranks(module, shape, shapes[f"{module}.lora_up.weight"], f"--lora: {path}")
        elif part == "alpha":
            kohya.check_alpha(module, shape, f"--lora: {path}")
    if kohya.is_embedding(shapes):
        raise LecoError(
            f"--lora: {path} is a textual-inversion embedding, not a LoRA; give it as --embedding "
            "and put its token in --prompt or --negative"
        )
    if not shapes:
        raise LecoError(f"--lora: {path} holds no tensors, so it is no LoRA (an empty or unfinished file?)")
    if kohya.is_one_token_embedding(shapes):
        raise LecoError(
            f"--lora: {path} holds one [vectors, width] tensor, a textual-inversion embedding (diffusers' "
            "form), not a LoRA; give it as --embedding and put its token in --prompt or --negative"
        )
    # LoHa/LoKr modules in kohya's naming: named as such, not as "no LoRA weights"
    kohya.refuse_lycoris((k for k in shapes if k.startswith(kohya.KOHYA_PREFIXES)), f"--lora: {path}")
    if not _has_lora_keys(shapes):
        example = next(iter(shapes))
        raise LecoError(
            f"--lora: {path} holds no LoRA weights (keys like {example}); if it is a model checkpoint, "
            "give it as --model"
        )
    if is_diffusers_layout(list(shapes)) and not diffusers_pipeline_reads(list(shapes)):
        tensors, _ = kohya.read_lora_file(path, family)  # the family: which SDXL encoder text keys are
        return LoraHeader(path, {key: list(t.shape) for key, t in tensors.items()}, metadata, tensors)
    return LoraHeader(path, shapes, metadata)


def check_lora_fits(
    header: LoraHeader, unet: torch.nn.Module, family: ModelFamily, model: str | None = None
) -> None:
    """Refuse a LoRA made for another model family, by its UNet layers (kohya-format files: leco's,
    A1111's, ComfyUI's; other layouts are left to diffusers), else by its metadata. Metadata that
    its layers contradict, and a prediction type other than the model's, are said. `model`: the
    --model given, which the advice does not name back."""
    lora_arch = kohya.arch_from_metadata(header.metadata)
    mislabelled = lora_arch is not None and lora_arch != family.arch
    modules = _kohya_modules(header)
    by_key = kohya.unet_layer_keys(unet, family) if modules else {}
    misfit = _layer_misfit(header, modules, by_key, unet, family)
    if mislabelled and (misfit is not None or not modules):  # the layers agree, or cannot be checked
        raise LecoError(
            f"--lora: {header.path} was trained for {lora_arch} but the model is {family.name}; "
            f"use a LoRA of this family, or {kohya.made_for(header.metadata, model)}"
        )
    if misfit is not None:
        raise LecoError(f"--lora: {header.path} {misfit}; {kohya.made_for(header.metadata, model)}")
    if mislabelled:  # every layer fits: the metadata is wrong
        warn(f"--lora: {header.path}: {kohya.mislabelled_family(header.metadata, family)}")
    other = kohya.other_prediction(header.metadata, family)
    if other:
        warn(f"--lora: {header.path} {other}")
    unknown = [module for module in modules if module not in by_key]
    unknown = unknown or _unknown_diffusers_modules(header, unet)
    if unknown:  # as A1111 and ComfyUI do: the modules this model has are applied, the others said
        modules = modules or unet_module_paths(header.shapes)
        more = ", ..." if len(unknown) > 1 else ""
        warn(
            f"--lora: {header.path}: {len(unknown)} of its {len(modules)} UNet modules match no layer of "
            f"this {family.name} model and are not applied ({unknown[0]}{more})"
        )


def _unknown_diffusers_modules(header: LoraHeader, unet: torch.nn.Module) -> list[str]:
    # diffusers leaves out the modules its UNet lacks and says so only in a log leco keeps quiet
    layers = dict(unet.named_modules())
    return [path for path in unet_module_paths(header.shapes) if path not in layers]


def _kohya_modules(header: LoraHeader) -> list[str]:
    """The file's UNet modules, in kohya's naming (none for other layouts)."""
    from leco.network.kohya import UNET_PREFIX

    kohya_keys = [key for key in header.shapes if key.startswith((UNET_PREFIX, *kohya.TEXT_ENCODER_PREFIXES))]
    stray = sorted(set(header.shapes) - set(kohya_keys))
    if kohya_keys and stray:  # diffusers' own message would not name the key
        raise LecoError(
            f"--lora: {header.path}: {stray[0]} is not a kohya LoRA key (they start with {UNET_PREFIX} or "
            "lora_te); this file is not a LoRA leco can read"
        )
    kohya.refuse_lycoris(kohya_keys, f"--lora: {header.path}")  # diffusers would drop them silently
    return sorted({key.split(".", 1)[0] for key in kohya_keys if key.startswith(UNET_PREFIX)})


def _layer_misfit(
    header: LoraHeader,
    modules: list[str],
    by_key: dict[str, str],
    unet: torch.nn.Module,
    family: ModelFamily,
) -> str | None:
    """Why the file's kohya-named UNet `modules` cannot be applied to this UNet, if they cannot
    (`by_key`: its layers by every key a file may use; SDXL files use SGM or diffusers paths)."""
    if not modules:
        return None
    known = [module for module in modules if module in by_key]
    if not known:
        return (
            f"fits no layer of this {family.name} model ({modules[0]} and {len(modules) - 1} more); it was "
            "made for another model family"
        )
    for module in known:
        layer = unet.get_submodule(by_key[module])
        down = header.shapes.get(f"{module}.lora_down.weight")
        if f"{module}.lora_up.weight" not in header.shapes or down is None:
            missing = "lora_down" if down is None else "lora_up"
            raise LecoError(
                f"--lora: {header.path} has {module} without its {missing}.weight; the file is incomplete"
            )
        up = header.shapes[f"{module}.lora_up.weight"]
        try:  # the shapes `leco merge`, A1111 and ComfyUI read: 1x1 tensors in Linear or conv form
            _fitted_shapes(down, up, layer, module)
        except kohya.LoraDoesNotFit as error:
            why = str(error).removesuffix(f"; {kohya.ANOTHER_MODEL}")
            return f"does not fit this {family.name} model: {why}"
    return None


def _fitted_shapes(
    down: list[int], up: list[int], layer: torch.nn.Module, where: str = ""
) -> tuple[list[int], list[int]]:
    """The shapes of a module's lora_down and lora_up in the form `layer` takes (kohya.fit_to_layer,
    on shapes alone: no tensor is read)."""
    empty = kohya.ModuleWeights(torch.empty(down, device="meta"), torch.empty(up, device="meta"), 1.0)
    fitted = kohya.fit_to_layer(empty, getattr(layer, "base_layer", layer), where)
    return list(fitted.down.shape), list(fitted.up.shape)


def arch_of_lora(path: Path) -> str | None:
    """The family a LoRA file's metadata names (ss_base_model_version), if any."""
    return kohya.arch_from_metadata(read_lora_header(path).metadata)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


@dataclass(frozen=True)
class Distillation:
    """What a LoRA's run distilled (its `leco.prompts`): the guidance scales its distill entries
    reproduce at guidance 1, their negative prompts, and whether other actions trained it too."""

    scales: tuple[float, ...]
    negatives: tuple[str, ...]
    mixed: bool

    def reproduces(self) -> str:
        """'guidance 3' or 'guidance 3 with negative prompt "blurry"'."""
        said = f"guidance {', '.join(f'{scale:g}' for scale in self.scales)}"
        negatives = [n for n in self.negatives if n]
        return said + (f" with negative prompt {', '.join(map(repr, negatives))}" if negatives else "")


def distillation_of(lora: str | Path) -> Distillation | None:
    """The CFG distillation a leco file was trained for, or None (no distill entry, or no leco file)."""
    try:
        entries = json.loads(safetensors_metadata(Path(lora)).get("leco.prompts", "[]"))
    except (OSError, ValueError):
        return None
    entries = [entry for entry in entries if isinstance(entry, dict)] if isinstance(entries, list) else []
    distilled = [entry for entry in entries if entry.get("action") == "distill"]
    if not distilled:
        return None
    scales = sorted(
        {
            entry.get("guidance_scale")
            for entry in distilled
            if isinstance(entry.get("guidance_scale"), (int, float))
        }
    )
    negatives = sorted({str(entry.get("unconditional") or "") for entry in distilled})
    mixed = any(entry.get("action") not in ("distill", "preserve") for entry in entries)
    return Distillation(tuple(scales), tuple(negatives), mixed)


def warn_if_distilled(lora: str | None, guidance: float, fix: str = "--guidance 1") -> None:
    """A CFG-distilled LoRA is made for guidance 1; at the usual guidance it guides twice."""
    distillation = distillation_of(lora) if lora is not None else None
    if distillation is None:
        return
    if distillation.mixed:
        warn(
            f"--lora {lora}: partly CFG-distilled (its distill entries draw at guidance 1 what the model "
            f"draws at {distillation.reproduces()}; its other entries were trained for guided sampling): "
            f"at guidance {guidance:g} only the {'other' if guidance != 1 else 'distill'} entries work "
            "as trained"
        )
    elif guidance != 1:
        warn(
            f"--lora {lora}: CFG-distilled (it draws at guidance 1 what the model draws at "
            f"{distillation.reproduces()}); sample with {fix}, not {guidance:g}"
        )


def trained_clip_skip(path: str | Path) -> int | None:
    """The clip skip a LoRA or embedding was trained with, where its file says (kohya's and leco's
    `ss_clip_skip`; "None" where the run left it unset)."""
    try:
        value = safetensors_metadata(Path(path)).get("ss_clip_skip", "")
    except (OSError, ValueError):
        return None
    if value == "None":  # the run left it unset: the model's own layer, clip skip 1
        return 1
    return int(value) if value.isdigit() and int(value) >= 1 else None


def clip_skip_for(
    models: LoadedModels, given: int | None, files: Sequence[str | Path], option: str = "--clip-skip"
) -> int:
    """`given`, or else the clip skip `files` were trained with (said in a note), else 1.

    A LoRA trained on the penultimate layer (an SD1 anime model's usual clip skip 2) shows its effect
    only when sampled the same way, so leco follows the file where the user does not say."""
    if given is not None:
        return checked_clip_skip(models, given, option)
    trained = {Path(file).name: trained_clip_skip(file) for file in files}
    values = set(trained.values()) - {None}
    if not values or values == {1}:
        return 1
    if len(values) > 1:
        said = ", ".join(f"{name}: {value}" for name, value in trained.items() if value)
        warn(f"the files were trained with different clip skips ({said}); sampling with 1; set {option}")
        return 1
    (value,) = values
    names = ", ".join(name for name, skip in trained.items() if skip)
    warn(f"clip skip {value}, as {names} was trained with; {option} 1 to change")
    return checked_clip_skip(models, value, option)


def warn_if_negative_unread(guidance: float, negative: str, where: str, fix: str = "--guidance 3") -> None:
    """At guidance 1 or below diffusers makes one UNet call a step, for the prompt alone."""
    if guidance <= 1 and negative.strip():
        warn(
            f"{where}: at guidance {guidance:g} the negative prompt ({negative!r}) is never read (one UNet "
            f"call a step, for the prompt alone); to use it, sample with guidance above 1, e.g. {fix}"
        )


def refuse_earlier_files(requests: list[ImageRequest], out: str | Path, overwrite: bool = False) -> None:
    """LecoError if `out` holds any file these requests (or their grid) would be written to: leco's
    own only without `overwrite`, anyone else's always."""
    refuse_earlier_outputs(output_files(requests, out), f"--out {out}", "files this run writes", overwrite)


def warn_of_other_images(requests: list[ImageRequest], out: str | Path) -> None:
    """--overwrite replaces this run's files only: an earlier run's other images stay beside the new
    grid (they may be wanted), which is said, as the grid no longer shows them."""
    written = output_files(requests, out)
    if any(path.exists() for path in written):
        others = sorted(set(Path(out).glob("*.png")) - set(written))
        if others:
            warn(
                f"--out {out}: also holds {len(others)} image(s) this run does not write (e.g. "
                f"{others[0].name}), left as they are beside the new {GRID}"
            )


def output_files(requests: list[ImageRequest], out: str | Path) -> list[Path]:
    """The files `run_generation` writes into `out`: one PNG per request, then the grid."""
    slugs = unique_slugs(request.prompt for request in requests)
    return [Path(out) / request.file_name(slugs) for request in requests] + [Path(out) / GRID]


def requests_for(prompts: list[str], strengths: list[float], seeds: list[int]) -> list[ImageRequest]:
    """In grid order: rows are prompts x seeds, columns strengths."""
    return [ImageRequest(p, s, seed) for p in prompts for seed in seeds for s in strengths]


def parse_seeds(text: str) -> list[int]:
    """'0-7' or '1,4,9' or '0-3,10': whole numbers from 0, ranges counting up; repeats kept once."""
    seeds: dict[int, None] = {}
    for part in text.split(","):
        # 20 digits hold every seed below 2**64 (and keep int() away from huge digit strings)
        match = re.fullmatch(r"\s*([0-9]{1,20})\s*(?:-\s*([0-9]{1,20})\s*)?", part)
        if not match:
            raise LecoError(
                f"--seeds: {text!r} is not a list of seeds (whole numbers from 0 to 2**64-1); "
                "write e.g. 0-7 or 1,4,9"
            )
        first, last = int(match[1]), int(match[2] or match[1])
        if last < first:
            raise LecoError(
                f"--seeds: {part.strip()} counts down; write the smaller seed first: {last}-{first}"
            )
        if last > MAX_SEED:
            raise LecoError(f"--seeds: {last} is too large; seeds go from 0 to 2**64-1")
        if len(seeds) + last - first + 1 > MAX_SEEDS:
            raise LecoError(f"--seeds: {text!r} asks for more than {MAX_SEEDS} seeds; split the run")
        seeds.update(dict.fromkeys(range(first, last + 1)))
    return list(seeds)


def parse_strengths(text: str) -> list[float]:
    """'-1,0,1': finite numbers; repeats kept once, -0 read as 0 (one image, one file name)."""
    try:
        values = [typed_float(part) for part in text.split(",")]
    except ValueError:
        raise LecoError(f"--strengths: {text!r} is not a list of numbers; write e.g. -1,0,1") from None
    for value in values:
        if not math.isfinite(value) or abs(value) > MAX_STRENGTH:
            raise LecoError(
                f"--strengths: {text!r} holds {value:g}; strengths are numbers from -{MAX_STRENGTH:g} to "
                f"{MAX_STRENGTH:g} (usually -2 to 2), e.g. -1,0,1"
            )
    alike = strengths_named_alike(values)
    if alike:
        raise LecoError(
            f"--strengths: {alike[0]!r} and {alike[1]!r} are both labelled {format_strength(alike[0])} (and "
            "one image file would replace the other); give strengths that differ in 6 significant digits"
        )
    return list(dict.fromkeys(value + 0.0 for value in values))


def run_generation(
    models: LoadedModels,
    lora: str | Path | None,
    requests: list[ImageRequest],
    settings: SamplingSettings,
    out: str | Path,
    device: torch.device,
    progress: bool = True,
    embeddings: Sequence[str | Path] = (),
    overwrite: bool = False,
    model_name: str | None = None,
) -> tuple[list[Path], Path]:
    """Write one PNG per request and the labelled grid; returns their paths, in request order.

    Each PNG carries its settings as A1111 writes them (`model_name`: the model as the user named it).

    `embeddings`: textual-inversion files (FILE or FILE:TOKEN) loaded for this run, then unloaded.
    Files of those names already in `out` stop it before the first image, unless `overwrite`.
    """
    out = Path(out)
    if not requests:
        raise LecoError("requests: an empty list; give at least one ImageRequest(prompt, strength, seed)")
    if lora is None and any(request.strength != 0 for request in requests):
        raise LecoError("strengths: without a LoRA every strength draws the same image; give lora= or 0")
    refuse_earlier_files(requests, out, overwrite)
    pipe = build_pipeline(models, settings.sampler).to(device)
    applied = lora_strengths(pipe, lora, models.family, models.source)
    with embeddings_loaded(pipe, embeddings), applied as set_strength:
        # With the embeddings' tokens known: a token of N vectors is N tokens, not its spelling.
        *prompts, negative = with_tokens_in_their_case(
            pipe, [*(r.prompt for r in requests), settings.negative_prompt]
        )

        def expand(text: str) -> str:
            return pipe.maybe_convert_prompt(text, pipe.tokenizer)

        warn_if_misread(models, prompts, expand=expand)
        warn_if_misread(models, [negative], "negative prompt", expand=expand)
        images = dict(generate(pipe, requests, settings, set_strength, progress))
    *files, grid_file = output_files(requests, out)
    size = image_size(pipe, settings)
    paths = [
        save_image(images[request], file, a1111_parameters(request, settings, pipe, size, model_name, lora))
        for request, file in zip(requests, files, strict=True)
    ]
    grid = save_image(make_grid({request: images[request] for request in requests}).image, grid_file)
    return paths, grid


def infotext_model_name(model: str) -> str:
    """The model as A1111 names it in its infotext: a checkpoint's file stem, a folder's (or repo's) name."""
    path = Path(model)
    return path.stem if path.suffix.lower() in CHECKPOINT_SUFFIXES else path.name


def a1111_parameters(
    request: ImageRequest,
    settings: SamplingSettings,
    pipe: DiffusionPipeline,
    size: tuple[int, int],
    model_name: str | None,
    lora: str | Path | None,
) -> str:
    """The image's settings in A1111's infotext form: the prompt (a LoRA as its <lora:name:strength>
    tag), the negative prompt, then one line of `Key: value` pairs."""
    prompt = request.prompt
    if lora is not None and request.strength != 0:
        prompt = f"{prompt} <lora:{Path(lora).stem}:{format_strength(request.strength)}>"
    lines = [prompt]
    if settings.negative_prompt:
        lines.append(f"Negative prompt: {settings.negative_prompt}")
    pairs = {
        "Steps": settings.steps,
        **a1111_sampler(pipe.scheduler),
        "CFG scale": f"{settings.guidance:g}",
        "Seed": request.seed,
        "Size": f"{size[1]}x{size[0]}",  # width x height
        "Model": model_name,
        "Clip skip": settings.clip_skip if settings.clip_skip > 1 else None,  # A1111 writes it past 1
        "RNG": "CPU",  # each image's noise comes from a CPU generator with its seed
        "Version": f"leco {__version__}",
    }
    lines.append(", ".join(f"{key}: {value}" for key, value in pairs.items() if value is not None))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Textual-inversion embeddings, loaded with diffusers' load_textual_inversion as its users do


@dataclass(frozen=True)
class Embedding:
    """A textual-inversion file's vectors: one [N, width] tensor per text encoder (SDXL: clip_l, clip_g)."""

    path: Path
    token: str
    vectors: tuple[torch.Tensor, ...]
    option: str = "--embedding"  # how the user gave it, for messages (eval judges one given as --lora)

    @property
    def tokens(self) -> list[str]:
        """The token and the ones diffusers adds for vectors 2..N (token_1, token_2, ...)."""
        return [self.token] + [f"{self.token}_{i}" for i in range(1, len(self.vectors[0]))]


def parse_embedding_option(option: str | Path) -> tuple[Path, str | None]:
    """`FILE` or `FILE:TOKEN`; a path that exists as written is taken whole (C:\\x.pt, a:b.pt)."""
    text = str(option)
    path, colon, token = text.rpartition(":")
    if colon and path and not token and not Path(text).exists() and Path(path).exists():
        raise LecoError(
            f"--embedding {text!r}: nothing follows the ':'; give {path} alone (the file names the token) "
            f"or {path}:TOKEN"
        )
    if Path(text).exists() or not (colon and path and token) or any(c in token for c in "/\\"):
        return Path(text), None
    return Path(path), token


def read_embedding(path: str | Path, token: str | None = None) -> Embedding:
    """Read kohya/leco `.safetensors` (emb_params, or clip_l + clip_g), A1111 `.pt` or diffusers files.

    The token: `token` if given, else the file's `leco.token` metadata, else diffusers' key, else
    the file name without its suffix (as A1111 names embeddings).
    """
    path = Path(path)
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "is not a regular file" if path.exists() else "not found"
        raise LecoError(f"--embedding: {path} {what}; give the embedding's file")
    tensors, metadata = _embedding_tensors(path)
    if _has_lora_keys(tensors):
        raise LecoError(f"--embedding: {path} is a LoRA, not an embedding; give it as --lora")
    key_token = None
    if set(tensors) == {"clip_l", "clip_g"}:
        vectors = (tensors["clip_l"], tensors["clip_g"])
    elif len(tensors) == 1:
        (key, vector), *_ = tensors.items()
        vectors = (vector,)
        key_token = None if key in ("emb_params", "*") else key  # diffusers' learned_embeds: {token: vector}
    else:
        raise LecoError(
            f"--embedding: {path} holds {', '.join(sorted(tensors))[:80]}, not an embedding "
            "(expected emb_params, clip_l + clip_g, or A1111's string_to_param)"
        )
    usable = (
        v.dim() in (1, 2) and v.numel() > 0 and v.is_floating_point() and v.isfinite().all() for v in vectors
    )
    if not all(usable):
        raise LecoError(f"--embedding: {path} holds no usable vectors (shape, type or NaN); is it damaged?")
    vectors = tuple(v.reshape(-1, v.shape[-1]).float() for v in vectors)
    if len(vectors) == 2 and len(vectors[0]) != len(vectors[1]):
        raise LecoError(f"--embedding: {path}: clip_l and clip_g hold different numbers of vectors")
    chosen = token or metadata.get("leco.token") or key_token or path.stem
    if not chosen.strip() or chosen != chosen.strip() or any(c.isspace() and c != " " for c in chosen):
        raise LecoError(
            f"--embedding {path}: its token {chosen!r} has tabs, line breaks or spaces at its ends, which no "
            f"prompt can match; give one with {path}:TOKEN"
        )
    # CLIP reads prompts in lower case and A1111 finds "EasyNegative" by its token ids, so in any
    # case; diffusers looks the token up in the lower-cased prompt and would miss a capital one,
    # using its first vector only. The token is loaded in lower case (with_tokens_in_their_case).
    return Embedding(path, chosen.lower(), vectors)


def _embedding_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as file:
                names = list(file.keys())
                return {name: file.get_tensor(name) for name in names}, dict(file.metadata() or {})
        except Exception as error:  # safetensors raises its own error types, OSError or ValueError
            raise _unreadable(path, error) from None
    if path.suffix.lower() not in (".pt", ".bin"):
        raise LecoError(f"--embedding: {path} is not .safetensors, .pt or .bin; give an embedding file")
    try:
        data = load_torch_file(path)  # never runs pickled code
    except LecoError as reason:
        raise LecoError(f"--embedding: {path} cannot be read ({reason})") from None
    vectors = data.get("string_to_param") if isinstance(data, dict) else None
    if isinstance(vectors, torch.nn.ParameterDict):  # the original textual inversion's
        vectors = vectors._parameters  # (a ParameterDict pickled by torch < 1.12 has no other index)
    if isinstance(vectors, dict):  # A1111
        data = {name: tensor.detach() for name, tensor in vectors.items()}
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()) or not data:
        raise LecoError(f"--embedding: {path} holds no embedding tensors (expected A1111's string_to_param)")
    return data, {}


def _unreadable(path: Path, error: BaseException) -> LecoError:
    return LecoError(f"--embedding: {path} cannot be read ({_first_line(error)[:160]}); is it damaged?")


def _text_encoders(pipe: DiffusionPipeline) -> list[tuple]:
    """(tokenizer, text encoder) pairs of the pipeline: one for SD1/SD2, two for SDXL."""
    pairs = [(pipe.tokenizer, pipe.text_encoder)]
    if getattr(pipe, "text_encoder_2", None) is not None:
        pairs.append((pipe.tokenizer_2, pipe.text_encoder_2))
    return pairs


def _check_embeddings(embeddings: list[Embedding], pairs: list[tuple]) -> None:
    """Each problem as one line naming the file, before anything is loaded."""
    for embedding in embeddings:
        path, token, option = embedding.path, embedding.token, embedding.option
        if len(embedding.vectors) != len(pairs):
            held = "clip_l + clip_g (SDXL)" if len(embedding.vectors) == 2 else "one text encoder's vectors"
            needed = "SDXL's clip_l + clip_g" if len(pairs) == 2 else "one text encoder's vectors (SD1/SD2)"
            raise LecoError(f"{option}: {path} holds {held}, but this model needs {needed}")
        for (tokenizer, encoder), vectors in zip(pairs, embedding.vectors, strict=True):
            width = encoder.get_input_embeddings().weight.shape[1]
            if vectors.shape[1] != width:
                raise LecoError(
                    f"{option}: {path} has vectors of width {vectors.shape[1]}, but this model's text "
                    f"encoder takes {width}; use an embedding made for this model family"
                )
            room = tokenizer.model_max_length - 2  # a prompt's tokens between its start and end
            if len(vectors) > room and tokenizer is pairs[0][0]:
                warn(
                    f"{option}: {path}: its {len(vectors)} vectors are more than the {room} tokens this "
                    "model reads of a prompt; the prompt is cut inside them, so the last are never read"
                )
            if _is_known_word(tokenizer, embedding.tokens):
                raise LecoError(
                    f"{option}: {path}: the token {token!r} is already a word of this model's tokenizer; "
                    f"name another one: {option} {path}:NEW_TOKEN"
                )
            if (words := words_a_token_spells(tokenizer, token)) and tokenizer is pairs[0][0]:
                warn(  # A1111 reads a file named "bad hands 5" so too; a warning, not a refusal
                    f"{option}: {path}: the token {token!r} is made of the words {', '.join(words)}: "
                    f"wherever a prompt writes {token!r} the embedding stands in for them; to keep the "
                    f"words, name it: {option} {path}:NEW_TOKEN"
                )
    refuse_shared_tokens(embeddings)


def refuse_shared_tokens(embeddings: list[Embedding]) -> None:
    """Two files under one token: the second would silently replace the first."""
    seen: dict[str, Path] = {}
    for embedding in embeddings:
        if embedding.token in seen:
            raise LecoError(
                f"--embedding: {embedding.path} and {seen[embedding.token]} both use the token "
                f"{embedding.token!r}; name one of them: --embedding {embedding.path}:NEW_TOKEN"
            )
        seen[embedding.token] = embedding.path


def _is_known_word(tokenizer, tokens: list[str]) -> bool:
    """A token the vocabulary has, or one that already reads as a single word ("cat" is "cat</w>")."""
    vocabulary = tokenizer.get_vocab()
    pieces = tokenizer.tokenize(tokens[0])
    return any(token in vocabulary for token in tokens) or (len(pieces) == 1 and pieces[0] in vocabulary)


@dataclass
class _TokenTable:
    """A text encoder's token table as loaded, to put back after the embeddings are unloaded."""

    module: torch.nn.Embedding
    weight: torch.Tensor
    vocab_size: int

    @classmethod
    def of(cls, encoder) -> _TokenTable:
        module = encoder.get_input_embeddings()
        return cls(module, module.weight.data, encoder.config.vocab_size)

    def restore(self, encoder) -> None:
        # transformers grows the table by swapping its weight's data, and diffusers' unload builds a
        # new, trainable module and leaves config.vocab_size grown: the caller's text encoder must
        # come back exactly as it was loaded (frozen, same tensors, same config).
        self.module.weight.data = self.weight
        self.module.num_embeddings = self.weight.shape[0]
        encoder.set_input_embeddings(self.module)
        encoder.config.vocab_size = self.vocab_size


@contextmanager
def embeddings_loaded(
    pipe: DiffusionPipeline, options: Sequence[str | Path | Embedding]
) -> Iterator[list[Embedding]]:
    """Load textual-inversion files (`FILE`, `FILE:TOKEN` or read ones) into the pipeline; unloaded on exit.

    diffusers' `load_textual_inversion` refuses SDXL's two-key files as a whole, so clip_l goes
    into the first tokenizer/text encoder and clip_g into the second, under the same token.
    """
    embeddings = [
        option if isinstance(option, Embedding) else read_embedding(*parse_embedding_option(option))
        for option in options
    ]
    if not embeddings:
        yield []
        return
    pairs = _text_encoders(pipe)
    _check_embeddings(embeddings, pairs)
    tables = [_TokenTable.of(encoder) for _, encoder in pairs]
    try:
        for embedding in embeddings:
            for (tokenizer, encoder), vectors in zip(pairs, embedding.vectors, strict=True):
                try:
                    with quiet_library_logs():  # transformers explains how it initialises new rows
                        pipe.load_textual_inversion(
                            vectors, token=embedding.token, tokenizer=tokenizer, text_encoder=encoder
                        )
                except (ValueError, RuntimeError) as error:
                    raise LecoError(
                        f"{embedding.option}: {embedding.path} cannot be loaded ({_first_line(error)})"
                    ) from None
        yield embeddings
    finally:
        tokens = [token for embedding in embeddings for token in embedding.tokens]
        for (tokenizer, encoder), table in zip(pairs, tables, strict=True):
            loaded = [token for token in tokens if token in tokenizer.get_vocab()]
            if loaded:
                pipe.unload_textual_inversion(tokens=loaded, tokenizer=tokenizer, text_encoder=encoder)
            table.restore(encoder)
