import dataclasses
import functools
import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from leco.cli import main
from leco.config import NetworkConfig
from leco.errors import LecoError
from leco.files import written_by_leco
from leco.generate import (
    SamplingSettings,
    build_pipeline,
    parse_seeds,
    parse_strengths,
    requests_for,
    run_generation,
)
from leco.images import ImageRequest
from leco.models import load_models
from leco.network import LoRANetwork
from leco.preview import make_grid
from leco.samplers import KARRAS, SAMPLERS, a1111_sampler, make_scheduler, sampler_name


@pytest.fixture(scope="module")
def lora_files(tmp_path_factory, tiny_folders):
    """A LoRA with random (non-zero) weights per family."""
    root = tmp_path_factory.mktemp("loras")
    files = {}
    for name in ("sd1", "sdxl"):
        models = load_models(str(tiny_folders[name]))
        network = LoRANetwork.create(models.unet, models.family, NetworkConfig(rank=2))
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for parameter in network.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
        files[name] = network.save(root / f"{name}.safetensors", resolution=16)
    return files


SETTINGS = SamplingSettings(steps=4, guidance=3.0)


@pytest.mark.parametrize("name", ["sd1", "sdxl"])
def test_strength_zero_is_byte_identical_to_no_lora(tmp_path, tiny_folders, lora_files, name):
    models = load_models(str(tiny_folders[name]), with_vae=True)
    requests = requests_for(["a red fox"], [0.0, 1.0, -1.0], [3])
    paths, grid = run_generation(
        models, lora_files[name], requests, SETTINGS, tmp_path / "with", "cpu", False
    )
    assert [p.name for p in paths] == ["a-red-fox_0_3.png", "a-red-fox_1_3.png", "a-red-fox_-1_3.png"]
    # The same loaded models again, without the LoRA: it must have been unloaded from the UNet.
    (alone,), _ = run_generation(models, None, requests[:1], SETTINGS, tmp_path / "plain", "cpu", False)
    assert paths[0].read_bytes() == alone.read_bytes()
    pixels = [np.asarray(Image.open(p), dtype=np.int16) for p in paths]
    assert np.abs(pixels[1] - pixels[0]).mean() > 0.5 and np.abs(pixels[2] - pixels[0]).mean() > 0.5


@pytest.mark.parametrize(
    ("settings", "says"),
    [
        ({"steps": 0}, "steps: 0; sampling takes 1 to 1000 steps"),
        ({"guidance": float("nan")}, "guidance: nan; a number from 0 to"),
        ({"height": 7}, "height: 7; image sides are positive multiples of 8"),
        ({"width": 0}, "width: 0; image sides"),
        ({"batch_size": 0}, "batch_size: 0; a pipeline call makes at least 1 image"),
        ({"clip_skip": 0}, "clip_skip: 0; it counts from 1"),
    ],
)
def test_sampling_settings_of_the_python_api_are_checked_as_the_cli_options_are(settings, says):
    with pytest.raises(LecoError, match=re.escape(says)):
        SamplingSettings(**settings)


@pytest.mark.parametrize("stop", [KeyboardInterrupt, LecoError])
def test_images_drawn_before_a_stop_are_kept_on_disk(tmp_path, tiny_folders, monkeypatch, capsys, stop):
    import leco.generate

    drawn = []
    real = leco.generate.generate

    def stopped_after_two(*args, **kwargs):
        for request, image in real(*args, **kwargs):
            if len(drawn) == 2:
                raise stop("stopped") if stop is LecoError else stop()
            drawn.append(request)
            yield request, image

    monkeypatch.setattr(leco.generate, "generate", stopped_after_two)
    models = load_models(str(tiny_folders["sd1"]), with_vae=True)
    requests = requests_for(["a red fox"], [0.0], [1, 2, 3, 4])
    with pytest.raises(stop):
        run_generation(
            models, None, requests, dataclasses.replace(SETTINGS, batch_size=1), tmp_path, "cpu", False
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-red-fox_0_1.png", "a-red-fox_0_2.png"]
    assert all(written_by_leco(p) for p in tmp_path.iterdir())  # whole PNGs, nothing half-written
    assert f"2 of 4 images were written to {tmp_path} before the stop" in capsys.readouterr().err


def test_a_strength_without_a_lora_is_refused_through_the_python_api(tmp_path, tiny_folders):
    models = load_models(str(tiny_folders["sd1"]), with_vae=True)
    requests = requests_for(["a red fox"], [1.0], [3])  # it would be the plain model, named _1_
    with pytest.raises(LecoError, match="without a LoRA every strength draws the same image"):
        run_generation(models, None, requests, SETTINGS, tmp_path / "out", "cpu", False)
    assert not (tmp_path / "out").exists()


def test_grid_layout_and_labels():
    images = {
        ImageRequest(prompt, strength, seed): Image.new("RGB", (16, 16), (40 * seed, 100, 200))
        for prompt in ("a cat", "a dog") for seed in (0, 1, 2) for strength in (-1.0, 0.0, 1.0)
    }  # fmt: skip
    grid = make_grid(images)
    assert grid.column_labels == ["strength -1", "strength 0", "strength 1"]
    assert len(grid.row_labels) == 6 and grid.row_labels[4] == "a dog\nseed 1"
    cell_w, cell_h = grid.cell
    assert cell_w >= 128 and cell_h >= 128  # tiny images are scaled up to stay visible
    assert grid.image.width > 3 * cell_w and grid.image.height > 6 * cell_h
    # the image of (a dog, seed 2, strength 1) sits in the last row and column
    pixel = grid.image.getpixel((grid.image.width - cell_w // 2, grid.image.height - cell_h // 2))
    assert pixel == (80, 100, 200)


def test_grid_labels_draw_accented_letters_as_themselves():
    """Pillow's own font draws é and ñ as the same box; a label must show which prompt it is."""

    def label_pixels(prompt: str) -> np.ndarray:
        grid = make_grid({ImageRequest(prompt, 0.0, 0): Image.new("RGB", (16, 16))})
        return np.asarray(grid.image)[:, : grid.image.width - grid.cell[0]]  # the row label only

    assert not np.array_equal(label_pixels("café"), label_pixels("cafñ"))
    assert not np.array_equal(label_pixels("naïve"), label_pixels("naöve"))


def test_grid_labels_of_chinese_japanese_or_korean_prompts_look_for_a_font_that_has_them(monkeypatch, capsys):
    from PIL import ImageFont

    from leco import images

    tried = []
    real_truetype = ImageFont.truetype

    def truetype(name, size):
        tried.append(name)
        if name in images.CJK_FONTS:
            raise OSError("not installed")  # as on a machine without one
        return real_truetype(name, size)

    monkeypatch.setattr(ImageFont, "truetype", truetype)
    for cached in (images._first_installed, images._warn_no_cjk_font):
        cached.cache_clear()
        monkeypatch.setattr(images, cached.__name__, functools.cache(cached.__wrapped__))
    make_grid({ImageRequest("a cat", 0.0, 0): Image.new("RGB", (16, 16))})
    assert not set(tried) & set(images.CJK_FONTS)  # Latin prompts: the usual font
    for prompt in ("猫の絵", "고양이"):
        make_grid({ImageRequest(prompt, 0.0, 0): Image.new("RGB", (16, 16))})
    assert tried[1 : 1 + len(images.CJK_FONTS)] == list(images.CJK_FONTS)  # tried first, in order
    warned = [line for line in capsys.readouterr().err.splitlines() if "grid labels" in line]
    assert len(warned) == 1 and "no installed font draws Chinese, Japanese or Korean" in warned[0]


def test_seed_and_strength_lists(capsys):
    assert parse_seeds("0-3,7") == [0, 1, 2, 3, 7]
    assert parse_seeds(" 9 , 2-3,3") == [9, 2, 3]  # order kept, repeats once, said
    assert "--seeds: 3 given more than once; drawn once" in capsys.readouterr().err
    assert parse_seeds(str(2**64 - 1)) == [2**64 - 1]
    assert parse_strengths("-1,0,0.5") == [-1.0, 0.0, 0.5]
    assert [str(s) for s in parse_strengths("-0,1,1")] == ["0.0", "1.0"]  # -0 is 0: one image, one name
    assert "--strengths: 1 given more than once; drawn once" in capsys.readouterr().err
    parse_seeds("0-7")
    parse_strengths("-1,0,1")
    assert capsys.readouterr().err == ""
    with pytest.raises(LecoError, match=r"^--strengths: 0.1 and 0.10000001 are both labelled 0.1"):
        parse_strengths("0.1,0.10000001")  # one file name, one grid column, one summary key
    assert parse_strengths("0.1,0.100001") == [0.1, 0.100001]
    for text, says in [
        ("a-b", "not a list of seeds"),
        ("5-1", "counts down; write the smaller seed first: 1-5"),
        ("-3", "not a list of seeds"),
        ("", "not a list of seeds"),
        ("1,", "not a list of seeds"),
        (str(2**64), "too large"),
        ("0-10000", "more than 10000 seeds"),
    ]:
        with pytest.raises(LecoError, match=f"^--seeds: .*{re.escape(says)}"):
            parse_seeds(text)
    for text in ("x", "", "1,,2", "nan", "1,inf", "1e400", "-inf", "1_0"):
        with pytest.raises(LecoError, match="^--strengths: "):
            parse_strengths(text)


def test_lora_of_another_family_is_refused_before_loading(tmp_path, tiny_folders, lora_files):
    models = load_models(str(tiny_folders["sd1"]), with_vae=True)
    with pytest.raises(LecoError, match="was trained for sdxl but the model is sd1"):
        run_generation(
            models, lora_files["sdxl"], requests_for(["x"], [1.0], [0]), SETTINGS, tmp_path, "cpu", False
        )


def test_cli_generate_writes_images_and_grid(tmp_path, tiny_folders, lora_files, embedding_files):
    result = subprocess.run(
        [sys.executable, "-m", "leco", "generate", "--model", str(tiny_folders["sd1"]), "--lora",
         str(lora_files["sd1"]), "--prompt", "a cat", "--prompt", "a dog", "--strengths", "-1,0,1",
         "--seeds", "0-1", "--steps", "3", "--guidance", "2", "--out", str(tmp_path), "--no-progress",
         "--embedding", str(embedding_files["sd1"][0]), "--negative", "<ugly>", "--batch-size", "5"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "longer than" not in result.stderr  # the embedding's token is one token, not its spelling
    names = sorted(p.name for p in tmp_path.iterdir())
    assert len(names) == 2 * 2 * 3 + 1 and "grid.png" in names and "a-dog_-1_1.png" in names


def test_a_console_without_unicode_and_a_prompt_cut_short_still_finish_with_a_word(tmp_path, tiny_folders):
    out = tmp_path / "pictures \N{GRINNING FACE}"
    long_prompt = "a cat " + "very " * 100
    result = subprocess.run(
        [sys.executable, "-m", "leco", "generate", "--model", str(tiny_folders["sd1"]),
         "--prompt", long_prompt, "--seeds", "0", "--steps", "2", "--out", str(out), "--no-progress"],
        capture_output=True, timeout=600, env={**os.environ, "PYTHONIOENCODING": "cp1252"},
    )  # fmt: skip
    stdout, stderr = result.stdout.decode("cp1252"), result.stderr.decode("cp1252")
    assert result.returncode == 0, stderr
    assert "pictures \\U0001f600" in stdout and (out / "grid.png").is_file()  # escaped, not a crash
    assert "is longer than" in stderr and "tokens and is cut there" in stderr


def test_prompts_that_share_a_slug_keep_their_own_images(tmp_path, tiny_folders):
    from leco.images import unique_slugs

    prompts = ["a digit seven", "A digit seven!", "数字 七", "数字 八", "a cat"]
    slugs = unique_slugs(prompts)
    assert len(set(slugs.values())) == len(prompts) and slugs["a cat"] == "a-cat"
    assert slugs["a digit seven"].startswith("a-digit-seven-") and slugs == unique_slugs(reversed(prompts))
    # a prompt whose own slug is another prompt's hashed name ("a b" hashes to a-b-7dbde9)
    clash = unique_slugs(["a b", "A b!", "a b 7dbde9"])
    assert len(set(clash.values())) == 3 and clash["a b 7dbde9"] == "a-b-7dbde9"
    models = load_models(str(tiny_folders["sd1"]), with_vae=True)
    paths, _ = run_generation(
        models, None, requests_for(prompts, [0.0], [0]), SETTINGS, tmp_path, "cpu", False
    )
    assert len(set(paths)) == len(prompts) and all(p.is_file() for p in paths)


def test_cli_names_a_missing_embedding_before_loading_the_model(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "leco", "generate", "--model", str(tmp_path / "no-model"), "--prompt", "a cat",
         "--embedding", str(tmp_path / "gone.safetensors"), "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"leco generate: error: --embedding: {tmp_path}/gone.safetensors not found; give the embedding's file"
    ]


def test_training_renders_preview_grids(tmp_path, tiny_folders):
    from leco import train
    from leco.config import LecoConfig

    config = LecoConfig.model_validate(
        {
            "pretrained_model": {"name_or_path": str(tiny_folders["sd1"])},
            "prompts": [{"target": "a cat"}],
            "train": {"precision": "fp32", "iterations": 4, "seed": 0, "max_denoising_steps": 6},
            "save": {"path": str(tmp_path), "name": "cat", "per_steps": 2},
            "preview": {"prompts": ["a cat", "a dog"], "strengths": [0, 1], "seeds": [0, 1, 2], "steps": 3},
        }
    )
    result = train(config, progress=False)
    previews = sorted(p.name for p in (tmp_path / "previews").iterdir())
    assert previews == ["cat_2steps.png", "cat_last.png"]
    grid = Image.open(tmp_path / "previews" / "cat_last.png")
    assert grid.width > 2 * 128 and grid.height > 6 * 128  # 2 strength columns, 2 prompts x 3 seeds
    assert result.trainable.multiplier == 1.0  # previews leave the LoRA switched on


# -- batching ---------------------------------------------------------------------------------


class CountingPipeline:
    """A pipeline stand-in that records the prompts of every call and forwards to the real one."""

    def __init__(self, pipe):
        self.pipe, self.calls = pipe, []

    def __call__(self, prompts, **kwargs):
        self.calls.append((list(prompts), [g.initial_seed() for g in kwargs["generator"]]))
        return self.pipe(prompts, **kwargs)

    def __getattr__(self, name):
        return getattr(self.pipe, name)


@pytest.mark.parametrize("name", ["sd1", "sdxl"])
def test_batched_images_equal_images_made_one_by_one(tiny_folders, name):
    from leco.generate import build_pipeline, generate

    pipe = CountingPipeline(build_pipeline(load_models(str(tiny_folders[name]), with_vae=True)))
    requests = requests_for(["a red fox", "a blue car"], [0.0, 1.0], [3, 4, 5])
    strengths_set = []
    alone = {
        r: np.asarray(image, dtype=np.int16)
        for r, image in generate(
            pipe, requests, SamplingSettings(steps=4, batch_size=1), lambda s: None, False
        )
    }
    assert len(pipe.calls) == len(requests)
    pipe.calls.clear()
    settings = SamplingSettings(steps=4, guidance=7.0, batch_size=4)
    batched = dict(generate(pipe, requests, settings, strengths_set.append, False))
    # one strength per call, chunks of at most 4: 6 images at strength 0 -> 4 + 2, the same at 1
    assert [len(prompts) for prompts, _ in pipe.calls] == [4, 2, 4, 2]
    assert strengths_set == [0.0, 0.0, 1.0, 1.0]
    assert pipe.calls[0] == (["a red fox"] * 3 + ["a blue car"], [3, 4, 5, 3])  # one generator per seed
    for request, image in batched.items():
        pixels = np.asarray(image, dtype=np.int16)
        # Same starting noise per seed; batched kernels may round a last float bit differently,
        # which can move a pixel by one 8-bit level, never more.
        assert np.abs(pixels - alone[request]).max() <= 1
        assert (pixels != alone[request]).mean() < 0.01
    # ...and the seeds really differ inside a batch
    a, b = (np.asarray(batched[ImageRequest("a red fox", 0.0, s)], dtype=np.int16) for s in (3, 4))
    assert np.abs(a - b).mean() > 1


def test_sdxl_images_use_the_encoded_empty_prompt_that_training_reads_as_unconditional(tiny_folders):
    from leco.generate import build_pipeline, generate

    pipe = build_pipeline(load_models(str(tiny_folders["sdxl"]), with_vae=True))
    settings = SamplingSettings(steps=3, guidance=5.0)
    request = ImageRequest("a red fox", 0.0, 7)
    ((_, image),) = generate(pipe, [request], settings, lambda s: None, False)

    def direct(negative):
        generator = torch.Generator("cpu").manual_seed(7)
        images = pipe(["a red fox"], negative_prompt=negative, num_inference_steps=3, guidance_scale=5.0,
                      generator=[generator], output_type="np").images  # fmt: skip
        return (images[0] * 255).round().astype(np.int16)

    ours = np.asarray(image, dtype=np.int16)
    assert np.abs(ours - direct([""])).max() <= 1  # the encoded "", as in training
    assert np.abs(ours - direct(None)).mean() > 1  # not diffusers' zeros for a missing one


@pytest.mark.parametrize(("option", "size"), [("--height", (16, 32)), ("--width", (32, 16))])
def test_one_side_given_keeps_it_and_the_other_is_native(tmp_path, tiny_folders, option, size):
    # diffusers alone would draw the native size and ignore the side given without the other
    argv = ["generate", "--model", str(tiny_folders["sd1"]), "--prompt", "a cat", "--steps", "2",
            option, "32", "--out", str(tmp_path), "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    assert Image.open(tmp_path / "a-cat_0_0.png").size == size  # PIL: (width, height)


def test_batch_size_by_image_size(tiny_folders):
    from leco.generate import MAX_AUTO_BATCH, build_pipeline, images_per_call

    pipe = build_pipeline(load_models(str(tiny_folders["sd1"]), with_vae=True))
    assert images_per_call(pipe, SamplingSettings(height=512, width=512)) == 8
    assert images_per_call(pipe, SamplingSettings(height=1024, width=1024)) == 2
    assert images_per_call(pipe, SamplingSettings(height=2048, width=2048)) == 1
    assert images_per_call(pipe, SamplingSettings()) == MAX_AUTO_BATCH  # the tiny model's 16x16 images
    assert images_per_call(pipe, SamplingSettings(batch_size=3)) == 3


# -- textual-inversion embeddings ---------------------------------------------------------------

WIDTHS = {"sd1": (32,), "sdxl": (32, 40)}  # text encoder widths of the tiny test pipelines


def _vectors(widths, count, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(count, width, generator=generator) for width in widths]


@pytest.fixture(scope="module")
def embedding_files(tmp_path_factory):
    """kohya/leco files for the tiny SD1 and SDXL pipelines, and an A1111 .pt, as those tools write them."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("embeddings")
    sd1 = _vectors(WIDTHS["sd1"], 2)
    save_file({"emb_params": sd1[0]}, root / "ugly.safetensors", metadata={"leco.token": "<ugly>"})
    sdxl = _vectors(WIDTHS["sdxl"], 2, seed=1)
    save_file({"clip_l": sdxl[0], "clip_g": sdxl[1]}, root / "ugly-xl.safetensors")  # token: file name
    a1111 = _vectors(WIDTHS["sd1"], 1, seed=2)
    torch.save(
        {"string_to_token": {"*": 265}, "string_to_param": {"*": a1111[0]}, "name": "other", "step": 500},
        root / "bad-hands.pt",
    )
    original = _vectors(WIDTHS["sd1"], 3, seed=3)  # the original textual inversion's ParameterDict
    parameters = torch.nn.ParameterDict({"*": torch.nn.Parameter(original[0])})
    del parameters.__dict__["_keys"]  # as torch < 1.12 pickled it: its vectors in _parameters alone
    torch.save({"string_to_token": {"*": 265}, "string_to_param": parameters}, root / "rinon-ti.pt")
    return {
        "sd1": (root / "ugly.safetensors", "<ugly>", sd1),
        "sdxl": (root / "ugly-xl.safetensors", "ugly-xl", sdxl),
        "a1111": (root / "bad-hands.pt", "bad-hands", a1111),
        "original": (root / "rinon-ti.pt", "rinon-ti", original),
        "root": root,
    }


def _text_state(models):
    return [
        (len(tok), tok("a fox <ugly> ugly-xl").input_ids, enc.get_input_embeddings(),
         enc.get_input_embeddings().weight.detach().clone(), enc.config.vocab_size)
        for tok, enc in zip(models.tokenizers, models.text_encoders, strict=True)
    ]  # fmt: skip


@pytest.mark.parametrize("name", ["sd1", "sdxl", "a1111", "original"])
def test_embedding_vectors_sit_behind_the_token_and_leave_on_exit(tiny_folders, embedding_files, name):
    from leco.embedding_files import embeddings_loaded
    from leco.generate import build_pipeline

    path, token, vectors = embedding_files[name]
    models = load_models(str(tiny_folders["sdxl" if name == "sdxl" else "sd1"]), with_vae=True)
    pipe = build_pipeline(models)
    before = _text_state(models)
    with embeddings_loaded(pipe, [path]) as (embedding,):
        assert embedding.token == token
        tokens = [token] + [f"{token}_{i}" for i in range(1, len(vectors[0]))]
        for tokenizer, encoder, expected in zip(
            models.tokenizers, models.text_encoders, vectors, strict=True
        ):
            ids = tokenizer.convert_tokens_to_ids(tokens)
            assert all(i >= len(before[0][1]) for i in ids)  # new rows, not existing words
            assert torch.equal(encoder.get_input_embeddings().weight[ids], expected)
            assert ids[0] in tokenizer(f"a fox {token}").input_ids
    for (size, ids, module, weight, vocab), tokenizer, encoder in zip(
        before, models.tokenizers, models.text_encoders, strict=True
    ):
        assert len(tokenizer) == size and tokenizer("a fox <ugly> ugly-xl").input_ids == ids
        assert encoder.get_input_embeddings() is module and torch.equal(module.weight, weight)
        assert encoder.config.vocab_size == vocab and not module.weight.requires_grad


def test_a_kohya_lora_with_a_stray_key_is_refused_naming_the_key(tmp_path, tiny_folders, lora_files):
    from safetensors.torch import load_file, save_file

    models = load_models(str(tiny_folders["sd1"]), with_vae=True)
    extra = tmp_path / "extra.safetensors"
    save_file({**load_file(lora_files["sd1"]), "extra_tensor": torch.zeros(2)}, extra)
    requests = requests_for(["a red fox"], [1.0], [0])
    with pytest.raises(LecoError, match=r"extra.safetensors: extra_tensor is not a kohya LoRA key"):
        run_generation(models, extra, requests, SETTINGS, tmp_path / "o", "cpu", False)


def test_an_embedding_longer_than_a_prompt_says_its_last_vectors_are_never_read(
    tmp_path, tiny_folders, capsys
):
    from safetensors.torch import save_file

    from leco.embedding_files import embeddings_loaded
    from leco.generate import build_pipeline

    pipe = build_pipeline(load_models(str(tiny_folders["sd1"]), with_vae=True))
    room = pipe.tokenizer.model_max_length - 2
    for count in (room, room + 1):
        save_file({"emb_params": torch.randn(count, WIDTHS["sd1"][0])}, tmp_path / f"long{count}.safetensors")
        with embeddings_loaded(pipe, [tmp_path / f"long{count}.safetensors"]):
            pass
    err = capsys.readouterr().err
    assert f"long{room + 1}.safetensors: its {room + 1} vectors are more than the {room} tokens" in err
    assert f"long{room}.safetensors" not in err


def test_embedding_token_override_and_negative_prompt_changes_the_image(
    tmp_path, tiny_folders, embedding_files
):
    path, _, _ = embedding_files["sd1"]
    models = load_models(str(tiny_folders["sd1"]), with_vae=True)
    requests = requests_for(["a red fox"], [0.0], [1])
    plain, _ = run_generation(models, None, requests, SETTINGS, tmp_path / "plain", "cpu", False)
    unused, _ = run_generation(
        models, None, requests, SETTINGS, tmp_path / "unused", "cpu", False, [f"{path}:<blur>"]
    )
    negative = SamplingSettings(steps=4, guidance=3.0, negative_prompt="<blur>")
    used, _ = run_generation(
        models, None, requests, negative, tmp_path / "used", "cpu", False, [f"{path}:<blur>"]
    )
    # the same negative prompt as plain text, without the embedding
    spelled, _ = run_generation(models, None, requests, negative, tmp_path / "spelled", "cpu", False)
    assert unused[0].read_bytes() == plain[0].read_bytes()  # loading alone changes nothing
    pixels = [np.asarray(Image.open(p[0]), dtype=np.int16) for p in (plain, used, spelled)]
    assert np.abs(pixels[1] - pixels[0]).mean() > 0.5 and np.abs(pixels[1] - pixels[2]).mean() > 0.5


def test_each_image_carries_its_settings_as_a1111_writes_them(tmp_path, tiny_folders, lora_files):
    models = load_models(str(tiny_folders["sd1"]), with_vae=True)
    requests = requests_for(["a red fox"], [0.0, 0.5], [7])
    settings = SamplingSettings(steps=4, guidance=3.5, negative_prompt="blurry", sampler="euler_a", width=24)
    files, grid = run_generation(
        models, lora_files["sd1"], requests, settings, tmp_path, "cpu", False, model_name="tiny-sd1"
    )
    texts = [Image.open(file).text["parameters"].split("\n") for file in files]
    settings_line = (
        "Steps: 4, Sampler: Euler a, Schedule type: Uniform, CFG scale: 3.5, Seed: 7, Size: 24x16, "
        "Model: tiny-sd1"
    )
    assert texts[0][0] == "a red fox" and texts[1][0] == "a red fox <lora:sd1:0.5>"  # strength 0: no LoRA
    for text in texts:
        assert text[1] == "Negative prompt: blurry" and text[2].startswith(settings_line)
    assert "parameters" not in Image.open(grid).text  # the grid is a comparison, not one image
    # the LoRA as A1111 and Civitai know it: the first 12 hex of its tensor bytes' hash, quoted
    raw = Path(lora_files["sd1"]).read_bytes()  # the tensor bytes, after the JSON header
    tensor_hash = hashlib.sha256(raw[8 + int.from_bytes(raw[:8], "little") :]).hexdigest()[:12]
    assert "Lora hashes" not in texts[0][2] and f', Lora hashes: "sd1: {tensor_hash}", ' in texts[1][2]


def test_the_embeddings_a_prompt_uses_are_listed_with_a1111s_hash(tmp_path, tiny_folders, embedding_files):
    path, token, _ = embedding_files["sd1"]
    models = load_models(str(tiny_folders["sd1"]), with_vae=True)
    # the tokenizer finds an added token wherever it is written, joined to a word by punctuation too
    requests = requests_for(["a red fox", f"a red fox, {token}", f"a red fox{token}"], [0.0], [1])
    settings = SamplingSettings(steps=2, guidance=3.0)
    files, _ = run_generation(
        models, None, requests, settings, tmp_path / "a", "cpu", False, [f"{path}:{token}"]
    )
    texts = [Image.open(file).text["parameters"] for file in files]
    whole_file_hash = hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12]
    assert "TI hashes" not in texts[0]
    assert all(f'TI hashes: "{token}: {whole_file_hash}"' in text for text in texts[1:])
    negative = SamplingSettings(steps=2, guidance=3.0, negative_prompt=f"blurry, {token.upper()}")
    files, _ = run_generation(
        models, None, requests[:1], negative, tmp_path / "b", "cpu", False, [f"{path}:{token}"]
    )
    assert f'TI hashes: "{token}: {whole_file_hash}"' in Image.open(files[0]).text["parameters"]


def test_a_capitalised_token_finds_every_vector_as_a1111_does(tmp_path, tiny_folders, embedding_files):
    """A1111 names embeddings by file (EasyNegative) and finds them in any case; diffusers looks the
    token up in the lower-cased prompt, so loaded as written only its first vector would be used."""
    path, token, _ = embedding_files["sd1"]  # two vectors
    models = load_models(str(tiny_folders["sd1"]), with_vae=True)
    requests = requests_for(["a red fox"], [0.0], [1])
    images = {}
    for name, (option, negative) in {
        "lower": (f"{path}:{token}", token),
        "capitals": (f"{path}:<Ugly>", "<UGLY>, blurry"),
    }.items():
        settings = SamplingSettings(steps=4, guidance=3.0, negative_prompt=negative)
        files, _ = run_generation(models, None, requests, settings, tmp_path / name, "cpu", False, [option])
        images[name] = np.asarray(Image.open(files[0]), dtype=np.int16)
    settings = SamplingSettings(steps=4, guidance=3.0, negative_prompt=f"{token}, blurry")
    files, _ = run_generation(models, None, requests, settings, tmp_path / "same", "cpu", False, [path])
    assert np.array_equal(images["capitals"], np.asarray(Image.open(files[0]), dtype=np.int16))
    assert np.abs(images["capitals"] - images["lower"]).mean() > 0  # ", blurry" is read too


def test_bad_embedding_files_are_one_line_errors(tmp_path, tiny_folders, embedding_files):
    from safetensors.torch import save_file

    from leco.embedding_files import embeddings_loaded
    from leco.generate import build_pipeline

    root = embedding_files["root"]
    (tmp_path / "damaged.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    (tmp_path / "damaged.pt").write_bytes(b"PK\x03\x04 truncated")
    (tmp_path / "notes.pt").write_text("hi\n")  # torch's own reason would be a bare byte value: 105
    save_file({"emb_params": torch.ones(1, 16)}, tmp_path / "narrow.safetensors")
    save_file({"emb_params": torch.full((1, 32), float("nan"))}, tmp_path / "nan.safetensors")
    save_file({"emb_params": torch.ones(0, 32)}, tmp_path / "none.safetensors")
    save_file({}, tmp_path / "empty.safetensors")
    model_keys = [
        f"cond_stage_model.transformer.text_model.encoder.layers.{i}.mlp.fc1.weight" for i in range(3)
    ]
    save_file({key: torch.ones(1) for key in model_keys}, tmp_path / "model.safetensors")
    save_file(
        {"lora_unet_x.lora_up.weight": torch.ones(2, 2), "x.alpha": torch.ones(())},
        tmp_path / "l.safetensors",
    )
    sd1 = build_pipeline(load_models(str(tiny_folders["sd1"]), with_vae=True))
    sdxl = build_pipeline(load_models(str(tiny_folders["sdxl"]), with_vae=True))
    cases = [
        (sd1, [tmp_path / "missing.safetensors"], "missing.safetensors not found"),
        (sd1, [tmp_path / "damaged.safetensors"], "damaged.safetensors cannot be read"),
        (sd1, [tmp_path / "damaged.pt"], "damaged.pt cannot be read"),
        (
            sd1,
            [tmp_path / "notes.pt"],
            r"notes.pt cannot be read \(not a torch file: it is text \(starting 'hi'\)",
        ),
        (sd1, [tmp_path / "nan.safetensors"], "nan.safetensors holds no usable vectors"),
        (sd1, [tmp_path / "none.safetensors"], "none.safetensors holds no usable vectors"),
        (sd1, [tmp_path / "empty.safetensors"], "empty.safetensors holds no tensors, not an embedding"),
        (  # every key whole: the message names one, not a list cut inside a name
            sd1,
            [tmp_path / "model.safetensors"],
            rf"model.safetensors holds 3 tensors \(keys like {re.escape(model_keys[0])}\), not an embedding",
        ),
        (
            sd1,
            [tmp_path / "l.safetensors"],
            "l.safetensors is a LoRA, not an embedding; give it as --lora",
        ),
        (
            sd1,
            [tmp_path / "narrow.safetensors"],
            "narrow.safetensors has vectors of width 16, but this model's",
        ),
        (sd1, [f"{root / 'ugly.safetensors'}:cat"], "the token 'cat' is already a word"),
        (sd1, [root / "ugly.safetensors", f"{root / 'bad-hands.pt'}:<ugly>"], "both use the token '<ugly>'"),
        (sd1, [root / "ugly-xl.safetensors"], "holds clip_l \\+ clip_g \\(SDXL\\), but this model needs one"),
        (sdxl, [root / "ugly.safetensors"], "holds one text encoder's vectors, but this model needs SDXL's"),
    ]
    for pipe, files, message in cases:
        before = len(pipe.tokenizer)
        with pytest.raises(LecoError, match=message) as caught, embeddings_loaded(pipe, files):
            pass
        assert "\n" not in str(caught.value) and str(caught.value).startswith("--embedding: ")
        assert len(pipe.tokenizer) == before  # nothing stays loaded after a refused file


def test_a_token_made_of_known_words_is_loaded_with_a_warning(tiny_folders, embedding_files, capsys):
    from leco.embedding_files import embeddings_loaded
    from leco.generate import build_pipeline

    pipe = build_pipeline(load_models(str(tiny_folders["sd1"]), with_vae=True))
    with embeddings_loaded(pipe, [f"{embedding_files['root'] / 'ugly.safetensors'}:red fox"]):
        assert "red fox" in pipe.tokenizer.get_vocab()  # as A1111 reads a file named "red fox.pt"
    assert "the token 'red fox' is made of the words red, fox: wherever a prompt" in capsys.readouterr().err


def test_embedding_option_parsing(tmp_path):
    from leco.embedding_files import parse_embedding_option

    assert parse_embedding_option("a/b.safetensors") == (Path("a/b.safetensors"), None)
    assert parse_embedding_option("a/b.safetensors:<tok>") == (Path("a/b.safetensors"), "<tok>")
    odd = tmp_path / "x:y.pt"
    odd.write_bytes(b"")
    assert parse_embedding_option(str(odd)) == (odd, None)  # an existing file is taken whole
    assert parse_embedding_option("C:\\emb\\x.pt") == (Path("C:\\emb\\x.pt"), None)
    with pytest.raises(LecoError, match=r"nothing follows the ':'; give .*x:y.pt alone"):
        parse_embedding_option(f"{odd}:")  # an empty token after an existing file's name
    # A token may hold ':' or '/' itself: the file is what exists before the first such ':'.
    plain = tmp_path / "no.safetensors"
    plain.write_bytes(b"")
    assert parse_embedding_option(f"{plain}:<no/seven>") == (plain, "<no/seven>")
    assert parse_embedding_option(f"{plain}:<x:y>") == (plain, "<x:y>")
    assert parse_embedding_option(f"{odd}:<x:y>") == (odd, "<x:y>")  # the file's own ':' is its name's
    shorter = tmp_path / "x"  # both "x" and "x:y.pt" exist: the longer name is the file
    shorter.write_bytes(b"")
    assert parse_embedding_option(f"{odd}:tok") == (odd, "tok")


def test_embedding_tokens_no_prompt_can_match_are_refused(tmp_path):
    from safetensors.torch import save_file

    from leco.embedding_files import read_embedding

    path = tmp_path / "neg.safetensors"
    save_file({"emb_params": torch.zeros(2, 8)}, str(path))
    assert read_embedding(path, "<neg two>").token == "<neg two>"  # spaces inside: prompts match it
    for token in ("a\tb", "a\nb", " ab", "ab "):
        with pytest.raises(LecoError, match=re.escape(f"--embedding {path}: its token {token!r} has tabs")):
            read_embedding(path, token)


def test_a_strength_that_breaks_the_model_is_named_not_drawn_black(tmp_path, tiny_folders, lora_files):
    models = load_models(str(tiny_folders["sd1"]), with_vae=True)
    with pytest.raises(LecoError, match=r"strength 1e\+30: the images came out as NaN"):
        run_generation(
            models,
            lora_files["sd1"],
            requests_for(["x"], [1e30], [0]),
            SETTINGS,
            tmp_path / "o",
            "cpu",
            False,
        )
    assert not (tmp_path / "o").exists()


def test_run_generation_refuses_files_an_earlier_run_left_unless_told(tmp_path, tiny_folders):
    models = load_models(tiny_folders["sd1"], with_vae=True)  # a Path, as from pathlib
    requests = requests_for(["数字 七", "a red fox"], [0.0], [1])
    paths, grid = run_generation(models, None, requests, SETTINGS, tmp_path, "cpu", False)
    assert [p.name for p in paths] == ["数字-七_0_1.png", "a-red-fox_0_1.png"]  # every script names files
    assert all(written_by_leco(path) for path in [*paths, grid])
    with pytest.raises(LecoError, match=r"--out .*: already holds 3 of the files this run writes"):
        run_generation(models, None, requests, SETTINGS, tmp_path, "cpu", False)
    grid.touch()
    run_generation(models, None, requests, SETTINGS, tmp_path, "cpu", False, overwrite=True)
    assert grid.stat().st_size > 0  # leco's own: replaced
    # the user's own image of that name, beside leco's images or not (an earlier release's grid had no
    # text either, so it cannot be told from one): never replaced
    Image.new("RGB", (4, 4)).save(grid)
    for beside_leco_images in (True, False):
        for overwrite in (False, True):
            with pytest.raises(
                LecoError, match=r"holds 1 file\(s\) leco did not write .* \(e.g. grid.png\); move"
            ):
                run_generation(models, None, requests, SETTINGS, tmp_path, "cpu", False, overwrite=overwrite)
        assert all(path.is_file() for path in paths) == beside_leco_images
        for path in paths:
            path.unlink(missing_ok=True)
    assert Image.open(grid).size == (4, 4)


def test_more_steps_than_the_sampler_can_take_is_one_line_before_any_image(tmp_path, tiny_folders):
    from leco.generate import build_pipeline, generate

    pipe = build_pipeline(load_models(str(tiny_folders["sd1"]), with_vae=True), sampler="ddim")
    pipe.scheduler = type(pipe.scheduler).from_config(
        pipe.scheduler.config, timestep_spacing="leading", steps_offset=1
    )  # SD 1.5's: 1000 steps reach timestep 1000, an IndexError inside diffusers
    with pytest.raises(
        LecoError, match=r"1000 sampling steps: .* timestep 1000, .* use fewer steps \(e.g. 999\)"
    ):
        list(
            generate(
                pipe, [ImageRequest("a cat", 0.0, 0)], SamplingSettings(steps=1000), lambda s: None, False
            )
        )
    lcm = build_pipeline(load_models(str(tiny_folders["sd1"]), with_vae=True), sampler="lcm")
    with pytest.raises(LecoError, match=r"60 sampling steps: .* takes at most 50 steps .*; use 50 or fewer"):
        list(
            generate(lcm, [ImageRequest("a cat", 0.0, 0)], SamplingSettings(steps=60), lambda s: None, False)
        )


@pytest.mark.parametrize("sampler", [*SAMPLERS, "Euler a", "DPM++ 2M", "DPM++ 2M SDE Karras", "LMS Karras"])
def test_every_sampler_draws_finite_images_by_our_name_or_a1111s(sampler, tiny_folders):
    """Each name --sampler and a spec take makes a working pipeline (the training samplers, lms
    included, among them), and A1111's names reach the same scheduler."""
    pipe = build_pipeline(load_models(str(tiny_folders["sd1"]), with_vae=True), sampler=sampler)
    assert type(pipe.scheduler) is SAMPLERS[sampler_name(sampler).removesuffix(KARRAS)].scheduler
    image = pipe(
        "a red fox", num_inference_steps=3, guidance_scale=2.0, height=16, width=16, output_type="np"
    )
    assert np.isfinite(image.images).all()


# A model whose own scheduler is DPM++ 2M SDE with Karras sigmas and v-prediction (as many fine-tunes ship)
SDE_KARRAS_MODEL = {
    "_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "sde-dpmsolver++",
    "use_karras_sigmas": True, "solver_order": 3, "prediction_type": "v_prediction",
    "timestep_spacing": "trailing", "steps_offset": 1,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "num_train_timesteps": 1000,
}  # fmt: skip


@pytest.mark.parametrize(
    ("name", "karras", "algorithm", "infotext"),
    [
        ("DPM++ 2M", False, "dpmsolver++", {"Sampler": "DPM++ 2M", "Schedule type": "Uniform"}),
        ("DPM++ 2M Karras", True, "dpmsolver++", {"Sampler": "DPM++ 2M", "Schedule type": "Karras"}),
        ("dpmpp_2m_sde", False, "sde-dpmsolver++", {"Sampler": "DPM++ 2M SDE", "Schedule type": "Uniform"}),
        ("k_lms_ka", True, None, {"Sampler": "LMS", "Schedule type": "Karras"}),
        ("euler", False, None, {"Sampler": "Euler", "Schedule type": "Uniform"}),
        ("  DDIM ", None, None, {"Sampler": "DDIM"}),
        ("pndm", None, None, {"Sampler": "PLMS"}),
        ("UniPC Karras", True, None, {"Sampler": "UniPC", "Schedule type": "Karras"}),
        (
            "DPM++ 2M SDE Heun",
            False,
            "sde-dpmsolver++",
            {"Sampler": "DPM++ 2M SDE Heun", "Schedule type": "Uniform"},
        ),
        (
            "dpmpp_2m_sde_gpu",
            False,
            "sde-dpmsolver++",
            {"Sampler": "DPM++ 2M SDE", "Schedule type": "Uniform"},
        ),
    ],
)
def test_a_named_sampler_is_that_algorithm_whatever_the_models_scheduler_chose(
    name, karras, algorithm, infotext
):
    """An explicit sampler keeps what the model's config says of the model (prediction type, betas,
    timestep spacing) and drops its algorithm choices (Karras sigmas, SDE, solver order), and the
    image's infotext names it as A1111 would, with the Schedule type A1111 1.9+ reads."""
    scheduler = make_scheduler(SDE_KARRAS_MODEL, name)
    config = scheduler.config
    assert config.prediction_type == "v_prediction" and config.timestep_spacing == "trailing"
    assert config.steps_offset == 1 and config.beta_schedule == "scaled_linear"
    assert config.get("use_karras_sigmas") == karras
    if algorithm is not None:
        assert config.algorithm_type == algorithm and config.solver_order == 2
    assert a1111_sampler(scheduler) == infotext
    if "SDE" in infotext["Sampler"]:  # A1111's (k-diffusion's) 2M SDE is the midpoint solver; Heun's its own
        assert config.solver_type == ("heun" if "Heun" in infotext["Sampler"] else "midpoint")
    own = make_scheduler(SDE_KARRAS_MODEL, "model")  # the model's own, as it is
    assert own.config.use_karras_sigmas and own.config.solver_order == 3
    assert a1111_sampler(own) == {"Sampler": "DPM++ 3M SDE", "Schedule type": "Karras"}


@pytest.mark.parametrize("name", ["Euler a Karras", "ddim karras", "DPM++ SDE", "model karras"])
def test_a_sampler_diffusers_cannot_run_is_one_line(name, tmp_path, capsys):
    """Karras sigmas where diffusers' scheduler has none, or an A1111 sampler without a diffusers
    counterpart: one line naming the option and the choices, before any model loads."""
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--model", "ink-digits", "--prompt", "a digit one", "--sampler", name,
              "--out", str(tmp_path / "out")])  # fmt: skip
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in error
    if name == "DPM++ SDE":
        assert f"--sampler: {name!r} is not offered" in error and "'DPM++ 2M SDE'" in error
    else:
        assert f"--sampler: {name!r} is not known" in error and "' Karras'" in error
    assert not (tmp_path / "out").exists() and error.count("\n") == 1


@pytest.mark.parametrize("name", ["lms", "Heun", "DPM2 a", "plms", "k_dpm_2_ka"])
def test_a_sampler_that_would_drop_zero_terminal_snr_is_refused(name):
    """diffusers' LMS, Heun, DPM2 and PNDM schedulers have no rescale_betas_zero_snr and drop it
    silently; a zero-SNR model would then be sampled with the wrong noise levels."""
    zero_snr = {**SDE_KARRAS_MODEL, "rescale_betas_zero_snr": True}
    with pytest.raises(
        LecoError, match="^sampler .*: cannot .*rescale_betas_zero_snr.*use one of ddim, ddpm, euler"
    ):
        make_scheduler(zero_snr, name)
    assert make_scheduler({**zero_snr, "rescale_betas_zero_snr": False}, name) is not None


def test_a_models_own_scheduler_is_warned_of_only_where_it_drops_zero_terminal_snr(capsys):
    """The model's own choice is how diffusers samples it (and merge and previews build it): a
    scheduler that drops the schedule is said, and one that keeps it passes quietly."""
    zero_snr = {**SDE_KARRAS_MODEL, "rescale_betas_zero_snr": True}
    for keeps in ("DDIMScheduler", "EulerDiscreteScheduler", "DPMSolverMultistepScheduler"):
        assert make_scheduler({**zero_snr, "_class_name": keeps}, "model").config.rescale_betas_zero_snr
    assert "zero-terminal-SNR" not in capsys.readouterr().err
    make_scheduler({**zero_snr, "_class_name": "LMSDiscreteScheduler"}, "model")
    assert (
        "the model's own scheduler, LMSDiscreteScheduler, ignores its zero-terminal-SNR"
        in capsys.readouterr().err
    )


@pytest.mark.parametrize(
    ("name", "why", "nearest"),
    [
        ("DPM++ SDE Karras", "repeat with its seed", "'DPM++ 2M SDE Karras'"),
        ("dpmpp_sde_gpu", "repeat with its seed", "'dpmpp_2m_sde_gpu'"),
        ("DPM++ 2S a", "no scheduler", "'DPM2 a'"),
        ("heunpp2", "no scheduler", "'heun'"),
        ("euler_cfg_pp", "CFG++", "'euler'"),
        ("uni_pc_bh1", "NaN", "'uni_pc_bh2'"),
    ],
)
def test_samplers_diffusers_cannot_run_are_refused_with_the_nearest_that_works(name, why, nearest):
    """A1111's and ComfyUI's names that have no faithful scheduler say so, and the sampler they name
    instead is one --sampler takes; other unknown names list every sampler."""
    with pytest.raises(
        LecoError,
        match=rf"'{re.escape(name)}' is not offered: .*{why}.*nearest here is {re.escape(nearest)}$",
    ):
        make_scheduler(SDE_KARRAS_MODEL, name)
    assert sampler_name(nearest.strip("'")) is not None
    with pytest.raises(LecoError, match=r"'DPM\+\+ 9M' is not known; use model or one of .*deis.*lcm"):
        make_scheduler(SDE_KARRAS_MODEL, "DPM++ 9M")


def test_dpmpp_3m_sde_is_the_third_order_sde_solver_under_a1111s_and_comfyuis_names():
    for name in ("dpm++_3m_sde", "DPM++ 3M SDE", "dpmpp_3m_sde_gpu"):
        config = make_scheduler(SDE_KARRAS_MODEL, name).config
        assert (config.algorithm_type, config.solver_order, config.use_karras_sigmas) == (
            "sde-dpmsolver++",
            3,
            False,
        )
    assert make_scheduler(SDE_KARRAS_MODEL, "DPM++ 3M SDE Karras").config.use_karras_sigmas is True


def test_unipc_is_diffusers_bh2_variant_under_every_name():
    """ComfyUI's uni_pc_bh2 is the variant diffusers runs; its bh1 (A1111's and ComfyUI's default)
    samples NaN in diffusers 0.42, so every UniPC name gets bh2, which the image's infotext keeps."""
    for name in ("unipc", "UniPC", "uni_pc", "uni_pc_bh2"):
        assert make_scheduler({**SDE_KARRAS_MODEL, "solver_type": "bh1"}, name).config.solver_type == "bh2"


@pytest.mark.parametrize("name", ["euler", "Euler a", "DPM++ 2M Karras", "ddim", "unipc"])
def test_samplers_that_know_zero_terminal_snr_keep_it(name):
    zero_snr = {**SDE_KARRAS_MODEL, "rescale_betas_zero_snr": True}
    assert make_scheduler(zero_snr, name).config.rescale_betas_zero_snr is True


# -- clip skip ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["sd1", "sdxl"])
def test_clip_skip_samples_the_text_states_training_reads(tiny_folders, name):
    """Images at clip skip 2 are drawn from the very states leco trains on at clip skip 2."""
    from leco.conditioning import PromptEncoder
    from leco.generate import generate

    models = load_models(str(tiny_folders[name]), with_vae=True)
    pipe = build_pipeline(models)
    request = ImageRequest("a red fox", 0.0, 5)

    def ours(clip_skip):
        settings = SamplingSettings(steps=3, guidance=4.0, clip_skip=clip_skip)
        ((_, image),) = generate(pipe, [request], settings, lambda s: None, False)
        return np.asarray(image, dtype=np.int16)

    with torch.no_grad():
        encoder = PromptEncoder(models, 2)
        prompt, negative = encoder.encode(["a red fox"]), encoder.encode([""])
    extra = {}
    if models.family.is_sdxl:
        extra = {"pooled_prompt_embeds": prompt.pooled, "negative_pooled_prompt_embeds": negative.pooled}
    extra |= {"prompt_embeds": prompt.hidden_states, "negative_prompt_embeds": negative.hidden_states}
    generator = [torch.Generator("cpu").manual_seed(5)]
    images = pipe(
        num_inference_steps=3, guidance_scale=4.0, generator=generator, output_type="np", **extra
    ).images
    trained_states = (images[0] * 255).round().astype(np.int16)
    assert np.abs(ours(2) - trained_states).max() <= 1
    assert np.abs(ours(1) - trained_states).mean() > 1  # the option changes the image


def test_generate_follows_the_clip_skip_a_lora_was_trained_with(tmp_path, tiny_folders, lora_files, capsys):
    from safetensors.torch import load_file, save_file

    from leco.generate import clip_skip_for

    models = load_models(str(tiny_folders["sd1"]))
    tensors = load_file(lora_files["sd1"])
    trained = {}
    for skip in ("2", "None"):
        trained[skip] = tmp_path / f"skip{skip}.safetensors"
        save_file(tensors, trained[skip], metadata={"ss_clip_skip": skip})
    assert clip_skip_for(models, None, [trained["2"]]) == 2
    assert "clip skip 2, as skip2.safetensors was trained with" in capsys.readouterr().err
    assert clip_skip_for(models, 1, [trained["2"]]) == 1  # the option wins
    assert clip_skip_for(models, None, [trained["None"]]) == 1
    assert clip_skip_for(models, None, []) == 1
    # "None": the run left it unset, so the model's own layer (1), not unknown: the files disagree
    assert clip_skip_for(models, None, [trained["2"], trained["None"]]) == 1
    assert "trained with different clip skips (skip2.safetensors: 2, skipNone.safetensors: 1)" in (
        capsys.readouterr().err
    )
    foreign = tmp_path / "foreign.safetensors"  # another tool's file, which does not say
    save_file(tensors, foreign)
    assert clip_skip_for(models, None, [trained["2"], foreign]) == 2
    layers = models.text_encoders[0].config.num_hidden_layers
    with pytest.raises(LecoError, match=rf"^--clip-skip: {layers + 1} skips past the {layers} text-encoder"):
        clip_skip_for(models, layers + 1, [])
    # and the images say so, as A1111 writes it
    files, _ = run_generation(
        load_models(str(tiny_folders["sd1"]), with_vae=True),
        trained["2"],
        requests_for(["a red fox"], [1.0], [0]),
        SamplingSettings(steps=2, clip_skip=2),
        tmp_path / "images",
        "cpu",
        False,
    )
    assert ", Clip skip: 2," in Image.open(files[0]).text["parameters"]


def test_trained_files_record_their_clip_skip_as_kohya_does(tmp_path, tiny_folders):
    from leco import train
    from leco.config import LecoConfig
    from leco.files import safetensors_metadata

    config = LecoConfig.model_validate(
        {
            "pretrained_model": {"name_or_path": str(tiny_folders["sd1"]), "clip_skip": 2},
            "prompts": [{"target": "a cat"}],
            "train": {"precision": "fp32", "iterations": 1, "max_denoising_steps": 4},
            "save": {"path": str(tmp_path), "name": "cat"},
        }
    )
    path = train(config, progress=False).path
    assert safetensors_metadata(path)["ss_clip_skip"] == "2"


def test_an_sdxl_lora_named_by_diffusers_paths_draws_what_its_sgm_names_draw(
    tmp_path, tiny_folders, lora_files
):
    """p1atdev/LECO and sliders name SDXL layers by diffusers paths; diffusers' kohya reader knows the
    SGM names only (it dropped add_embedding without a word), so leco hands it SGM names."""
    from safetensors.torch import load_file, save_file

    from leco.network import kohya

    models = load_models(str(tiny_folders["sdxl"]), with_vae=True)
    by_key = kohya.unet_layer_keys(models.unet, models.family)
    sgm = load_file(lora_files["sdxl"])
    size_embedding = models.unet.get_submodule("add_embedding.linear_1")
    module = kohya.kohya_key("add_embedding.linear_1", models.family, models.unet.config)
    generator = torch.Generator().manual_seed(1)
    sgm[f"{module}.lora_down.weight"] = torch.randn(2, size_embedding.in_features, generator=generator)
    sgm[f"{module}.lora_up.weight"] = torch.randn(size_embedding.out_features, 2, generator=generator)
    sgm[f"{module}.alpha"] = torch.tensor(2.0)
    save_file(sgm, tmp_path / "sgm.safetensors")

    def diffusers_name(key):
        module, _, part = key.partition(".")
        return f"{kohya.UNET_PREFIX}{by_key[module].replace('.', '_')}.{part}" if module in by_key else key

    save_file({diffusers_name(k): v for k, v in sgm.items()}, tmp_path / "diffusers.safetensors")
    requests = requests_for(["a red fox"], [1.0], [3])
    images = {}
    for name in ("sgm", "diffusers"):
        (path,), _ = run_generation(
            models, tmp_path / f"{name}.safetensors", requests, SETTINGS, tmp_path / name, "cpu", False
        )
        images[name] = np.asarray(Image.open(path), dtype=np.int16)  # (the infotext names the file)
    assert np.array_equal(images["sgm"], images["diffusers"])
    without = {k: v for k, v in sgm.items() if not k.startswith(module)}
    save_file(without, tmp_path / "without.safetensors")
    (path,), _ = run_generation(
        models, tmp_path / "without.safetensors", requests, SETTINGS, tmp_path / "without", "cpu", False
    )
    # the size embedding's module does change the image
    assert np.abs(np.asarray(Image.open(path), dtype=np.int16) - images["sgm"]).mean() > 0.5
    both = {**sgm, **{diffusers_name(k): v.clone() for k, v in sgm.items() if k.startswith(module)}}
    both_file = tmp_path / "both.safetensors"
    save_file(both, both_file)
    with pytest.raises(LecoError, match=r"add_embedding_linear_1 names the same layer as .*two namings"):
        run_generation(models, both_file, requests, SETTINGS, tmp_path / "both", "cpu", False)


def test_no_requests_is_one_line_not_an_empty_grid(tmp_path, tiny_folders):
    models = load_models(str(tiny_folders["sd1"]), with_vae=True)
    with pytest.raises(LecoError, match="requests: an empty list; give at least one ImageRequest"):
        run_generation(models, None, [], SamplingSettings(steps=2), tmp_path / "out", torch.device("cpu"))
    assert not (tmp_path / "out").exists()


def test_generate_follows_the_clip_skip_an_embedding_was_trained_with(tmp_path, tiny_folders, capsys):
    from safetensors.torch import save_file

    embedding = tmp_path / "no_dog.safetensors"  # trained at clip skip 2, as its file says
    save_file(
        {"emb_params": torch.randn(2, 32)}, str(embedding), {"leco.token": "<no-dog>", "ss_clip_skip": "2"}
    )
    argv = ["generate", "--model", str(tiny_folders["sd1"]), "--prompt", "a dog", "--steps", "2"]
    assert (
        main([*argv, "--embedding", str(embedding), "--negative", "<no-dog>", "--out", str(tmp_path / "o")])
        == 0
    )
    assert "clip skip 2, as no_dog.safetensors was trained with" in capsys.readouterr().err
    assert "Clip skip: 2" in Image.open(tmp_path / "o" / "a-dog_0_0.png").text["parameters"]


def test_the_library_samples_as_leco_generate_does(capsys):
    from leco.generate import sampling_settings

    ink_digits = load_models("ink-digits")
    settings = sampling_settings(ink_digits, None, negative_prompt="blurry")
    assert (settings.steps, settings.guidance, settings.negative_prompt) == (25, 3.0, "blurry")
    given = sampling_settings(ink_digits, None, steps=10, guidance=1.0, negative_prompt="blurry")
    assert (given.steps, given.guidance) == (10, 1.0)
    assert "the negative prompt ('blurry') is never read" in capsys.readouterr().err


def test_the_python_api_refuses_what_would_be_misread(tmp_path, lora_files, tiny_folders):
    """A string where a list goes would be read letter by letter; "no" for a flag would read as yes;
    a value of the wrong type would fail deep inside diffusers."""
    from leco.interop.convert import convert
    from leco.interop.merge import merge

    with pytest.raises(LecoError, match=r"^prompts: 'a digit' is not a list; give a list of prompts"):
        requests_for("a digit", [1.0], [0])
    for wrong, said in (
        ({"steps": "30"}, "steps: '30' is not a whole number"),
        ({"steps": 2.5}, "steps: 2.5 is not a whole number"),
        ({"clip_skip": None}, "clip_skip: None is not a whole number"),
        ({"guidance": "7"}, "guidance: '7' is not a number"),
        ({"negative_prompt": None}, "negative_prompt: None; give text"),
        ({"sampler": None}, "sampler: None; give a sampler's name"),
    ):
        with pytest.raises(LecoError, match=re.escape(said)):
            SamplingSettings(**wrong)
    models = load_models(str(tiny_folders["sd1"]), with_vae=True)
    requests = requests_for(["a fox"], [0.0], [0])
    (tmp_path / "o").mkdir()
    with pytest.raises(LecoError, match="overwrite: 'no'; give True or False"):
        run_generation(
            models, None, requests, SamplingSettings(steps=2), tmp_path / "o", "cpu", overwrite="no"
        )
    with pytest.raises(LecoError, match="embeddings: 'x.pt' is not a list"):
        run_generation(
            models, None, requests, SamplingSettings(steps=2), tmp_path / "o", "cpu", embeddings="x.pt"
        )
    with pytest.raises(LecoError, match="overwrite: 'no'"):
        merge(str(tiny_folders["sd1"]), lora_files["sd1"], tmp_path / "m.safetensors", overwrite="no")
    with pytest.raises(LecoError, match="overwrite: 'no'"):
        convert(lora_files["sd1"], tmp_path / "c.safetensors", family="sd1", overwrite="no")
    # paths as str or Path, one LoRA or many: what --lora takes
    merged = merge(tiny_folders["sd1"], lora_files["sd1"], tmp_path / "m.safetensors", precision="fp32")
    assert merged.is_file()
