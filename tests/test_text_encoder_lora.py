"""A LoRA on the text encoders (training_method: text-encoder): only its modules train, prompts are
read through it wherever the edited model samples or is trained, and the file applies as kohya's."""

import pytest
import torch

from leco import train
from leco.config import ConfigError, LecoConfig
from leco.generate import build_pipeline
from leco.lora_files import lora_strengths
from leco.models import load_models
from leco.network import read_lora_file
from leco.network.text_encoders import text_encoder_layers
from leco.trainer import Trainer


def text_encoder_config(folder, out, *, iterations=4, text_weight=0.0, **train_options) -> LecoConfig:
    train_settings = {"precision": "fp32", "iterations": iterations, "seed": 5, "max_denoising_steps": 8}
    return LecoConfig.model_validate(
        {
            "pretrained_model": {"name_or_path": str(folder)},
            "network": {"rank": 2, "alpha": 1, "training_method": "text-encoder"},
            "prompts": [
                {"target": "a red fox", "positive": "a red fox", "unconditional": "a blue fox"},
                {
                    "target": "a red fox",
                    "positive": "a blue fox",
                    "unconditional": "a red fox",
                    "multiplier": -1,
                },
            ],
            "anchors": {"prompts": ["a house", "a green car"], "text_weight": text_weight},
            "train": {**train_settings, "lr": 5e-2, **train_options},
            "save": {"path": str(out), "name": "te", "per_steps": 2},
        }
    )


def encoded(models, texts):
    from leco.conditioning import PromptEncoder

    with torch.no_grad():
        return PromptEncoder(models).encode(texts).hidden_states


@pytest.mark.parametrize("name", ["sd1", "sdxl"])
def test_only_the_text_encoders_lora_trains_and_strength_zero_is_the_model(tmp_path, tiny_folders, name):
    trainer = Trainer(text_encoder_config(tiny_folders[name], tmp_path), progress=False)
    models = trainer.models
    unet = {k: v.clone() for k, v in models.unet.state_dict().items()}
    before = encoded(models, ["a red fox", "a house"])
    start = [p.detach().clone() for p in trainer.trainable.parameters()]
    layers = text_encoder_layers(models.text_encoders, models.family)
    # Every attention and MLP layer whose output reaches the UNet: SDXL reads the first encoder's
    # penultimate layer (the second's last one gives the pooled text).
    last_unread = 6 if name == "sdxl" else 0  # q, k, v, out, fc1, fc2 of that one layer
    assert len(start) == 2 * (len(layers) - last_unread)
    weights = {key: layer.weight.detach().clone() for key, layer in layers.items()}
    for _ in range(3):
        trainer.train_step()
    ups = zip(start[1::2], trainer.trainable.parameters()[1::2], strict=True)  # zero at the start
    assert all(not torch.equal(a, b) for a, b in ups)
    assert all(torch.equal(v, models.unet.state_dict()[k]) for k, v in unet.items())
    assert all(torch.equal(weights[key], layer.weight) for key, layer in layers.items())
    assert not torch.allclose(encoded(models, ["a red fox", "a house"]), before)  # at strength 1
    with trainer.trainable.strength(0.0):
        assert torch.equal(encoded(models, ["a red fox", "a house"]), before)


def test_rollouts_and_the_trained_prediction_read_prompts_through_the_lora(tmp_path, tiny_folders):
    trainer = Trainer(text_encoder_config(tiny_folders["sd1"], tmp_path), progress=False)
    for _ in range(2):
        trainer.train_step()
    seen = []
    handle = trainer.unet.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["encoder_hidden_states"].detach().clone()),
        with_kwargs=True,
    )
    samples = trainer.samples.roll_out()
    handle.remove()
    entry = trainer.prompts[samples[0].prompt]
    with torch.no_grad(), trainer.trainable.strength(entry.settings.multiplier):
        read = trainer.trainable.edited_conditions(["a red fox", entry.texts(0)["unconditional"]], {})
    negative, positive = seen[0].chunk(2)
    torch.testing.assert_close(positive, read["a red fox"].hidden_states.expand_as(positive))
    unconditional = read[entry.texts(0)["unconditional"]].hidden_states
    torch.testing.assert_close(negative, unconditional.expand_as(negative))
    cached = trainer.edited.embeddings["a red fox"].hidden_states
    assert not torch.allclose(positive[:1], cached)  # not the frozen encoders' reading


def test_the_file_holds_kohya_text_encoder_modules_that_generate_applies_as_trained(tmp_path, tiny_folders):
    result = train(text_encoder_config(tiny_folders["sd1"], tmp_path), progress=False)
    tensors, metadata = read_lora_file(result.path)
    models = load_models(tiny_folders["sd1"], with_vae=True)
    layers = text_encoder_layers(models.text_encoders, models.family)
    assert {key.split(".")[0] for key in tensors} == set(layers)  # no UNet module
    assert metadata["leco.training_method"] == "text-encoder"
    trained = result.trainable
    pipe = build_pipeline(models)
    with lora_strengths(pipe, result.path, models.family) as set_strength:
        for strength in (1.0, -0.5):
            set_strength(strength)
            applied = encoded(models, ["a red fox", "a house"])
            with trained.strength(strength):
                as_trained = encoded(trained.models, ["a red fox", "a house"])
            torch.testing.assert_close(applied, as_trained, rtol=1e-4, atol=1e-5)
    before = load_models(tiny_folders["sd1"])
    torch.testing.assert_close(encoded(models, ["a red fox"]), encoded(before, ["a red fox"]))  # taken out


def test_a_resumed_run_ends_with_the_same_file_as_an_uninterrupted_one(tmp_path, tiny_folders, monkeypatch):
    import leco.preservation

    monkeypatch.setattr(leco.preservation, "TEXTS_PER_STEP", 1)  # the anchors' window turns each step

    def config(out, iterations=4):
        return text_encoder_config(tiny_folders["sd1"], out, iterations=iterations, text_weight=0.5)

    whole = train(config(tmp_path / "whole"), progress=False)
    first = train(config(tmp_path / "split", iterations=2), progress=False)
    resumed = train(config(tmp_path / "split"), resume=first.state, progress=False)
    a, b = read_lora_file(whole.path)[0], read_lora_file(resumed.path)[0]
    assert a and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", ["sd1", "sdxl"])
def test_text_weight_keeps_the_anchors_text_at_both_signs(tmp_path, tiny_folders, name):
    """The token states, and SDXL's pooled text (the second encoder's last layer, read by nothing else)."""
    from leco.conditioning import PromptEncoder

    changes = []
    for weight in (0.0, 100.0):
        config = text_encoder_config(tiny_folders[name], tmp_path / str(weight), text_weight=weight)
        trainer = Trainer(config, progress=False)
        for _ in range(24):  # past Adam's first steps, which move every weight by about lr whatever the loss
            trainer.train_step()
        encoder, texts = PromptEncoder(trainer.models), ["a house", "a green car", ""]
        with torch.no_grad(), trainer.trainable.strength(0.0):
            frozen = encoder.encode(texts)
        moved = []
        for strength in (1.0, -1.0):
            with torch.no_grad(), trainer.trainable.strength(strength):
                now = encoder.encode(texts)
            moved.append([(now.hidden_states - frozen.hidden_states).pow(2).mean()])
            if name == "sdxl":
                moved[-1].append((now.pooled - frozen.pooled).pow(2).mean())
        changes.append(torch.tensor(moved).amax(dim=0))  # per kind of text, the worse sign
    assert (changes[1] < changes[0] / 10).all(), changes


def test_an_encoder_clip_skip_passes_by_trains_nothing_and_the_other_one_trains(tmp_path, tiny_folders):
    # Tiny SDXL encoders have 2 layers, read at the penultimate one: skipping 2 leaves the first
    # encoder none (full-size SDXL: clip_skip 12). The second still gives the pooled text.
    config = text_encoder_config(tiny_folders["sdxl"], tmp_path, iterations=2)
    config.pretrained_model.clip_skip = 2
    result = train(config, progress=False)
    keys = {key.split(".")[0] for key in read_lora_file(result.path)[0]}
    assert keys and all(key.startswith("lora_te2_") for key in keys)


def test_settings_a_text_encoder_lora_cannot_take_are_refused(tmp_path, tiny_folders):
    config = text_encoder_config(tiny_folders["sd1"], tmp_path, steps_per_forward=2, samples_per_rollout=2)
    with pytest.raises(ConfigError, match=r"train.steps_per_forward: a text-encoder LoRA .* set 1"):
        config.check_combination()
    config = text_encoder_config(tiny_folders["sd1"], tmp_path, method="closed_form")
    with pytest.raises(ConfigError, match=r"train.method: closed_form edits the cross-attention"):
        config.check_combination()
    config = text_encoder_config(tiny_folders["sd1"], tmp_path)
    config.network.type = "c3lier"
    config.network.conv_rank = 2
    assert any("training_method text-encoder never chooses" in note for note in config.unused_settings())


@pytest.mark.parametrize(
    ("family", "clip_skip", "modules"),
    # kohya's counts (SD1.5 72, SD2 138; SDXL 72 + 192) less the layers the UNet never reads: SDXL's
    # first encoder is read at its penultimate layer, and clip skip 2 passes SD1's last layer by.
    [("sd1", None, 72), ("sd1", 2, 66), ("sd2", None, 138), ("sdxl", None, 66 + 192)],
)
def test_full_size_text_encoder_module_counts(family, clip_skip, modules):
    from accelerate import init_empty_weights
    from transformers import CLIPTextConfig, CLIPTextModel

    from leco.models import CONFIG_ROOT, ModelFamily
    from leco.network.text_encoder_lora import trained_layers

    folders = ["text_encoder", "text_encoder_2"] if family == "sdxl" else ["text_encoder"]
    with init_empty_weights():
        encoders = [
            CLIPTextModel(CLIPTextConfig.from_pretrained(CONFIG_ROOT / family / folder)) for folder in folders
        ]
    keys = trained_layers(encoders, ModelFamily(family), clip_skip)
    assert len(keys) == modules
    assert all(key.startswith("lora_te1_" if family == "sdxl" else "lora_te_") for key in list(keys)[:6])
