"""anchors: auto: prompts the model knows, without the edited concept's words."""

from pathlib import Path

from leco.config import AnchorConfig, PromptSettings
from leco.ink_digits import model_path
from leco.preservation import GENERIC_PROMPTS, anchor_prompts, concept_words, known_prompts


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


def test_paraphrase_contexts_are_not_the_concept_and_slider_poles_are_kept():
    candidates = known_prompts(model_path("ink-digits"))
    paraphrases = [PromptSettings(target=["a digit seven in red ink", "a digit seven in blue ink"])]
    assert concept_words(paraphrases, candidates) == {"seven"}  # red and blue are context
    slider = PromptSettings(
        target="a digit five",
        positive="a digit five in red ink",
        unconditional="a digit five in blue ink",
        neutral="a digit five",
        action="enhance",
    )
    kept = anchor_prompts(AnchorConfig(prompts="auto"), [slider], model_path("ink-digits"))
    assert "a digit five" not in kept  # the slider's own target is not an anchor
    assert "a digit five in green ink" in kept and "red ink" in kept and "a digit three" in kept


def test_count_draws_the_same_prompts_every_time(tmp_path: Path):
    config = AnchorConfig(prompts="auto", count=7)
    erase = [PromptSettings(target="a photo of a dog")]
    first, second = anchor_prompts(config, erase, tmp_path), anchor_prompts(config, erase, tmp_path)
    assert first == second and len(first) == 7 and not any("dog" in p for p in first)
    listed = AnchorConfig(prompts=["a cat", "a dog"])
    assert anchor_prompts(listed, erase, tmp_path) == ["a cat", "a dog"]  # lists are used as written
