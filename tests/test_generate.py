import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from leco.config import NetworkConfig
from leco.errors import LecoError
from leco.generate import (
    ImageRequest,
    SamplingSettings,
    parse_seeds,
    parse_strengths,
    requests_for,
    run_generation,
)
from leco.models import load_models
from leco.network import LoRANetwork
from leco.preview import make_grid


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


def test_seed_and_strength_lists():
    assert parse_seeds("0-3,7") == [0, 1, 2, 3, 7]
    assert parse_strengths("-1,0,0.5") == [-1.0, 0.0, 0.5]
    with pytest.raises(LecoError, match="--seeds"):
        parse_seeds("a-b")
    with pytest.raises(LecoError, match="--strengths"):
        parse_strengths("x")


def test_lora_of_another_family_is_refused_before_loading(tmp_path, tiny_folders, lora_files):
    models = load_models(str(tiny_folders["sd1"]), with_vae=True)
    with pytest.raises(LecoError, match="was trained for sdxl but the model is sd1"):
        run_generation(
            models, lora_files["sdxl"], requests_for(["x"], [1.0], [0]), SETTINGS, tmp_path, "cpu", False
        )


def test_cli_generate_writes_images_and_grid(tmp_path, tiny_folders, lora_files):
    result = subprocess.run(
        [sys.executable, "-m", "leco", "generate", "--model", str(tiny_folders["sd1"]), "--lora",
         str(lora_files["sd1"]), "--prompt", "a cat", "--prompt", "a dog", "--strengths", "-1,0,1",
         "--seeds", "0-1", "--steps", "3", "--guidance", "2", "--out", str(tmp_path), "--no-progress"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    names = sorted(p.name for p in tmp_path.iterdir())
    assert len(names) == 2 * 2 * 3 + 1 and "grid.png" in names and "a-dog_-1_1.png" in names


def test_training_renders_preview_grids(tmp_path, tiny_folders):
    from leco.config import LecoConfig
    from leco.trainer import train

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
    assert result.network.multiplier == 1.0  # previews leave the LoRA switched on
