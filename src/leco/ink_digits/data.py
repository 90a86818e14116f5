"""The ink-digits data: scikit-learn's real handwritten digits, drawn in coloured ink, with captions.

Two kinds of concept: objects (the digit) and styles (the ink). Captions come in several
phrasings with synonyms ("seven" / "7", "digit" / "number"), so that an erasure can be tested
against a paraphrase, and in phrasings that name only the digit or only the ink.

Both bundled models share one VAE and one judge that know every ink (ALL_INKS); each model is
trained on its own ink list (MODEL_INKS): ink-digits on five, ink-digits-2 on all seven.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from sklearn.datasets import load_digits

from leco.ink_digits import INK_DIGITS, INK_DIGITS_2

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# Ink colours (RGB at full ink). Orange sits next to red on purpose: "erase red, keep orange" is
# the hard case of an ink erasure.
INKS = {
    "red": (205, 30, 30),
    "orange": (240, 135, 15),
    "green": (25, 140, 45),
    "blue": (35, 65, 215),
    "black": (20, 20, 20),
    # Only ink-digits-2 is trained on these two; ink-digits has their words but never saw them drawn.
    "purple": (120, 40, 170),
    "teal": (0, 140, 140),
}
# Every ink, in a fixed order: the judge's ink indices and the shared VAE's training data.
ALL_INKS = tuple(INKS)
# The inks each bundled model is trained on (and measured on).
MODEL_INKS = {INK_DIGITS: ALL_INKS[:5], INK_DIGITS_2: ALL_INKS}
PAPER = (255, 255, 255)
SIZE = 16  # image side in pixels; the 8x8 originals are upsampled 2x (bilinear)
# The ways a caption can be written; training draws them uniformly.
PHRASINGS = {
    "words": "a digit {word} in {ink} ink",
    "number": "the number {digit} written in {ink}",
    "terse": "{digit}, {ink} ink",
    "digit-only": "a digit {word}",
    "number-only": "the number {digit}",
    "ink-only": "{ink} ink",
}
PHRASING_NAMES = tuple(PHRASINGS)
# Which phrasings name the digit, and which the ink: only those are judged on it.
DIGIT_PHRASINGS = tuple(p for p, text in PHRASINGS.items() if "{word}" in text or "{digit}" in text)
INK_PHRASINGS = tuple(p for p, text in PHRASINGS.items() if "{ink}" in text)
EMPTY_CAPTION_RATE = 0.1  # captions dropped to "" in training, for classifier-free guidance


def caption(digit: int | None, ink: str | None, phrasing: str) -> str:
    """The caption of `digit` (0-9) in `ink` written the `phrasing` way; unused parts may be None."""
    if phrasing not in PHRASINGS:
        raise ValueError(f"unknown phrasing {phrasing!r}; known: {', '.join(PHRASING_NAMES)}")
    if phrasing in DIGIT_PHRASINGS and (digit is None or not 0 <= digit <= 9):
        raise ValueError(f"phrasing {phrasing!r} needs a digit 0-9, got {digit!r}")
    if phrasing in INK_PHRASINGS and ink not in INKS:
        raise ValueError(f"phrasing {phrasing!r} needs an ink ({', '.join(ALL_INKS)}), got {ink!r}")
    word = DIGIT_WORDS[digit] if digit is not None else ""
    return PHRASINGS[phrasing].format(word=word, digit=digit, ink=ink)


def caption_words() -> list[str]:
    """Every word a caption of either model can contain: the shared tokenizer gives each its own token."""
    fixed = {w for text in PHRASINGS.values() for w in text.replace(",", " ").split() if "{" not in w}
    return sorted(fixed | set(DIGIT_WORDS) | set(ALL_INKS) | {str(d) for d in range(10)} | {","})


def digits() -> tuple[np.ndarray, np.ndarray]:
    """The 1,797 real 8x8 digits as ink amounts in [0, 1], and their labels."""
    data = load_digits()
    return (data.images / 16.0).astype(np.float32), data.target.astype(np.int64)


def upsample(amounts: np.ndarray) -> np.ndarray:
    """Ink amounts [N, 8, 8] -> [N, 16, 16], bilinear: how the training images are made."""
    tensor = torch.from_numpy(np.ascontiguousarray(amounts, dtype=np.float32))[:, None]
    big = torch.nn.functional.interpolate(tensor, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    return big[:, 0].numpy()


def draw(amounts: np.ndarray, ink: str) -> np.ndarray:
    """Ink amounts [N, H, W] in [0, 1] -> RGB uint8 [N, H, W, 3]: ink mixed into the paper colour."""
    colour = np.array(INKS[ink], dtype=np.float32)
    paper = np.array(PAPER, dtype=np.float32)
    rgb = paper + amounts[..., None] * (colour - paper)
    return np.clip(np.round(rgb), 0, 255).astype(np.uint8)


def dataset(inks: Sequence[str] = ALL_INKS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every digit in each of `inks`: images [N, 16, 16, 3] uint8, digit labels, ink indices into ALL_INKS."""
    amounts, labels = digits()
    big = upsample(amounts)
    images = [draw(big, ink) for ink in inks]
    ink_labels = [np.full_like(labels, ALL_INKS.index(ink)) for ink in inks]
    return np.concatenate(images), np.tile(labels, len(inks)), np.concatenate(ink_labels)
