"""anchors: auto: prompts the model knows, without the edited concept's words."""

from pathlib import Path

import pytest
import torch

from leco.conditioning import Conditioning, predict
from leco.config import AnchorConfig, LecoConfig, NetworkConfig, PromptSettings
from leco.ink_digits import model_path
from leco.models import load_models
from leco.network import LoRANetwork
from leco.preservation import (
    GENERIC_PROMPTS,
    anchor_prompts,
    concept_words,
    known_prompts,
    text_state_moments,
)
from leco.prompts import encode_texts
from leco.trainer import Trainer


def test_the_bundled_model_lists_its_own_captions_and_others_get_everyday_prompts(tmp_path):
    own = known_prompts(model_path("ink-digits"))
    assert "a digit seven in red ink" in own and "the number 7" in own and len(own) == len(set(own))
    assert known_prompts(tmp_path) == known_prompts(tmp_path / "missing") != own
    assert len(known_prompts(tmp_path)) > 100 and GENERIC_PROMPTS.is_file()
    (tmp_path / "prompts.txt").write_text("# comment\na cat\n\na dog\n")
    assert known_prompts(tmp_path) == ["a cat", "a dog"]


def test_an_erased_digit_leaves_out_its_word_but_keeps_words_every_digit_shares():
    candidates = known_prompts(model_path("ink-digits"))
    erase = [PromptSettings(target="a digit seven")]
    assert concept_words(erase, candidates) == {"seven"}  # "a" and "digit" are in most prompts
    kept = anchor_prompts(AnchorConfig(prompts="auto", exclude=["7"]), erase, model_path("ink-digits"))
    assert "a digit three in red ink" in kept and "the number 4" in kept and "red ink" in kept
    assert not [p for p in kept if "seven" in p or "7" in p.split(", ")[0].split()]


# a red (+1) / blue (-1) slider of fives: its target is its context, not a concept it edits
RED_BLUE_SLIDER = PromptSettings(
    target="a digit five",
    positive="a digit five in red ink",
    unconditional="a digit five in blue ink",
    neutral="a digit five",
    action="enhance",
)


def test_paraphrase_contexts_are_not_the_concept_and_slider_poles_are_kept():
    candidates = known_prompts(model_path("ink-digits"))
    paraphrases = [PromptSettings(target=["a digit seven in red ink", "a digit seven in blue ink"])]
    assert concept_words(paraphrases, candidates) == {"seven"}  # red and blue are context
    kept = anchor_prompts(AnchorConfig(prompts="auto"), [RED_BLUE_SLIDER], model_path("ink-digits"))
    assert "a digit five" not in kept  # the slider's own target is not an anchor
    assert "a digit five in green ink" in kept and "red ink" in kept and "a digit three" in kept


def test_paraphrases_sharing_no_word_still_leave_out_every_prompt_that_holds_one_of_them():
    # "a digit seven" and "the number 7" share no word: the words rule finds nothing, the phrases do
    paraphrases = [PromptSettings(target=["a digit seven", "the number 7"])]
    assert concept_words(paraphrases, known_prompts(model_path("ink-digits"))) == set()
    kept = anchor_prompts(AnchorConfig(prompts="auto"), paraphrases, model_path("ink-digits"))
    assert not [p for p in kept if "a digit seven" in p or "the number 7 " in p + " "], kept
    assert "a digit three in red ink" in kept and "the number 4 written in blue" in kept
    assert "the number 3" in kept  # a phrase is whole words: "the number 7" is not in "the number 70"
    everything = known_prompts(model_path("ink-digits"))
    for common in ("ink", "a digit"):  # a target of words most prompts hold bans nothing by itself
        kept = anchor_prompts(
            AnchorConfig(prompts="auto"), [PromptSettings(target=common)], model_path("ink-digits")
        )
        assert len(kept) == len(everything) - (common in everything)  # the target itself is no anchor


def test_count_draws_the_same_prompts_every_time(tmp_path: Path):
    config = AnchorConfig(prompts="auto", count=7)
    erase = [PromptSettings(target="a photo of a dog")]
    first, second = anchor_prompts(config, erase, tmp_path), anchor_prompts(config, erase, tmp_path)
    assert first == second and len(first) == 7 and not any("dog" in p for p in first)
    listed = AnchorConfig(prompts=["a cat", "a dog"])
    assert anchor_prompts(listed, erase, tmp_path) == ["a cat", "a dog"]  # lists are used as written


def test_an_anchor_that_is_an_edited_prompt_is_named(tmp_path: Path, capsys):
    # erase_red.yaml copied for green, its anchor list left as it was
    erase = [PromptSettings(target=["green ink", "a digit in green ink"])]
    listed = AnchorConfig(prompts=["red ink", "Green ink", "blue ink"])
    assert anchor_prompts(listed, erase, tmp_path) == ["red ink", "Green ink", "blue ink"]
    warning = capsys.readouterr().err
    assert "anchors.prompts: 'Green ink' is a prompt that prompts entry 1 edits" in warning
    assert "red ink" not in warning


def test_a_listed_anchor_holding_an_erased_concept_is_named_and_a_sliders_context_is_not(capsys):
    erase = [PromptSettings(target=["a digit seven", "the number 7"])]
    listed = AnchorConfig(
        prompts=["a digit seven in red ink", "the number 70", "A  digit  SEVEN", "a digit two"]
    )
    assert anchor_prompts(listed, erase, model_path("ink-digits")) == listed.prompts  # used as written
    warning = capsys.readouterr().err
    assert (
        "anchors.prompts: 'a digit seven in red ink' holds 'a digit seven', which prompts entry 1 erases"
        in warning
    )
    assert "'the number 70' holds" not in warning and "'a digit two'" not in warning  # whole words only
    assert warning.count("A  digit  SEVEN") == 1  # an edited prompt itself: named once, as one
    anchor_prompts(
        AnchorConfig(prompts=["a digit five in green ink"]), [RED_BLUE_SLIDER], model_path("ink-digits")
    )
    assert "holds" not in capsys.readouterr().err  # a slider's target is its context, not its concept


def test_text_state_change_is_the_change_of_keys_and_values_over_the_anchor_tokens(tiny_folders):
    models = load_models(str(tiny_folders["sd1"]))
    network = LoRANetwork.create(models.unet, models.family, NetworkConfig(training_method="xattn"))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    dim = models.unet.config.cross_attention_dim
    anchors = [Conditioning(torch.randn(1, 6, dim, generator=generator)) for _ in range(3)]
    moments = text_state_moments(anchors)
    states = torch.cat([a.hidden_states[0] for a in anchors])
    direct = []
    with torch.no_grad():
        for name, layer in network.layers.items():
            if name.endswith((".attn2.to_k", ".attn2.to_v")):
                base = layer.base_layer(states)
                direct.append((layer(states) - base).square().sum() / base.square().sum())
        assert len(direct) > 0 and len(direct) < len(network.layers)  # q and out do not read text
        torch.testing.assert_close(
            network.text_state_change(moments, []), torch.stack(direct).mean(), rtol=1e-4, atol=0
        )
        with network.strength(0.0):  # the change is the trained edit's, whatever strength is applied
            torch.testing.assert_close(
                network.text_state_change(moments, []), torch.stack(direct).mean(), rtol=1e-4, atol=0
            )


def _anchor_run(out: Path, text_weight: float) -> LecoConfig:
    anchors = {
        "prompts": ["a digit three in red ink", "the number 4"],
        "per_step": 0,
        "text_weight": text_weight,
    }
    return LecoConfig.model_validate(
        {
            "pretrained_model": {"name_or_path": "ink-digits"},
            "network": {"type": "lierla", "rank": 2, "training_method": "xattn-strict"},
            "prompts": [{"target": "a digit seven", "guidance_scale": 3.0}],
            "anchors": anchors if text_weight else {},
            "train": {"precision": "fp32", "iterations": 12, "seed": 1, "max_denoising_steps": 6, "lr": 3e-2},
            "save": {"path": str(out), "name": f"w{text_weight:g}", "per_steps": 100},
        }
    )


def test_text_weight_keeps_the_anchors_predictions_and_still_edits_the_target(tmp_path):
    """A key/value LoRA that leaves the anchors' text states alone leaves their predictions alone."""
    moved = {}
    for weight in (0.0, 1.0):
        trainer = Trainer(_anchor_run(tmp_path, weight), progress=False)
        for _ in range(12):
            trainer.train_step()
        generator = torch.Generator().manual_seed(5)
        latents = torch.randn(2, 4, 8, 8, generator=generator)
        timesteps = torch.tensor([700, 200])
        moved[weight] = {}
        with torch.no_grad():
            for text in ("a digit seven", "a digit three in red ink"):
                embeds = encode_texts(trainer.models, [text], None, trainer.device)[text]
                cond = trainer.edited.condition(embeds, 2, (64, 64), (0, 0))
                edited = predict(trainer.unet, latents, timesteps, cond)
                with trainer.trainable.strength(0.0):
                    original = predict(trainer.unet, latents, timesteps, cond)
                moved[weight][text] = (edited - original).abs().mean().item()
    kept, target = "a digit three in red ink", "a digit seven"
    assert moved[0.0][kept] > moved[0.0][target] / 10  # without it the anchor moves along
    assert moved[1.0][kept] < moved[0.0][kept] / 5
    assert moved[1.0][target] > moved[0.0][target] / 4  # the target is still edited
    assert moved[1.0][target] > 20 * moved[1.0][kept]


def test_text_anchors_cover_anchors_on_their_own_rollouts_too(tmp_path):
    for rollouts in (False, True):
        config = _anchor_run(tmp_path / str(rollouts), 1.0)
        config.anchors.rollouts, config.anchors.per_step = rollouts, 1
        trainer = Trainer(config, progress=False)
        assert trainer.text_anchors is not None and trainer.text_anchors.weight == 1.0
        expected = text_state_moments(
            [
                encode_texts(trainer.models, [text], None, trainer.device)[text]
                for text in config.anchors.prompts
            ]
        )
        torch.testing.assert_close(trainer.text_anchors.moments, expected)
        assert bool(trainer.anchors) != rollouts  # riding along, or an entry of their own
    config.anchors.text_weight = 0.0
    assert Trainer(config, progress=False, overwrite=True).text_anchors is None


def test_exclude_takes_phrases_and_a_filter_that_leaves_nothing_is_an_error():
    from leco.errors import LecoError

    folder, seven = model_path("ink-digits"), [PromptSettings(target="a digit seven")]
    every = anchor_prompts(AnchorConfig(prompts="auto"), seven, folder)
    phrase = anchor_prompts(AnchorConfig(prompts="auto", exclude=["the number 7"]), seven, folder)
    assert set(every) - set(phrase) == {p for p in every if "the number 7" in p} and len(phrase) < len(every)
    # written as CLIP reads it: in any case and spacing
    assert anchor_prompts(AnchorConfig(prompts="auto", exclude=["The  number 7 "]), seven, folder) == phrase
    with pytest.raises(LecoError, match="anchors.prompts: auto left no prompt to keep"):
        anchor_prompts(AnchorConfig(prompts="auto", exclude=["digit", "number", "ink"]), seven, folder)
