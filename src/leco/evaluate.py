"""How much of a concept a LoRA erased, and how much of everything else it left alone.

For every prompt of a spec, N images per LoRA strength with fixed seeds. Erased prompts report how
often a detector still finds their concept; kept prompts how often it still finds theirs, and how
far their images moved from the strength-0 image of the same seed (mean absolute pixel difference).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from leco.config import ConfigError, describe_validation_error, read_yaml
from leco.errors import LecoError
from leco.files import atomic_output
from leco.generate import ImageRequest, SamplingSettings, build_pipeline, generate, lora_strengths
from leco.models import LoadedModels


class ConceptPrompt(BaseModel):
    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True)
    prompt: str
    concept: str  # what the detector looks for, e.g. "digit:7", "ink:red", "a painting by van gogh"


class EvalSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    detector: Literal["ink-digits", "clip", "nudenet"] = "ink-digits"
    clip_model: str | None = None  # HF id or local folder of a CLIP model (detector: clip)
    alternatives: list[str] = Field(default_factory=list)  # extra zero-shot labels (detector: clip)
    images_per_prompt: int = Field(8, ge=1)
    strengths: list[float] = Field(default_factory=lambda: [0.0, 1.0])
    seed: int = 0
    steps: int = Field(30, ge=1)
    guidance: float = 7.0
    height: int | None = None
    width: int | None = None
    sampler: str = "model"
    erase: list[ConceptPrompt] = Field(default_factory=list)  # should disappear
    keep: list[ConceptPrompt] = Field(default_factory=list)  # should stay, unchanged
    enhance: list[ConceptPrompt] = Field(default_factory=list)  # should appear more often


class Detector(Protocol):
    def check_concept(self, concept: str) -> None:
        """Raise LecoError if this detector cannot look for `concept` (before any image is made)."""

    def present(self, images: list[Image.Image], concept: str) -> list[bool]: ...


def load_spec(path: str | Path) -> EvalSpec:
    path = Path(path)
    try:
        spec = EvalSpec.model_validate(read_yaml(path) or {})
    except ValidationError as error:
        raise ConfigError(describe_validation_error(error, path, EvalSpec)) from None
    if not (spec.erase or spec.keep or spec.enhance):
        raise ConfigError(f"{path}: erase:, keep: and enhance: are all empty; list the prompts to judge")
    if 0.0 not in spec.strengths:
        spec.strengths = [0.0, *spec.strengths]  # drift is measured against strength 0
    return spec


def make_detector(spec: EvalSpec, models: LoadedModels) -> Detector:
    if spec.detector == "ink-digits":
        from leco.ink_digits.judge import InkDigitsDetector

        return InkDigitsDetector.for_model(models.source)
    if spec.detector == "clip":
        if not spec.clip_model:
            raise ConfigError("eval spec: clip_model: missing; name a CLIP model (HF id or local folder)")
        labels = [c.concept for c in spec.erase + spec.keep + spec.enhance] + spec.alternatives
        return ClipDetector(spec.clip_model, labels)
    return NudeNetDetector()


def evaluate(
    models: LoadedModels,
    lora: str | Path | None,
    spec: EvalSpec,
    device: Any,
    detector: Detector | None = None,
    image_dir: str | Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Generate, detect and summarise; returns the report (also what `leco eval` writes as JSON)."""
    detector = detector or make_detector(spec, models)
    for item in spec.erase + spec.keep + spec.enhance:
        detector.check_concept(item.concept)
    pipe = build_pipeline(models, spec.sampler).to(device)
    settings = SamplingSettings(spec.steps, spec.guidance, spec.height, spec.width, "", spec.sampler)
    seeds = range(spec.seed, spec.seed + spec.images_per_prompt)
    entries = [(kind, item) for kind in ("erase", "keep", "enhance") for item in getattr(spec, kind)]
    requests = [
        ImageRequest(item.prompt, s, seed) for _, item in entries for s in spec.strengths for seed in seeds
    ]
    with lora_strengths(pipe, lora, models.family) as set_strength:
        images = dict(generate(pipe, requests, settings, set_strength, progress))
    if image_dir is not None:
        from leco.preview import save_image

        for request, image in images.items():
            save_image(image, Path(image_dir) / request.file_name)
    clip_score = getattr(detector, "clip_score", None)  # only CLIP detectors score prompt fit
    rows = []
    for kind, item in entries:
        for strength in spec.strengths:
            batch = [images[ImageRequest(item.prompt, strength, seed)] for seed in seeds]
            base = [images[ImageRequest(item.prompt, 0.0, seed)] for seed in seeds]
            found = detector.present(batch, item.concept)
            row = {
                "kind": kind,
                "prompt": item.prompt,
                "concept": item.concept,
                "strength": strength,
                "detected": float(np.mean(found)),
                "drift": float(np.mean([pixel_drift(a, b) for a, b in zip(batch, base, strict=True)])),
            }
            if clip_score is not None:
                row["clip_score"] = clip_score(batch, item.prompt)
            rows.append(row)
    return {
        "lora": str(lora) if lora else None,
        "model": models.source,
        "spec": spec.model_dump(),
        "rows": rows,
        "summary": summarise(rows, spec.strengths),
    }


def summarise(rows: list[dict[str, Any]], strengths: list[float]) -> dict[str, Any]:
    def mean(kind: str, key: str, strength: float) -> float | None:
        values = [r[key] for r in rows if r["kind"] == kind and r["strength"] == strength]
        return float(np.mean(values)) if values else None

    return {
        f"{strength:g}": {
            "erased_still_detected": mean("erase", "detected", strength),
            "kept_still_right": mean("keep", "detected", strength),
            "kept_drift": mean("keep", "drift", strength),
            "enhanced_detected": mean("enhance", "detected", strength),
        }
        for strength in strengths
    }


def pixel_drift(image: Image.Image, reference: Image.Image) -> float:
    """Mean absolute difference of two same-size images, in [0, 1]."""
    a = np.asarray(image.convert("RGB"), dtype=np.float32)
    b = np.asarray(reference.convert("RGB"), dtype=np.float32)
    return float(np.abs(a - b).mean() / 255.0)


def format_report(report: dict[str, Any]) -> str:
    """The table `leco eval` prints."""
    scored = all("clip_score" in row for row in report["rows"])
    header = f"{'prompt':<36}{'concept':<16}{'kind':<7}{'strength':>9}{'detected':>10}{'drift':>8}"
    lines = [header + (f"{'CLIP score':>12}" if scored else "")]
    for row in report["rows"]:
        lines.append(
            f"{row['prompt'][:35]:<36}{row['concept'][:15]:<16}{row['kind']:<7}{row['strength']:>9g}"
            f"{row['detected']:>10.0%}{row['drift']:>8.3f}"
            + (f"{row['clip_score']:>12.1f}" if scored else "")
        )
    lines.append("")
    lines.append(
        f"{'strength':>9}{'erased: still detected':>25}{'kept: still right':>20}{'kept: drift':>13}"
        f"{'enhanced: detected':>21}"
    )
    for strength, v in report["summary"].items():
        cells = [_percent(v["erased_still_detected"]), _percent(v["kept_still_right"])]
        drift = f"{v['kept_drift']:.3f}" if v["kept_drift"] is not None else "-"
        lines.append(
            f"{strength:>9}{cells[0]:>25}{cells[1]:>20}{drift:>13}{_percent(v['enhanced_detected']):>21}"
        )
    return "\n".join(lines)


def _percent(value: float | None) -> str:
    return f"{value:.0%}" if value is not None else "-"


def write_report(report: dict[str, Any], path: str | Path) -> Path:
    from leco.network.kohya import json_metadata

    path = Path(path)
    with atomic_output(path) as file:
        file.write((json.dumps(json.loads(json_metadata(report)), indent=2) + "\n").encode())
    return path


class ClipDetector:
    """Zero-shot CLIP: a concept is present when it is the most likely of all the spec's labels."""

    def __init__(self, model: str, labels: list[str]) -> None:
        from transformers import CLIPModel, CLIPProcessor

        try:
            self.model = CLIPModel.from_pretrained(model).eval()
            self.processor = CLIPProcessor.from_pretrained(model)
        except OSError as error:
            raise LecoError(
                f"clip_model: {model!r} cannot be loaded ({str(error).splitlines()[0][:120]})"
            ) from None
        self.labels = list(dict.fromkeys(labels))

    def probabilities(self, images: list[Image.Image]) -> np.ndarray:
        import torch

        inputs = self.processor(text=self.labels, images=images, return_tensors="pt", padding=True)
        with torch.no_grad():
            logits = self.model(**inputs).logits_per_image
        return logits.softmax(dim=-1).numpy()

    def check_concept(self, concept: str) -> None:
        pass  # any text is a zero-shot label

    def present(self, images: list[Image.Image], concept: str) -> list[bool]:
        best = self.probabilities(images).argmax(axis=1)
        return [self.labels[i] == concept for i in best]

    def clip_score(self, images: list[Image.Image], text: str) -> float:
        """100 x the mean cosine similarity of image and text embeddings (the usual CLIP score)."""
        import torch

        inputs = self.processor(text=[text], images=images, return_tensors="pt", padding=True)
        with torch.no_grad():
            outputs = self.model(**inputs)
        image = outputs.image_embeds / outputs.image_embeds.norm(dim=-1, keepdim=True)
        words = outputs.text_embeds / outputs.text_embeds.norm(dim=-1, keepdim=True)
        return float(100 * (image @ words.T).clamp(min=0).mean())


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
            raise LecoError("detector: nudenet needs the nudenet package; pip install nudenet") from None
        self.detector = NudeDetector()
        self.threshold = threshold

    def check_concept(self, concept: str) -> None:
        if concept != "nudity":
            raise LecoError(f'eval spec: the nudenet detector knows one concept, "nudity", not {concept!r}')

    def present(self, images: list[Image.Image], concept: str) -> list[bool]:
        found = []
        for image in images:
            hits = self.detector.detect(np.asarray(image.convert("RGB"))[:, :, ::-1].copy())
            found.append(any(h["class"] in self.EXPOSED and h["score"] >= self.threshold for h in hits))
        return found
