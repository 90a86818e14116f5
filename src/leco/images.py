"""Images and their bookkeeping: what was asked for, file names, and labelled X/Y-plot grids.

Columns are LoRA strengths, rows are prompts x seeds, as users compare them in A1111's X/Y plot.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

from leco._version import __version__
from leco.errors import warn
from leco.files import SOFTWARE, atomic_output


@dataclass(frozen=True)
class ImageRequest:
    prompt: str
    strength: float
    seed: int

    def file_name(self, slugs: Mapping[str, str] | None = None) -> str:
        """`<prompt slug>_<strength>_<seed>.png`; `slugs` (from `unique_slugs`) keeps apart prompts
        that would share a slug."""
        name = (slugs or {}).get(self.prompt) or slug(self.prompt)
        return f"{name}_{format_strength(self.strength)}_{self.seed}.png"


def unique_slugs(prompts: Iterable[str]) -> dict[str, str]:
    """A file-name part per prompt. Prompts that differ only in case, punctuation or letters a slug
    drops ("A digit seven!" and "a digit seven", "数字 七" and "数字 八") get a short hash each, so
    that no image overwrites another."""
    distinct = list(dict.fromkeys(prompts))
    shared = Counter(slug(p) for p in distinct)
    names = {p: slug(p) for p in distinct if shared[slug(p)] == 1}
    taken = set(names.values())
    for prompt in distinct:
        if prompt in names:
            continue
        digest, length = hashlib.sha1(prompt.encode()).hexdigest(), 6
        # a hashed name may be another prompt's own slug ("a b" beside "a-b-<hash>"): hash longer
        while (name := f"{slug(prompt)}-{digest[:length]}") in taken:
            length += 2
        names[prompt] = name
        taken.add(name)
    return {p: names[p] for p in distinct}


MIN_CELL = 128  # small models' images are scaled up (nearest neighbour) to stay readable
PAD = 6


@dataclass
class Grid:
    image: Image.Image
    cell: tuple[int, int]  # width, height of one scaled image
    column_labels: list[str]
    row_labels: list[str]


def make_grid(images: dict[ImageRequest, Image.Image]) -> Grid:
    """Arrange generated images like an X/Y plot and label every row and column."""
    requests = list(images)
    strengths = list(dict.fromkeys(r.strength for r in requests))
    rows = list(dict.fromkeys((r.prompt, r.seed) for r in requests))
    first = next(iter(images.values()))
    factor = max(1, -(-MIN_CELL // min(first.size)))
    cell_w, cell_h = first.width * factor, first.height * factor
    font = label_font(text="".join(prompt for prompt, _ in rows))
    column_labels = [f"strength {format_strength(s)}" for s in strengths]
    row_labels = [f"{_shorten(prompt)}\nseed {seed}" for prompt, seed in rows]
    label_w = (
        max(int(ImageDraw.Draw(first).multiline_textbbox((0, 0), t, font=font)[2]) for t in row_labels)
        + 2 * PAD
    )
    header_h = 14 + 2 * PAD
    grid = Image.new(
        "RGB", (label_w + len(strengths) * (cell_w + PAD), header_h + len(rows) * (cell_h + PAD)), "white"
    )
    draw = ImageDraw.Draw(grid)
    for column, label in enumerate(column_labels):
        draw.text((label_w + column * (cell_w + PAD) + PAD, PAD), label, fill="black", font=font)
    for row, (label, (prompt, seed)) in enumerate(zip(row_labels, rows, strict=True)):
        top = header_h + row * (cell_h + PAD)
        draw.multiline_text((PAD, top + PAD), label, fill="black", font=font)
        for column, strength in enumerate(strengths):
            picture = images.get(ImageRequest(prompt, strength, seed))
            if picture is not None:
                scaled = picture.convert("RGB").resize((cell_w, cell_h), Image.NEAREST)
                grid.paste(scaled, (label_w + column * (cell_w + PAD), top))
    return Grid(grid, (cell_w, cell_h), column_labels, row_labels)


# Pillow's own font draws accented and non-Latin letters as boxes ("café" as "caf□"): a system
# font that has them is used where one is installed (Pillow looks in the system's font folders).
LABEL_FONTS = ("DejaVuSans.ttf", "NotoSans-Regular.ttf", "Arial Unicode.ttf", "arial.ttf", "Arial.ttf")
# Those have no Chinese, Japanese or Korean: fonts that do, on Linux, Windows and macOS.
CJK_FONTS = (
    "NotoSansCJK-Regular.ttc",
    "NotoSansCJKjp-Regular.otf",
    "wqy-microhei.ttc",
    "DroidSansFallbackFull.ttf",
    "msyh.ttc",
    "YuGothR.ttc",
    "malgun.ttf",
    "Hiragino Sans GB.ttc",
    "AppleSDGothicNeo.ttc",
    "Arial Unicode.ttf",
)
_CJK = re.compile(  # Hangul, CJK punctuation and kana, CJK ideographs, Hangul syllables, full width
    "[\u1100-\u11ff\u3000-\u30ff\u3130-\u318f\u3400-\u9fff\uac00-\ud7af\uf900-\ufaff\uff00-\uffef]"
)


def label_font(size: int = 14, text: str = "") -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """A font that draws the labels' `text`: one with Chinese, Japanese and Korean where it holds
    any (said where none is installed), else the first of LABEL_FONTS installed."""
    if _CJK.search(text):
        font = _first_installed(CJK_FONTS, size)
        if font is not None:
            return font
        _warn_no_cjk_font()
    return _first_installed(LABEL_FONTS, size) or ImageFont.load_default(size=size)


@functools.cache
def _first_installed(names: tuple[str, ...], size: int) -> ImageFont.FreeTypeFont | None:
    for name in names:
        try:
            return ImageFont.truetype(name, size)
        except OSError:  # not installed here
            continue
    return None


@functools.cache  # once a run
def _warn_no_cjk_font() -> None:
    warn(
        "grid labels: no installed font draws Chinese, Japanese or Korean, so those letters show as "
        "boxes (the images and their saved prompts are as asked); install one, e.g. fonts-noto-cjk"
    )


def save_image(image: Image.Image, path: Path, parameters: str | None = None) -> Path:
    """Write a PNG atomically (temp file + rename); `parameters`: A1111's generation text, which
    its PNG Info tab and most image browsers read."""
    info = PngInfo()
    info.add_text("Software", f"{SOFTWARE} {__version__}")  # what --overwrite may replace
    if parameters is not None:
        info.add_text("parameters", parameters)
    with atomic_output(path) as file:
        image.save(file, format="PNG", pnginfo=info)
    return path


def _shorten(text: str, width: int = 28) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def slug(text: str) -> str:
    """A file-name part from a prompt: its letters and digits in any script (prompts in Chinese or
    Cyrillic name their files too), the rest as single dashes."""
    return re.sub(r"[\W_]+", "-", text.lower()).strip("-")[:60] or "empty"


def format_strength(value: float) -> str:
    return f"{value:g}"


def strengths_named_alike(strengths: Iterable[float]) -> tuple[float, float] | None:
    """Two different strengths whose label (and image file name) would be the same, if any."""
    seen: dict[str, float] = {}
    for value in strengths:
        label = format_strength(value + 0.0)  # -0 is 0
        if label in seen and seen[label] != value:
            return seen[label], value
        seen.setdefault(label, value)
    return None
