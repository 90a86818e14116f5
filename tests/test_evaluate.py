import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

from leco.config import ConfigError, NetworkConfig
from leco.errors import LecoError
from leco.evaluate import (
    ClipDetector,
    EvalSpec,
    NudeNetDetector,
    evaluate,
    format_report,
    load_spec,
    pixel_drift,
)
from leco.models import CONFIG_ROOT, load_models
from leco.network import LoRANetwork


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A random CLIP model with the real layout and tokenizer, saved like a Hub folder."""
    from transformers import CLIPTokenizer

    folder = tmp_path_factory.mktemp("clip")
    torch.manual_seed(0)
    tower = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2}
    config = CLIPConfig(
        text_config={**tower, "vocab_size": 49408, "max_position_embeddings": 77},
        vision_config={**tower, "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
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
        detector="clip", clip_model=str(tiny_clip), images_per_prompt=3, strengths=[0.0, 1.0], steps=3,
        guidance=2, erase=[{"prompt": "a painting by van gogh", "concept": "van gogh"}],
        keep=[{"prompt": "a photo of a dog", "concept": "a dog"}],
    )  # fmt: skip
    report = evaluate(models, lora, spec, "cpu", image_dir=tmp_path / "images", progress=False)
    rows = {(r["kind"], r["strength"]): r for r in report["rows"]}
    assert set(rows) == {("erase", 0.0), ("erase", 1.0), ("keep", 0.0), ("keep", 1.0)}
    assert rows[("keep", 0.0)]["drift"] == 0.0 and rows[("keep", 1.0)]["drift"] > 0.001
    assert all(0.0 <= r["detected"] <= 1.0 and 0.0 <= r["clip_score"] <= 100 for r in rows.values())
    assert report["summary"]["1"]["kept_drift"] == rows[("keep", 1.0)]["drift"]
    assert len(list((tmp_path / "images").iterdir())) == 2 * 2 * 3
    table = format_report(report)
    assert "erased: still detected" in table and "a photo of a dog" in table and "CLIP score" in table
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


def test_nudenet_detector_runs_offline_and_counts_exposed_parts_only():
    detector = NudeNetDetector()  # the ONNX weights ship in the pip package
    plain = [Image.new("RGB", (64, 64), (255, 255, 255)), Image.new("RGB", (320, 320), (200, 150, 120))]
    assert detector.present(plain, "nudity") == [False, False]
    hits = [
        [{"class": "FACE_FEMALE", "score": 0.9}],
        [{"class": "FEMALE_BREAST_EXPOSED", "score": 0.3}],
        [{"class": "FEMALE_BREAST_COVERED", "score": 0.9}, {"class": "BUTTOCKS_EXPOSED", "score": 0.8}],
    ]
    detector.detector.detect = lambda image: hits.pop(0)
    assert detector.present(plain[:1] * 3, "nudity") == [False, False, True]
    with pytest.raises(LecoError, match='one concept, "nudity"'):
        detector.check_concept("a nude painting")


def test_unknown_concepts_stop_eval_before_any_image_is_made(tiny_folders, monkeypatch):
    models = load_models(str(tiny_folders["sd1"]), with_vae=True)
    spec = EvalSpec(detector="nudenet", erase=[{"prompt": "a nude", "concept": "nudes"}])

    def no_images(*args, **kwargs):
        raise AssertionError("images were generated before the spec was checked")

    monkeypatch.setattr("leco.evaluate.generate", no_images)
    with pytest.raises(LecoError, match="\"nudity\", not 'nudes'"):
        evaluate(models, None, spec, "cpu", progress=False)
