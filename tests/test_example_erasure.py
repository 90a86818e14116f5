"""End to end on the bundled model: the example config erases the digit seven and keeps the others.

This is the check the random tiny models cannot give: that a LECO LoRA trained from the model's
own knowledge removes the named concept (also under a paraphrase it never saw) and leaves the
rest alone, judged by the model's digit classifier.
"""

from pathlib import Path

import pytest
import torch

from leco import train
from leco.conditioning import PromptEncoder, predict
from leco.config import load_config
from leco.evaluate import evaluate, load_spec
from leco.models import load_models
from leco.network import LoRANetwork

# One worker trains and judges the examples once for all the tests below (pytest-xdist). The
# fixtures live for the session: xdist may run another module's tests on that worker between
# these, which would end a module fixture and train the examples a second time (66 s).
pytestmark = pytest.mark.xdist_group("bundled-example")
EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "ink-digits"
PARAPHRASE = "the number 7 written in green"  # never a training prompt


@pytest.fixture(scope="session")
def models():
    return load_models("ink-digits", with_vae=True)


@pytest.fixture(scope="session")
def spec():
    spec = load_spec(EXAMPLES / "erase_seven_eval.yaml")  # keep: all, every other digit and ink
    spec.images_per_prompt = 4  # the example uses 16; 4 keeps CI short and still separates 0% from 100%
    return spec


@pytest.fixture(scope="session")
def trained(tmp_path_factory, models, spec):
    """The erase-seven example and its closed-form variant, judged in one eval: the plain model's
    strength-0 images are made once for both."""
    folder = tmp_path_factory.mktemp("example")
    config = load_config(EXAMPLES / "erase_seven.yaml")
    config.save.path = str(folder)
    config.save.per_steps = config.train.iterations  # no intermediate files or preview grids
    config.preview.prompts = []
    example = train(config, progress=False)
    closed_form = load_config(EXAMPLES / "erase_seven_closed_form.yaml")
    closed_form.save.path = str(folder)
    edit = train(closed_form, progress=False)
    edit.trainable.remove()
    report = evaluate(models, [example.path, edit.path], spec, "cpu", progress=False)
    return {"example": example, "closed_form": edit, "report": report}


def rows_by_prompt(report: dict, strength: float, lora: Path | None) -> dict[str, float]:
    label = None if strength == 0.0 else lora.stem
    return {
        r["prompt"]: r["detected"] for r in report["rows"] if r["strength"] == strength and r["lora"] == label
    }


def test_zero_lora_erases_nothing(tmp_path, models, spec):
    config = load_config(EXAMPLES / "erase_seven.yaml")
    network = LoRANetwork.create(models.unet, models.family, config.network)  # up-weights start at zero
    zero = network.save(tmp_path / "zero.safetensors", resolution=models.resolution)
    network.remove()
    # the erased prompts, fewer images: what matters is that strength 1 draws what 0 does
    small = spec.model_copy(update={"images_per_prompt": 2, "keep": [], "keep_all": False})
    report = evaluate(models, zero, small, "cpu", progress=False)
    assert rows_by_prompt(report, 1.0, zero) == rows_by_prompt(report, 0.0, None)
    assert all(r["drift"] == 0.0 for r in report["rows"])
    assert report["summary"]["1"]["erased_still_detected"] >= 0.9


def test_example_config_erases_seven_and_keeps_the_other_digits(trained, models, spec):
    result, report = trained["example"], trained["report"]
    assert (
        result.steps == load_config(EXAMPLES / "erase_seven.yaml").train.iterations and result.path.exists()
    )
    before, after = rows_by_prompt(report, 0.0, None), rows_by_prompt(report, 1.0, result.path)
    erased = [item.prompt for item in spec.erase]
    kept = [r["prompt"] for r in report["rows"] if r["kind"] == "keep" and r["lora"] == result.path.stem]
    assert PARAPHRASE in erased and len(kept) > 60  # every other digit in every ink, every ink
    assert all(before[p] >= 0.8 for p in erased), before  # the model draws sevens without the LoRA
    assert all(after[p] <= 0.2 for p in erased), after  # ...and not with it, paraphrase included
    # Every other concept, not a hand-picked few: the recipe before anchors lost the six here.
    assert all(after[p] >= 0.75 for p in kept), {p: after[p] for p in kept if after[p] < 0.75}
    assert report["per_lora"][result.path.stem]["1"]["kept_drift"] < 0.05  # other digits barely move

    # The same at the level the loss works on: the LoRA moves the UNet's prediction for the
    # target far more than for unrelated prompts (random tiny models cannot show this).
    change = prediction_change(models, result.trainable, ["a digit seven", "a digit three", "a digit one"])
    assert change["a digit seven"] > 2.5 * max(change["a digit three"], change["a digit one"]), change


def prediction_change(models, network, prompts: list[str]) -> dict[str, float]:
    """Mean |LoRA on - LoRA off| of the noise prediction, over fixed latents and timesteps."""
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(8, 4, 8, 8, generator=generator)
    timesteps = torch.linspace(50, 950, 8).long()
    encoder = PromptEncoder(models)
    change = {}
    with torch.no_grad():
        for prompt in prompts:
            cond = encoder.encode([prompt]).repeat(len(latents))
            with network.strength(0.0):
                before = predict(network.unet, latents, timesteps, cond)
            change[prompt] = (predict(network.unet, latents, timesteps, cond) - before).abs().mean().item()
    return change


def test_the_closed_form_example_erases_seven_and_keeps_every_other_concept(trained):
    label = trained["closed_form"].path.stem
    after = [r for r in trained["report"]["rows"] if r["strength"] == 1.0 and r["lora"] == label]
    assert len(after) > 60
    assert all(r["detected"] <= 0.25 for r in after if r["kind"] == "erase"), after
    assert all(r["detected"] >= 0.75 for r in after if r["kind"] == "keep")
