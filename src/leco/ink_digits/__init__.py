"""ink-digits: a small real text-to-image model (SD 1.x layout) that leco ships and measures on.

Trained on scikit-learn's handwritten digits drawn in coloured ink; it knows objects (the digit)
and styles (the ink), so erasing one and keeping the others can be measured on a laptop CPU.
"""

from pathlib import Path


def default_model_path() -> Path:
    """The shipped model folder (a diffusers SD1-layout folder)."""
    return Path(__file__).parent / "model"
