"""Keep everything else without listing it: prompts the model knows, minus the edited concept's words.

`anchors: {prompts: auto}` draws its anchor prompts from what the model knows: the `prompts.txt`
beside the model (one prompt a line; the bundled models ship one listing their captions), else a
list of everyday prompts that ships with leco. Prompts that contain a word of an edited concept
are left out: the entries' own targets and prompts holding one of them whole (a slider's target,
which its neutral prompt repeats, excepted), the words named in `anchors.exclude`, and the words every
target of an erase or enhance entry shares and its neutral prompt lacks, except function words and
words so common among the candidates (in more than a third of them) that they cannot be what the
concept is about.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from leco.conditioning import Conditioning
from leco.config import AnchorConfig, LecoConfig, PromptSettings, as_read
from leco.errors import LecoError, warn

if TYPE_CHECKING:
    from leco.trainable import Trainable

GENERIC_PROMPTS = Path(__file__).parent / "data" / "everyday_prompts.txt"
KNOWN_PROMPTS_FILE = "prompts.txt"
COMMON_SHARE = 1 / 3
# Words that never name a concept on their own.
FUNCTION_WORDS = frozenset(
    ["a", "an", "the", "of", "in", "on", "at", "with", "and", "or", "by", "for", "to", "from", "into"]
    + ["over", "under", "near", "its", "his", "her", "their", "this", "that", "written", "style"]
)


def known_prompts(model_folder: str | Path) -> list[str]:
    """The model's own prompt list if it has one, else leco's everyday prompts."""
    folder = Path(model_folder)
    own = folder / KNOWN_PROMPTS_FILE if folder.is_dir() else None
    source = own if own is not None and own.is_file() else GENERIC_PROMPTS
    lines = (line.strip() for line in source.read_text(encoding="utf-8").splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def words(text: str) -> set[str]:
    return set(re.findall(r"[\w']+", text.lower()))


def concept_words(prompts: list[PromptSettings], candidates: list[str]) -> set[str]:
    """Words the edited entries add to their neutral prompt, unless most prompts share them."""
    added: set[str] = set()
    for entry in prompts:
        if entry.action not in ("erase", "enhance", "imitate"):
            continue
        # Words every target of the entry shares: its paraphrases' other words (an ink, a setting) are
        # context, not the concept. A slider's poles (positive, unconditional) are not its concept:
        # "a digit five" -> red/blue keeps every red and blue prompt as an anchor.
        shared = set.intersection(*(words(t) for t in entry.targets))
        neutral = set.union(*(words(entry.role_text("neutral", i)) for i in range(len(entry.targets))))
        added |= shared - neutral
    added -= FUNCTION_WORDS
    counts = {word: sum(word in words(c) for c in candidates) for word in added}
    return {word for word, count in counts.items() if count <= COMMON_SHARE * max(len(candidates), 1)}


def concept_phrases(prompts: list[PromptSettings], candidates: list[str]) -> set[str]:
    """The edited entries' targets that name something their neutral prompt lacks: a prompt holding
    one whole ("a digit seven in red ink" holds "a digit seven") is that concept, even where a list
    of paraphrases ("a digit seven", "the number 7") shares no word for concept_words to find. Not
    a target made only of words too common to be a concept ("a digit", "ink"), as concept_words."""
    common = _common_words(candidates)
    phrases = set()
    for entry in prompts:
        if entry.action not in ("erase", "enhance", "imitate"):
            continue
        for i, target in enumerate(entry.targets):
            added = words(target) - words(entry.role_text("neutral", i)) - FUNCTION_WORDS
            if added - common:
                phrases.add(target.strip().lower())
    return phrases


def _common_words(candidates: list[str]) -> set[str]:
    counts: dict[str, int] = {}
    for candidate in candidates:
        for word in words(candidate):
            counts[word] = counts.get(word, 0) + 1
    return {word for word, count in counts.items() if count > COMMON_SHARE * max(len(candidates), 1)}


def _as_phrase(text: str) -> re.Pattern[str]:
    """`text` as whole words ("a digit seven" is not in "a digit sevens"), in any case and spacing."""
    body = r"\s+".join(re.escape(part) for part in text.split())
    return re.compile(rf"(?<![\w']){body}(?![\w'])", re.IGNORECASE)


def anchor_prompts(
    anchors: AnchorConfig, prompts: list[PromptSettings], model_folder: str | Path
) -> list[str]:
    """The anchor prompts a run uses: as listed, or drawn from what the model knows (`auto`)."""
    for number, entry in enumerate(prompts, start=1):
        if entry.action == "preserve":
            _warn_of_edited_anchors(entry.targets, prompts, f"prompts entry {number} (preserve)")
    if anchors.prompts != "auto":
        _warn_of_edited_anchors(anchors.prompts, prompts, "anchors.prompts")
        _warn_of_anchors_holding_concepts(anchors.prompts, prompts, known_prompts(model_folder))
        return list(anchors.prompts)
    candidates = known_prompts(model_folder)
    excluded = [as_read(text) for text in anchors.exclude or []]  # "The  number 3" is "the number 3"
    # A word leaves out every prompt holding it; anything else ("the number 7", "7,") where it occurs.
    phrases = [text for text in excluded if not re.fullmatch(r"[\w']+", text)]
    banned = {text for text in excluded if text not in phrases} | concept_words(prompts, candidates)
    targets = {as_read(t) for entry in prompts for t in entry.targets}
    within = [_as_phrase(t) for t in concept_phrases(prompts, candidates)]
    kept = [
        c
        for c in candidates
        if not words(c) & banned
        and not any(p in as_read(c) for p in phrases)
        and as_read(c) not in targets
        and not any(phrase.search(c) for phrase in within)
    ]
    if not kept:
        raise LecoError(
            "anchors.prompts: auto left no prompt to keep (every known prompt holds an edited or excluded "
            "word); exclude fewer words, or list the anchor prompts yourself"
        )
    if anchors.count is not None and anchors.count < len(kept):
        generator = torch.Generator().manual_seed(0)  # the same draw every time: resumable runs
        kept = [
            kept[i] for i in sorted(torch.randperm(len(kept), generator=generator)[: anchors.count].tolist())
        ]
    return kept


def _warn_of_edited_anchors(anchors: list[str], prompts: list[PromptSettings], where: str) -> None:
    """An anchor (or preserved prompt) that is an edited prompt (a config copied for another concept)
    pulls against the edit."""
    edited = {}
    for number, entry in enumerate(prompts, start=1):
        if entry.action != "preserve":
            for index, target in enumerate(entry.targets):
                for text in (target, entry.role_text("positive", index)):
                    edited.setdefault(as_read(text), number)
    for anchor in anchors:
        number = edited.get(as_read(anchor))
        if number is not None:
            warn(
                f"{where}: {anchor!r} is a prompt that prompts entry {number} edits; kept as the model "
                f"draws it, it pulls against the edit: remove it from {where}"
            )


def _warn_of_anchors_holding_concepts(
    anchors: list[str], prompts: list[PromptSettings], known: list[str]
) -> None:
    """A listed anchor that holds an edited concept whole ("a digit seven in red ink" while "a digit
    seven" is erased) keeps the concept there: what `auto` leaves out, said when the user lists it."""
    edited = {as_read(text) for entry in prompts for text in entry.targets}
    phrases = sorted(concept_phrases(prompts, known))
    for anchor in anchors:
        held = next((p for p in phrases if _as_phrase(p).search(anchor)), None)
        if held is not None and as_read(anchor) not in edited:  # an edited prompt itself: said above
            number = next(
                n for n, e in enumerate(prompts, 1) if held in {t.strip().lower() for t in e.targets}
            )
            action = prompts[number - 1].action
            warn(
                f"anchors.prompts: {anchor!r} holds {held!r}, which prompts entry {number} {action}s; kept "
                "as the model draws it, it holds the edit back wherever prompts read like it (anchors: "
                "auto leaves such prompts out); remove it unless that is meant"
            )


def entries_and_anchors(config: LecoConfig, anchors: list[str]) -> tuple[list[PromptSettings], list[str]]:
    """The prompt entries to train, and which of the run's anchor prompts ride along at their latents.

    With `anchors.rollouts` (and always for a negative embedding) the anchors become one more
    entry, `action: preserve`, with rollouts of its own, and none ride along.
    """
    if anchors and (config.anchors.rollouts or config.network.type == "embedding"):
        entry = PromptSettings(target=anchors, action="preserve", weight=config.anchors.weight)
        return [*config.prompts, entry], []
    return list(config.prompts), anchors


def text_state_moments(anchors: list[Conditioning]) -> torch.Tensor:
    """Mean of x xᵀ over every token state of every anchor: all `anchors.text_weight` needs of them."""
    states = torch.cat([anchor.hidden_states.flatten(0, -2) for anchor in anchors]).float()
    return states.T @ states / len(states)


TEXTS_PER_STEP = 64  # anchors a text-encoder LoRA reads per step for anchors.text_weight


@dataclass
class TextAnchors:
    """`anchors.text_weight`: the anchors are kept through their text. A LoRA on the cross-attention
    keys and values changes a prompt's prediction only through what it makes of the prompt's token
    states, so keeping those for every anchor token keeps the anchors at every latent at once; a
    LoRA on the text encoder keeps the anchors' text states themselves."""

    moments: torch.Tensor
    weight: float
    texts: list[str]

    @classmethod
    def of_run(
        cls, config: LecoConfig, anchors: list[str], embeddings: dict[str, Conditioning]
    ) -> TextAnchors | None:
        """The run's anchor prompts (whether they ride along or have rollouts of their own), kept."""
        if config.anchors.text_weight == 0 or not anchors:
            return None
        moments = text_state_moments([embeddings[text] for text in anchors])
        return cls(moments, config.anchors.text_weight, list(anchors))

    def loss(self, trainable: Trainable, step: int) -> torch.Tensor:
        return self.weight * trainable.text_state_change(self.moments, self.texts_at(step))

    def texts_at(self, step: int) -> list[str]:
        """The anchor texts read at this step: all of them for a key/value LoRA (their moments
        stand for them), a window that turns with the step for a text-encoder LoRA, which reads each
        through the encoders with gradients (every anchor at once would hold activations of the
        whole prompt list per step: gigabytes on SDXL). By the step, so a resumed run reads the same."""
        if len(self.texts) <= TEXTS_PER_STEP:
            return self.texts
        start = step * TEXTS_PER_STEP % len(self.texts)
        return (self.texts + self.texts)[start : start + TEXTS_PER_STEP]


def draw_anchors(prompts: list[str], per_step: int, generator: torch.Generator) -> list[str]:
    """The anchors that ride along with one step's samples."""
    count = min(per_step, len(prompts))
    if count == 0:
        return []
    return [prompts[i] for i in torch.randperm(len(prompts), generator=generator)[:count]]
