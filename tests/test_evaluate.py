import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

from leco.config import ConfigError, NetworkConfig
from leco.evaluate import ClipDetector, EvalSpec, evaluate, format_report, load_spec, pixel_drift
from leco.models import CONFIG_ROOT, load_models
from leco.network import LoRANetwork


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A random CLIP model with the real layout and tokenizer, saved like a Hub folder."""
    from transformers import CLIPTokenizer

    folder = tmp_path_factory.mktemp("clip")
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config={"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2,
                     "vocab_size": 49408, "max_position_embeddings": 77},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2,
                       "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )  # fmt: skip
    CLIPModel(config).save_pretrained(folder)
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=CLIPTokenizer.from_pretrained(CONFIG_ROOT / "clip_tokenizer"),
    )
    processor.save_pretrained(folder)
    return folder


def test_clip_detector_picks_the_most_likely_label(tiny_clip):
    labels = ["a painting by van gogh", "a photo of a dog", "a watercolor"]
    detector = ClipDetector(str(tiny_clip), labels)
    images = [Image.new("RGB", (32, 32), (i * 60, 255 - i * 60, 128)) for i in range(4)]
    probabilities = detector.probabilities(images)
    assert probabilities.shape == (4, 3) and np.allclose(probabilities.sum(axis=1), 1, atol=1e-5)
    for label in labels:
        expected = [labels[i] == label for i in probabilities.argmax(axis=1)]
        assert detector.present(images, label) == expected
    assert 0 <= detector.clip_score(images, labels[0]) <= 100


def test_eval_report_with_a_clip_detector(tmp_path, tiny_folders, tiny_clip):
    models = load_models(str(tiny_folders["sd1"]), with_vae=True)
    network = LoRANetwork.create(models.unet, models.family, NetworkConfig(rank=2))
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.normal_(0, 0.3)
    lora = network.save(tmp_path / "l.safetensors", resolution=16)
    network.remove()
    spec = EvalSpec(
        detector="clip", clip_model=str(tiny_clip), images_per_prompt=3, strengths=[0.0, 1.0], steps=3, guidance=2,
        erase=[{"prompt": "a painting by van gogh", "concept": "van gogh"}],
        keep=[{"prompt": "a photo of a dog", "concept": "a dog"}],
    )  # fmt: skip
    report = evaluate(models, lora, spec, "cpu", image_dir=tmp_path / "images", progress=False)
    rows = {(r["kind"], r["strength"]): r for r in report["rows"]}
    assert set(rows) == {("erase", 0.0), ("erase", 1.0), ("keep", 0.0), ("keep", 1.0)}
    assert rows[("keep", 0.0)]["drift"] == 0.0 and rows[("keep", 1.0)]["drift"] > 0.001
    assert all(0.0 <= r["detected"] <= 1.0 for r in rows.values())
    assert report["summary"]["1"]["kept_drift"] == rows[("keep", 1.0)]["drift"]
    assert len(list((tmp_path / "images").iterdir())) == 2 * 2 * 3
    table = format_report(report)
    assert "erased: still detected" in table and "a photo of a dog" in table
    json.dumps(report)  # the report is plain JSON


def test_pixel_drift():
    black, white = Image.new("RGB", (4, 4), (0, 0, 0)), Image.new("RGB", (4, 4), (255, 255, 255))
    assert pixel_drift(black, black) == 0.0 and pixel_drift(black, white) == 1.0


def test_spec_errors_name_the_file_and_key(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text("detector: ink-digits\nerase:\n  - prompt: a\n    concpt: digit:7\n")
    with pytest.raises(ConfigError, match=r"spec.yaml: erase.0.concpt: unknown key; did you mean 'concept'"):
        load_spec(path)
    path.write_text("detector: ink-digits\n")
    with pytest.raises(ConfigError, match="erase:, keep: and enhance: are all empty"):
        load_spec(path)
    path.write_text("erase: [{prompt: a, concept: 'digit:7'}]\nstrengths: [1]\n")
    assert load_spec(path).strengths == [0.0, 1.0]  # drift needs the strength-0 images
