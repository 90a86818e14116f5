"""A trained token: textual-inversion vectors for a new word, trained as a NEGATIVE embedding.

Only the new token's input vectors are trained (both text encoders on SDXL); the text encoders and
the UNet stay frozen. The prediction for the token's prompt is the one a user puts in the negative
prompt, so its training target is `objectives.as_negative_prompt` of the action's target: sampling
with the embedding as negative prompt at the rollout's guidance then does what the LoRA version of
the same action would do, and prompts it should leave alone (`preserve` entries) keep what an empty
negative prompt gives.

Files: `emb_params` [N, dim] for SD1/SD2, `clip_l` + `clip_g` for SDXL (what A1111, ComfyUI and
kohya read), with ModelSpec metadata marking a negative embedding.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from leco._version import __version__
from leco.conditioning import (
    EMBEDDING_TOKEN,
    Conditioning,
    PromptEncoder,
    negative_with_token,
    words_a_token_spells,
)
from leco.errors import LecoError, warn
from leco.models import LoadedModels
from leco.network import kohya
from leco.objectives import Predictions, as_negative_prompt

SDXL_KEYS = ("clip_l", "clip_g")


class TokenEmbedding:
    """N new vectors per text encoder behind the token `token` (and token_1 ... token_{N-1})."""

    extra_roles = ("target", "empty")  # what `training_target` reads besides the objective's roles

    def __init__(
        self,
        models: LoadedModels,
        token: str,
        vectors: int = 1,
        init_text: str | None = None,
        clip_skip: int | None = None,
        cfg_scale: float = 3.0,
    ) -> None:
        self.models = models
        self.token = token
        self.cfg_scale = cfg_scale
        _warn_if_guidance_barely_acts(cfg_scale)
        self.clip_skip = clip_skip
        self.tokens = [token] + [f"{token}_{i}" for i in range(1, vectors)]  # the diffusers/A1111 convention
        self.vectors: list[nn.Parameter] = []
        self._hooks = []
        for tokenizer, encoder in zip(models.tokenizers, models.text_encoders, strict=True):
            self._check_new(tokenizer)
            if init_text and token in init_text.lower():  # read after the token is added: fresh rows
                raise LecoError(
                    f"network.init_text: {init_text!r} holds the token {token!r} itself, which has no "
                    "vectors yet; give words the model knows (e.g. seven)"
                )
            tokenizer.add_tokens(self.tokens)
            first = tokenizer.convert_tokens_to_ids(self.tokens[0])
            encoder.resize_token_embeddings(len(tokenizer))
            table = encoder.get_input_embeddings()
            start = _initial_vectors(tokenizer, table.weight, init_text, vectors)
            if init_text and not self.vectors:  # once, from the first tokenizer (SDXL's agree on words)
                _warn_about_init_pieces(tokenizer, init_text, vectors)
            table.weight.data[first : first + vectors] = start.to(table.weight.dtype)
            vector = nn.Parameter(start.float().clone())
            self.vectors.append(vector)
            self._hooks.append(table.register_forward_hook(_use_vectors(first, vector)))

    @property
    def prompt(self) -> str:
        """The text that stands for all N vectors."""
        return " ".join(self.tokens)

    # -- the Trainable interface ---------------------------------------------------------------

    def parameters(self) -> list[nn.Parameter]:
        return list(self.vectors)

    def weight_modules(self) -> None:
        return None  # the vectors feed a text encoder shared by every step: one step per backward

    @contextlib.contextmanager
    def strength(self, value: float) -> Iterator[TokenEmbedding]:
        # The UNet is untouched: the embedding acts only where its token is in a prompt.
        yield self

    def encode(self) -> Conditioning:
        """The token prompt through the text encoder(s), with gradients to the vectors."""
        return PromptEncoder(self.models, self.clip_skip).encode([self.prompt])

    def edited_conditions(
        self, texts: list[str], cached: Mapping[str, Conditioning]
    ) -> dict[str, Conditioning]:
        return {text: cached[text] for text in texts}  # the encoders are not trained

    def student_condition(self, target: Conditioning) -> Conditioning:
        return self.encode()

    def negative_condition(self, unconditional: Conditioning) -> Conditioning:
        with torch.no_grad():
            return self.encode()

    def training_target(self, conditional_target: Tensor, frozen: Predictions) -> Tensor:
        return as_negative_prompt(conditional_target, frozen, self.cfg_scale)

    def negative_prompt(self, strength: float, negative: str = "") -> str:
        """What a sampler's negative prompt is at this 'strength' (0: without the embedding)."""
        return negative if strength == 0 else negative_with_token(negative, self.token)

    def text_state_change(self, moments: Tensor, texts: list[str]) -> Tensor:
        return moments.new_zeros(())  # a new token leaves every other prompt's text states as they are

    def state_dict(self) -> dict[str, Tensor]:
        tensors = [v.detach().cpu().float().contiguous().clone() for v in self.vectors]
        if self.models.family.is_sdxl:
            return dict(zip(SDXL_KEYS, tensors, strict=True))
        return {"emb_params": tensors[0]}

    @torch.no_grad()
    def load_state_dict(self, tensors: dict[str, Tensor], source: str = "state dict") -> None:
        expected = self.state_dict()
        if set(tensors) != set(expected):
            raise LecoError(f"{source}: holds {sorted(tensors)}, expected {sorted(expected)} for this model")
        for vector, key in zip(self.vectors, expected, strict=True):
            if tensors[key].shape != vector.shape:
                raise LecoError(
                    f"{source}: {key} has shape {list(tensors[key].shape)}, expected {list(vector.shape)}"
                )
            vector.copy_(tensors[key])

    def save(
        self,
        path: str | Path,
        *,
        dtype: torch.dtype = torch.float32,
        resolution: int,
        title: str | None = None,
        extra_metadata: dict[str, Any] | None = None,
    ) -> Path:
        path = Path(path)
        metadata = kohya.family_metadata(self.models.family, resolution)
        metadata = {k: v for k, v in metadata.items() if k.startswith("modelspec.")}
        metadata["modelspec.architecture"] = metadata["modelspec.architecture"].replace(
            "/lora", "/textual-inversion"
        )
        # kohya's sai_model_spec names Stability's implementation for every embedding, SD1/SD2 too
        metadata["modelspec.implementation"] = kohya.STABILITY_IMPLEMENTATION
        metadata.update(
            {
                "modelspec.title": title or path.stem,
                "modelspec.is_negative_embedding": "True",
                "leco.version": __version__,
                "leco.token": self.token,
                "leco.vectors": str(len(self.tokens)),
            }
        )
        metadata.update(
            {
                k: v if isinstance(v, str) else kohya.json_metadata(v)
                for k, v in (extra_metadata or {}).items()
            }
        )
        tensors = {k: v.to(dtype) for k, v in self.state_dict().items()}
        return kohya.save_lora_file(path, tensors, metadata)

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    # -- checks ---------------------------------------------------------------------------------

    def _check_new(self, tokenizer) -> None:
        # Past the prompt length the tokenizer silently cuts the token short (its start and end
        # tokens take two places): vectors beyond it would train nothing and load as dead weight.
        room = tokenizer.model_max_length - 2
        if len(self.tokens) > room:
            raise LecoError(
                f"network.vectors: {len(self.tokens)} vectors do not fit this model's prompts of "
                f"{tokenizer.model_max_length} tokens; use at most {room}"
            )
        vocabulary = tokenizer.get_vocab()
        for token in self.tokens:
            pieces = tokenizer.tokenize(token)
            if token in vocabulary or (len(pieces) == 1 and pieces[0] in vocabulary):
                raise LecoError(
                    f"network.token: {token!r} is already in this model's vocabulary; choose a new word, "
                    "e.g. <no-seven>"
                )
        token = self.tokens[0]  # lower case (config): CLIP's tokenizer lowercases prompts
        if not re.search(r"[^\W\d_]", token) and not EMBEDDING_TOKEN.fullmatch(token):
            bracketed = f"<{token}>"  # '<>' bracketed is still no word: then the usual example
            example = bracketed if EMBEDDING_TOKEN.fullmatch(bracketed) else "<no-seven>"
            raise LecoError(  # "77" would stand in wherever a prompt writes the number 77
                f"network.token: {token!r} has no letter, so prompts may write it for what it is "
                f"(a number, a sign); choose a new word, e.g. {example}"
            )
        if words := words_a_token_spells(tokenizer, token):
            raise LecoError(
                f"network.token: {token!r} is the word(s) {', '.join(words)} and punctuation, which "
                "prompts write anyway; choose a new word, e.g. <no-seven>"
            )
        # A token is matched wherever it stands, inside words too ("igi" in "digit", as diffusers'
        # tokenizer reads them): it would change every prompt with such a word.
        inside = sorted({word.removesuffix("</w>") for word in vocabulary if token in word} - {token})
        if inside:
            raise LecoError(
                f"network.token: {token!r} occurs inside words the model knows ({', '.join(inside[:3])}), "
                f"where a tokenizer reads it too; choose a token no word contains, e.g. '<{token}>'"
            )


def _initial_vectors(tokenizer, table: Tensor, init_text: str | None, vectors: int) -> Tensor:
    """The init text's token vectors, repeated to N; without one, the vocabulary's mean vector."""
    if init_text:
        ids = tokenizer(init_text, add_special_tokens=False).input_ids
        if not ids:
            raise LecoError(f"network.init_text: {init_text!r} has no tokens; give a word or leave it out")
        rows = table[torch.tensor(ids)].detach()
        return rows[torch.arange(vectors) % len(ids)].clone()
    return table.detach().mean(dim=0, keepdim=True).repeat(vectors, 1)


# How CLIP's tokenizer cuts text before its vocabulary is used: words, single digits, punctuation runs
# (its own pattern, with \p{L} as "a letter"); more tokens than these means a word was split.
_CLIP_WORDS = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|[^\s\w]+")


def _warn_about_init_pieces(tokenizer, init_text: str, vectors: int) -> None:
    """Say so when the init text does not start the vectors as the user reads it: a word the
    vocabulary splits (ink-digits' small vocabulary spells an unknown word letter by letter, whose
    vectors mean nothing), or more tokens than vectors (only the first ones are used)."""
    ids = tokenizer(init_text, add_special_tokens=False).input_ids
    pieces = [piece.removesuffix("</w>") for piece in tokenizer.convert_ids_to_tokens(ids)]
    if len(pieces) > len(_CLIP_WORDS.findall(init_text.lower())):
        warn(
            f"network.init_text: {init_text!r} is {len(pieces)} tokens of this vocabulary "
            f"({' '.join(pieces)}), not one per word; the vectors start from those pieces"
        )
    if len(ids) > vectors:
        room = tokenizer.model_max_length - 2  # what _check_new allows
        advice = (
            f"set vectors: {len(ids)} to use all" if len(ids) <= room else f"a prompt holds at most {room}"
        )
        warn(
            f"network.init_text: {init_text!r} is {len(ids)} tokens but network.vectors is "
            f"{vectors}: only the first {vectors} start the vectors; {advice}"
        )


def _warn_if_guidance_barely_acts(cfg_scale: float) -> None:
    """Near guidance 1 a negative prompt barely acts: to carry an edit it must differ from the empty
    prompt's prediction by s/(s-1) times the edit (leco.objectives.as_negative_prompt), a target so
    far out that the loss grows instead of falling (negative_seven.yaml's first 120 steps: median
    loss 0.004 throughout at guidance 3; at 1.1 from 0.011 to 0.12, single steps up to 8)."""
    if 1 < cfg_scale < 1.5:
        warn(
            f"train.rollout_guidance_scale: {cfg_scale:g} is close to 1, where a negative prompt barely "
            f"acts: the embedding must push {cfg_scale / (cfg_scale - 1):.0f}x as far as the edit itself "
            "(1.5x at guidance 3) and its loss grows instead of falling; train for the guidance it will "
            "be used at, 1.5 or more"
        )


def _use_vectors(first: int, vector: nn.Parameter):
    """A forward hook on the token table: rows of the new ids come from the trained vectors."""

    def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
        ids = inputs[0]
        new = (ids >= first) & (ids < first + len(vector))
        if not new.any():
            return output
        output = output.clone()
        output[new] = vector[ids[new] - first].to(output.dtype)
        return output

    return hook
