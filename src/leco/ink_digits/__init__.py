"""ink-digits: small real text-to-image models that leco ships and measures on.

Trained on scikit-learn's handwritten digits drawn in coloured ink; they know objects (the digit)
and styles (the ink), so erasing one and keeping the others can be measured on a laptop CPU.

- `ink-digits`: SD 1.x layout, epsilon prediction, trained on five inks.
- `ink-digits-2`: SD 2.x layout (penultimate-layer text, linear projections), v-prediction,
  trained on all seven inks, with ink-digits' VAE: both models share one latent space.

This module stays free of torch imports: leco.models resolves the bundled names through it.
"""

from pathlib import Path

INK_DIGITS = "ink-digits"
INK_DIGITS_2 = "ink-digits-2"
# Where each bundled model lives inside this package.
MODEL_FOLDERS = {INK_DIGITS: "model", INK_DIGITS_2: "model2"}
MODEL_NAMES = tuple(MODEL_FOLDERS)
# The bundled models' recommended sampling settings (their model cards repeat them).
GUIDANCE = 3.0
STEPS = 25


def model_path(name: str) -> Path:
    """The shipped diffusers folder of the bundled model `name` (one of MODEL_NAMES)."""
    if name not in MODEL_FOLDERS:
        raise ValueError(f"unknown bundled model {name!r}; known: {', '.join(MODEL_NAMES)}")
    return Path(__file__).parent / MODEL_FOLDERS[name]


def default_model_path() -> Path:
    """The shipped ink-digits folder (SD 1.x layout)."""
    return model_path(INK_DIGITS)
