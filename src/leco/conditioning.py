"""Prompt embeddings and the extra inputs each family's UNet takes, and the one UNet call."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from leco.errors import LecoError, warn
from leco.models import LoadedModels


@dataclass
class Conditioning:
    """A batch of UNet conditions: text states, plus SDXL's pooled text and size ids."""

    hidden_states: Tensor
    pooled: Tensor | None = None
    time_ids: Tensor | None = None

    def __len__(self) -> int:
        return self.hidden_states.shape[0]

    def repeat(self, times: int) -> Conditioning:
        """Each row `times` times in a row (row i becomes rows i*times ... i*times+times-1)."""
        return Conditioning(
            *(None if t is None else t.repeat_interleave(times, dim=0) for t in self._tensors())
        )

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Conditioning:
        return Conditioning(
            *(None if t is None else t.to(device=device, dtype=dtype) for t in self._tensors())
        )

    def row(self, index: int) -> Conditioning:
        """Row `index` alone, as a batch of one."""
        return Conditioning(*(None if t is None else t[index : index + 1] for t in self._tensors()))

    def with_time_ids(self, time_ids: Tensor) -> Conditioning:
        return replace(self, time_ids=time_ids.expand(len(self), -1).to(self.hidden_states))

    @staticmethod
    def cat(parts: list[Conditioning]) -> Conditioning:
        fields = zip(*(p._tensors() for p in parts), strict=True)
        return Conditioning(*(None if f[0] is None else torch.cat(f) for f in fields))

    def _tensors(self) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        return self.hidden_states, self.pooled, self.time_ids


def predict(unet: torch.nn.Module, latents: Tensor, timesteps: Tensor, cond: Conditioning) -> Tensor:
    """One UNet call: noise (or v) prediction for a batch of latents at their timesteps."""
    added = None
    if cond.pooled is not None:
        added = {"text_embeds": cond.pooled, "time_ids": cond.time_ids}
    return unet(latents, timesteps, encoder_hidden_states=cond.hidden_states, added_cond_kwargs=added).sample


def conditioning_for(
    embeds: Conditioning, batch: int, size: tuple[int, int], crop: tuple[int, int], sdxl: bool
) -> Conditioning:
    """Each prompt row repeated over the batch; SDXL also gets its size ids (image size in pixels)."""
    cond = embeds.repeat(batch)
    if sdxl:
        cond = cond.with_time_ids(sdxl_time_ids(*size, *crop))
    return cond


def sdxl_time_ids(height: int, width: int, crop_top: int = 0, crop_left: int = 0) -> Tensor:
    """SDXL's micro-conditioning: original size, crop corner, target size, all in pixels."""
    return torch.tensor([[height, width, crop_top, crop_left, height, width]], dtype=torch.float32)


class PromptEncoder:
    """Turns prompt strings into `Conditioning` the way each family was trained.

    `clip_skip` follows A1111/kohya: 1 = last layer, 2 = penultimate layer (+ final layer norm).
    SDXL always uses the penultimate layers of both encoders and the second one's pooled output.
    """

    def __init__(
        self, models: LoadedModels, clip_skip: int | None = None, key: str = "pretrained_model.clip_skip"
    ) -> None:
        self.models = models
        self.clip_skip = checked_clip_skip(models, clip_skip, key)

    def encode(self, prompts: list[str]) -> Conditioning:
        """Runs with gradients where the caller allows them (a trained embedding needs them)."""
        models = self.models
        return encode_text(models.tokenizers, models.text_encoders, prompts, self.clip_skip)


def encode_text(
    tokenizers: Sequence[Any], encoders: Sequence[torch.nn.Module], prompts: list[str], clip_skip: int
) -> Conditioning:
    """The UNet's conditions for `prompts` at A1111's clip skip (1: as the model reads them); two
    encoders: SDXL, whose second one also gives the pooled text.

    Not the pipelines' `encode_prompt`: training encodes without a pipeline, with gradients (a
    trained token's vectors, a text-encoder LoRA), and its `clip_skip` counts from A1111's minus
    one (its 1 is A1111's 2)."""
    if len(encoders) == 1:
        return Conditioning(sd_text_states(tokenizers[0], encoders[0], prompts, clip_skip))
    states, pooled = [], None
    for tokenizer, encoder in zip(tokenizers, encoders, strict=True):
        out = encoder(_token_ids(tokenizer, prompts, encoder), output_hidden_states=True)
        states.append(out.hidden_states[-1 - clip_skip])  # SDXL reads the penultimate layer at 1
        pooled = out[0]  # the projected pooled text of the second encoder is what SDXL uses
    return Conditioning(torch.cat(states, dim=-1), pooled=pooled)


def checked_clip_skip(models: LoadedModels, clip_skip: int | None, key: str) -> int:
    """`clip_skip` (unset: 1), or LecoError naming `key` where it skips past every layer."""
    clip_skip = clip_skip or 1
    layers = min(encoder.config.num_hidden_layers for encoder in models.text_encoders)
    if clip_skip > layers:  # the Nth layer from the end must be a layer
        raise LecoError(
            f"{key}: {clip_skip} skips past the {layers} text-encoder layers of "
            f"{models.source}; use 1 to {layers} ("
            + (
                "1 is already the penultimate layer on SDXL)"
                if models.family.is_sdxl
                else "2: the penultimate layer, as A1111's clip skip 2)"
            )
        )
    return clip_skip


def layers_read(text_encoders: Sequence[torch.nn.Module], sdxl: bool, clip_skip: int | None) -> list[int]:
    """How many transformer layers of each encoder reach the conditioning as PromptEncoder reads
    it; the later ones are skipped (clip skip, SDXL's penultimate layer), except by the pooled
    text SDXL takes from the second encoder's last layer."""
    skip, counts = clip_skip or 1, []
    for index, encoder in enumerate(text_encoders):
        layers = encoder.config.num_hidden_layers
        if not sdxl:
            counts.append(layers - skip + 1)
        else:
            pooled = index == len(text_encoders) - 1
            counts.append(layers if pooled else layers - skip)
    return counts


def sd_text_states(tokenizer: Any, encoder: torch.nn.Module, prompts: list[str], clip_skip: int) -> Tensor:
    """SD1/SD2 text states at A1111's clip skip (1: the last layer's output)."""
    ids = _token_ids(tokenizer, prompts, encoder)
    if clip_skip == 1:
        return encoder(ids)[0]
    hidden = encoder(ids, output_hidden_states=True).hidden_states[-clip_skip]
    return _final_layer_norm(encoder)(hidden)


def _token_ids(tokenizer, prompts: list[str], encoder: torch.nn.Module) -> Tensor:
    tokens = tokenizer(
        prompts,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    return tokens.input_ids.to(next(encoder.parameters()).device)


def _final_layer_norm(encoder: torch.nn.Module) -> torch.nn.Module:
    # transformers >= 5.6 flattened CLIPTextModel; CLIPTextModelWithProjection keeps `text_model`.
    return getattr(encoder, "text_model", encoder).final_layer_norm


# A1111's prompt syntax, which diffusers (and so leco) reads as plain words: a LoRA tag, and a weight
# or doubled brackets for emphasis. A prompt pasted from A1111 is otherwise read without a word.
A1111_SYNTAX = (
    (
        re.compile(r"<(lora|lyco|hypernet):[^>]*>", re.IGNORECASE),
        "an A1111 LoRA tag, which leco reads as words (give a LoRA file with --lora)",
    ),
    (
        re.compile(r"\([^()]*[^\W\d_][^()]*:\s*[-+]?(\d+\.?\d*|\.\d+)\s*\)"),  # a word, not (16:9)
        "A1111's emphasis; leco reads the brackets and the weight as words",
    ),
    (re.compile(r"\(\(|\[\["), "A1111's emphasis; leco reads the brackets as words"),
)


# Training loads no embeddings: a <token> in its prompts stays the pieces of its spelling.
NO_EMBEDDINGS_IN_TRAINING = "training loads no embeddings; write out what it stands for"


def warn_if_misread(
    models: LoadedModels,
    texts: Sequence[str],
    where: str = "prompt",
    expand: Callable[[str], str] | None = None,
    embedding_hint: str = "if it is an embedding's, load its file with --embedding FILE",
) -> None:
    """Name the prompts that are not read as written: those the tokenizer cuts short (the words
    past its length are never read) and those in A1111's syntax (read as plain words).

    `expand`: the text as the pipeline tokenizes it (diffusers spells a token of N vectors as N
    tokens), when that differs."""
    texts = [text for text in dict.fromkeys(texts) if text]
    if not texts:
        return
    _warn_of_a1111_syntax(texts, where)
    tokenizer = models.tokenizers[0]
    _warn_of_unknown_tokens(texts, where, tokenizer.get_vocab(), embedding_hint)
    limit = tokenizer.model_max_length
    read = [expand(text) for text in texts] if expand else texts
    # One batched call: a 100,000-line target_file took 4 s prompt by prompt.
    long = [text for text, ids in zip(texts, tokenizer(read).input_ids, strict=True) if len(ids) > limit]
    example = long[0][:40] if long else ""
    if len(long) == 1:
        warn(f"{where} {example!r}... is longer than {limit} tokens and is cut there")
    elif long:
        warn(f"{len(long)} {where}s are longer than {limit} tokens and are cut there, e.g. {example!r}...")


def words_a_token_spells(tokenizer: Any, token: str) -> list[str]:
    """The known words a new token is made of ("digit seven", "seven."), or [] for a word of its
    own. Such a token would stand in for those words wherever a prompt writes them that way."""
    vocabulary = tokenizer.get_vocab()
    words = [word.strip(".,;:!?\"'") for word in token.split()]
    if not all(words) or (len(words) == 1 and words[0] == token):  # one word: the vocabulary check's
        return []
    single = [tokenizer.tokenize(word) for word in words]
    known = all(len(pieces) == 1 and pieces[0] in vocabulary for pieces in single)
    return words if known else []


def negative_with_token(negative_prompt: str, token: str) -> str:
    """A negative prompt with a negative embedding's token added, as A1111 users write it
    ("blurry, <no-seven>"): training previews and eval add it alike."""
    return f"{negative_prompt.strip()}, {token}" if negative_prompt.strip() else token


# An embedding's token as users write it: <name> (A1111's and our own spelling), not a <lora:...> tag,
# with what a token given on the command line may add after it (<no-seven>_1).
EMBEDDING_TOKEN = re.compile(r"<[^<>:|\s]+>[\w-]*")


def _warn_of_unknown_tokens(texts: Sequence[str], where: str, vocabulary: dict[str, int], hint: str) -> None:
    """An embedding's <token> that no loaded embedding adds is read as the pieces of its spelling."""
    found = [
        (text, token)
        for text in texts
        for token in EMBEDDING_TOKEN.findall(text)
        # "<sks>-style": the tokenizer reads the loaded "<sks>" and then the rest
        if token.lower() not in vocabulary and token[: token.index(">") + 1].lower() not in vocabulary
    ]
    if found:
        text, token = found[0]
        more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
        warn(
            f"{where} {text[:60]!r}: {token!r}{more} is no token this model knows and is read as words; "
            f"{hint}"
        )


def _warn_of_a1111_syntax(texts: Sequence[str], where: str) -> None:
    for pattern, meaning in A1111_SYNTAX:
        found = [(text, match.group(0)) for text in texts if (match := pattern.search(text))]
        if found:
            text, written = found[0]
            more = f" (and {len(found) - 1} more {where}s)" if len(found) > 1 else ""
            warn(f"{where} {text[:60]!r}{more}: {written!r} is {meaning}")
