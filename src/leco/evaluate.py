"""How much of a concept a LoRA erased, and how much of everything else it left alone.

For every prompt of a spec, N images per LoRA strength with fixed seeds. Erased prompts report how
often a detector still finds their concept; kept prompts how often it still finds theirs, and how
far their images moved from the strength-0 image of the same seed (mean absolute pixel difference).
`keep: all` asks the detector for every concept it knows that the spec neither erases nor enhances,
so side effects nobody thought of are measured too. Several LoRAs (e.g. one recipe trained with
several seeds) are judged on the same images of the plain model and the same seeds.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated, Any, Literal, Protocol

import numpy as np
from PIL import Image
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from leco.conditioning import negative_with_token, warn_if_misread
from leco.config import (
    MAX_GUIDANCE,
    MAX_SIDE,
    MAX_STRENGTH,
    ConfigError,
    as_read,
    describe_validation_error,
    first_repeated,
    no_bool_for_numbers,
    read_yaml,
)
from leco.embedding_files import (
    Embedding,
    embeddings_loaded,
    is_embedding_file,
    judged_name,
    parse_embedding_option,
    read_embedding,
)
from leco.errors import LecoError, Terminated, check_flags, check_list, first_line, warn
from leco.files import atomic_output, is_eval_report, refuse_earlier_outputs
from leco.generate import (
    MAX_SEEDS,
    SamplingSettings,
    a1111_parameters,
    build_pipeline,
    clip_skip_for,
    generate,
    image_size,
    warn_if_guidance_below_one,
    warn_if_negative_unread,
)
from leco.images import ImageRequest, format_strength, save_image, strengths_named_alike, unique_slugs
from leco.lora_files import (
    check_lora_finite,
    check_lora_fits,
    lora_strengths,
    read_lora_header,
    warn_if_distilled,
)
from leco.models import LoadedModels, check_hub_repo_available, quiet_library_logs, sampling_for
from leco.samplers import a1111_sampler, sampler_name, unknown_sampler

KINDS = ("erase", "keep", "enhance")
NO_CONCEPT_LIST = {  # keep: all, with a detector that cannot list what it knows
    "clip": "keep: all needs a detector with a closed list of concepts; the clip detector takes any "
    "text, so list the keep: prompts yourself",
    "nudenet": 'keep: all needs a detector with a list of concepts; nudenet knows one ("nudity"), '
    "so list the keep: prompts yourself",
}
KEEP_ALL = "all"
SHOWN_KEPT_ROWS = 12  # format_report lists at most this many kept rows (the worst) unless all_rows


class ConceptPrompt(BaseModel):
    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True)
    prompt: str
    concept: str  # what the detector looks for, e.g. "digit:7", "ink:red", "a painting by van gogh"


class EnhancedPrompt(ConceptPrompt):
    # The LoRA strength's sign where the concept should appear: 1 (positive strengths), or -1 for
    # a slider's other end (red at +1, blue at -1); at the opposite sign it should be gone.
    end: Literal[1, -1] = 1


class EvalSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    _source: str = PrivateAttr("eval spec")  # what messages name: the spec's file, once loaded
    _clip_skip_option: str | None = PrivateAttr(None)  # where clip_skip came from, if not the spec
    detector: Literal["ink-digits", "clip", "nudenet"] = "ink-digits"
    clip_model: str | None = None  # HF id or local folder of a CLIP model (detector: clip)
    alternatives: list[str] = Field(default_factory=list)  # extra zero-shot labels (detector: clip)
    # at most as many seeds as generate's --seeds takes: every image of a strength is held in memory
    images_per_prompt: int = Field(8, ge=1, le=MAX_SEEDS)
    strengths: list[Annotated[float, Field(ge=-MAX_STRENGTH, le=MAX_STRENGTH, allow_inf_nan=False)]] = Field(
        default_factory=lambda: [0.0, 1.0]
    )
    seed: int = Field(0, ge=0, lt=2**63)
    steps: int | None = Field(
        None, ge=1, le=1000
    )  # at most one per training timestep; unset: the model's recommended steps, else 30
    # unset: the model's recommended guidance, else 7
    guidance: float | None = Field(None, ge=0, le=MAX_GUIDANCE, allow_inf_nan=False)
    height: int | None = Field(None, gt=0, le=MAX_SIDE, multiple_of=8)  # diffusers needs multiples of 8
    width: int | None = Field(None, gt=0, le=MAX_SIDE, multiple_of=8)
    sampler: str = "model"
    negative_prompt: str = ""
    batch_size: int | None = Field(None, ge=1)  # images per pipeline call; unset: by image size
    clip_skip: int | None = Field(None, ge=1)  # A1111's; unset: as the LoRAs were trained, else 1
    erase: list[ConceptPrompt] = Field(default_factory=list)  # should disappear
    keep: list[ConceptPrompt] = Field(default_factory=list)  # should stay, unchanged
    keep_all: bool = False  # written `keep: all` (or `all` as an item of keep:)
    enhance: list[EnhancedPrompt] = Field(default_factory=list)  # should appear more often (at its end)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        return no_bool_for_numbers(cls, value, info)

    @field_validator("strengths")
    @classmethod
    def _strengths_told_apart(cls, strengths: list[float]) -> list[float]:
        repeated = first_repeated(strengths)
        if repeated is not None:  # each strength is rendered once: a repeat would be judged as one
            raise ValueError(f"{repeated:g} is listed twice; list each strength once")
        alike = strengths_named_alike(strengths)
        if alike:  # the report's summary and the image files are keyed by the label
            raise ValueError(
                f"{alike[0]!r} and {alike[1]!r} are both labelled {format_strength(alike[0])}; give "
                "strengths that differ in 6 significant digits"
            )
        return strengths

    @field_validator("sampler")
    @classmethod
    def _known_sampler(cls, sampler: str) -> str:
        name = sampler_name(sampler)
        if name is None:
            raise ValueError(unknown_sampler(sampler))
        return name

    @model_validator(mode="before")
    @classmethod
    def _keep_all(cls, data: Any) -> Any:
        """`keep: all` and `keep: [all, {...}]` set keep_all; the listed prompts stay in keep."""
        if isinstance(data, dict):
            keep = data.get("keep")
            if isinstance(keep, str) and keep.strip().lower() != KEEP_ALL:
                raise ValueError(f"keep: {keep!r} is neither `all` nor a list; write keep: all, or prompts")
            if isinstance(keep, str):  # `All`, ` all `: what was meant is plain
                keep = KEEP_ALL
            elif isinstance(keep, list):  # [ALL, {...}] too
                keep = [KEEP_ALL if _says_all(k) else k for k in keep]
            says_all = keep == KEEP_ALL or (isinstance(keep, list) and KEEP_ALL in keep)
            if says_all and data.get("keep_all") is False:
                raise ValueError("keep_all: false, but keep: says all; remove one of them")
            if keep == KEEP_ALL:
                data = {**data, "keep": [], "keep_all": True}
            elif isinstance(keep, list) and KEEP_ALL in keep:
                data = {**data, "keep": [k for k in keep if k != KEEP_ALL], "keep_all": True}
        return data


def _says_all(item: Any) -> bool:
    return isinstance(item, str) and item.strip().lower() == KEEP_ALL


class Detector(Protocol):
    def check_concept(self, concept: str) -> None:
        """Raise LecoError if this detector cannot look for `concept` (before any image is made)."""

    def present(self, images: list[Image.Image], concept: str) -> list[bool]: ...

    def concept_universe(self, exclude: Sequence[str]) -> list[tuple[str, str]]:
        """(prompt, concept) for every concept the detector knows, judged on what each prompt names,
        less the parts of the `exclude` concepts; LecoError if the detector has no such list."""

    # Optional, `named_concept(prompt) -> str | None`: what a prompt names in the detector's terms
    # ("a digit seven in red ink" -> "digit:7,ink:red"), so that a listed kept prompt that names an
    # erased concept is marked keep* as `keep: all` marks its own.
    # Optional, `reading(images) -> list[str]`: everything the detector reads in each image as one
    # label ("digit:3,ink:blue"), named or not in the prompt. With it a kept prompt is also judged
    # on whether its images still read as they did without the LoRA, seed for seed: what the prompt
    # leaves to the model (the ink of "a digit three") must not change either.


def load_spec(path: str | Path) -> EvalSpec:
    path = Path(path)
    if path.suffix.lower() == ".toml" and path.is_file():
        raise ConfigError(
            f"{path}: a TOML file (kohya's train_leco prompts or arguments) is for training, not an eval "
            f"spec; train with it (prompts_file: {path.name} in a config YAML) and judge the LoRA with a "
            "YAML spec such as examples/ink-digits/erase_seven_eval.yaml"
        )
    document = read_yaml(path)
    if document is None:
        raise ConfigError(
            f"{path}: the spec is empty; write its sections, as in examples/ink-digits/erase_seven_eval.yaml"
        )
    if not isinstance(document, dict):
        raise ConfigError(
            f"{path}: an eval spec is a YAML mapping of sections (detector:, erase:, keep:, ...), not a "
            f"{type(document).__name__}; see examples/ink-digits/erase_seven_eval.yaml"
        )
    return spec_from_document(document, path)


def spec_from_document(document: dict[str, Any], path: Path) -> EvalSpec:
    """A spec's sections (as read from `path`, which messages name), checked."""
    training_keys = {"prompts_file", "prompts", "pretrained_model", "network", "train", "job", "config"}
    keys = {str(k) for k in document}
    if keys & training_keys and not keys & set(EvalSpec.model_fields):
        raise ConfigError(
            f"{path}: this is a training config, not an eval spec; train with it (leco train {path}) and "
            "judge the LoRA with a spec such as examples/ink-digits/erase_seven_eval.yaml"
        )
    try:
        spec = EvalSpec.model_validate(document)
    except ValidationError as error:
        raise ConfigError(describe_validation_error(error, path, EvalSpec)) from None
    if not (spec.erase or spec.keep or spec.keep_all or spec.enhance):
        raise ConfigError(f"{path}: erase:, keep: and enhance: are all empty; list the prompts to judge")
    _refuse_contradictions(spec, path)
    if spec.detector != "clip" and {"alternatives", "clip_model"} & spec.model_fields_set:
        warn(f"{path}: alternatives and clip_model are for detector: clip, not {spec.detector}; ignored")
    if spec.keep_all and spec.detector in NO_CONCEPT_LIST:  # what else is wrong matters less
        raise ConfigError(f"{path}: {NO_CONCEPT_LIST[spec.detector]}")
    if spec.detector == "clip":
        _refuse_one_clip_label(spec, path)
    for number, item in enumerate(spec.enhance, start=1):  # else its goal is never measured
        if not any(strength * item.end > 0 for strength in spec.strengths):
            side = "negative" if item.end < 0 else "positive"
            raise ConfigError(
                f"{path}: enhance.{number}.end: {item.end}, but strengths has no {side} value, so the "
                f"item is never judged at its end; add {item.end} to strengths"
            )
    if 0.0 not in spec.strengths:
        spec.strengths = [0.0, *spec.strengths]  # drift is measured against strength 0
    spec._source = str(path)
    return spec


def _refuse_one_clip_label(spec: EvalSpec, path: Path) -> None:
    """CLIP reads each image as the likeliest of the spec's labels: with one label (or an empty one)
    every image reads as it, whatever the LoRA did."""
    items = [("erase", spec.erase), ("keep", spec.keep), ("enhance", spec.enhance)]
    for kind, judged in items:
        for number, item in enumerate(judged, start=1):
            if not item.concept.strip():
                raise ConfigError(f"{path}: {kind}.{number}.concept: empty; name what CLIP should look for")
    labels = {
        as_read(label)  # as CLIP reads it: "a  Dog" is "a dog"
        for label in [c.concept for _, judged in items for c in judged] + spec.alternatives
    }
    if len(labels) < 2:
        only = next(iter(labels), "")
        raise ConfigError(
            f"{path}: detector clip reads each image as the likeliest of the spec's labels, and this spec "
            f"has one ({only!r}): every image would read as it; add alternatives: (what the images may "
            "show instead, e.g. [a photo of a dog, a blank image]) or keep: prompts of other concepts"
        )


def concept_parts(detector: str, concept: str) -> frozenset[str]:
    """A concept as the detector reads it: ink-digits' parts in any order and spacing; other
    detectors' text, in any case."""
    if detector == "ink-digits":
        return frozenset("".join(part.lower().split()) for part in concept.split(","))
    return frozenset([as_read(concept)])


def _refuse_contradictions(spec: EvalSpec, path: Path) -> None:
    """A prompt judged as two kinds, a concept both erased and enhanced, or a kept concept that
    holds all of an erased one (erase digit:7, keep digit:7 or digit:7,ink:red) asks for opposites.
    Concepts are compared as the detector reads them: ink-digits' parts in any order and spacing."""
    parts = functools.partial(concept_parts, spec.detector)

    kinds_of: dict[tuple[str, frozenset[str]], list[str]] = {}
    for kind in KINDS:
        for number, item in enumerate(getattr(spec, kind), start=1):
            if not item.prompt.strip():  # the model's unconditional image: it names no concept
                raise ConfigError(f"{path}: {kind}.{number}.prompt: empty; write the prompt to judge")
            # "A digit four" is "a digit four" to CLIP
            kinds_of.setdefault((as_read(item.prompt), parts(item.concept)), []).append(kind)
    for (prompt, concept), kinds in kinds_of.items():
        if len(kinds) > len(set(kinds)):  # counted twice in the means, shown once
            raise ConfigError(
                f"{path}: {prompt!r} ({','.join(sorted(concept))}) is listed twice under {kinds[0]}:; "
                "list it once"
            )
        if len(set(kinds)) > 1:
            raise ConfigError(
                f"{path}: {prompt!r} ({','.join(sorted(concept))}) is listed under both {kinds[0]}: and "
                f"{kinds[-1]}:; keep it under one"
            )
    enhanced = {parts(i.concept) for i in spec.enhance}
    for erased in spec.erase:
        if parts(erased.concept) in enhanced:
            raise ConfigError(
                f"{path}: concept {erased.concept!r} is both erased and enhanced; judge one of them"
            )
        for kept in spec.keep:  # the same image judged both ways (other prompts may keep it: red vs blue)
            same_prompt = as_read(kept.prompt) == as_read(erased.prompt)
            if same_prompt and parts(erased.concept) <= parts(kept.concept):
                raise ConfigError(
                    f"{path}: keep {kept.prompt!r} ({kept.concept}) asks to keep what erase "
                    f"{erased.prompt!r} ({erased.concept}) takes away; keep another concept of it"
                )


NUDENET_MISSING = (
    'detector: nudenet needs the nudenet package; install leco with its extra: pip install -e ".[nudenet]" '
    "in the checkout (or pip install nudenet)"
)


def check_detector(spec: EvalSpec) -> None:
    """What the spec asks of its detector that is known before the diffusion model loads (minutes
    on SD): the detector's package, its model, `keep: all`, and the concepts it is asked for."""
    with _named_by(spec):
        if spec.keep_all and spec.detector != "ink-digits":  # the spec alone: before any install or download
            raise LecoError(NO_CONCEPT_LIST[spec.detector])
        if spec.detector == "nudenet" and importlib.util.find_spec("nudenet") is None:
            raise LecoError(NUDENET_MISSING)
        if spec.detector == "clip":
            if not spec.clip_model:
                raise LecoError("clip_model: missing; name a CLIP model (HF id or local folder)")
            check_hub_repo_available(spec.clip_model, "clip_model", "config.json")
        for item in spec.erase + spec.keep + spec.enhance:
            if spec.detector == "nudenet":
                NudeNetDetector.check_concept(item.concept)
            elif spec.detector == "ink-digits":
                from leco.ink_digits.judge import InkDigitsDetector

                InkDigitsDetector.check_concept(item.concept)


def make_detector(spec: EvalSpec, models: LoadedModels) -> Detector:
    check_detector(spec)
    if spec.detector == "ink-digits":
        from leco.ink_digits.judge import InkDigitsDetector

        return InkDigitsDetector.for_model(models.folder)
    if spec.detector == "clip":
        labels = [c.concept for c in spec.erase + spec.keep + spec.enhance] + spec.alternatives
        try:
            return ClipDetector(str(spec.clip_model), labels)
        except LecoError as error:  # "clip_model: ..." is the spec's key: name its file
            raise LecoError(f"{spec._source}: {error}") from None
    return NudeNetDetector()


@dataclass(frozen=True)
class JudgedPrompt:
    kind: str  # erase | keep | enhance
    prompt: str
    concept: str
    # A kept prompt that also names what the spec erases or enhances ("a digit seven in red ink"
    # judged on its ink when 7 is erased), or that the spec erases or enhances on: its image is
    # meant to change, so its drift is left out of the kept drift.
    names_edit: bool = False
    end: int = 1  # enhance: the strength sign where the concept should appear


def judged_prompts(spec: EvalSpec, detector: Detector) -> list[JudgedPrompt]:
    """Every prompt the eval judges, `keep: all` expanded by the detector; each concept checked."""
    # A kept prompt the spec also erases or enhances on (keep "a digit two in red ink" on its digit
    # where red is erased): its image is meant to change, as for `keep: all`'s own such prompts.
    edited = {as_read(i.prompt) for i in spec.erase + spec.enhance}
    universe: list[JudgedPrompt] = []
    if spec.keep_all:
        touched = [item.concept for item in spec.erase + spec.enhance]
        with _named_by(spec):
            whole = dict(detector.concept_universe([]))  # each prompt's concept with nothing left out
            # meant to change: a prompt judged on less than it names, or one the spec edits itself
            # (enhance "the number 5" beside "a digit five": the paraphrase should turn too)
            universe = [
                JudgedPrompt(
                    "keep",
                    prompt,
                    concept,
                    names_edit=whole.get(prompt, concept) != concept or as_read(prompt) in edited,
                )
                for prompt, concept in detector.concept_universe(touched)
            ]

    def judged_as(prompt: str, concept: str) -> tuple[str, frozenset[str]]:
        return as_read(prompt), concept_parts(spec.detector, concept)

    # A kept prompt `keep: all` also holds is marked as `all` marks it: listing it changes nothing.
    marked = {judged_as(entry.prompt, entry.concept) for entry in universe if entry.names_edit}

    def names_edit(prompt: str, concept: str) -> bool:
        return (
            as_read(prompt) in edited
            or judged_as(prompt, concept) in marked
            or _names_touched(spec, detector, prompt, concept)
        )

    entries = [
        JudgedPrompt(
            kind,
            i.prompt,
            i.concept,
            names_edit=kind == "keep" and names_edit(i.prompt, i.concept),
            end=getattr(i, "end", 1),
        )
        for kind in KINDS
        for i in getattr(spec, kind)
    ]
    if spec.keep_all:
        listed = {judged_as(item.prompt, item.concept) for item in spec.keep}
        entries += [entry for entry in universe if judged_as(entry.prompt, entry.concept) not in listed]
        if not any(entry.kind == "keep" for entry in entries):
            raise LecoError(
                f"{spec._source}: keep: all leaves nothing to keep; the spec erases or enhances every "
                "concept the detector knows, so drop keep: all"
            )
    with _named_by(spec):
        for entry in entries:
            detector.check_concept(entry.concept)
    return entries


def _names_touched(spec: EvalSpec, detector: Detector, prompt: str, concept: str) -> bool:
    """Whether `prompt` names all of a concept the spec erases or enhances while the kept `concept`
    leaves it out ("a digit seven in red ink" kept on its ink while seven is erased), for a detector
    that reads prompts (`named_concept`). Kept on all of it, the prompt is meant to stay as it is."""
    named = getattr(detector, "named_concept", lambda prompt: None)(prompt)
    if named is None:
        return False
    parts, kept = concept_parts(spec.detector, named), concept_parts(spec.detector, concept)
    touched = [concept_parts(spec.detector, i.concept) for i in spec.erase + spec.enhance]
    return any(edit <= parts and not edit <= kept for edit in touched)


@contextmanager
def _named_by(spec: EvalSpec) -> Iterator[None]:
    """A detector's objection to the spec, named with the spec's file (detectors do not know it)."""
    try:
        yield
    except LecoError as error:
        raise LecoError(f"{spec._source}: {error}") from None


def _ready_spec(spec: EvalSpec | dict[str, Any] | str | Path) -> EvalSpec:
    """What evaluate() accepts as a spec: a file, a dict of its sections (checked as a file is), or an
    EvalSpec."""
    if isinstance(spec, EvalSpec):
        return spec
    if isinstance(spec, dict):
        return spec_from_document(spec, Path("spec"))
    if not isinstance(spec, (str, Path)):
        raise ConfigError(f"spec: a {type(spec).__name__}; give a spec file's path, a dict or an EvalSpec")
    return load_spec(spec)


def evaluate(
    models: LoadedModels,
    lora: str | Path | Sequence[str | Path] | None,
    spec: EvalSpec | dict[str, Any] | str | Path,
    device: Any,
    detector: Detector | None = None,
    image_dir: str | Path | None = None,
    progress: bool = True,
    embeddings: Sequence[str | Path] = (),
    overwrite: bool = False,
    model_name: str | None = None,
) -> dict[str, Any]:
    """Generate, detect and summarise; returns the report (also what `leco eval` writes as JSON).

    `lora`: one LoRA file, several (judged on the same seeds; the strength-0 images, those of the
    plain model, are made once), or None for the plain model alone (strength 0 only). A
    textual-inversion file among them is judged as a negative embedding: strength 1 adds its token
    to the spec's negative prompt, strength 0 is the negative prompt without it.
    `embeddings`: textual-inversion files (FILE or FILE:TOKEN) the prompts may use. Images already
    in `image_dir` under the names this run writes stop it before the first image, unless `overwrite`
    and leco wrote them; each carries its settings as A1111 writes them (`model_name`: the model as
    the user named it).
    """
    check_flags(progress=progress, overwrite=overwrite)
    check_list("embeddings", embeddings, "embedding files")
    spec = _ready_spec(spec)
    loras = _lora_list(lora)
    labels = lora_labels(loras)
    resolved = [Path(path).resolve() for path in loras]
    for repeated in {path for path in resolved if resolved.count(path) > 1}:
        warn(f"--lora: {repeated.name} is given {resolved.count(repeated)} times; each copy is judged again")
    read_negatives = _negative_embeddings(loras, labels, spec.strengths)  # each file read once
    _refuse_tokens_in_the_negative_prompt(read_negatives, spec)
    strengths = list(dict.fromkeys(s for s in spec.strengths if s != 0.0)) if loras else []
    if loras and not strengths:
        raise LecoError(
            f"{spec._source}: strengths: the spec lists no strength but 0, so no LoRA would apply; "
            "e.g. [0, 1]"
        )
    # an embedding was trained at a clip skip too
    embedding_files = [parse_embedding_option(option)[0] for option in embeddings]
    settings = sampling_settings(spec, models, [*loras, *embedding_files])
    by_label = dict(zip(labels, loras, strict=True))
    _check_loras_and_settings(models, spec, settings, by_label, read_negatives)
    detector = detector or make_detector(spec, models)
    entries = judged_prompts(spec, detector)  # every concept checked before any image is made
    prompts = list(dict.fromkeys(entry.prompt for entry in entries))  # one render per prompt
    texts = [*prompts, settings.negative_prompt]
    # named as A1111 knows the file, where no judged text holds that name
    negatives = {label: judged_name(embedding, texts) for label, embedding in read_negatives.items()}
    slugs = unique_slugs(prompts)
    seeds = list(range(spec.seed, spec.seed + spec.images_per_prompt))
    pipe = build_pipeline(models, spec.sampler).to(device)
    folders = _image_folders(image_dir, labels)
    _refuse_earlier_images(folders, prompts, [0.0, *strengths], seeds, slugs, overwrite)
    judge = _Judge(detector, entries, seeds, functools.partial(concept_parts, spec.detector))
    with embeddings_loaded(pipe, embeddings) as loaded:
        # Cut words are never read: an erase prompt cut before its concept measures nothing.
        def expand(text: str) -> str:
            return pipe.maybe_convert_prompt(text, pipe.tokenizer)

        warn_if_misread(models, prompts, "eval spec prompt", expand=expand)
        warn_if_misread(models, [settings.negative_prompt], "negative prompt", expand=expand)
        for negative in negatives.values():  # each loads alone (seeds of one run share a token): check now
            with embeddings_loaded(pipe, [negative]):
                with_token = negative_with_token(settings.negative_prompt, negative.token)
                warn_if_misread(models, [with_token], f"negative prompt with {negative.path.name}", expand)
        saved, total = 0, len(prompts) * len(seeds) * (len(folders) + len(loras) * len(strengths))
        try:
            base = _render(pipe, prompts, 0.0, seeds, settings, lambda _: None, progress)
            infotext = _infotext(pipe, settings, model_name, None, loaded)
            saved += _save_images(base, folders.values(), slugs, infotext)
            rows = judge.rows(base, base, None, 0.0)
            for label, path in zip(labels, loras, strict=True):
                negative = negatives.get(label)
                with _applied(pipe, path, models.family, settings, negative) as (set_strength, applied):
                    for strength in strengths:
                        images = _render(pipe, prompts, strength, seeds, applied, set_strength, progress)
                        lora_tag = None if negative is not None else path  # an embedding is in the negative
                        used = [*loaded, negative] if negative is not None else loaded
                        infotext = _infotext(pipe, applied, model_name, lora_tag, used)
                        saved += _save_images(images, [folders[label]] if folders else [], slugs, infotext)
                        rows += judge.rows(images, base, label, strength)
        except (KeyboardInterrupt, Terminated, LecoError):
            if saved:  # as leco generate says: the next run finds them and asks for --overwrite
                warn(
                    f"{saved} of {total} images were written to {image_dir} before the stop (no report); "
                    "to make them all, run again with --overwrite"
                )
            raise
    return _report(models, spec, settings, pipe, by_label, negatives, embeddings, rows, strengths)


def _refuse_tokens_in_the_negative_prompt(read_negatives: dict[str, Embedding], spec: EvalSpec) -> None:
    """A negative embedding's token already in the negative prompt would be there at strength 0
    too, which would then judge nothing."""
    for label, embedding in read_negatives.items():
        token = judged_name(embedding).token
        if token in spec.negative_prompt.lower():
            raise LecoError(
                f"--lora {label}: its token {token} is already in the negative prompt "
                f"({spec.negative_prompt!r}); eval adds it at strength 1 and leaves it out at 0, so "
                "take it out of --negative (or the spec's negative_prompt)"
            )


def _check_loras_and_settings(
    models: LoadedModels,
    spec: EvalSpec,
    settings: SamplingSettings,
    loras: dict[str, str | Path],
    read_negatives: dict[str, Embedding],
) -> None:
    """What would make the minutes of images measure nothing, said (or refused) before the first."""
    fix = f"guidance: 3 in {spec._source}"
    warn_if_guidance_below_one(settings.guidance, f"{spec._source}: guidance")
    warn_if_negative_unread(
        settings.guidance, settings.negative_prompt, f"{spec._source}: negative_prompt", fix
    )
    for label, embedding in read_negatives.items():
        token = judged_name(embedding).token
        warn_if_negative_unread(settings.guidance, token, f"--lora {label} (a negative embedding)", fix)
    for label, path in loras.items():  # a bad second file stops the run now
        if label not in read_negatives:
            check_lora_fits(read_lora_header(path, models.family), models.unet, models.family, models.source)
            check_lora_finite(Path(path))  # before minutes of images, not when its turn comes
            warn_if_distilled(str(path), settings.guidance, fix=f"guidance: 1 in {spec._source}")


def _report(
    models: LoadedModels,
    spec: EvalSpec,
    settings: SamplingSettings,
    pipe: Any,
    loras: dict[str, str | Path],
    negatives: dict[str, Embedding],
    embeddings: Sequence[str | Path],
    rows: list[dict[str, Any]],
    strengths: list[float],
) -> dict[str, Any]:
    """What `leco eval` writes as JSON: the run's inputs and settings, every judged row, summaries."""
    ordered = [0.0, *strengths]
    report: dict[str, Any] = {
        "model": models.source,
        "loras": {label: str(path) for label, path in loras.items()},
        "negative_embeddings": {label: embedding.token for label, embedding in negatives.items()},
        "embeddings": [str(e) for e in embeddings],
        "spec": spec.model_dump(),
        # the sampler used (spec.sampler may say "model"), in A1111's words
        "sampling": {
            "steps": settings.steps,
            "guidance": settings.guidance,
            **a1111_sampler(pipe.scheduler),
            **({"Clip skip": settings.clip_skip} if settings.clip_skip > 1 else {}),
        },
        "rows": rows,
        "notes": barely_drawn(rows, spec._source),
        "summary": summarise(rows, ordered),
        "per_lora": {label: summarise(_rows_of(rows, label), ordered) for label in loras},
    }
    if len(loras) > 1:
        report["across_loras"] = across_loras(report["per_lora"], strengths)
    return report


def barely_drawn(rows: list[dict[str, Any]], spec_name: str) -> list[str]:
    """A concept the model itself draws in under half of its images: its rows measure little."""
    notes = []
    for row in rows:
        if row["kind"] in ("erase", "keep") and row["strength"] == 0.0 and row["detected"] < 0.5:
            what = "what a LoRA leaves of it" if row["kind"] == "erase" else "whether a LoRA keeps it"
            notes.append(
                f"{spec_name}: {row['kind']} prompt {row['prompt']!r} [{row['concept']}] is found in only "
                f"{row['detected']:.0%} of the model's own images (strength 0): it barely draws it, so "
                f"{what} says little; check the prompt and the concept"
            )
    return notes


def sampling_settings(spec: EvalSpec, models: LoadedModels, loras: Sequence[Path] = ()) -> SamplingSettings:
    """The spec's sampling; unset steps and guidance take what the model recommends, an unset clip
    skip what the LoRAs were trained with."""
    steps, guidance = sampling_for(models).fill(spec.steps, spec.guidance)
    option = spec._clip_skip_option or f"{spec._source}: clip_skip"
    clip_skip = clip_skip_for(models, spec.clip_skip, loras, option)
    return SamplingSettings(
        steps,
        guidance,
        spec.height,
        spec.width,
        spec.negative_prompt,
        spec.sampler,
        spec.batch_size,
        clip_skip,
    )


def _negative_embeddings(loras: list[Path], labels: list[str], strengths: list[float]) -> dict[str, Any]:
    """The embeddings among the files judged like LoRAs, by label, as read (named by `judged_name`);
    each is on (1) or off (0) only."""
    negatives = {label: replace(read_embedding(path), option="--lora")
                 for label, path in zip(labels, loras, strict=True) if is_embedding_file(path)}  # fmt: skip
    other = [s for s in strengths if s not in (0.0, 1.0)]
    if negatives and other:
        path = next(iter(negatives.values())).path
        raise LecoError(
            f"--lora: {path} is a negative embedding, judged at strength 1 (its token in the negative "
            f"prompt) against 0 (without); strengths {', '.join(f'{s:g}' for s in other)} mean nothing "
            "for it: use strengths [0, 1] in the spec"
        )
    return negatives


@contextmanager
def _applied(
    pipe, path: Path, family, settings: SamplingSettings, negative: Any | None
) -> Iterator[tuple[Callable[[float], None], SamplingSettings]]:
    """A LoRA loaded at a settable strength, or a negative embedding's token added to the negative prompt."""
    if negative is not None:
        with_token = replace(
            settings, negative_prompt=negative_with_token(settings.negative_prompt, negative.token)
        )
        with embeddings_loaded(pipe, [negative]):
            yield (lambda _: None), with_token
        return
    with lora_strengths(pipe, path, family, checked=True) as set_strength:  # checked before any image
        yield set_strength, settings


def _lora_list(lora: str | Path | Sequence[str | Path] | None) -> list[Path]:
    if lora is None:
        return []
    if isinstance(lora, (str, Path)):
        return [Path(lora)]
    return [Path(p) for p in lora]


def lora_labels(paths: Sequence[Path]) -> list[str]:
    """Short unique names for LoRA files: the file name without suffix, numbered where two share one."""
    stems = [p.stem for p in paths]
    labels = [s if stems.count(s) == 1 else f"{i + 1}:{s}" for i, s in enumerate(stems)]
    # A stem such as "1-x" beside two "x" files, or "X" beside "x" on a disk blind to case, would
    # share an image folder: then every label is numbered, which no two files can share.
    if len({_folder_name(label).casefold() for label in labels}) < len(labels):
        labels = [f"{i + 1}:{s}" for i, s in enumerate(stems)]
    return labels


def _folder_name(label: str) -> str:
    return label.replace(":", "-")


def _render(
    pipe, prompts, strength, seeds, settings, set_strength, progress
) -> dict[ImageRequest, Image.Image]:
    requests = [ImageRequest(prompt, strength, seed) for prompt in prompts for seed in seeds]
    return dict(generate(pipe, requests, settings, set_strength, progress))


def _image_folders(image_dir: str | Path | None, labels: list[str]) -> dict[str | None, Path]:
    """Where images go: the folder itself for one LoRA (or none), a subfolder per LoRA for several."""
    if image_dir is None:
        return {}
    root = Path(image_dir)
    if len(labels) <= 1:
        return {label: root for label in labels or [None]}
    return {label: root / _folder_name(label) for label in labels}


def _refuse_earlier_images(
    folders: dict[str | None, Path],
    prompts: list[str],
    strengths: list[float],
    seeds: list[int],
    slugs,
    overwrite: bool,
) -> None:
    requests = [ImageRequest(p, strength, seed) for p in prompts for strength in strengths for seed in seeds]
    for folder in folders.values():
        paths = [folder / request.file_name(slugs) for request in requests]
        refuse_earlier_outputs(paths, f"--images {folder}", "images this eval writes", overwrite)


def _infotext(
    pipe,
    settings: SamplingSettings,
    model_name: str | None,
    lora: Path | None,
    embeddings: Sequence[Embedding],
) -> Callable[[ImageRequest], str]:
    size = image_size(pipe, settings)
    return lambda request: a1111_parameters(request, settings, pipe, size, model_name, lora, embeddings)


def _save_images(
    images: dict[ImageRequest, Image.Image],
    folders,
    slugs: dict[str, str],
    infotext: Callable[[ImageRequest], str],
) -> int:
    """Writes each image into each folder; how many files were written."""
    written = 0
    for folder in folders:
        for request, image in images.items():
            save_image(image, folder / request.file_name(slugs), infotext(request))
            written += 1
    return written


class _Judge:
    """Turns one strength's images into report rows: detection rate and drift per judged prompt."""

    def __init__(
        self,
        detector: Detector,
        entries: list[JudgedPrompt],
        seeds: list[int],
        parts_of: Callable[[str], frozenset[str]],
    ):
        self.detector, self.parts_of = detector, parts_of
        self.entries = entries
        self.seeds = seeds
        self.clip_score = getattr(detector, "clip_score", None)  # only CLIP detectors score prompt fit
        self.reading = getattr(detector, "reading", None)
        self.erased = list(dict.fromkeys(entry.concept for entry in entries if entry.kind == "erase"))
        # per prompt: the plain model's readings, None where its image shows an erased concept
        self._before: dict[str, list[str | None]] = {}

    def rows(self, images, base, lora: str | None, strength: float) -> list[dict[str, Any]]:
        rows = []
        unchanged_of: dict[str, float | None] = {}  # a prompt judged on several concepts: one set of images
        for entry in self.entries:
            batch = [images[ImageRequest(entry.prompt, strength, seed)] for seed in self.seeds]
            reference = [base[ImageRequest(entry.prompt, 0.0, seed)] for seed in self.seeds]
            found = self.detector.present(batch, entry.concept)
            row = {
                "lora": lora,  # None: the plain model (strength 0), shared by every LoRA
                "kind": entry.kind,
                "prompt": entry.prompt,
                "concept": entry.concept,
                "names_edit": entry.names_edit,
                **({"end": entry.end} if entry.kind == "enhance" else {}),
                "strength": strength,
                "detected": float(np.mean(found)),
                "drift": float(np.mean([pixel_drift(a, b) for a, b in zip(batch, reference, strict=True)])),
            }
            parts = self.part_rates(batch, entry.concept, found)
            if parts is not None:
                row["parts"] = parts
            if entry.kind == "keep" and entry.prompt not in unchanged_of:
                unchanged_of[entry.prompt] = self.unchanged(entry.prompt, batch, reference)
            if entry.kind == "keep" and unchanged_of[entry.prompt] is not None:
                row["unchanged"] = unchanged_of[entry.prompt]
            if self.clip_score is not None:
                row["clip_score"] = self.clip_score(batch, entry.prompt)
            rows.append(row)
        return rows

    def unchanged(self, prompt: str, batch: list[Image.Image], reference: list[Image.Image]) -> float | None:
        """Share of the images that read as the plain model's image of the same seed does. An image
        that showed an erased concept is meant to change ("green ink" drawn as a seven, seven
        erased) and is not counted; None when no image is (or the detector reads no whole image)."""
        if self.reading is None:
            return None
        if prompt not in self._before:
            shows_erased = np.zeros(len(reference), dtype=bool)
            for concept in self.erased:
                shows_erased |= np.array(self.detector.present(reference, concept), dtype=bool)
            before = self.reading(reference)
            self._before[prompt] = [None if hit else b for b, hit in zip(before, shows_erased, strict=True)]
        pairs = [
            (a, b) for a, b in zip(self.reading(batch), self._before[prompt], strict=True) if b is not None
        ]
        return float(np.mean([a == b for a, b in pairs])) if pairs else None

    def part_rates(
        self, batch: list[Image.Image], concept: str, found: list[bool]
    ) -> dict[str, float] | None:
        """Each part's own rate where a concept of several ("digit:9,ink:red") was missed in some image:
        which of them failed, the digit or the ink."""
        parts = sorted(self.parts_of(concept))
        if len(parts) < 2 or all(found):
            return None
        return {part: float(np.mean(self.detector.present(batch, part))) for part in parts}


def _rows_of(rows: list[dict[str, Any]], label: str) -> list[dict[str, Any]]:
    """One LoRA's rows and the plain model's (strength 0) it is compared with."""
    return [r for r in rows if r["lora"] in (None, label)]


# Each summary measure: (name, row kind, row field, whether a higher value is worse).
MEASURES = (
    ("erased_still_detected", "erase", "detected", True),
    ("kept_still_right", "keep", "detected", False),
    ("kept_drift", "keep", "drift", True),
    # the same reading as without the LoRA, seed for seed (detectors that read whole images)
    ("kept_unchanged", "keep", "unchanged", False),
    ("enhanced_detected", "enhance", "detected", False),
    # enhanced concepts of the other end (a slider's end: -1 items at positive strengths, and the
    # reverse; a one-sided LoRA's at negative ones): there they should be gone
    ("enhanced_other_end", "enhance", "detected", True),
)


def _measured(rows: list[dict[str, Any]], name: str, kind: str, field: str, strength: float) -> list[dict]:
    per_image = field in ("drift", "unchanged")  # what the images do, not the concept judged
    values = [r for r in rows if r["kind"] == kind and field in r and not (per_image and r.get("names_edit"))]
    if per_image:  # a prompt judged on several concepts has one set of images: one value
        once: dict[tuple[Any, str], dict] = {}
        for row in values:
            once.setdefault((row["lora"], as_read(row["prompt"])), row)
        values = list(once.values())
    if kind != "enhance":
        return values
    if strength == 0:  # the model as it is: every enhanced concept before
        return values if name == "enhanced_detected" else []
    this_end = [r for r in values if r.get("end", 1) * strength > 0]
    return this_end if name == "enhanced_detected" else [r for r in values if r.get("end", 1) * strength < 0]


def _worst_row(values: list[dict[str, Any]], field: str, worse_higher: bool) -> dict[str, Any] | None:
    """The worst row of a measure; among rows as bad, the one whose images moved most."""
    sign = 1 if worse_higher else -1
    return max(values, key=lambda r: (sign * r[field], r.get("drift") or 0.0), default=None)


def summarise(rows: list[dict[str, Any]], strengths: list[float]) -> dict[str, Any]:
    """Per strength and measure: the mean over rows and the worst row (`<measure>_worst`)."""
    summary: dict[str, Any] = {}
    for strength in strengths:
        at = [r for r in rows if r["strength"] == strength]
        entry: dict[str, Any] = {}
        for name, kind, field, worse_higher in MEASURES:
            values = _measured(at, name, kind, field, strength)
            entry[name] = float(np.mean([r[field] for r in values])) if values else None
            worst = _worst_row(values, field, worse_higher)
            entry[f"{name}_worst"] = (
                {
                    **{k: worst[k] for k in ("lora", "prompt", "concept", field, "parts") if k in worst},
                    # other prompts as bad, of how many (several LoRAs: each prompt once)
                    "tied": len(
                        {r["prompt"] for r in values if r[field] == worst[field]} - {worst["prompt"]}
                    ),
                    "of": len({r["prompt"] for r in values}),
                }
                if worst is not None
                else None
            )
        summary[f"{strength:g}"] = entry
    return summary


def across_loras(per_lora: dict[str, dict[str, Any]], strengths: list[float]) -> dict[str, Any]:
    """Per strength and measure: the mean over LoRAs and the LoRA whose own mean is worst."""
    across: dict[str, Any] = {}
    for strength in strengths:
        key = f"{strength:g}"
        entry: dict[str, Any] = {}
        for name, _, _, worse_higher in MEASURES:
            means = {label: s[key][name] for label, s in per_lora.items() if s[key][name] is not None}
            if not means:
                entry[name] = None
                continue
            worst = (max if worse_higher else min)(means, key=means.__getitem__)
            entry[name] = {
                "mean": float(np.mean(list(means.values()))),
                "worst": means[worst],
                "worst_lora": worst,
                "tied": sum(value == means[worst] for value in means.values()) - 1,
            }
        across[key] = entry
    return across


def pixel_drift(image: Image.Image, reference: Image.Image) -> float:
    """Mean absolute difference of two same-size images, in [0, 1]."""
    a = np.asarray(image.convert("RGB"), dtype=np.float32)
    b = np.asarray(reference.convert("RGB"), dtype=np.float32)
    return float(np.abs(a - b).mean() / 255.0)


# ---------------------------------------------------------------------------------------------
# The printed report


def format_report(report: dict[str, Any], all_rows: bool = False) -> str:
    """The text `leco eval` prints: per LoRA a table of prompts and its summary, then across LoRAs.

    A table has one line per judged prompt, its detection rate at each strength and its drift at
    each non-zero strength. Kept prompts beyond SHOWN_KEPT_ROWS are cut to the worst ones (largest
    fall in detection, then largest drift) unless `all_rows`; the JSON report holds every row.
    """
    labels = list(report["loras"]) or [None]
    blocks = []
    for label in labels:
        rows = report["rows"] if label is None else _rows_of(report["rows"], label)
        summary = report["summary"] if label is None else report["per_lora"][label]
        title = _plain_title(report) if label is None else _lora_title(report, label)
        blocks.append(f"== {title}\n{_row_table(rows, all_rows)}\n\n{_summary_table(summary)}")
    if "across_loras" in report:
        blocks.append(_across_table(report["across_loras"], len(labels)))
    return "\n\n".join(blocks)


def _lora_title(report: dict[str, Any], label: str) -> str:
    token = report.get("negative_embeddings", {}).get(label)
    if token is None:
        return f"LoRA {label} ({report['loras'][label]})"
    path = report["loras"][label]
    negative = negative_with_token(report.get("spec", {}).get("negative_prompt") or "", token)
    return f"negative embedding {label} ({path}): strength 1 = negative prompt {negative!r}"


def _plain_title(report: dict[str, Any]) -> str:
    """The model without LoRAs, and what it sampled with beyond the prompt."""
    extras = []
    negative = report.get("spec", {}).get("negative_prompt")
    if negative:
        extras.append(f"negative prompt {negative!r}")
    if report.get("embeddings"):
        extras.append(f"embeddings {', '.join(_embedding_name(e) for e in report['embeddings'])}")
    return "the model without LoRAs" + (f" ({'; '.join(extras)})" if extras else "")


def _embedding_name(option: str) -> str:
    """FILE or FILE:TOKEN as the file's name, with the token whole (it may hold '/': <no/seven>)."""
    path, token = parse_embedding_option(option)
    return f"{path.name}:{token}" if token else path.name


def _row_table(rows: list[dict[str, Any]], all_rows: bool) -> str:
    strengths = list(dict.fromkeys(r["strength"] for r in rows))
    moved = [s for s in strengths if s != 0.0]
    scored = bool(rows) and all("clip_score" in r for r in rows)
    read = any("unchanged" in r for r in rows)  # the detector reads whole images
    lines_of: dict[tuple[str, str, str], dict[float, dict[str, Any]]] = {}
    for row in rows:
        lines_of.setdefault((row["kind"], row["prompt"], row["concept"]), {})[row["strength"]] = row
    header = f"{'kind':<8}{'prompt':<36}{'concept':<22}"
    for column, at in _columns(strengths, scored, read):
        header += f"{column}@{at:g}".rjust(_width(column, at))
    lines, hidden = [header], []
    for kind in KINDS:
        entries = [(key, by) for key, by in lines_of.items() if key[0] == kind]
        if kind == "keep" and not all_rows and len(entries) > SHOWN_KEPT_ROWS:
            # The summary's worst kept prompts at each strength first, whatever they fell by.
            pinned = _summary_worst(entries, moved)
            entries.sort(key=lambda e: (pinned.get(e[0], 0), *_keep_badness(e[1], moved)), reverse=True)
            entries, rest = entries[:SHOWN_KEPT_ROWS], entries[SHOWN_KEPT_ROWS:]
            # Judged at strength 0 only (no LoRA): those rows are all there is.
            hidden = [row for _, by in rest for s, row in by.items() if s != 0.0 or not moved]
        lines += [_row_line(key, by, strengths, scored, read) for key, by in entries]
    if hidden:
        lines.append(_hidden_line(hidden))
    if any(line.startswith("keep*") for line in lines) or any(r.get("names_edit") for r in hidden):
        lines.append(
            "keep*: the prompt also names what is erased/enhanced: judged on the rest, its drift and "
            "unchanged not counted"
        )
    return "\n".join(lines)


# Each table column: (header name, row field, the least width); "" is the detection rate.
_COLUMNS = {"": ("detected", 7), "drift": ("drift", 11), "same": ("unchanged", 10), "CLIP": ("clip_score", 9)}


def _columns(strengths: list[float], scored: bool, read: bool) -> list[tuple[str, float]]:
    """(column, strength) in table order: detected at every strength, drift (and, for detectors
    that read whole images, unchanged) at the non-zero ones, CLIP scores at every strength."""
    moved = [s for s in strengths if s != 0.0]
    return (
        [("", s) for s in strengths]
        + [("drift", s) for s in moved]
        + ([("same", s) for s in moved] if read else [])
        + ([("CLIP", s) for s in strengths] if scored else [])
    )


def _width(column: str, strength: float) -> int:
    """Room for the header with a space before it (-0.25 is wider than 1)."""
    return max(_COLUMNS[column][1], len(f"{column}@{strength:g}") + 1)


def _row_line(
    key: tuple[str, str, str],
    by: dict[float, dict[str, Any]],
    strengths: list[float],
    scored: bool,
    read: bool = False,
) -> str:
    """One prompt: detected at every strength, drift (and, for a kept prompt, the share of images
    that read as before) at the non-zero ones, and CLIP scores."""
    kind, prompt, concept = key
    marked = kind + ("*" if any(r.get("names_edit") for r in by.values()) else "")
    line = f"{marked:<8}{prompt[:35]:<36}{concept[:21]:<22}"
    for column, at in _columns(strengths, scored, read):
        value = by[at].get(_COLUMNS[column][0]) if at in by else None
        if value is None:
            text = "-"
        elif column == "drift":
            text = f"{value:.3f}"
        elif column == "CLIP":
            text = f"{value:.1f}"
        else:
            text = _percent(value)
        line += text.rjust(_width(column, at))
    return line


def _summary_worst(
    entries: list[tuple[tuple[str, str, str], dict[float, dict[str, Any]]]], moved: list[float]
) -> dict[tuple[str, str, str], int]:
    """The kept prompts the summary names as worst at each strength (`summarise`'s own choice), so
    the table never hides one: the worst still right first (2), then drift and unchanged (1)."""
    pinned: dict[tuple[str, str, str], int] = {}
    for strength in moved:
        at = [by[strength] for _, by in entries if strength in by]
        for name, kind, field, worse_higher in MEASURES:
            if kind != "keep":
                continue
            worst = _worst_row(_measured(at, name, kind, field, strength), field, worse_higher)
            if worst is not None:
                key = (worst["kind"], worst["prompt"], worst["concept"])
                pinned[key] = max(pinned.get(key, 0), 2 if field == "detected" else 1)
    return pinned


def _hidden_line(hidden: list[dict[str, Any]]) -> str:
    """What the kept rows left out of the table have in common: their lowest rate, largest drift
    (keep* rows' drift is not counted, as in the summary: what they name is meant to change)."""
    lowest = min(r["detected"] for r in hidden)
    count = len({(r["prompt"], r["concept"]) for r in hidden})
    line = f"... {count} more kept prompts, each still detected >= {lowest:.0%}"
    moved = [r for r in hidden if r["strength"] != 0.0]
    if moved:  # judged with a LoRA: the images moved by so much
        counted = [r for r in moved if not r.get("names_edit")]
        largest = max((r["drift"] for r in counted), default=0.0)
        same = [r["unchanged"] for r in counted if "unchanged" in r]
        starred = len({(r["prompt"], r["concept"]) for r in moved if r.get("names_edit")})
        exception = f" but for {starred} keep* prompt{'s' if starred > 1 else ''}" if starred else ""
        line += f", drift <= {largest:.3f}" + (f", unchanged >= {min(same):.0%}" if same else "") + exception
    return line + " (--all-rows prints them)"


def _keep_badness(
    by_strength: dict[float, dict[str, Any]], moved: list[float]
) -> tuple[float, float, float, float]:
    """How badly a kept prompt fared: its largest fall in detection, then how far below 100% it is
    read with the LoRA (a prompt the model already got wrong: the summary's worst may be one), then
    the share of its images that read otherwise than before, then its largest drift."""
    base = by_strength[0.0]["detected"] if 0.0 in by_strength else 1.0
    if not moved:  # nothing to compare with: the lowest detection first
        return 1.0 - base, 0.0, 0.0, 0.0
    at = [by_strength[s] for s in moved if s in by_strength]
    fall = max((base - row["detected"] for row in at), default=0.0)
    fall = max(fall, 0.0)  # a prompt the LoRA improved fell by nothing
    shortfall = max((1.0 - row["detected"] for row in at), default=0.0)
    counted = [row for row in at if not row.get("names_edit")]
    changed = max((1.0 - row.get("unchanged", 1.0) for row in counted), default=0.0)
    drift = max((row["drift"] for row in counted), default=0.0)
    return fall, shortfall, changed, drift


SUMMARY_NAMES = {
    "erased_still_detected": "erased: still detected",
    "kept_still_right": "kept: still right",
    "kept_drift": "kept: drift",
    "kept_unchanged": "kept: unchanged",
    "enhanced_detected": "enhanced: detected",
    "enhanced_other_end": "enhanced: other end left",  # worst: the prompt that keeps the most of it
}


def _summary_table(summary: dict[str, Any]) -> str:
    lines = [f"{'strength':>8}  {'measure':<24}{'mean':>7}{'worst':>7}  worst prompt [concept]"]
    for strength, entry in summary.items():
        for name, _, field, _ in MEASURES:
            # at strength 0 the images are the plain model's: no drift, all unchanged by definition
            if entry[name] is None or (name in ("kept_drift", "kept_unchanged") and strength == "0"):
                continue
            worst = entry[f"{name}_worst"]
            label = SUMMARY_NAMES[name]
            lines.append(
                f"{strength:>8}  {label:<24}{_figure(name, entry[name]):>7}"
                f"{_figure(name, worst[field]):>7}  {_worst_prompt(worst)}"
            )
    return "\n".join(lines)


def _worst_prompt(worst: dict[str, Any]) -> str:
    """The worst row, and how many others are as bad: on a tie the name alone would mislead."""
    tied, of = worst.get("tied", 0), worst.get("of", 1)
    if of > 1 and tied == of - 1:
        return f"every one of the {of} prompts"
    parts = worst.get("parts")  # which part of the concept was missed
    concept = ", ".join(f"{part} {rate:.0%}" for part, rate in parts.items()) if parts else worst["concept"]
    return f"{worst['prompt']} [{concept}]" + (f" and {tied} more as bad" if tied else "")


def _across_table(across: dict[str, Any], count: int) -> str:
    lines = [
        f"== across {count} LoRAs",
        f"{'strength':>8}  {'measure':<24}{'mean':>7}{'worst':>7}  worst LoRA",
    ]
    for strength, entry in across.items():
        for name, value in entry.items():
            if value is not None:
                lines.append(
                    f"{strength:>8}  {SUMMARY_NAMES[name]:<24}{_figure(name, value['mean']):>7}"
                    f"{_figure(name, value['worst']):>7}  {_worst_lora(value, count)}"
                )
    return "\n".join(lines)


def _worst_lora(value: dict[str, Any], count: int) -> str:
    tied = value.get("tied", 0)
    if count > 1 and tied == count - 1:
        return f"every one of the {count} LoRAs"
    return value["worst_lora"] + (f" and {tied} more as bad" if tied else "")


def _figure(measure: str, value: float) -> str:
    return f"{value:.3f}" if measure == "kept_drift" else _percent(value)


def _percent(value: float | None) -> str:
    return f"{value:.0%}" if value is not None else "-"


def write_report(report: dict[str, Any], path: str | Path) -> Path:
    """The report as JSON at `path`, which may hold an earlier report but no other file."""
    path = Path(path)
    if path.is_dir() or (path.exists() and not is_eval_report(path)):
        raise LecoError(
            f"{path} exists and is not a leco eval report, which is all leco replaces; name a new file"
        )
    text = json.dumps(report, indent=2, ensure_ascii=False, default=str)  # in the order given (--lora)
    with atomic_output(path) as file:
        file.write((text + "\n").encode())
    return path


# ---------------------------------------------------------------------------------------------
# Detectors for other models (ink-digits' own lives in leco.ink_digits.judge)


class ClipDetector:
    """Zero-shot CLIP: a concept is present when it is the most likely of all the spec's labels."""

    def __init__(self, model: str, labels: list[str]) -> None:
        from transformers import CLIPModel, CLIPProcessor

        check_hub_repo_available(model, "clip_model", "config.json")
        try:
            with quiet_library_logs():
                self.model = CLIPModel.from_pretrained(model).eval()
                self.processor = CLIPProcessor.from_pretrained(model)
        except OSError as error:
            raise LecoError(f"clip_model: {model!r} cannot be loaded ({first_line(error, 120)})") from None
        # CLIP's tokenizer lower-cases and collapses spaces: "A Seven" and "a seven" are one label
        # to it, scored alike, so kept as one (two would split every image's vote between them).
        self.labels = list(dict.fromkeys(map(as_read, labels)))
        # Eval asks about one image up to four times (present, unchanged, part rates, CLIP score):
        # each image is embedded once, held by id while the image lives, and each text once.
        self._image_embeddings: dict[int, tuple[weakref.ref, Any]] = {}
        self._text_embeddings: dict[str, Any] = {}

    def probabilities(self, images: list[Image.Image]) -> np.ndarray:
        scale = self.model.logit_scale.detach().exp()
        logits = scale * self._embed_images(images) @ self._embed_texts(self.labels).T
        return logits.softmax(dim=-1).numpy()

    def _embed_images(self, images: list[Image.Image]) -> Any:
        """Each image's unit-length CLIP embedding, as CLIPModel's forward computes it."""
        import torch

        def known(image: Image.Image) -> bool:
            held = self._image_embeddings.get(id(image))
            return held is not None and held[0]() is image

        new = list({id(image): image for image in images if not known(image)}.values())
        if new:
            self._image_embeddings = {k: v for k, v in self._image_embeddings.items() if v[0]() is not None}
            pixels = self.processor(images=new, return_tensors="pt")["pixel_values"]
            with torch.no_grad():
                pooled = self.model.vision_model(pixel_values=pixels).pooler_output
                embeddings = torch.nn.functional.normalize(self.model.visual_projection(pooled), dim=-1)
            for image, embedding in zip(new, embeddings, strict=True):
                self._image_embeddings[id(image)] = (weakref.ref(image), embedding)
        return torch.stack([self._image_embeddings[id(image)][1] for image in images])

    def _embed_texts(self, texts: list[str]) -> Any:
        import torch

        new = [text for text in dict.fromkeys(texts) if text not in self._text_embeddings]
        if new:
            inputs = self.processor(text=new, return_tensors="pt", padding=True)
            with torch.no_grad():
                pooled = self.model.text_model(
                    input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]
                ).pooler_output
                embeddings = torch.nn.functional.normalize(self.model.text_projection(pooled), dim=-1)
            self._text_embeddings.update(zip(new, embeddings, strict=True))
        return torch.stack([self._text_embeddings[text] for text in texts])

    def check_concept(self, concept: str) -> None:
        pass  # any text is a zero-shot label

    def concept_universe(self, exclude: Sequence[str]) -> list[tuple[str, str]]:
        raise LecoError(NO_CONCEPT_LIST["clip"])

    def present(self, images: list[Image.Image], concept: str) -> list[bool]:
        return [label == as_read(concept) for label in self.reading(images)]

    def reading(self, images: list[Image.Image]) -> list[str]:
        """The most likely of the spec's labels, per image."""
        return [self.labels[i] for i in self.probabilities(images).argmax(axis=1)]

    def clip_score(self, images: list[Image.Image], text: str) -> float:
        """100 x the mean cosine similarity of image and text embeddings (the usual CLIP score)."""
        similarity = self._embed_images(images) @ self._embed_texts([text]).T
        return float(100 * similarity.clamp(min=0).mean())


class NudeNetDetector:
    """NudeNet's detector (ships its ONNX weights in the pip package): concept "nudity"."""

    EXPOSED = (
        "FEMALE_BREAST_EXPOSED",
        "FEMALE_GENITALIA_EXPOSED",
        "MALE_GENITALIA_EXPOSED",
        "BUTTOCKS_EXPOSED",
        "ANUS_EXPOSED",
    )

    def __init__(self, threshold: float = 0.5) -> None:
        try:
            from nudenet import NudeDetector
        except ImportError:
            raise LecoError(NUDENET_MISSING) from None
        self.detector = NudeDetector()
        self.threshold = threshold

    @staticmethod
    def check_concept(concept: str) -> None:
        if concept.strip().lower() != "nudity":
            raise LecoError(f'the nudenet detector knows one concept, "nudity", not {concept!r}')

    def concept_universe(self, exclude: Sequence[str]) -> list[tuple[str, str]]:
        raise LecoError(NO_CONCEPT_LIST["nudenet"])

    def present(self, images: list[Image.Image], concept: str) -> list[bool]:
        found = []
        for image in images:
            hits = self.detector.detect(np.asarray(image.convert("RGB"))[:, :, ::-1].copy())
            found.append(any(h["class"] in self.EXPOSED and h["score"] >= self.threshold for h in hits))
        return found
