"""Images from a model with a LoRA at several strengths, as users compare them in A1111's X/Y plot."""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import DiffusionPipeline
from PIL import Image
from tqdm.auto import tqdm

from leco._version import __version__
from leco.conditioning import checked_clip_skip, encode_text, warn_if_misread
from leco.config import MAX_STRENGTH, typed_float
from leco.embedding_files import Embedding, embeddings_loaded, with_tokens_in_their_case, written_as_a_word
from leco.errors import LecoError, Terminated, check_flags, check_list, warn
from leco.files import GRID, refuse_earlier_outputs, safetensors_metadata
from leco.images import (
    ImageRequest,
    format_strength,
    make_grid,
    save_image,
    strengths_named_alike,
    unique_slugs,
)
from leco.lora_files import lora_strengths, trained_clip_skip
from leco.models import LoadedModels, quiet_library_logs
from leco.samplers import a1111_sampler, make_scheduler

# Images per pipeline call when the user sets none: 8 at 512x512, 2 at 1024x1024 (CFG doubles the
# UNet batch), and at most MAX_AUTO_BATCH for small models, where bigger batches stop paying off.
AUTO_BATCH_PIXELS = 8 * 512 * 512
MAX_AUTO_BATCH = 64
MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes seeds below 2**64
MAX_SEEDS = 10_000  # one --seeds list; more is a typo, not a plan
MAX_SAMPLING_STEPS = 1000  # the samplers take at most one step per training timestep


def is_image_side(pixels: int) -> bool:
    """A height or width diffusers draws: a positive multiple of 8 (the VAE's), at most MAX_SIDE."""
    from leco.config import MAX_SIDE

    return 0 < pixels <= MAX_SIDE and pixels % 8 == 0


def is_guidance(scale: float) -> bool:
    from leco.config import MAX_GUIDANCE

    return math.isfinite(scale) and 0 <= scale <= MAX_GUIDANCE


@dataclass(frozen=True)
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

        def whole(value: object) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        for name in ("steps", "clip_skip", "height", "width", "batch_size"):
            value = getattr(self, name)
            if not whole(value) and not (value is None and name in ("height", "width", "batch_size")):
                raise LecoError(f"{name}: {value!r} is not a whole number; give one, e.g. {name}=2")
        if isinstance(self.guidance, bool) or not isinstance(self.guidance, (int, float)):
            raise LecoError(f"guidance: {self.guidance!r} is not a number; give one, e.g. guidance=7.5")
        if not isinstance(self.negative_prompt, str):
            raise LecoError(f"negative_prompt: {self.negative_prompt!r}; give text ('' for none)")
        if not isinstance(self.sampler, str):
            raise LecoError(f"sampler: {self.sampler!r}; give a sampler's name ('model' for its own)")
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
    try:
        scheduler.set_timesteps(steps)
    except ValueError:  # LCM spreads its steps over original_inference_steps (50) of the schedule
        most = getattr(scheduler.config, "original_inference_steps", None)
        raise LecoError(
            f"{steps} sampling steps: this sampler ({type(scheduler).__name__}) takes at most {most} "
            f"steps (its original_inference_steps); use {most} or fewer"
            if most
            else f"{steps} sampling steps: this model's sampler cannot take that many; use fewer steps"
        ) from None
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


def sampling_settings(
    models: LoadedModels,
    lora: str | Path | None,
    embeddings: Sequence[str | Path] = (),
    *,
    steps: int | None = None,
    guidance: float | None = None,
    clip_skip: int | None = None,
    **rest: Any,
) -> SamplingSettings:
    """`leco generate`'s sampling: unset steps and guidance as the model recommends (a merged single
    file's own word, else its card's), an unset clip skip as the LoRA or embeddings (FILE or
    FILE:TOKEN) were trained; settings that would not do what they seem are warned of. `rest`: the
    other SamplingSettings fields."""
    from leco.embedding_files import parse_embedding_option
    from leco.lora_files import warn_if_distilled
    from leco.models import sampling_for

    steps, guidance = sampling_for(models).fill(steps, guidance)
    files = [*([lora] if lora else []), *(parse_embedding_option(e)[0] for e in embeddings)]
    settings = SamplingSettings(steps, guidance, clip_skip=clip_skip_for(models, clip_skip, files), **rest)
    warn_if_distilled(str(lora) if lora else None, settings.guidance)
    warn_if_guidance_below_one(settings.guidance, "--guidance")
    warn_if_negative_unread(settings.guidance, settings.negative_prompt, "--negative")
    return settings


def cfg_scale(guidance: float) -> float:
    """The CFG scale images are made at: diffusers samples any guidance at or below 1 as 1 (the prompt
    alone), where A1111 would mix in the unconditional prediction below 1."""
    return max(guidance, 1.0)


def warn_if_guidance_below_one(guidance: float, where: str) -> None:
    if guidance < 1:
        warn(
            f"{where}: guidance {guidance:g} samples as guidance 1 (diffusers reads the prompt alone at 1 "
            "or below; A1111 would mix in the unconditional prediction), and the images' settings say "
            "CFG scale 1"
        )


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
    for name, values in (("prompts", prompts), ("strengths", strengths), ("seeds", seeds)):
        check_list(name, values, name)
    return [ImageRequest(p, s, seed) for p in prompts for seed in seeds for s in strengths]


def parse_seeds(text: str) -> list[int]:
    """'0-7' or '1,4,9' or '0-3,10': whole numbers from 0, ranges counting up; repeats kept once."""
    seeds: dict[int, None] = {}
    repeated: list[int] = []
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
        repeated.extend(seed for seed in range(first, last + 1) if seed in seeds)
        seeds.update(dict.fromkeys(range(first, last + 1)))
    _warn_of_repeats("--seeds", [str(seed) for seed in dict.fromkeys(repeated)])
    return list(seeds)


def _warn_of_repeats(option: str, repeated: list[str]) -> None:
    if repeated:  # one image per strength and seed: a second one would be the same file
        shown = ", ".join(repeated[:10]) + (f" and {len(repeated) - 10} more" if len(repeated) > 10 else "")
        warn(f"{option}: {shown} given more than once; drawn once")


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
    values = [value + 0.0 for value in values]  # -0 is 0
    distinct = list(dict.fromkeys(values))
    _warn_of_repeats("--strengths", [format_strength(v) for v in distinct if values.count(v) > 1])
    return distinct


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
    check_flags(progress=progress, overwrite=overwrite)
    check_list("requests", requests, "ImageRequest(prompt, strength, seed), e.g. from requests_for")
    check_list("embeddings", embeddings, "embedding files")
    if not all(isinstance(request, ImageRequest) for request in requests):
        raise LecoError("requests: give ImageRequest(prompt, strength, seed) items, e.g. from requests_for")
    if not isinstance(settings, SamplingSettings):
        raise LecoError(f"settings: a {type(settings).__name__}; give a SamplingSettings")
    if not requests:
        raise LecoError("requests: an empty list; give at least one ImageRequest(prompt, strength, seed)")
    if lora is None and any(request.strength != 0 for request in requests):
        raise LecoError("strengths: without a LoRA every strength draws the same image; give lora= or 0")
    refuse_earlier_files(requests, out, overwrite)
    pipe = build_pipeline(models, settings.sampler).to(device)
    applied = lora_strengths(pipe, lora, models.family, models.source)
    with embeddings_loaded(pipe, embeddings) as loaded, applied as set_strength:
        # With the embeddings' tokens known: a token of N vectors is N tokens, not its spelling.
        *prompts, negative = with_tokens_in_their_case(
            pipe, [*(r.prompt for r in requests), settings.negative_prompt]
        )

        def expand(text: str) -> str:
            return pipe.maybe_convert_prompt(text, pipe.tokenizer)

        warn_if_misread(models, prompts, expand=expand)
        warn_if_misread(models, [negative], "negative prompt", expand=expand)
        *files, grid_file = output_files(requests, out)
        file_of = dict(zip(requests, files, strict=True))
        size = image_size(pipe, settings)
        images: dict[ImageRequest, Image.Image] = {}
        try:
            # Each image written as it comes: a stop or a failure later keeps what was drawn
            for request, image in generate(pipe, requests, settings, set_strength, progress):
                parameters = a1111_parameters(request, settings, pipe, size, model_name, lora, loaded)
                save_image(image, file_of[request], parameters)
                images[request] = image
        except (KeyboardInterrupt, Terminated, LecoError):
            if images:
                warn(
                    f"{len(images)} of {len(requests)} images were written to {out} before the stop "
                    "(no grid); to draw them all, run again with --overwrite"
                )
            raise
    grid = save_image(make_grid({request: images[request] for request in requests}).image, grid_file)
    return files, grid


def a1111_parameters(
    request: ImageRequest,
    settings: SamplingSettings,
    pipe: DiffusionPipeline,
    size: tuple[int, int],
    model_name: str | None,
    lora: str | Path | None,
    embeddings: Sequence[Embedding] = (),
) -> str:
    """The image's settings in A1111's infotext form: the prompt (a LoRA as its <lora:name:strength>
    tag), the negative prompt, then one line of `Key: value` pairs, with the hashes by which A1111
    and Civitai know the LoRA and the embeddings the prompts use."""
    prompt = request.prompt
    lora_hashes = None
    if lora is not None and request.strength != 0:
        prompt = f"{prompt} <lora:{Path(lora).stem}:{format_strength(request.strength)}>"
        lora_hashes = f"{_hash_name(Path(lora).stem)}: {_short_hash(str(lora), kind='lora')}"
    texts = [request.prompt.lower(), settings.negative_prompt.lower()]  # CLIP reads lower case
    tokens = [e.token.lower() for e in embeddings]
    used = [e for e in embeddings if any(written_as_a_word(t, e.token.lower(), tokens) for t in texts)]
    ti_hashes = ", ".join(
        f"{_hash_name(e.token)}: {_short_hash(str(e.path), kind='embedding')}" for e in used
    )
    lines = [prompt]
    if settings.negative_prompt:
        lines.append(f"Negative prompt: {settings.negative_prompt}")
    pairs = {
        "Steps": settings.steps,
        **a1111_sampler(pipe.scheduler),
        "CFG scale": f"{cfg_scale(settings.guidance):g}",
        "Seed": request.seed,
        "Size": f"{size[1]}x{size[0]}",  # width x height
        "Model": model_name,
        "Clip skip": settings.clip_skip if settings.clip_skip > 1 else None,  # A1111 writes it past 1
        "RNG": "CPU",  # each image's noise comes from a CPU generator with its seed
        "Lora hashes": lora_hashes,
        "TI hashes": ti_hashes or None,
        "Version": f"leco {__version__}",
    }
    lines.append(", ".join(f"{key}: {_quoted(value)}" for key, value in pairs.items() if value is not None))
    return "\n".join(lines)


def _quoted(value: Any) -> str:
    """A value as A1111 writes it into the pairs line: in JSON quotes where it holds a separator."""
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text


def _hash_name(name: str) -> str:
    return name.replace(":", "").replace(",", "")  # as A1111 lists names beside their hashes


def _short_hash(path: str, *, kind: str) -> str:
    """The first 12 hex digits of the hash A1111 lists a file by: for a LoRA the additional-networks
    hash of its tensor bytes (its sshs_model_hash where the file carries one), for an embedding the
    sha256 of the whole file. Read once per file and version."""
    return _file_hash(path, os.stat(path).st_mtime_ns, kind)[:12]


@functools.lru_cache(maxsize=64)
def _file_hash(path: str, modified: int, kind: str) -> str:
    if kind != "lora" or Path(path).suffix.lower() != ".safetensors":  # A1111: a .pt LoRA by the whole file
        return _sha256(path)
    from leco.network.kohya import data_hash_of_file

    declared = safetensors_metadata(Path(path)).get("sshs_model_hash", "")
    return declared or data_hash_of_file(path)  # A1111 takes the file's word for it


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
