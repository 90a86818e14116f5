"""Images from a model with a LoRA at several strengths, as users compare them in A1111's X/Y plot."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import (
    DDIMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)
from PIL import Image
from tqdm.auto import tqdm

from leco.errors import LecoError
from leco.models import LoadedModels, ModelFamily

SAMPLERS = {
    "ddim": DDIMScheduler,
    "euler": EulerDiscreteScheduler,
    "euler_a": EulerAncestralDiscreteScheduler,
    "dpm++": DPMSolverMultistepScheduler,
}
ADAPTER = "lora"


@dataclass(frozen=True)
class ImageRequest:
    prompt: str
    strength: float
    seed: int

    @property
    def file_name(self) -> str:
        return f"{slug(self.prompt)}_{format_strength(self.strength)}_{self.seed}.png"


@dataclass
class SamplingSettings:
    steps: int = 30
    guidance: float = 7.0
    height: int | None = None  # None: the model's native size
    width: int | None = None
    negative_prompt: str = ""
    sampler: str = "model"  # the model's own scheduler, or one of SAMPLERS


def build_pipeline(models: LoadedModels, sampler: str = "model") -> DiffusionPipeline:
    """A diffusers text-to-image pipeline over already loaded parts (VAE included)."""
    if models.vae is None:
        raise LecoError("generation needs the VAE: load the model with with_vae=True")
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
    if sampler == "model":
        import diffusers

        cls = getattr(diffusers, str(config.get("_class_name")), None) or DDIMScheduler
    elif sampler in SAMPLERS:
        cls = SAMPLERS[sampler]
    else:
        raise LecoError(f"--sampler: {sampler!r} is not known; use model or one of {', '.join(SAMPLERS)}")
    return cls.from_config({k: v for k, v in config.items() if not k.startswith("_")})


@contextmanager
def lora_strengths(
    pipe: DiffusionPipeline, lora: str | Path | None, family: ModelFamily
) -> Iterator[Callable[[float], None]]:
    """Load a LoRA the way diffusers users do; yields a function that sets its strength.

    The LoRA is unloaded on exit: the pipeline shares its UNet with the caller's loaded models,
    which must come back unchanged (a second evaluation on them would otherwise find it there).
    """
    if lora is None:
        yield lambda strength: None
        return
    path = Path(lora)
    if not path.is_file():
        raise LecoError(f"--lora: {path} not found; check the path")
    lora_arch = arch_of_lora(path)
    if lora_arch is not None and lora_arch != family.arch:
        raise LecoError(
            f"--lora: {path} was trained for {lora_arch} but the model is {family.name}; "
            "use a LoRA of this family"
        )
    try:
        pipe.load_lora_weights(str(path), adapter_name=ADAPTER)
    except (ValueError, KeyError, RuntimeError) as error:
        raise LecoError(
            f"--lora: {path} cannot be applied to this model ({str(error).splitlines()[0][:160]})"
        ) from None

    def set_strength(strength: float) -> None:
        pipe.set_adapters([ADAPTER], adapter_weights=[float(strength)])

    try:
        yield set_strength
    finally:
        pipe.unload_lora_weights()


@torch.no_grad()
def generate(
    pipe: DiffusionPipeline,
    requests: list[ImageRequest],
    settings: SamplingSettings,
    set_strength: Callable[[float], None],
    progress: bool = True,
) -> Iterator[tuple[ImageRequest, Image.Image]]:
    """One image per request; the same seed gives the same starting noise on every device."""
    for request in tqdm(requests, desc="images", disable=not progress, dynamic_ncols=True):
        set_strength(request.strength)
        image = pipe(
            request.prompt,
            negative_prompt=settings.negative_prompt or None,
            num_inference_steps=settings.steps,
            guidance_scale=settings.guidance,
            height=settings.height,
            width=settings.width,
            generator=torch.Generator("cpu").manual_seed(request.seed),
        ).images[0]
        yield request, image


def arch_of_lora(path: Path) -> str | None:
    """The family a LoRA's metadata names (ss_base_model_version), if any."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as file:
            version = (file.metadata() or {}).get("ss_base_model_version", "")
    except Exception:  # not our job to diagnose a damaged file here: diffusers will say more
        return None
    for prefix, arch in (("sdxl", "sdxl"), ("sd_v2", "sd2"), ("sd_v1", "sd1")):
        if version.startswith(prefix):
            return arch
    return None


def requests_for(prompts: list[str], strengths: list[float], seeds: list[int]) -> list[ImageRequest]:
    """In grid order: rows are prompts x seeds, columns strengths."""
    return [ImageRequest(p, s, seed) for p in prompts for seed in seeds for s in strengths]


def parse_seeds(text: str) -> list[int]:
    """'0-7' or '1,4,9' or '0-3,10'."""
    seeds: list[int] = []
    for part in text.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not match:
            raise LecoError(f"--seeds: {text!r} is not a list of seeds; write e.g. 0-7 or 1,4,9")
        first, last = int(match[1]), int(match[2] or match[1])
        seeds += range(first, last + 1)
    return seeds


def parse_strengths(text: str) -> list[float]:
    try:
        return [float(part) for part in text.split(",")]
    except ValueError:
        raise LecoError(f"--strengths: {text!r} is not a list of numbers; write e.g. -1,0,1") from None


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60] or "empty"


def format_strength(value: float) -> str:
    return f"{value:g}"


def run_generation(
    models: LoadedModels,
    lora: str | Path | None,
    requests: list[ImageRequest],
    settings: SamplingSettings,
    out: str | Path,
    device: torch.device,
    progress: bool = True,
) -> tuple[list[Path], Path]:
    """Write one PNG per request and the labelled grid; returns their paths."""
    from leco.preview import make_grid, save_image

    pipe = build_pipeline(models, settings.sampler).to(device)
    out = Path(out)
    paths, images = [], {}
    with lora_strengths(pipe, lora, models.family) as set_strength:
        for request, image in generate(pipe, requests, settings, set_strength, progress):
            paths.append(save_image(image, out / request.file_name))
            images[request] = image
    grid = save_image(make_grid(images).image, out / "grid.png")
    return paths, grid
