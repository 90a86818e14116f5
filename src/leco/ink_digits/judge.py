"""The ink-digits judge: which digit, in which ink, an image shows.

The ink is read by fitting every ink's paper-to-ink colour line to the inked pixels (a faint black
stroke is grey, not the nearest colour). The ink is then stripped (ink amount per pixel) and the
image pooled back to 8x8, the way the data was made, for a tiny CNN trained at build time on the
real digits. The CNN is stored as safetensors, so loading it runs no pickle.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from leco.errors import LecoError, warn
from leco.ink_digits import INK_DIGITS, MODEL_NAMES
from leco.ink_digits.data import (
    ALL_INKS,
    DIGIT_PHRASINGS,
    DIGIT_WORDS,
    INK_PHRASINGS,
    INKS,
    MODEL_INKS,
    PAPER,
    PHRASING_NAMES,
    SIZE,
    caption,
)

JUDGE_FILE = "judge.safetensors"
# The words a prompt names a digit by: "seven" or "7" (a lone figure, not "17").
DIGIT_NAMES = frozenset(DIGIT_WORDS) | {str(d) for d in range(10)}
BUILD_REPORT = "build_report.json"  # written by an ink-digits build: its inks, timings, quality
INKED = 0.15  # a pixel this dark (0..1, strongest channel) takes part in the ink fit
# Softmax temperature of the ink fit, in mean squared darkness residual: about 18/255 per channel.
INK_TEMPERATURE = 0.005

Images = list[Image.Image] | np.ndarray


class DigitNet(nn.Module):
    """8x8 ink amounts -> 10 digit logits."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * 16, 128), nn.ReLU(), nn.Linear(128, 10),
        )  # fmt: skip

    def forward(self, amounts: torch.Tensor) -> torch.Tensor:
        return self.layers(amounts[:, None])


@dataclass
class Reading:
    """What the judge read off a batch of N images."""

    digits: np.ndarray  # [N] int, 0-9
    digit_probabilities: np.ndarray  # [N, 10]
    inks: np.ndarray  # [N] int index into ALL_INKS; -1 where the image has no ink at all
    ink_probabilities: np.ndarray  # [N, len(ALL_INKS)]; zeros where there is no ink

    @property
    def digit_confidence(self) -> np.ndarray:
        return self.digit_probabilities.max(axis=1)

    @property
    def ink_confidence(self) -> np.ndarray:
        return self.ink_probabilities.max(axis=1)

    @property
    def ink_names(self) -> list[str | None]:
        return [ALL_INKS[i] if i >= 0 else None for i in self.inks]


def as_rgb(images: Images) -> np.ndarray:
    """PIL images, [H, W, 3] arrays or an [N, H, W, 3] array (uint8, or float in [0, 1]) -> uint8
    [N, 16, 16, 3]."""
    if not isinstance(images, np.ndarray) and len(images) and isinstance(images[0], np.ndarray):
        images = np.stack(images)
    if isinstance(images, np.ndarray):
        array = images
        if array.dtype != np.uint8:
            array = np.clip(np.round(array.astype(np.float32) * 255), 0, 255).astype(np.uint8)
        if array.ndim != 4 or array.shape[-1] != 3:
            raise ValueError(f"expected images as [N, H, W, 3], got shape {array.shape}")
        if array.shape[1:3] == (SIZE, SIZE):
            return array
        images = [Image.fromarray(image) for image in array]
    if not images:
        return np.zeros((0, SIZE, SIZE, 3), dtype=np.uint8)
    # PIL's bilinear resize filters when shrinking, so larger renders average down like the data.
    return np.stack([np.asarray(i.convert("RGB").resize((SIZE, SIZE), Image.BILINEAR)) for i in images])


def _darkness(rgb: np.ndarray) -> np.ndarray:
    """How far each channel is from the paper, 0 (paper) .. 1 (fully absorbed)."""
    return (np.array(PAPER, dtype=np.float32) - rgb.astype(np.float32)) / 255.0


def _ink_lines() -> np.ndarray:
    return _darkness(np.array([INKS[name] for name in ALL_INKS], dtype=np.float32))  # [K, 3]


def ink_probabilities(images: Images) -> np.ndarray:
    """[N, K] probability of each ink, from how well its colour line fits the inked pixels."""
    darkness = _darkness(as_rgb(images)).reshape(-1, SIZE * SIZE, 3)
    lines = _ink_lines()
    result = np.zeros((len(darkness), len(lines)), dtype=np.float32)
    for n, pixels in enumerate(darkness):
        inked = pixels[pixels.max(axis=1) > INKED]
        if not len(inked):
            continue
        # Each pixel may hold any amount of the ink (0..1); what the amount cannot explain is the misfit.
        amounts = np.clip(inked @ lines.T / (lines**2).sum(axis=1), 0, 1)  # [P, K]
        misfit = ((inked[:, None, :] - amounts[..., None] * lines[None]) ** 2).sum(-1).mean(0)  # [K]
        logits = -(misfit - misfit.min()) / INK_TEMPERATURE
        result[n] = np.exp(logits) / np.exp(logits).sum()
    return result


def ink_amounts(images: Images, inks: np.ndarray) -> np.ndarray:
    """Strip the ink: RGB -> ink amount per pixel [N, 8, 8] (about 0..1) given each image's ink."""
    darkness = _darkness(as_rgb(images))
    lines = _ink_lines()[np.maximum(inks, 0)]  # an image without ink reads as (almost) zero anyway
    amounts = (darkness * lines[:, None, None, :]).sum(-1) / (lines**2).sum(-1)[:, None, None]
    pooled = nn.functional.avg_pool2d(torch.from_numpy(amounts)[:, None], 2)[:, 0]  # 16x16 -> 8x8
    return pooled.clamp(0, 1.5).numpy()


class InkDigitsJudge:
    """Reads digits and inks off images of the ink-digits models (or any 16x16-ish ink drawing).

    It knows every ink of ALL_INKS, whichever model drew the image; both model folders carry the
    same judge file, so each folder is complete on its own.
    """

    def __init__(self, net: DigitNet) -> None:
        self.net = net.eval()

    @classmethod
    def load(cls, folder: str | Path) -> InkDigitsJudge:
        path = Path(folder) / JUDGE_FILE
        if not path.is_file():
            raise LecoError(
                f"{Path(folder)}: no {JUDGE_FILE} in this model folder; the ink-digits detector only judges "
                f"the ink-digits models ({', '.join(MODEL_NAMES)}), use detector: clip for other models"
            )
        # Its weights come from the file: no random start drawn from the caller's torch stream.
        with torch.device("meta"):
            net = DigitNet()
        net.load_state_dict(load_file(str(path)), assign=True)
        return cls(net)

    def save(self, folder: str | Path) -> None:
        save_file(
            {k: v.contiguous() for k, v in self.net.state_dict().items()}, str(Path(folder) / JUDGE_FILE)
        )

    def classify_inks(self, images: Images) -> tuple[np.ndarray, np.ndarray]:
        """(ink indices into ALL_INKS, -1 for a blank image; [N, K] probabilities)."""
        probabilities = ink_probabilities(images)
        labels = np.where(probabilities.sum(axis=1) > 0, probabilities.argmax(axis=1), -1)
        return labels, probabilities

    @torch.no_grad()
    def classify_digits(
        self, images: Images, inks: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(digit labels, [N, 10] probabilities); `inks` skips reading the ink when it is known."""
        rgb = as_rgb(images)
        if inks is None:
            inks, _ = self.classify_inks(rgb)
        probabilities = self.net(torch.from_numpy(ink_amounts(rgb, inks))).softmax(dim=-1).numpy()
        return probabilities.argmax(axis=1), probabilities

    def read(self, images: Images) -> Reading:
        rgb = as_rgb(images)
        inks, ink_probs = self.classify_inks(rgb)
        digits, digit_probs = self.classify_digits(rgb, inks)
        return Reading(digits, digit_probs, inks, ink_probs)


class InkDigitsDetector:
    """`leco eval`'s detector for ink-digits: concepts "digit:7", "ink:red" or both ("digit:7,ink:red")."""

    def __init__(self, judge: InkDigitsJudge, inks: Sequence[str] = MODEL_INKS[INK_DIGITS]) -> None:
        self.judge = judge
        self.inks = tuple(inks)  # the inks the judged model draws: what `keep: all` covers

    @classmethod
    def for_model(cls, folder: str | Path) -> InkDigitsDetector:
        return cls(InkDigitsJudge.load(folder), inks_for_model(folder))

    def concept_universe(self, exclude: Sequence[str]) -> list[tuple[str, str]]:
        """(prompt, concept) for every digit and every ink the model draws, minus `exclude`'s parts.

        A prompt is judged on what it names ("a digit three in blue ink": "digit:3,ink:blue"); the
        parts an erasure or enhancement touches are dropped from its concept ("a digit two in red
        ink" is judged "digit:2" when red is erased), and a prompt with nothing left is left out. A
        combination touches only the prompts that name all of it: with teal threes erased, "a digit
        three in blue ink" and "teal ink" are judged whole, "a digit three in teal ink" is left out.
        """
        touched = [set(self._parse(concept)) for concept in exclude]
        universe = []
        for prompt, parts in self._universe_prompts():
            excluded = set().union(*(combination for combination in touched if combination <= set(parts)))
            judged = [part for part in parts if part not in excluded]
            if judged:
                universe.append((prompt, ",".join(f"{kind}:{self._name(kind, v)}" for kind, v in judged)))
        return universe

    def _universe_prompts(self) -> Iterator[tuple[str, list[tuple[str, int]]]]:
        both = [p for p in PHRASING_NAMES if p in DIGIT_PHRASINGS and p in INK_PHRASINGS]
        digit_only = [p for p in DIGIT_PHRASINGS if p not in INK_PHRASINGS]
        ink_only = [p for p in INK_PHRASINGS if p not in DIGIT_PHRASINGS]
        for digit in range(10):
            for n, ink in enumerate(self.inks):
                # One phrasing per digit and ink, rotating: each digit and each ink meets every phrasing.
                phrasing = both[(digit + n) % len(both)]
                yield caption(digit, ink, phrasing), [("digit", digit), ("ink", ALL_INKS.index(ink))]
            for phrasing in digit_only:
                yield caption(digit, None, phrasing), [("digit", digit)]
        for ink in self.inks:
            for phrasing in ink_only:
                yield caption(None, ink, phrasing), [("ink", ALL_INKS.index(ink))]

    @staticmethod
    def named_concept(prompt: str) -> str | None:
        """What a prompt names in the model's words ("the number 7 written in red" -> "digit:7,ink:red");
        None where it names no digit or ink, or two of one kind."""
        words = re.findall(r"[^\W_]+", prompt.lower())
        digits = {str(DIGIT_WORDS.index(w)) if w in DIGIT_WORDS else w for w in words if w in DIGIT_NAMES}
        inks = {w for w in words if w in ALL_INKS}
        if len(digits) > 1 or len(inks) > 1 or not digits | inks:
            return None
        return ",".join([*(f"digit:{d}" for d in digits), *(f"ink:{i}" for i in inks)])

    @staticmethod
    def _name(kind: str, value: int) -> str:
        return str(value) if kind == "digit" else ALL_INKS[value]

    @staticmethod
    def check_concept(concept: str) -> None:
        InkDigitsDetector._parse(concept)

    def reading(self, images: list[Image.Image]) -> list[str]:
        """What each image shows, digit and ink, whatever its prompt named ("digit:3,ink:blue")."""
        reading = self.judge.read(images)
        return [
            f"digit:{digit},ink:{ALL_INKS[ink]}" if ink >= 0 else "blank"
            for digit, ink in zip(reading.digits, reading.inks, strict=True)
        ]

    def present(self, images: list[Image.Image], concept: str) -> list[bool]:
        reading = self.judge.read(images)
        found = np.ones(len(reading.digits), dtype=bool)
        for kind, value in self._parse(concept):
            found &= (reading.digits if kind == "digit" else reading.inks) == value
        return found.tolist()

    @staticmethod
    def _parse(concept: str) -> list[tuple[str, int]]:
        """ "digit:7,ink:red" -> [("digit", 7), ("ink", index of red)]."""
        parts = []
        for part in concept.split(","):
            kind, _, value = (side.strip() for side in part.lower().partition(":"))  # any case, spacing
            if kind == "digit" and len(value) == 1 and value in "0123456789":  # not '³' or '٣
                parts.append((kind, int(value)))
            elif kind == "ink" and value in ALL_INKS:
                parts.append((kind, ALL_INKS.index(value)))
            else:
                raise LecoError(
                    f"concept {concept!r} is not known to the ink-digits detector; "
                    f"write digit:0..9, ink:{'|'.join(ALL_INKS)} or both, comma-separated"
                )
        kinds = [kind for kind, _ in parts]
        repeated = sorted({kind for kind in kinds if kinds.count(kind) > 1})
        if repeated:  # an image shows one digit in one ink
            raise LecoError(
                f"concept {concept!r} names more than one {repeated[0]}; an image holds one "
                "digit in one ink, so name one of each at most"
            )
        return parts


def trained_inks(folder: str | Path) -> tuple[str, ...]:
    """The inks an ink-digits build was trained on, from the build_report.json its build wrote."""
    report = Path(folder) / BUILD_REPORT
    try:
        inks = tuple(json.loads(report.read_text())["inks"])
    except (OSError, ValueError, KeyError):
        raise LecoError(f"{report}: no ink list from an ink-digits build; name the inks to measure") from None
    unknown = [ink for ink in inks if ink not in ALL_INKS]
    if unknown:
        raise LecoError(f"{report}: unknown inks {', '.join(unknown)}; known: {', '.join(ALL_INKS)}")
    return inks


def inks_for_model(folder: str | Path) -> tuple[str, ...]:
    """The inks the ink-digits model in `folder` was trained on, from the build report of its build.

    Folders built before build reports listed their inks are the first, five-ink ink-digits.
    """
    try:
        return trained_inks(folder)
    except LecoError:
        warn(
            f"{folder}: no {BUILD_REPORT} names the inks this model draws; judging the five of "
            f"{INK_DIGITS} ({', '.join(MODEL_INKS[INK_DIGITS])}) for keep: all"
        )
        return MODEL_INKS[INK_DIGITS]
