import functools
import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

from leco.config import ConfigError, NetworkConfig
from leco.errors import LecoError
from leco.evaluate import (
    SHOWN_KEPT_ROWS,
    ClipDetector,
    EvalSpec,
    NudeNetDetector,
    _summary_table,
    concept_parts,
    evaluate,
    format_report,
    judged_prompts,
    load_spec,
    make_detector,
    pixel_drift,
    summarise,
)
from leco.models import CONFIG_ROOT, load_models
from leco.network import LoRANetwork, read_lora_file


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
    detector = ClipDetector(str(tiny_clip), [*labels, labels[0]])  # a repeated label counts once
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(8)]
    probabilities = detector.probabilities(images)
    assert probabilities.shape == (8, 3) and np.allclose(probabilities.sum(axis=1), 1, atol=1e-5)
    # The expected winners from CLIP itself: cosine similarity of its image and text embeddings.
    model, processor = CLIPModel.from_pretrained(tiny_clip).eval(), CLIPProcessor.from_pretrained(tiny_clip)
    with torch.no_grad():
        out = model(**processor(text=labels, images=images, return_tensors="pt", padding=True))
    similarity = (
        torch.nn.functional.normalize(out.image_embeds, dim=-1)
        @ torch.nn.functional.normalize(out.text_embeds, dim=-1).T
    )
    winners = [labels[i] for i in similarity.argmax(dim=1)]
    assert len(set(winners)) >= 2  # the images do not all read the same: the check below can fail
    for label in labels:
        assert detector.present(images, label) == [winner == label for winner in winners]
    assert 0 <= detector.clip_score(images, labels[0]) <= 100
    with torch.no_grad():
        expected = out.logits_per_image.softmax(dim=-1).numpy()
    assert np.allclose(detector.probabilities(images), expected, atol=1e-5)  # CLIP's own forward


def test_eval_report_with_a_clip_detector(tmp_path, tiny_folders, tiny_clip, capsys):
    models = load_models(str(tiny_folders["sd1"]), with_vae=True)
    network = LoRANetwork.create(models.unet, models.family, NetworkConfig(rank=2))
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.normal_(0, 0.3)
    lora = network.save(tmp_path / "l.safetensors", resolution=16)
    network.remove()
    tensors, metadata = read_lora_file(lora)  # as a CFG-distilled LoRA says it is
    metadata["leco.prompts"] = json.dumps([{"action": "distill", "guidance_scale": 3.0}])
    save_file(tensors, str(lora), metadata)
    spec = EvalSpec(
        detector="clip", clip_model=str(tiny_clip), images_per_prompt=3, strengths=[0.0, 1.0], steps=3,
        guidance=2, erase=[{"prompt": "a painting by van gogh", "concept": "van gogh"}],
        keep=[{"prompt": "a photo of a dog", "concept": "a dog"}],
    )  # fmt: skip
    detector = ClipDetector(str(tiny_clip), ["van gogh", "a dog"])
    embedded = []  # each image goes through CLIP's vision tower once, however often it is asked about
    detector.model.vision_model.register_forward_pre_hook(
        lambda module, args, kwargs: embedded.append(len(kwargs["pixel_values"])), with_kwargs=True
    )
    report = evaluate(
        models, lora, spec, "cpu", detector=detector, image_dir=tmp_path / "images", progress=False
    )
    assert sum(embedded) == 2 * 2 * 3  # prompts x strengths x seeds
    rows = {(r["kind"], r["strength"]): r for r in report["rows"]}
    assert set(rows) == {("erase", 0.0), ("erase", 1.0), ("keep", 0.0), ("keep", 1.0)}
    assert rows[("keep", 0.0)]["drift"] == 0.0 and rows[("keep", 1.0)]["drift"] > 0.001
    assert all(0.0 <= r["detected"] <= 1.0 and 0.0 <= r["clip_score"] <= 100 for r in rows.values())
    assert report["summary"]["1"]["kept_drift"] == rows[("keep", 1.0)]["drift"]
    assert len(list((tmp_path / "images").iterdir())) == 2 * 2 * 3
    table = format_report(report)
    assert "erased: still detected" in table and "a photo of a dog" in table and "CLIP@1" in table
    json.dumps(report)  # the report is plain JSON
    assert "CFG-distilled" in capsys.readouterr().err  # judged at guidance 2, it would guide twice


def test_pixel_drift():
    black, white = Image.new("RGB", (4, 4), (0, 0, 0)), Image.new("RGB", (4, 4), (255, 255, 255))
    assert pixel_drift(black, black) == 0.0 and pixel_drift(black, white) == 1.0


@pytest.mark.parametrize(
    ("strengths", "end"), [("[0, 1]", -1), ("[0, -1]", 1), (None, -1)], ids=["minus", "plus", "default"]
)
def test_an_enhance_item_whose_end_is_never_drawn_is_refused(tmp_path, strengths, end):
    path = tmp_path / "spec.yaml"
    text = f"enhance: [{{prompt: a digit five, concept: 'ink:blue', end: {end}}}]\n"
    path.write_text(text + (f"strengths: {strengths}\n" if strengths else ""))
    side = "negative" if end < 0 else "positive"
    with pytest.raises(
        ConfigError, match=rf"spec.yaml: enhance.1.end: {end}, but strengths has no {side} value"
    ):
        load_spec(path)


def test_ink_digits_concepts_read_in_any_case_and_spacing():
    from leco.ink_digits.data import ALL_INKS
    from leco.ink_digits.judge import InkDigitsDetector

    red = ALL_INKS.index("red")
    assert InkDigitsDetector._parse("digit: 3") == InkDigitsDetector._parse("Digit:3") == [("digit", 3)]
    assert InkDigitsDetector._parse(" INK : red ") == [("ink", red)]
    assert sorted(InkDigitsDetector._parse("ink:Red, digit:3")) == [("digit", 3), ("ink", red)]
    assert concept_parts("ink-digits", "Ink: Red, digit:3") == concept_parts("ink-digits", "digit:3,ink:red")


def test_an_image_count_no_machine_holds_is_refused_before_any_image(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text("images_per_prompt: 100000000\nkeep: [{prompt: a cat, concept: a cat}]\n")
    with pytest.raises(LecoError, match=r"spec.yaml: images_per_prompt: .*10000"):
        load_spec(spec)


def test_spec_errors_name_the_file_and_key(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text("detector: ink-digits\nerase:\n  - prompt: a\n    concpt: digit:7\n")
    with pytest.raises(ConfigError, match=r"spec.yaml: erase.1.concpt: unknown key; did you mean 'concept'"):
        load_spec(path)
    path.write_text("detector: ink-digits\n")
    with pytest.raises(ConfigError, match="erase:, keep: and enhance: are all empty"):
        load_spec(path)
    for text, says in [
        ("", "the spec is empty; write its sections"),
        ("[1, 2]\n", "an eval spec is a YAML mapping of sections .*, not a list"),
        ("keep: all\nkeep_all: false\n", "keep_all: false, but keep: says all"),
        (
            "erase: [{prompt: a, concept: 'digit:7'}]\nguidance: 1e30\n",
            "guidance: .*less than or equal to 100",
        ),
        (
            "erase: [{prompt: a, concept: 'digit:7'}]\nstrengths: [1e9]\n",
            "strengths.1: .*less than or equal to 100",
        ),
    ]:
        path.write_text(text)
        with pytest.raises(ConfigError, match=rf"spec.yaml: {says}"):
            load_spec(path)
    path.write_text("erase: [{prompt: a, concept: 'digit:7'}]\nstrengths: [1]\n")
    assert load_spec(path).strengths == [0.0, 1.0]  # drift needs the strength-0 images
    path.write_text("erase: [{prompt: a, concept: 'digit:7'}]\nstrengths: [0.1, 0.10000001]\n")
    with pytest.raises(ConfigError, match=r"spec.yaml: strengths: 0.1 and 0.10000001 are both labelled 0.1"):
        load_spec(path)
    path.write_text("erase: [{prompt: a, concept: 'digit:7'}]\nsampler: eulr\n")
    with pytest.raises(ConfigError, match=r"spec.yaml: sampler: 'eulr' is not known; use model or one"):
        load_spec(path)  # named as the spec's key, not as the command line's --sampler
    path.write_text("erase: [{prompt: a, concept: 'digit:7'}]\nsampler: DPM++ SDE\n")
    with pytest.raises(
        ConfigError, match=r"spec.yaml: sampler: 'DPM\+\+ SDE' is not offered: .*'DPM\+\+ 2M SDE'"
    ):
        load_spec(path)


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


# -- keep: all ----------------------------------------------------------------------------------


def _parts(concept):
    return dict(part.split(":") for part in concept.split(","))


def _kept(spec, detector):
    return [entry for entry in judged_prompts(spec, detector) if entry.kind == "keep"]


@pytest.fixture(scope="module")
def ink_detector():
    from leco.ink_digits import default_model_path
    from leco.ink_digits.judge import InkDigitsDetector

    return InkDigitsDetector.for_model(default_model_path())


def test_keep_all_on_an_erased_seven_checks_every_other_digit_in_every_ink(ink_detector):
    from leco.ink_digits import INK_DIGITS
    from leco.ink_digits.data import DIGIT_PHRASINGS, MODEL_INKS, caption

    spec = EvalSpec.model_validate(
        {"erase": [{"prompt": "a digit seven in red ink", "concept": "digit:7"}], "keep": "all"}
    )
    kept = _kept(spec, ink_detector)
    parts = [_parts(item.concept) for item in kept]
    inks = MODEL_INKS[INK_DIGITS]  # what the bundled model is trained on (its build report says so too)
    assert ink_detector.inks == tuple(inks)
    for digit in sorted(set(range(10)) - {7}):
        for ink in inks:
            assert {"digit": str(digit), "ink": ink} in parts, (digit, ink)
        # ...in every phrasing that names a digit
        shapes = {i.prompt.replace(_parts(i.concept).get("ink", "-"), "INK") for i in kept
                  if _parts(i.concept).get("digit") == str(digit)}  # fmt: skip
        assert shapes == {caption(digit, "red", p).replace("red", "INK") for p in DIGIT_PHRASINGS}
    for ink in inks:
        assert {"ink": ink} in parts  # the ink-only phrasing, and the inks of the erased seven's prompts
    assert not any(p.get("digit") == "7" for p in parts)
    assert len({item.prompt for item in kept}) == len(kept)  # no prompt judged twice
    # the sevens' ink prompts are judged on their ink, marked so their (wanted) drift is not counted
    sevens = {i.prompt for i in kept if "7" in i.prompt or "seven" in i.prompt}
    assert len(sevens) == len(inks) and {i.prompt for i in kept if i.names_edit} == sevens


def test_keep_all_on_an_erased_ink_checks_every_other_ink_and_every_digit(ink_detector):
    spec = EvalSpec.model_validate(
        {"erase": [{"prompt": "a digit two in red ink", "concept": "ink:red"}], "keep": "all"}
    )
    parts = [_parts(item.concept) for item in _kept(spec, ink_detector)]
    others = [ink for ink in ink_detector.inks if ink != "red"]
    assert others and len(others) == len(ink_detector.inks) - 1
    for ink in others:
        assert {"ink": ink} in parts
        for digit in range(10):
            assert {"digit": str(digit), "ink": ink} in parts
    for digit in range(10):
        assert {"digit": str(digit)} in parts  # digit-only prompts, and the red ones judged on the digit
    assert not any(p.get("ink") == "red" for p in parts)


def test_keep_all_covers_every_ink_the_model_knows(tmp_path):
    from leco.ink_digits.data import ALL_INKS
    from leco.ink_digits.judge import DigitNet, InkDigitsDetector, InkDigitsJudge, inks_for_model

    seven = InkDigitsDetector(InkDigitsJudge(DigitNet()), ALL_INKS)
    concepts = {concept for _, concept in seven.concept_universe(["digit:3", "ink:blue"])}
    assert {"ink:purple", "ink:teal", "digit:0,ink:teal", "digit:9,ink:purple"} <= concepts
    assert not any("digit:3" in c or "ink:blue" in c for c in concepts)
    # A combination touches only prompts naming all of it: other threes, other teal digits, "teal
    # ink" and "a digit three" are judged whole; teal threes are left out.
    combined = {concept for _, concept in seven.concept_universe(["digit:3,ink:teal"])}
    assert {"digit:3,ink:blue", "digit:5,ink:teal", "ink:teal", "digit:3"} <= combined
    assert "digit:3,ink:teal" not in combined  # the one teal-three prompt, and nothing else, left out
    assert len(seven.concept_universe(["digit:3,ink:teal"])) == len(seven.concept_universe([])) - 1
    (tmp_path / "build_report.json").write_text(json.dumps({"inks": list(ALL_INKS)}))
    assert inks_for_model(tmp_path) == ALL_INKS
    assert inks_for_model(tmp_path / "elsewhere") == ALL_INKS[:5]  # no report: the five-ink model


def test_keep_all_in_spec_files(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text("erase: [{prompt: a, concept: 'digit:7'}]\nkeep: all\n")
    spec = load_spec(path)
    assert spec.keep_all and spec.keep == []
    path.write_text("keep: [all, {prompt: a digit two in red ink, concept: 'digit:2'}]\n")
    spec = load_spec(path)
    assert spec.keep_all and [k.concept for k in spec.keep] == ["digit:2"]
    path.write_text("keep: [{prompt: a, concept: 'digit:2'}]\n")
    assert not load_spec(path).keep_all
    path.write_text("erase: [{prompt: a, concept: 'digit:7'}]\nkeep: All\n")
    assert load_spec(path).keep_all
    for written in ("ALL", "' all'"):  # in a list too, however it is written
        path.write_text(f"erase: [{{prompt: a, concept: 'digit:7'}}]\nkeep: [{written}]\n")
        assert load_spec(path).keep_all and load_spec(path).keep == []
    path.write_text("erase: [{prompt: a, concept: 'digit:7'}]\nkeep: alll\n")
    with pytest.raises(ConfigError, match=r"spec.yaml: keep: 'alll' is neither `all` nor a list"):
        load_spec(path)


def test_keep_all_with_every_concept_erased_is_refused_before_any_image():
    from leco.ink_digits.judge import InkDigitsDetector
    from leco.models import resolve_bundled

    detector = InkDigitsDetector.for_model(resolve_bundled("ink-digits"))
    erase = [{"prompt": f"a digit {d}", "concept": f"digit:{d}"} for d in range(10)]
    universe = detector.concept_universe([])
    inks = {concept for _, concept in universe if "," not in concept and concept.startswith("ink:")}
    erase += [{"prompt": concept, "concept": concept} for concept in sorted(inks)]
    spec = EvalSpec.model_validate({"erase": erase, "keep": "all"})
    with pytest.raises(LecoError, match="keep: all leaves nothing to keep"):
        judged_prompts(spec, detector)
    spec = EvalSpec.model_validate({"erase": erase[1:], "keep": "all"})  # digit 0 left: kept and judged
    assert {j.concept for j in judged_prompts(spec, detector) if j.kind == "keep"} == {"digit:0"}


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (
            "erase: [{prompt: a seven, concept: a seven}]",
            r"has one \('a seven'\): every image would read as it",
        ),
        ("erase: [{prompt: a, concept: X}]\nalternatives: [' x ']", r"has one \('x'\)"),  # the same label
        ("keep: [{prompt: a, concept: ' '}]\nalternatives: [b]", r"keep.1.concept: empty"),
    ],
)
def test_a_clip_spec_whose_images_can_read_only_one_way_is_refused(tmp_path, lines, message):
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"detector: clip\nclip_model: x\n{lines}\n")
    with pytest.raises(ConfigError, match=rf"spec.yaml: .*{message}"):
        load_spec(spec)
    if "alternatives" not in lines and "empty" not in message:  # with something else to read: judged
        spec.write_text(f"detector: clip\nclip_model: x\n{lines}\nalternatives: [a blank image]\n")
        assert load_spec(spec).alternatives == ["a blank image"]


def test_keep_all_is_refused_by_detectors_without_a_concept_list(tiny_clip):
    spec = EvalSpec.model_validate({"erase": [{"prompt": "a nude", "concept": "nudity"}], "keep": "all"})
    with pytest.raises(LecoError, match="keep: all needs a detector with a list of concepts; nudenet"):
        judged_prompts(spec, NudeNetDetector())
    with pytest.raises(
        LecoError, match="keep: all needs a detector with a closed list of concepts; the clip"
    ):
        judged_prompts(spec, ClipDetector(str(tiny_clip), ["nudity"]))


@pytest.mark.parametrize("detector", ["clip", "nudenet"])
def test_keep_all_with_a_detector_without_a_concept_list_is_the_first_thing_said(tmp_path, detector):
    # A spec's own problem, before a missing clip_model, a download or another label check
    path = tmp_path / "spec.yaml"
    path.write_text(
        f"detector: {detector}\nerase: [{{prompt: a digit seven, concept: a seven}}]\nkeep: all\n"
    )
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: keep: all needs a detector with a"):
        load_spec(path)


def test_a_loaded_specs_own_problems_name_its_file(tmp_path):
    path = tmp_path / "nudes.yaml"
    path.write_text("detector: nudenet\nerase: [{prompt: a nude, concept: nudity}]\nkeep: all\n")
    with pytest.raises(LecoError, match=rf"^{re.escape(str(path))}: keep: all needs a detector"):
        judged_prompts(load_spec(path), NudeNetDetector())
    path.write_text("detector: nudenet\nerase: [{prompt: a nude, concept: nudes}]\n")
    with pytest.raises(LecoError, match=rf"^{re.escape(str(path))}: the nudenet detector knows one concept"):
        judged_prompts(load_spec(path), NudeNetDetector())


# -- several LoRAs, worst cases, the printed report ---------------------------------------------


class BrightnessDetector:
    """A stand-in for the random tiny models: concept "bright>T" is present when mean brightness > T."""

    def check_concept(self, concept):
        if not concept.startswith("bright>"):
            raise LecoError(f"unknown concept {concept!r}")

    def present(self, images, concept):
        threshold = float(concept.split(">")[1])
        return [np.asarray(image, dtype=np.float32).mean() / 255 > threshold for image in images]

    def concept_universe(self, exclude):
        known = [("a blue car", "bright>0.4"), ("a tree", "bright>0.6"), ("a sky", "bright>0.5")]
        return [(prompt, concept) for prompt, concept in known if concept not in exclude]


@pytest.fixture(scope="module")
def seed_loras(tmp_path_factory, tiny_folders):
    """Two LoRAs of one recipe: 'seed0' is still the identity (kohya init), 'seed1' moved (random)."""
    root = tmp_path_factory.mktemp("seeds")
    models = load_models(str(tiny_folders["sd1"]))
    network = LoRANetwork.create(models.unet, models.family, NetworkConfig(rank=2))
    identity = network.save(root / "seed0.safetensors", resolution=16)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    moved = network.save(root / "seed1.safetensors", resolution=16)
    network.remove()
    return identity, moved


def test_several_loras_share_the_plain_images_and_name_the_worst(
    tmp_path, tiny_folders, seed_loras, monkeypatch
):
    import leco.evaluate

    rendered = []
    real_generate = leco.evaluate.generate

    def counting_generate(pipe, requests, *args, **kwargs):
        rendered.extend(requests)
        return real_generate(pipe, requests, *args, **kwargs)

    monkeypatch.setattr(leco.evaluate, "generate", counting_generate)
    models = load_models(str(tiny_folders["sd1"]), with_vae=True)
    spec = EvalSpec.model_validate(
        {"images_per_prompt": 2, "strengths": [0, 1], "steps": 3, "guidance": 2.0, "keep": "all",
         "erase": [{"prompt": "a cat", "concept": "bright>0.5"}]}
    )  # fmt: skip
    report = evaluate(
        models, seed_loras, spec, "cpu", detector=BrightnessDetector(), image_dir=tmp_path, progress=False
    )
    # 3 prompts x 2 seeds: once for the plain model (strength 0), once per LoRA at strength 1
    assert len(rendered) == 3 * 2 * 3 and sum(r.strength == 0 for r in rendered) == 6
    assert report["loras"] == {"seed0": str(seed_loras[0]), "seed1": str(seed_loras[1])}
    rows = report["rows"]
    base = {r["prompt"]: r for r in rows if r["lora"] is None}
    assert set(base) == {"a cat", "a blue car", "a tree"} and all(r["strength"] == 0 for r in base.values())
    by = {(r["lora"], r["prompt"]): r for r in rows if r["lora"] is not None}
    assert len(by) == 6 and all(r["strength"] == 1 for r in by.values())
    for prompt, plain in base.items():
        # the identity LoRA draws the plain model's images: the same seeds, pixel for pixel
        assert (
            by[("seed0", prompt)]["drift"] == 0.0 and by[("seed0", prompt)]["detected"] == plain["detected"]
        )
        assert by[("seed1", prompt)]["drift"] > 0.001
    kept_drift = {
        label: np.mean([by[(label, p)]["drift"] for p in ("a blue car", "a tree")])
        for label in ("seed0", "seed1")
    }
    across = report["across_loras"]["1"]["kept_drift"]
    assert across == {
        "mean": pytest.approx(np.mean(list(kept_drift.values()))),
        "worst": pytest.approx(kept_drift["seed1"]),
        "worst_lora": "seed1",
        "tied": 0,
    }
    assert report["per_lora"]["seed0"]["1"]["kept_drift"] == 0.0
    worst = report["summary"]["1"]["kept_drift_worst"]
    assert worst["lora"] == "seed1" and worst["prompt"] == max(
        ("a blue car", "a tree"), key=lambda p: by[("seed1", p)]["drift"]
    )
    for label in ("seed0", "seed1"):  # every LoRA's images in its own folder, the plain ones included
        assert len(list((tmp_path / label).iterdir())) == 3 * 2 * 2
    table = format_report(report)
    assert "== LoRA seed0" in table and "== LoRA seed1" in table and "== across 2 LoRAs" in table
    assert any(line.endswith("  seed1") and "kept: drift" in line for line in table.splitlines())
    json.dumps(report)


def test_loras_whose_labels_would_share_an_image_folder_each_get_their_own(
    tmp_path, tiny_folders, seed_loras
):
    """Two files named x and a third named 1-x: "1:x" would go to the folder 1-x, the third's own."""
    files = []
    for folder, name, source in (("a", "x", 0), ("b", "x", 1), ("c", "1-x", 1)):
        (tmp_path / folder).mkdir()
        files.append(tmp_path / folder / f"{name}.safetensors")
        files[-1].write_bytes(seed_loras[source].read_bytes())
    models = load_models(str(tiny_folders["sd1"]), with_vae=True)
    spec = EvalSpec.model_validate(
        {"images_per_prompt": 1, "strengths": [0, 1], "steps": 2, "guidance": 2.0,
         "keep": [{"prompt": "a tree", "concept": "bright>0.6"}]}
    )  # fmt: skip
    images = tmp_path / "images"
    report = evaluate(
        models, files, spec, "cpu", detector=BrightnessDetector(), image_dir=images, progress=False
    )
    assert len(set(report["loras"])) == 3 and [Path(p) for p in report["loras"].values()] == files
    folders = sorted(path for path in images.iterdir())
    assert len(folders) == 3 and all(len(list(folder.iterdir())) == 2 for folder in folders)
    assert [folder.name for folder in folders] == ["1-x", "2-x", "3-1-x"]  # all numbered, none shared
    first, second, third = (np.asarray(Image.open(folder / "a-tree_1_0.png")) for folder in folders)
    assert np.array_equal(second, third) and not np.array_equal(first, second)  # 2nd and 3rd: one LoRA


class PixelReadingDetector(BrightnessDetector):
    """Reads each image as its exact pixels: any change at all is another reading."""

    def reading(self, images):
        return [np.asarray(image).tobytes().hex() for image in images]


def test_kept_prompts_are_judged_on_whether_their_images_read_as_before(tiny_folders, seed_loras):
    models = load_models(str(tiny_folders["sd1"]), with_vae=True)
    spec = EvalSpec.model_validate(
        {
            "images_per_prompt": 3,
            "strengths": [0, 1],
            "steps": 3,
            "guidance": 2.0,
            "keep": "all",
            "erase": [{"prompt": "a cat", "concept": "bright>2"}],
            "enhance": [{"prompt": "a tree", "concept": "bright>0.95"}],
        }
    )  # fmt: skip  (no image shows the erased concept: every image counts)
    report = evaluate(models, seed_loras, spec, "cpu", detector=PixelReadingDetector(), progress=False)
    by = {(r["lora"], r["prompt"]): r for r in report["rows"] if r["kind"] == "keep"}
    # the identity LoRA draws every image as before; the moved one changes pixels, so readings
    kept = ("a blue car", "a tree", "a sky")
    assert {by[("seed0", p)]["unchanged"] for p in kept} == {1.0}
    assert [by[("seed1", p)]["unchanged"] for p in kept] == [0.0, 0.0, 0.0]
    assert all("unchanged" not in r for r in report["rows"] if r["kind"] != "keep")
    # "a tree" is kept by `all` but enhanced by the spec: meant to change, so not counted
    assert by[("seed1", "a tree")]["names_edit"] and not by[("seed1", "a blue car")]["names_edit"]
    assert report["per_lora"]["seed0"]["1"]["kept_unchanged"] == 1.0
    assert report["per_lora"]["seed1"]["1"]["kept_unchanged"] == 0.0
    assert report["summary"]["0"]["kept_unchanged"] == 1.0  # the plain model: itself
    assert report["across_loras"]["1"]["kept_unchanged"]["worst_lora"] == "seed1"
    table = format_report(report)
    assert "same@1" in table and "kept: unchanged" in table
    assert not any(line.lstrip().startswith("0  kept: unchanged") for line in table.splitlines())
    # a detector that cannot read whole images judges no such thing
    plain = evaluate(models, seed_loras[1], spec, "cpu", detector=BrightnessDetector(), progress=False)
    assert plain["summary"]["1"]["kept_unchanged"] is None and "same@1" not in format_report(plain)
    # an image that showed the erased concept is meant to change: here every image does
    spec.erase[0].concept = "bright>-1"
    shown = evaluate(models, seed_loras[1], spec, "cpu", detector=PixelReadingDetector(), progress=False)
    assert all("unchanged" not in r for r in shown["rows"])


def test_the_table_names_every_worst_prompt_of_the_summary_and_keeps_its_columns_apart():
    rows = []
    for prompt, detected, drift, unchanged in [
        *[(f"fell {i}", 0.5, 0.01, 1.0) for i in range(SHOWN_KEPT_ROWS + 1)],
        ("moved most", 1.0, 0.2, 1.0),  # the worst drift and the worst unchanged: never fell
        ("read otherwise", 1.0, 0.05, 0.0),
    ]:
        for strength in (0.0, -0.25):
            moved = strength != 0.0
            row = _row("keep", prompt, strength, detected if moved else 1.0, drift if moved else 0.0)
            rows.append({**row, "unchanged": unchanged if moved else 1.0, "names_edit": False})
    summary = summarise(rows, [0.0, -0.25])
    report = {"loras": {"a": "a.safetensors"}, "rows": rows, "summary": summary, "per_lora": {"a": summary}}
    table = format_report(report)
    shown = [line.split()[1:3] for line in table.splitlines() if line.startswith("keep ")]
    assert ["moved", "most"] in shown and ["read", "otherwise"] in shown  # more fell, yet they show
    assert len(shown) == SHOWN_KEPT_ROWS
    header = next(line for line in table.splitlines() if line.startswith("kind"))
    assert header.split()[3:] == ["@0", "@-0.25", "drift@-0.25", "same@-0.25"]  # apart, not run together
    line = next(line for line in table.splitlines() if "read otherwise" in line)
    assert line.split()[-4:] == ["100%", "100%", "0.050", "0%"]
    assert len(line) == len(header)  # each value under its header


def _row(kind, prompt, strength, detected, drift=0.0, lora="a", concept="c"):
    return {"lora": None if strength == 0 else lora, "kind": kind, "prompt": prompt, "concept": concept,
            "strength": strength, "detected": detected, "drift": drift}  # fmt: skip


def test_summary_names_the_worst_row_of_each_measure():
    rows = [
        _row("erase", "e1", 1.0, 0.0), _row("erase", "e2", 1.0, 0.25, concept="digit:7"),
        _row("keep", "k1", 1.0, 1.0, 0.01), _row("keep", "k2", 1.0, 0.5, 0.02),
        _row("keep", "k3", 1.0, 0.9, 0.3),
        {**_row("keep", "k4 names the erased concept", 1.0, 1.0, 0.9), "names_edit": True},
        _row("enhance", "n1", 1.0, 0.75), _row("enhance", "n2", 1.0, 0.5),
    ]  # fmt: skip
    summary = summarise(rows, [1.0])["1"]
    assert summary["erased_still_detected"] == 0.125
    assert summary["erased_still_detected_worst"] == {
        "lora": "a",
        "prompt": "e2",
        "concept": "digit:7",
        "detected": 0.25,
        "tied": 0,
        "of": 2,
    }
    assert (
        summary["kept_still_right"] == pytest.approx(0.85)
        and summary["kept_still_right_worst"]["prompt"] == "k2"
    )
    assert summary["kept_drift"] == pytest.approx(0.11) and summary["kept_drift_worst"]["prompt"] == "k3"
    assert summary["enhanced_detected"] == 0.625 and summary["enhanced_detected_worst"]["prompt"] == "n2"


def test_a_tie_for_worst_names_the_row_that_moved_most_and_counts_the_others():
    rows = [
        _row("keep", "k1", 1.0, 0.5, 0.01), _row("keep", "k2", 1.0, 0.5, 0.05), _row("keep", "k3", 1.0, 1.0),
    ]  # fmt: skip
    summary = summarise(rows, [1.0])
    assert summary["1"]["kept_still_right_worst"]["prompt"] == "k2"  # as bad as k1, and moved more
    assert "kept: still right           67%    50%  k2 [c] and 1 more as bad" in _summary_table(summary)
    every = summarise([_row("keep", p, 1.0, 1.0) for p in ("k1", "k2", "k3")], [1.0])
    assert "100%  every one of the 3 prompts" in _summary_table(every)  # no prompt singled out


def test_a_one_sided_loras_other_end_is_summarised_by_the_enhanced_prompt_it_leaves_most():
    rows = [_row("enhance", "n1", -1.0, 0.0), _row("enhance", "n2", -1.0, 0.25)]
    summary = summarise(rows, [-1.0])
    assert summary["-1"]["enhanced_detected"] is None  # nothing should appear at -1
    assert summary["-1"]["enhanced_other_end_worst"]["prompt"] == "n2"  # gone is right at -1
    assert "enhanced: other end left    12%    25%  n2" in _summary_table(summary)


def test_a_two_ended_slider_is_judged_at_each_end_on_its_own_concepts():
    """red at +1, blue at -1: a perfect slider reads 100% detected and 0% left at both ends."""
    rows = [
        {**_row("enhance", "red", strength, float(strength > 0)), "end": 1} for strength in (-1.0, 1.0)
    ] + [{**_row("enhance", "blue", strength, float(strength < 0)), "end": -1} for strength in (-1.0, 1.0)]
    summary = summarise(rows, [-1.0, 1.0])
    for strength, shown, gone in (("1", "red", "blue"), ("-1", "blue", "red")):
        assert summary[strength]["enhanced_detected"] == 1.0
        assert summary[strength]["enhanced_detected_worst"]["prompt"] == shown
        assert summary[strength]["enhanced_other_end"] == 0.0
        assert summary[strength]["enhanced_other_end_worst"]["prompt"] == gone
    table = _summary_table(summary)
    assert "      -1  enhanced: detected         100%   100%  blue [c]" in table
    assert "      -1  enhanced: other end left     0%     0%  red [c]" in table


def test_the_report_keeps_the_order_it_was_given(tmp_path):
    from leco.evaluate import write_report

    report = {"loras": {"zeta": "z.safetensors", "alpha": "a.safetensors"}, "summary": {"10": {}, "2": {}}}
    written = json.loads(write_report(report, tmp_path / "r.json").read_text())
    assert list(written["loras"]) == ["zeta", "alpha"] and list(written["summary"]) == ["10", "2"]


def test_a_report_replaces_an_earlier_report_and_nothing_else(tmp_path):
    from leco.evaluate import write_report

    report = {"rows": [], "summary": {}, "spec": {"seed": 1}}
    write_report(report, tmp_path / "r.json")
    write_report({**report, "spec": {"seed": 2}}, tmp_path / "r.json")  # an eval run again
    assert json.loads((tmp_path / "r.json").read_text())["spec"] == {"seed": 2}
    (tmp_path / "config.yaml").write_text("mine")
    for taken in (tmp_path / "config.yaml", tmp_path):
        with pytest.raises(LecoError, match="is not a leco eval report"):
            write_report(report, taken)
    assert (tmp_path / "config.yaml").read_text() == "mine"


def test_long_reports_print_the_worst_kept_rows_unless_all_rows():
    rows = [_row("erase", "a digit seven", s, 1.0 - s) for s in (0.0, 1.0)]
    for n in range(100):
        rows += [_row("keep", f"prompt {n}", 0.0, 1.0), _row("keep", f"prompt {n}", 1.0, 1.0, drift=n / 1000)]
    rows[-1]["detected"] = 0.5  # prompt 99 fell; prompt 98 drifted most among the rest
    report = {"loras": {"a": "a.safetensors"}, "rows": rows, "per_lora": {"a": summarise(rows, [0.0, 1.0])}}
    report["summary"] = report["per_lora"]["a"]
    short, full = format_report(report), format_report(report, all_rows=True)
    shown = [line for line in short.splitlines() if line.startswith("keep ")]
    assert len(shown) == SHOWN_KEPT_ROWS
    assert "prompt 99" in shown[0] and "prompt 98" in shown[1] and not any("prompt 0 " in s for s in shown)
    assert "... 88 more kept prompts, each still detected >= 100%, drift <= 0.087 (--all-rows" in short
    assert sum(line.startswith("keep ") for line in full.splitlines()) == 100 and "more kept" not in full
    assert "a digit seven" in short  # erased rows are always printed
    assert "50%  prompt 99 [c]" in short  # the summary names the worst kept prompt and its figure


def test_a_model_judged_alone_shows_its_worst_kept_rows_and_what_it_sampled_with(tmp_path):
    rows = [_row("keep", f"prompt {n}", 0.0, 1.0 if n != 70 else 0.25) for n in range(100)]
    (tmp_path / "bad.pt").write_bytes(b"")  # a token with '/' after an existing file: kept whole
    report = {
        "loras": {},
        "embeddings": ["out/no_seven.safetensors", f"{tmp_path / 'bad.pt'}:<no/hands>"],
        "spec": {"negative_prompt": "<no-seven>"},
        "rows": rows,
        "summary": summarise(rows, [0.0]),
    }
    short = format_report(report)
    assert short.startswith(
        "== the model without LoRAs (negative prompt '<no-seven>'; embeddings no_seven.safetensors, "
        "bad.pt:<no/hands>)"
    )
    shown = [line for line in short.splitlines() if line.startswith("keep ")]
    assert len(shown) == SHOWN_KEPT_ROWS and "prompt 70 " in shown[0]
    assert f"... {100 - SHOWN_KEPT_ROWS} more kept prompts, each still detected >= 100% (--all-rows" in short


def test_the_table_shows_the_summarys_worst_kept_prompt_and_says_what_its_hidden_line_leaves_out():
    """A prompt the model already got wrong (0% -> 12%) fell by nothing, yet the summary names it as
    the worst kept: it is in the table, ahead of prompts read right that merely drifted. A keep* row
    (it names what is edited) drifts as it should; the line for the hidden rows says so."""
    rows = []
    for n in range(30):
        rows += [_row("keep", f"prompt {n}", 0.0, 1.0), _row("keep", f"prompt {n}", 1.0, 1.0, drift=n / 1000)]
    rows += [_row("keep", "0, teal ink", 0.0, 0.0), _row("keep", "0, teal ink", 1.0, 0.125, drift=0.01)]
    starred = [_row("keep", "7, black ink", s, 1.0, drift=0.3 * s) for s in (0.0, 1.0)]
    rows += [{**row, "names_edit": True} for row in starred]
    summary = summarise(rows, [0.0, 1.0])
    report = {"loras": {"a": "a.safetensors"}, "rows": rows, "per_lora": {"a": summary}, "summary": summary}
    short = format_report(report)
    shown = [line for line in short.splitlines() if line.startswith("keep")]
    assert summary["1"]["kept_still_right_worst"]["prompt"] == "0, teal ink" and "0, teal ink" in shown[0]
    assert (
        "... 20 more kept prompts, each still detected >= 100%, drift <= 0.018 but for 1 keep* prompt ("
        in short
    )
    assert "keep*: the prompt also names what is erased/enhanced" in short


DOG_SPEC = {
    "images_per_prompt": 1,
    "steps": 3,
    "guidance": 3.0,
    "keep": [{"prompt": "a dog", "concept": "bright>0.5"}],
}


def _dog_with(models, tmp_path, folder, **settings):
    """The report and the one image of DOG_SPEC judged with `settings` added to it."""
    spec = EvalSpec.model_validate({**DOG_SPEC, **settings})
    report = evaluate(models, None, spec, "cpu", BrightnessDetector(), tmp_path / folder, False)
    return report, Image.open(tmp_path / folder / "a-dog_0_0.png")


def _pixel_distance(a, b):
    return np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).mean()


def test_negative_prompt_from_the_spec_reaches_the_images(tmp_path, tiny_folders):
    models = load_models(str(tiny_folders["sd1"]), with_vae=True)
    _, plain = _dog_with(models, tmp_path, "plain")
    report, other = _dog_with(models, tmp_path, "negative", negative_prompt="a blurry photo")
    assert report["spec"]["negative_prompt"] == "a blurry photo" and report["sampling"] == {
        "steps": 3,
        "guidance": 3.0,
        "Sampler": "DDIM",  # the tiny model's own scheduler (spec.sampler: model), by A1111's name
    }
    assert _pixel_distance(plain, other) > 0.5


def test_clip_skip_from_the_spec_reaches_the_images_and_the_report(tmp_path, tiny_folders):
    models = load_models(str(tiny_folders["sd1"]), with_vae=True)
    _, one = _dog_with(models, tmp_path, "one")
    report, two = _dog_with(models, tmp_path, "two", clip_skip=2)
    assert report["sampling"]["Clip skip"] == 2
    assert _pixel_distance(one, two) > 0.5
    assert "Clip skip: 2" in two.text["parameters"]
    with pytest.raises(LecoError, match=r"^eval spec: clip_skip: 99 skips past the \d+ text-encoder layers"):
        _dog_with(models, tmp_path, "far", clip_skip=99)


def test_an_embedding_judged_as_a_lora_is_named_by_that_option(tmp_path, tiny_folders):
    models = load_models(str(tiny_folders["sd1"]), with_vae=True)
    wrong_width = tmp_path / "neg.safetensors"  # the tiny model's text encoder is 32 wide
    save_file({"emb_params": torch.zeros(2, 8)}, str(wrong_width))
    spec = EvalSpec.model_validate(
        {"images_per_prompt": 1, "steps": 2, "keep": [{"prompt": "a dog", "concept": "bright>0.5"}]}
    )
    with pytest.raises(LecoError, match=r"^--lora: .*neg.safetensors has vectors of width 8"):
        evaluate(models, wrong_width, spec, "cpu", BrightnessDetector(), None, False)


def test_a_loras_warnings_are_said_once_per_eval(tmp_path, tiny_folders, seed_loras, capsys):
    models = load_models(str(tiny_folders["sd1"]), with_vae=True)
    extra = tmp_path / "extra.safetensors"
    absent = "lora_unet_down_blocks_3_attentions_0_transformer_blocks_0_attn2_to_k"  # no such block here
    tensors = load_file(str(seed_loras[1]))
    tensors[f"{absent}.lora_down.weight"], tensors[f"{absent}.lora_up.weight"] = (
        torch.zeros(2, 16),
        torch.zeros(16, 2),
    )
    save_file(tensors, str(extra))
    spec = EvalSpec.model_validate(
        {"images_per_prompt": 1, "steps": 2, "keep": [{"prompt": "a dog", "concept": "bright>0.5"}]}
    )
    evaluate(models, extra, spec, "cpu", BrightnessDetector(), None, False)
    assert capsys.readouterr().err.count(f"are not applied ({absent})") == 1


def test_cli_eval_judges_several_loras_with_an_embedding(tmp_path, tiny_folders, tiny_clip, seed_loras):
    import subprocess
    import sys

    from safetensors.torch import save_file

    save_file({"emb_params": torch.randn(1, 32)}, tmp_path / "fuzzy.safetensors")
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        f"detector: clip\nclip_model: {tiny_clip}\nimages_per_prompt: 2\nstrengths: [1]\nsteps: 2\n"
        "negative_prompt: ignored\nerase: [{prompt: a <fuzzy> painting, concept: a painting}]\n"
        "keep: [{prompt: a photo of a dog, concept: a dog}]\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "leco", "eval", "--model", str(tiny_folders["sd1"]),
         "--lora", str(seed_loras[0]), "--lora", str(seed_loras[1]), "--spec", str(spec),
         "--out", str(tmp_path / "report.json"), "--negative", "<fuzzy>",
         "--embedding", f"{tmp_path / 'fuzzy.safetensors'}:<fuzzy>", "--all-rows", "--no-progress"],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert list(report["loras"]) == ["seed0", "seed1"] and report["spec"]["negative_prompt"] == "<fuzzy>"
    assert (
        report["embeddings"] == [f"{tmp_path / 'fuzzy.safetensors'}:<fuzzy>"]
        and len(report["rows"]) == 2 + 2 * 2
    )
    assert "== across 2 LoRAs" in result.stdout and "CLIP@1" in result.stdout


def test_a_negative_prompt_cut_only_once_the_embedding_joins_it_is_named(tmp_path, tiny_folders, capsys):
    from safetensors.torch import save_file

    models = load_models(str(tiny_folders["sd1"]), with_vae=True)
    embedding = tmp_path / "wide.safetensors"
    save_file({"emb_params": torch.randn(10, 32)}, str(embedding), metadata={"leco.token": "<wide>"})
    limit = models.tokenizers[0].model_max_length
    negative = " ".join(["blurry"] * (limit - 6))  # fits alone; its 10 vectors take it past the limit
    spec = {"images_per_prompt": 1, "steps": 2, "negative_prompt": negative}
    spec["keep"] = [{"prompt": "a dog", "concept": "bright>0.5"}]
    evaluate(models, embedding, EvalSpec.model_validate(spec), "cpu", BrightnessDetector())
    warnings = capsys.readouterr().err
    assert (
        "negative prompt with wide.safetensors 'blurry blurry" in warnings
        and "eval spec prompt" not in warnings
    )


def test_an_embedding_given_as_a_lora_is_judged_as_a_negative_embedding(tmp_path, tiny_folders):
    """Strength 0: the spec's negative prompt; strength 1: that prompt with the embedding's token."""
    from safetensors.torch import save_file

    models = load_models(str(tiny_folders["sd1"]), with_vae=True)
    embedding = tmp_path / "no_dog.safetensors"
    save_file({"emb_params": torch.randn(2, 32) * 3}, str(embedding), metadata={"leco.token": "<no-dog>"})
    spec = {"images_per_prompt": 1, "steps": 3, "guidance": 3.0, "negative_prompt": "blurry"}
    spec["keep"] = [{"prompt": "a dog", "concept": "bright>0.5"}]
    report = evaluate(
        models,
        embedding,
        EvalSpec.model_validate(spec),
        "cpu",
        BrightnessDetector(),
        tmp_path / "judged",
        False,
    )
    assert report["negative_embeddings"] == {"no_dog": "<no-dog>"}
    assert [r["strength"] for r in report["rows"]] == [0.0, 1.0] and report["rows"][1]["drift"] > 0
    # the negative prompt strength 1 samples with, whole: the spec's and the token
    title = "negative embedding no_dog"
    assert f"{title} ({embedding}): strength 1 = negative prompt 'blurry, <no-dog>'" in format_report(report)
    by_hand = EvalSpec.model_validate({**spec, "negative_prompt": "blurry, <no-dog>"})
    evaluate(models, None, by_hand, "cpu", BrightnessDetector(), tmp_path / "by_hand", False, [embedding])
    evaluate(
        models, None, EvalSpec.model_validate(spec), "cpu", BrightnessDetector(), tmp_path / "plain", False
    )
    judged, by_hand_image, plain = (
        np.asarray(Image.open(tmp_path / name), np.int16)
        for name in ("judged/a-dog_1_0.png", "by_hand/a-dog_0_0.png", "plain/a-dog_0_0.png")
    )
    assert np.array_equal(judged, by_hand_image) and not np.array_equal(judged, plain)
    other_seed = tmp_path / "no_dog_seed1.safetensors"  # another training seed: the same token
    save_file({"emb_params": torch.randn(2, 32)}, str(other_seed), metadata={"leco.token": "<no-dog>"})
    both = evaluate(
        models, [embedding, other_seed], EvalSpec.model_validate(spec), "cpu", BrightnessDetector()
    )
    assert both["negative_embeddings"] == {"no_dog": "<no-dog>", "no_dog_seed1": "<no-dog>"}
    # judged, no prompt writes its token: one named by a word ("dog") or by diffusers' key is safe
    word, one_key = tmp_path / "dog.safetensors", tmp_path / "dog_concept.safetensors"
    save_file({"emb_params": torch.randn(2, 32)}, str(word))  # the file's name: a word the model knows
    save_file({"<dog-concept>": torch.randn(32)}, str(one_key))
    named = evaluate(models, [word, one_key], EvalSpec.model_validate(spec), "cpu", BrightnessDetector())
    assert named["negative_embeddings"] == {"dog": "<dog>", "dog_concept": "<dog-concept>"}
    # a name no judged text holds stays as A1111 and ComfyUI know the file: its infotext pastes there
    bare = tmp_path / "nosev.safetensors"
    save_file({"emb_params": torch.randn(2, 32)}, str(bare))
    kept_name = evaluate(
        models, bare, EvalSpec.model_validate(spec), "cpu", BrightnessDetector(), tmp_path / "b"
    )
    assert kept_name["negative_embeddings"] == {"nosev": "nosev"}
    infotext = Image.open(tmp_path / "b" / "a-dog_1_0.png").text["parameters"]
    assert "Negative prompt: blurry, nosev\n" in infotext
    assert f'TI hashes: "nosev: {hashlib.sha256(bare.read_bytes()).hexdigest()[:12]}"' in infotext
    assert "TI hashes" not in Image.open(tmp_path / "b" / "a-dog_0_0.png").text["parameters"]  # not used
    with pytest.raises(LecoError, match=r"strengths: the spec lists no strength but 0"):
        evaluate(models, embedding, EvalSpec.model_validate({**spec, "strengths": []}), "cpu")
    with pytest.raises(
        LecoError, match=r"--lora no_dog: its token <no-dog> is already in the negative prompt"
    ):
        evaluate(
            models, embedding, EvalSpec.model_validate({**spec, "negative_prompt": "blurry, <No-Dog>"}), "cpu"
        )
    with pytest.raises(
        LecoError, match=r"is a negative embedding, judged at strength 1 .* strengths -1 mean"
    ):
        evaluate(models, embedding, EvalSpec.model_validate({**spec, "strengths": [-1, 1]}), "cpu")


def test_a_clip_model_that_is_not_here_is_one_line_at_once(monkeypatch, tmp_path):
    from huggingface_hub import constants

    from leco.evaluate import ClipDetector

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(
        LecoError, match=r"clip_model: 'someone/no-such-clip' is not in the local Hugging Face cache"
    ):
        ClipDetector("someone/no-such-clip", ["a cat"])
    spec = tmp_path / "spec.yaml"  # through a spec: its file is named, as for its other keys
    spec.write_text(
        "detector: clip\nclip_model: someone/no-such-clip\nkeep: [{prompt: a cat, concept: a cat}]\n"
        "alternatives: [a dog]\n"
    )
    with pytest.raises(
        LecoError, match=r"^.*spec.yaml: clip_model: 'someone/no-such-clip' is not in the local"
    ):
        make_detector(load_spec(spec), None)


def test_images_an_earlier_eval_left_are_replaced_only_with_overwrite(tmp_path, tiny_folders):
    models = load_models(str(tiny_folders["sd1"]), with_vae=True)
    spec = EvalSpec.model_validate(
        {"images_per_prompt": 1, "steps": 2, "keep": [{"prompt": "a dog", "concept": "bright>0.5"}]}
    )
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")  # a file of another name is left alone
    evaluate(models, None, spec, "cpu", BrightnessDetector(), folder, False)
    (image,) = folder.glob("*.png")
    with pytest.raises(LecoError, match=r"--images .*images: already holds 1 of the images this eval writes"):
        evaluate(models, None, spec, "cpu", BrightnessDetector(), folder, False)
    image.write_bytes(b"leco's image, damaged")
    with pytest.raises(LecoError, match=r"--images .*images: holds 1 file\(s\) leco did not write"):
        evaluate(models, None, spec, "cpu", BrightnessDetector(), folder, False, overwrite=True)
    assert image.read_bytes() == b"leco's image, damaged"  # not known to be leco's: kept
    image.unlink()
    evaluate(models, None, spec, "cpu", BrightnessDetector(), folder, False)
    modified = image.stat().st_mtime_ns
    evaluate(models, None, spec, "cpu", BrightnessDetector(), folder, False, overwrite=True)
    assert image.stat().st_mtime_ns != modified and (folder / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize(
    ("document", "message"),
    [
        (
            {
                "erase": [{"prompt": "a 7", "concept": "digit:7"}],
                "keep": [{"prompt": "a 7", "concept": "digit:7"}],
            },
            r"spec.yaml: 'a 7' \(digit:7\) is listed under both erase: and keep:",
        ),
        (
            {
                "erase": [{"prompt": "a 7", "concept": "digit:7"}],
                "enhance": [{"prompt": "7", "concept": "digit:7"}],
            },
            r"spec.yaml: concept 'digit:7' is both erased and enhanced",
        ),
        ({"erase": [{"prompt": " ", "concept": "digit:7"}]}, r"spec.yaml: erase.1.prompt: empty"),
        (
            {"keep": [{"prompt": "a 7", "concept": "digit:7"}, {"prompt": "a 7", "concept": "digit:7 "}]},
            r"'a 7' \(digit:7\) is listed twice under keep:",
        ),
        (  # the same prompt as CLIP reads it (lower case, spaces collapsed), the same concept however spelt
            {
                "keep": [
                    {"prompt": "a digit four", "concept": "digit:4"},
                    {"prompt": "A digit  four", "concept": "Digit: 4"},
                ]
            },
            r"'a digit four' \(digit:4\) is listed twice under keep:",
        ),
        (  # the same concept, however its parts are written
            {
                "erase": [{"prompt": "a 7", "concept": "digit:7,ink:red"}],
                "enhance": [{"prompt": "a 7", "concept": " ink:red, digit:7"}],
            },
            r"'a 7' \(digit:7,ink:red\) is listed under both erase: and enhance:",
        ),
        (  # with more parts on the same prompt: still what erase takes away from that image
            {
                "erase": [{"prompt": "a digit seven in red ink", "concept": "digit:7"}],
                "keep": [{"prompt": "a digit seven in red ink", "concept": "digit:7,ink:red"}],
            },
            r"keep 'a digit seven in red ink' \(digit:7,ink:red\) asks to keep what erase 'a digit seven in",
        ),
        (  # the same prompt as CLIP reads it
            {
                "erase": [{"prompt": "a digit seven in red ink", "concept": "digit:7"}],
                "keep": [{"prompt": "A digit seven in red  ink", "concept": "digit:7,ink:red"}],
            },
            r"keep 'A digit seven in red  ink' \(digit:7,ink:red\) asks to keep what erase",
        ),
    ],
)
def test_a_spec_that_asks_for_opposites_is_one_line(tmp_path, document, message):
    path = tmp_path / "spec.yaml"
    path.write_text(json.dumps(document))
    with pytest.raises(ConfigError, match=message):
        load_spec(path)


def test_erasing_red_sevens_may_keep_the_other_sevens(tmp_path):
    path = tmp_path / "spec.yaml"
    erase = [{"prompt": "a digit seven in red ink", "concept": "digit:7,ink:red"}]
    path.write_text(json.dumps({"erase": erase, "keep": [{"prompt": "a digit seven", "concept": "digit:7"}]}))
    assert [k.concept for k in load_spec(path).keep] == ["digit:7"]
    # a targeted erasure keeps the concept on other prompts: sevens go in red, stay in blue
    erase = [{"prompt": "a digit seven in red ink", "concept": "digit:7"}]
    keep = [{"prompt": "a digit seven in blue ink", "concept": "digit:7"}]
    path.write_text(json.dumps({"erase": erase, "keep": keep}))
    assert [k.prompt for k in load_spec(path).keep] == ["a digit seven in blue ink"]


def test_keep_all_does_not_judge_a_listed_prompt_again_however_its_concept_is_written(tmp_path):
    from leco.evaluate import judged_prompts
    from leco.ink_digits.judge import InkDigitsDetector
    from leco.models import resolve_bundled

    path = tmp_path / "spec.yaml"
    listed = [
        {"prompt": "a digit zero in red ink", "concept": "ink:red, digit:0"},
        {"prompt": "A Digit Four", "concept": "digit:4"},  # as CLIP reads it: "a digit four"
        {"prompt": "the number  5", "concept": "digit:5"},
    ]
    path.write_text(json.dumps({"erase": [{"prompt": "7", "concept": "digit:7"}], "keep": ["all", *listed]}))
    detector = InkDigitsDetector.for_model(resolve_bundled("ink-digits"))
    prompts = [entry.prompt for entry in judged_prompts(load_spec(path), detector) if entry.kind == "keep"]
    assert prompts.count("a digit zero in red ink") == 1 and len(prompts) > 50
    read = [" ".join(p.lower().split()) for p in prompts]
    assert read.count("a digit four") == 1 and read.count("the number 5") == 1


def test_a_listed_kept_prompt_that_is_also_erased_on_leaves_the_kept_drift(tmp_path):
    from leco.evaluate import judged_prompts
    from leco.ink_digits.judge import InkDigitsDetector
    from leco.models import resolve_bundled

    path = tmp_path / "spec.yaml"
    erase = [{"prompt": "a digit two in red ink", "concept": "ink:red"}]
    keep = [
        {"prompt": "A digit two in red ink", "concept": "digit:2"},  # its ink is meant to change
        {"prompt": "a digit two in blue ink", "concept": "ink:blue"},
    ]
    path.write_text(json.dumps({"erase": erase, "keep": keep}))
    detector = InkDigitsDetector.for_model(resolve_bundled("ink-digits"))
    kept = {e.prompt: e.names_edit for e in judged_prompts(load_spec(path), detector) if e.kind == "keep"}
    assert kept == {"A digit two in red ink": True, "a digit two in blue ink": False}


def test_a_listed_kept_prompt_that_names_the_erased_concept_in_other_words_is_marked(tmp_path):
    """Erase seven: "the number 7 written in red" kept on its ink names seven too, so its image is
    meant to change and its drift is not kept drift, however the seven is written."""
    from leco.evaluate import judged_prompts
    from leco.ink_digits.judge import InkDigitsDetector
    from leco.models import resolve_bundled

    path = tmp_path / "spec.yaml"
    erase = [{"prompt": "a digit seven", "concept": "digit:7"}, {"prompt": "teal ink", "concept": "ink:teal"}]
    keep = [
        {"prompt": "the number 7 written in red", "concept": "ink:red"},
        {"prompt": "7, blue ink", "concept": "ink:blue"},
        {"prompt": "A digit SEVEN in green ink", "concept": "ink:green"},
        {"prompt": "a digit six in teal ink", "concept": "digit:6"},  # the erased ink named
        {"prompt": "the number 17 written in red", "concept": "ink:red"},  # not a seven
        {"prompt": "a digit six in red ink", "concept": "digit:6,ink:red"},
        # kept on the erased concept itself (erased on other prompts only): meant to stay as it is
        {"prompt": "the number 7 written in blue", "concept": "digit:7"},
        {"prompt": "a digit seven in black ink", "concept": "ink:black,digit:7"},
    ]
    path.write_text(json.dumps({"erase": erase, "keep": keep}))
    detector = InkDigitsDetector.for_model(resolve_bundled("ink-digits"))
    kept = {e.prompt: e.names_edit for e in judged_prompts(load_spec(path), detector) if e.kind == "keep"}
    assert kept == {k["prompt"]: n < 4 for n, k in enumerate(keep)}


def test_an_ink_digits_concept_with_two_digits_is_refused():
    from leco.ink_digits.judge import InkDigitsDetector
    from leco.models import resolve_bundled

    detector = InkDigitsDetector.for_model(resolve_bundled("ink-digits"))
    with pytest.raises(LecoError, match="names more than one digit; an image holds one digit in one ink"):
        detector.check_concept("digit:7,digit:3")
    with pytest.raises(LecoError, match="names more than one ink"):
        detector.check_concept("ink:red,digit:2,ink:blue")
    detector.check_concept("digit:7,ink:red")


def test_the_same_lora_given_twice_is_warned_of(tmp_path, tiny_folders, capsys):
    models = load_models(str(tiny_folders["sd1"]), with_vae=True)
    network = LoRANetwork.create(models.unet, models.family, NetworkConfig(rank=2))
    lora = network.save(tmp_path / "l.safetensors", resolution=16)
    network.remove()
    spec = EvalSpec.model_validate(
        {"images_per_prompt": 1, "steps": 2, "keep": [{"prompt": "a dog", "concept": "bright>0.5"}]}
    )
    again = tmp_path / "sub" / ".." / "l.safetensors"
    (tmp_path / "sub").mkdir()
    evaluate(models, [lora, again], spec, "cpu", BrightnessDetector(), None, False)
    assert "--lora: l.safetensors is given 2 times; each copy is judged again" in capsys.readouterr().err


def test_eval_images_carry_their_settings_as_a1111_writes_them(tmp_path, tiny_folders):
    """An eval image opened in A1111's PNG Info (or ComfyUI) says how it was made: the LoRA at its
    strength, the negative prompt, sampler, steps, guidance and seed; the strength-0 one names no LoRA."""
    models = load_models(str(tiny_folders["sd1"]), with_vae=True)
    network = LoRANetwork.create(models.unet, models.family, NetworkConfig(rank=2))
    lora = network.save(tmp_path / "no_dog.safetensors", resolution=16)
    network.remove()
    spec = EvalSpec.model_validate(
        {"images_per_prompt": 1, "steps": 2, "guidance": 2.5, "seed": 4, "strengths": [0, 0.5],
         "sampler": "Euler a", "negative_prompt": "blurry",
         "keep": [{"prompt": "a dog", "concept": "bright>0.5"}]}
    )  # fmt: skip
    evaluate(models, lora, spec, "cpu", BrightnessDetector(), tmp_path / "images", False, model_name="tiny")
    texts = {path.name: Image.open(path).text["parameters"] for path in (tmp_path / "images").glob("*.png")}
    assert len(texts) == 2
    base = next(text for text in texts.values() if "<lora:" not in text)
    edited = next(text for text in texts.values() if "<lora:" in text)
    assert base.splitlines()[:2] == ["a dog", "Negative prompt: blurry"]
    assert edited.splitlines()[0] == "a dog <lora:no_dog:0.5>"
    for text in (base, edited):
        assert "Steps: 2, Sampler: Euler a, Schedule type: Uniform, CFG scale: 2.5, Seed: 4" in text
        assert "Model: tiny" in text


def test_a_lora_holding_nan_stops_eval_before_any_image_is_made(tmp_path, tiny_folders, monkeypatch):
    from safetensors.torch import load_file, save_file

    models = load_models(str(tiny_folders["sd1"]), with_vae=True)
    network = LoRANetwork.create(models.unet, models.family, NetworkConfig(rank=2))
    good = network.save(tmp_path / "good.safetensors", dtype=torch.float32, resolution=32, title="good")
    network.remove()
    tensors = load_file(good)
    first = sorted(k for k in tensors if k.endswith("lora_up.weight"))[0]
    tensors[first] = torch.full_like(tensors[first], float("nan"))
    save_file(tensors, tmp_path / "nan.safetensors")

    def no_images(*args, **kwargs):
        raise AssertionError("images were generated before the LoRA was checked")

    monkeypatch.setattr("leco.evaluate.generate", no_images)
    spec = EvalSpec(detector="nudenet", erase=[{"prompt": "a nude", "concept": "nudity"}])
    with pytest.raises(LecoError, match=rf"nan.safetensors: {first} holds NaN or inf values"):
        evaluate(models, [good, tmp_path / "nan.safetensors"], spec, "cpu", progress=False)


# -- what a second read of eval found ----------------------------------------------------------


def test_clip_reads_labels_that_differ_only_in_case_as_one(tiny_clip):
    # CLIP lower-cases: "A Seven" and "a seven" score alike, so two labels would always hand every
    # image to the first and the second would read as never drawn.
    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(6)]
    detector = ClipDetector(str(tiny_clip), ["a seven", "A  Seven", "a blank image"])
    assert detector.labels == ["a seven", "a blank image"]
    assert detector.present(images, "A  Seven") == detector.present(images, "a seven")
    assert any(detector.present(images, "A Seven") + detector.present(images, "a blank image"))


def test_a_kept_prompt_listed_as_well_as_by_keep_all_is_judged_as_keep_all_judges_it(tmp_path):
    from leco.ink_digits.judge import InkDigitsDetector
    from leco.models import resolve_bundled

    detector = InkDigitsDetector.for_model(resolve_bundled("ink-digits"))
    erase = [{"prompt": "a digit seven in red ink", "concept": "digit:7"}]
    path = tmp_path / "spec.yaml"
    path.write_text(json.dumps({"erase": erase, "keep": "all"}))
    universe = {
        (e.prompt, e.concept): e for e in judged_prompts(load_spec(path), detector) if e.kind == "keep"
    }
    marked = next(key for key, entry in universe.items() if entry.names_edit)  # a seven judged on its ink
    path.write_text(
        json.dumps({"erase": erase, "keep": ["all", {"prompt": marked[0], "concept": marked[1]}]})
    )
    listed = {(e.prompt, e.concept): e for e in judged_prompts(load_spec(path), detector) if e.kind == "keep"}
    assert listed == universe


def test_a_prompt_kept_on_two_concepts_counts_its_drift_once():
    def row(concept: str, prompt: str, drift: float) -> dict:
        return {"lora": "a", "kind": "keep", "prompt": prompt, "concept": concept, "strength": 1.0,
                "detected": 1.0, "drift": drift}  # fmt: skip

    rows = [
        row("digit:3", "a digit three in blue ink", 0.3),
        row("ink:blue", "a digit three in blue ink", 0.3),
    ]
    rows.append(row("digit:4", "a digit four", 0.0))
    summary = summarise(rows, [1.0])["1"]
    assert summary["kept_drift"] == pytest.approx(0.15)  # one image set each: (0.3 + 0) / 2
    assert summary["kept_still_right"] == 1.0


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ("strengths: [0, 1, 1]", "strengths: 1 is listed twice; list each strength once"),
        ("strengths: [true]", "strengths: true/false, which this key does not take"),
        ("images_per_prompt: true", "images_per_prompt: true/false, which this key does not take"),
    ],
)
def test_spec_numbers_are_numbers_each_once(tmp_path, lines, message):
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"{lines}\nerase: [{{prompt: a digit seven, concept: 'digit:7'}}]\n")
    with pytest.raises(ConfigError, match=rf"spec.yaml: {re.escape(message)}"):
        load_spec(spec)


@pytest.mark.parametrize(
    ("spec_text", "message"),
    [
        ("erase: [{prompt: a digit seven, concept: 'digit:12'}]", "concept 'digit:12' is not known"),
        ("detector: nudenet\nerase: [{prompt: a nude, concept: nudes}]", 'knows one concept, "nudity"'),
        ("detector: nudenet\nerase: [{prompt: a nude, concept: Nudity}]\nkeep: all", "keep: all needs a"),
        (
            "detector: clip\nerase: [{prompt: a cat, concept: a cat}]\nalternatives: [a dog]",
            "clip_model: missing",
        ),
    ],
)
def test_a_specs_detector_problems_stop_eval_before_the_model_loads(
    tmp_path, monkeypatch, capsys, spec_text, message
):
    from leco import cli

    def no_loading(args):
        raise AssertionError("the model was loaded before the spec's detector was checked")

    monkeypatch.setattr(cli, "load_for_images", no_loading)
    spec = tmp_path / "spec.yaml"
    spec.write_text(spec_text + "\n")
    code = cli.main(["eval", "--model", "ink-digits", "--spec", str(spec), "--out", str(tmp_path / "r.json")])
    error = capsys.readouterr().err
    assert code == 2 and f"{spec}: " in error and message in error, error


def test_nudenet_missing_is_said_with_the_extra_to_install_before_the_model_loads(
    tmp_path, monkeypatch, capsys
):
    import importlib.util

    from leco import cli

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "nudenet" else real_find_spec(name, *a)
    )
    monkeypatch.setattr(cli, "load_for_images", lambda args: pytest.fail("the model was loaded first"))
    spec = tmp_path / "spec.yaml"
    spec.write_text("detector: nudenet\nerase: [{prompt: a nude, concept: Nudity}]\n")
    code = cli.main(["eval", "--model", "ink-digits", "--spec", str(spec), "--out", str(tmp_path / "r.json")])
    error = capsys.readouterr().err
    assert code == 2 and f"{spec}: detector: nudenet needs the nudenet package" in error
    assert 'pip install -e ".[nudenet]"' in error


def test_evaluate_takes_a_spec_as_a_dict_checked_as_a_file_is(tmp_path, tiny_folders):
    models = load_models(str(tiny_folders["sd1"]), with_vae=True)
    keep = [{"prompt": "a dog", "concept": "bright>0.5"}]
    spec = {"images_per_prompt": 1, "steps": 2, "strengths": [1], "keep": keep}
    report = evaluate(models, None, spec, "cpu", BrightnessDetector(), progress=False)
    assert report["spec"]["strengths"] == [0.0, 1.0] and [r["prompt"] for r in report["rows"]] == ["a dog"]
    with pytest.raises(ConfigError, match=r"^spec: images_per_prompt: Input should be greater than or equal"):
        evaluate(models, None, {**spec, "images_per_prompt": 0}, "cpu", BrightnessDetector(), progress=False)
    with pytest.raises(ConfigError, match=r"^spec: a list; give a spec file's path, a dict or an EvalSpec"):
        evaluate(models, None, [spec], "cpu", BrightnessDetector(), progress=False)


def test_a_missed_concept_of_several_parts_says_which_part_was_missed():
    """ "digit:9,ink:red" read as a nine in black: the summary says the ink failed, not the digit."""
    from PIL import Image

    from leco.evaluate import JudgedPrompt, _Judge
    from leco.images import ImageRequest

    class BlackNines:  # every image a nine in black ink
        def present(self, images, concept):
            return [concept in ("digit:9", "ink:black", "digit:9,ink:black")] * len(images)

    entries = [JudgedPrompt("keep", "a digit nine in red ink", "digit:9,ink:red"),
               JudgedPrompt("keep", "a digit nine", "digit:9")]  # fmt: skip
    images = {ImageRequest(e.prompt, 1.0, seed): Image.new("RGB", (8, 8)) for e in entries for seed in (0, 1)}
    base = {ImageRequest(r.prompt, 0.0, r.seed): image for r, image in images.items()}
    judge = _Judge(BlackNines(), entries, [0, 1], functools.partial(concept_parts, "ink-digits"))
    red, plain = judge.rows(images, base, "a", 1.0)
    assert red["detected"] == 0.0 and red["parts"] == {"digit:9": 1.0, "ink:red": 0.0}
    assert "parts" not in plain  # one part, found: nothing to split
    table = _summary_table(summarise([red, plain], [1.0]))
    assert (
        "kept: still right           50%     0%  a digit nine in red ink [digit:9 100%, ink:red 0%]" in table
    )


def test_the_summarys_worst_kept_prompt_is_shown_even_behind_many_that_fell():
    rows = []
    for n in range(20):  # twenty prompts fell a little...
        rows += [_row("keep", f"prompt {n}", 0.0, 1.0), _row("keep", f"prompt {n}", 1.0, 0.75)]
    rows += [_row("keep", "0, teal ink", 0.0, 0.0), _row("keep", "0, teal ink", 1.0, 0.125)]  # ...one was low
    summary = summarise(rows, [0.0, 1.0])
    report = {"loras": {"a": "a.safetensors"}, "rows": rows, "per_lora": {"a": summary}, "summary": summary}
    shown = [line for line in format_report(report).splitlines() if line.startswith("keep")]
    assert summary["1"]["kept_still_right_worst"]["prompt"] == "0, teal ink" and "0, teal ink" in shown[0]


def test_an_eval_stopped_midway_says_how_many_images_it_left(
    tmp_path, tiny_folders, seed_loras, monkeypatch, capsys
):
    import leco.evaluate
    from leco.errors import Terminated

    real_generate, calls = leco.evaluate.generate, []

    def stopped_on_the_second_lora(pipe, requests, *args, **kwargs):
        calls.append(requests)
        if len(calls) == 3:  # the plain model's images, the first LoRA's, then a SIGTERM
            raise Terminated(15)
        return real_generate(pipe, requests, *args, **kwargs)

    monkeypatch.setattr(leco.evaluate, "generate", stopped_on_the_second_lora)
    models = load_models(str(tiny_folders["sd1"]), with_vae=True)
    spec = EvalSpec.model_validate(
        {"images_per_prompt": 2, "strengths": [0, 1], "steps": 2, "guidance": 2.0,
         "erase": [{"prompt": "a cat", "concept": "bright>0.5"}]}
    )  # fmt: skip
    with pytest.raises(Terminated):
        evaluate(models, seed_loras, spec, "cpu", detector=BrightnessDetector(), image_dir=tmp_path / "i")
    written = len(list((tmp_path / "i").rglob("*.png")))
    assert written == 2 * 2 + 2  # the plain images in both LoRAs' folders, then the first LoRA's
    assert f"{written} of 8 images were written to {tmp_path / 'i'} before the stop (no report)" in (
        capsys.readouterr().err
    )
