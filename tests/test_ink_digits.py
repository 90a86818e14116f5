"""The bundled ink-digits model loads like any SD 1.x folder, offline, and is good enough to measure on."""

import json

import numpy as np
import pytest
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from PIL import Image
from transformers import CLIPTextModel, CLIPTokenizer

from leco.errors import LecoError
from leco.ink_digits import default_model_path
from leco.ink_digits.build import Recipe, build
from leco.ink_digits.data import (
    DIGIT_PHRASINGS,
    INK_NAMES,
    INK_PHRASINGS,
    PHRASING_NAMES,
    caption,
    caption_words,
    dataset,
)
from leco.ink_digits.judge import InkDigitsDetector, InkDigitsJudge
from leco.ink_digits.quality import GUIDANCE, STEPS, load_pipeline, measure

MODEL = default_model_path()


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline(MODEL)


def test_the_folder_is_a_plain_sd1_pipeline(pipe):
    assert json.loads((MODEL / "model_index.json").read_text())["safety_checker"] == [None, None]
    assert isinstance(pipe, StableDiffusionPipeline) and pipe.safety_checker is None
    assert isinstance(pipe.tokenizer, CLIPTokenizer) and isinstance(pipe.text_encoder, CLIPTextModel)
    assert isinstance(pipe.unet, UNet2DConditionModel) and isinstance(pipe.vae, AutoencoderKL)
    assert isinstance(pipe.scheduler, DDIMScheduler)
    assert pipe.scheduler.config.num_train_timesteps == 1000
    assert pipe.scheduler.config.prediction_type == "epsilon"
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    assert pipe.tokenizer.model_max_length == pipe.text_encoder.config.max_position_embeddings
    # The module names LECO's presets target (ESD-x: attn2, ESD-u: everything but attn2).
    names = {name.rsplit(".", 1)[-1] for name, _ in pipe.unet.named_modules()}
    assert {"attn1", "attn2", "ff", "proj_in", "proj_out"} <= names
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == 16
    weights = sum(f.stat().st_size for f in MODEL.rglob("*.safetensors"))
    assert weights <= 20 * 2**20


def test_the_bundled_name_loads_through_leco():
    from leco.models import load_models

    models = load_models("ink-digits", with_vae=True)
    assert models.source == str(MODEL)
    assert models.family.name == "sd1" and models.resolution == 16


def test_every_caption_tokenizes_to_known_tokens(pipe):
    tokenizer = pipe.tokenizer
    vocab = json.loads((MODEL / "tokenizer" / "vocab.json").read_text())
    # transformers 5 has been seen to build a 3-token CLIPTokenizer from vocab/merges files.
    assert len(tokenizer) == len(vocab) > 512
    for word in caption_words():
        pieces = tokenizer.tokenize(word)
        assert len(pieces) == 1 and tokenizer.convert_tokens_to_ids(pieces[0]) != tokenizer.unk_token_id, word
    for phrasing in PHRASING_NAMES:
        for digit in range(10):
            for ink in INK_NAMES:
                text = caption(digit, ink, phrasing)
                ids = tokenizer(text).input_ids
                assert tokenizer.unk_token_id not in ids[1:-1], text
                words = text.replace(",", " ,").split()
                assert len(ids) == len(words) + 2 <= tokenizer.model_max_length, text


def test_captions():
    assert caption(7, "red", "words") == "a digit seven in red ink"
    assert caption(7, "red", "number") == "the number 7 written in red"
    assert caption(7, "red", "terse") == "7, red ink"
    assert caption(7, None, "digit-only") == "a digit seven"
    assert caption(None, "red", "ink-only") == "red ink"
    assert set(DIGIT_PHRASINGS) | set(INK_PHRASINGS) == set(PHRASING_NAMES)
    with pytest.raises(ValueError):
        caption(None, "red", "words")


def test_judge_reads_the_real_digits():
    images, digits, inks = dataset()
    sample = np.random.default_rng(0).choice(len(images), 500, replace=False)
    judge = InkDigitsJudge.load(MODEL)
    reading = judge.read(images[sample])
    assert (reading.digits == digits[sample]).mean() >= 0.98
    assert (reading.inks == inks[sample]).all() and reading.ink_confidence.min() > 0.9
    # PIL images at another size read the same (they are resized the way the data was made).
    big = [Image.fromarray(image).resize((64, 64), Image.BILINEAR) for image in images[sample[:50]]]
    labels, probabilities = judge.classify_digits(big)
    assert (labels == reading.digits[:50]).mean() >= 0.96 and probabilities.shape == (50, 10)
    assert (judge.classify_inks(big)[0] == inks[sample[:50]]).all()
    blank = np.full((1, 16, 16, 3), 255, dtype=np.uint8)
    assert judge.classify_inks(blank)[0].tolist() == [-1]


def test_detector_concepts():
    images, digits, inks = dataset()
    pick = [int(np.flatnonzero((digits == 7) & (inks == INK_NAMES.index("red")))[0])]
    detector = InkDigitsDetector.for_model(MODEL)
    found = [Image.fromarray(images[i]) for i in pick]
    assert detector.present(found, "digit:7") == [True]
    assert detector.present(found, "digit:7,ink:red") == [True]
    assert detector.present(found, "ink:blue") == [False]
    for wrong in ("digit:seven", "ink:purple", "a seven"):
        with pytest.raises(LecoError, match="not known to the ink-digits detector"):
            detector.check_concept(wrong)


def test_generated_images_meet_the_quality_bar(pipe):
    # Every digit x every ink, one seed, per phrasing (300 images at the recommended settings).
    quality = measure(pipe, GUIDANCE, STEPS, seeds=1)
    assert set(quality) == set(PHRASING_NAMES)
    for phrasing, result in quality.items():
        assert result["images"] == 10 * len(INK_NAMES)
        if result["digit_accuracy"] is not None:
            assert result["digit_accuracy"] >= 0.9, (phrasing, result)
        if result["ink_accuracy"] is not None:
            assert result["ink_accuracy"] >= 0.95, (phrasing, result)


def test_build_is_deterministic_and_writes_a_loadable_folder(tmp_path):
    # The real build is `python -m leco.ink_digits build` (about 15 minutes); a few steps of each stage
    # check that it still runs, is seeded everywhere, and writes a folder diffusers loads.
    recipe = Recipe(threads=1, judge_steps=3, vae_steps=3, unet_steps=3)
    for name in ("a", "b"):
        build(tmp_path / name, recipe, measure_quality=False)
    for file in sorted((tmp_path / "a").rglob("*.safetensors")):
        assert file.read_bytes() == (tmp_path / "b" / file.relative_to(tmp_path / "a")).read_bytes(), file
    pipe = load_pipeline(tmp_path / "a")
    assert pipe("7, red ink", num_inference_steps=2, output_type="np").images.shape == (1, 16, 16, 3)
