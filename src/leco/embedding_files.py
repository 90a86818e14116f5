"""Embedding files (textual inversion, e.g. a negative embedding): read, checked against the
pipeline's text encoders, and their tokens loaded for sampling."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from diffusers import DiffusionPipeline

from leco.conditioning import words_a_token_spells
from leco.config import word_around
from leco.errors import LecoError, check_list, first_line, warn
from leco.files import load_torch_file
from leco.models import quiet_library_logs
from leco.network import kohya

A1111_KEY = "string_to_param"  # an A1111 file's one vector set, whatever its own key
# Key parts of every LoRA layout diffusers loads (kohya, diffusers/peft, older diffusers).
LORA_KEY_MARKERS = ("lora_down", "lora_up", "lora_A", "lora_B", "lora.down", "lora.up", "lora_linear_layer")


def has_lora_keys(keys: Iterable[str]) -> bool:
    """Whether any key names a LoRA layer, in any layout diffusers loads."""
    return any(marker in key for key in keys for marker in LORA_KEY_MARKERS)


def is_embedding_file(path: str | Path) -> bool:
    """Whether `path` is a readable textual-inversion file: .safetensors, or A1111's .pt / .bin."""
    path = Path(path)
    if path.suffix.lower() not in (".safetensors", ".pt", ".bin") or not path.is_file():
        return False
    if path.suffix.lower() != ".safetensors":
        try:  # an embedding is a few KB; anything read_embedding refuses (a LoRA .pt) is none
            return path.stat().st_size < 16 * 2**20 and bool(read_embedding(path))
        except (LecoError, OSError):
            return False
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as file:
            shapes = {key: file.get_slice(key).get_shape() for key in file.keys()}  # noqa: SIM118
            return kohya.is_embedding(list(shapes)) or kohya.is_one_token_embedding(shapes)
    except (SafetensorError, OSError):
        return False  # read_lora_header names the damage


@dataclass(frozen=True)
class Embedding:
    """A textual-inversion file's vectors: one [N, width] tensor per text encoder (SDXL: clip_l, clip_g)."""

    path: Path
    token: str
    vectors: tuple[torch.Tensor, ...]
    option: str = "--embedding"  # how the user gave it, for messages (eval judges one given as --lora)
    # What diffusers calls a one-key file ({token: vector}): its key. A1111 and ComfyUI name an
    # embedding by its file; a prompt written for either works.
    other_names: tuple[str, ...] = ()

    @property
    def tokens(self) -> list[str]:
        """The token and the ones diffusers adds for vectors 2..N (token_1, token_2, ...)."""
        return [self.token] + [f"{self.token}_{i}" for i in range(1, len(self.vectors[0]))]


def parse_embedding_option(option: str | Path) -> tuple[Path, str | None]:
    """`FILE` or `FILE:TOKEN`; a path that exists as written is taken whole (C:\\x.pt, a:b.pt)."""
    text = str(option)
    path, colon, token = text.rpartition(":")
    if colon and path and not token and not Path(text).exists() and Path(path).exists():
        raise LecoError(
            f"--embedding {text!r}: nothing follows the ':'; give {path} alone (the file names the token) "
            f"or {path}:TOKEN"
        )
    if Path(text).exists():
        return Path(text), None
    # The longest existing file before a ':': a token may hold ':' or '/' itself (<no/seven>, <x:y>).
    for at in sorted((i for i, c in enumerate(text) if c == ":"), reverse=True):
        if text[at + 1 :] and Path(text[:at]).is_file():
            return Path(text[:at]), text[at + 1 :]
    if not (colon and path and token) or any(c in token for c in "/\\"):
        return Path(text), None
    return Path(path), token


def read_embedding(path: str | Path, token: str | None = None) -> Embedding:
    """Read kohya/leco `.safetensors` (emb_params, or clip_l + clip_g), A1111 `.pt` or diffusers files.

    The token: `token` if given, else the file's `leco.token` metadata, else the file name without
    its suffix (as A1111 and ComfyUI name embeddings); the name diffusers reads from a one-key
    file (its key) is kept in `other_names`.
    """
    path = Path(path)
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "is not a regular file" if path.exists() else "not found"
        raise LecoError(f"--embedding: {path} {what}; give the embedding's file")
    tensors, metadata = _embedding_tensors(path)
    if has_lora_keys(tensors):
        raise LecoError(f"--embedding: {path} is a LoRA, not an embedding; give it as --lora")
    # (not an A1111 .pt's `name`, which diffusers reads too: A1111 files carry any word there)
    diffusers_names = []
    if set(tensors) == {"clip_l", "clip_g"}:
        vectors = (tensors["clip_l"], tensors["clip_g"])
    elif len(tensors) == 1:
        (key, vector), *_ = tensors.items()
        vectors = (vector,)
        if key not in ("emb_params", "*", A1111_KEY):  # diffusers' learned_embeds: {token: vector}
            diffusers_names.append(key)
    else:
        held = ", ".join(sorted(tensors)) or "no tensors"  # two at most: a larger file is named above
        raise LecoError(
            f"--embedding: {path} holds {held}, not an embedding "
            "(expected emb_params, clip_l + clip_g, or A1111's string_to_param)"
        )
    usable = (
        v.dim() in (1, 2) and v.numel() > 0 and v.is_floating_point() and v.isfinite().all() for v in vectors
    )
    if not all(usable):
        raise LecoError(f"--embedding: {path} holds no usable vectors (shape, type or NaN); is it damaged?")
    vectors = tuple(v.reshape(-1, v.shape[-1]).float() for v in vectors)
    if len(vectors) == 2 and len(vectors[0]) != len(vectors[1]):
        raise LecoError(f"--embedding: {path}: clip_l and clip_g hold different numbers of vectors")
    chosen = token or metadata.get("leco.token") or path.stem
    if not _matchable(chosen):
        raise LecoError(
            f"--embedding {path}: its token {chosen!r} has tabs, line breaks or spaces at its ends, which no "
            f"prompt can match; give one with {path}:TOKEN"
        )
    # CLIP reads prompts in lower case and A1111 finds "EasyNegative" by its token ids, so in any
    # case; diffusers looks the token up in the lower-cased prompt and would miss a capital one,
    # using its first vector only. The token is loaded in lower case (with_tokens_in_their_case).
    others = [] if token else [n.lower() for n in diffusers_names if _matchable(n)]
    others = [n for n in dict.fromkeys(others) if n != chosen.lower()]
    return Embedding(path, chosen.lower(), vectors, other_names=tuple(others))


def judged_embedding(path: str | Path, texts: Sequence[str] = ()) -> Embedding:
    """An embedding given to `leco eval --lora`, judged with its token added to the negative prompt
    by leco: diffusers' key, else the token. No prompt writes it, so it must be safe: a name inside
    any of `texts` (the judged prompts and the negative prompt; "seven.safetensors" beside "a digit
    seven") is put in <...>; any other keeps its name, as A1111 and ComfyUI know the file, so an
    image's infotext can be pasted there. Without `texts`, always <...>."""
    return judged_name(replace(read_embedding(path), option="--lora"), texts)


def judged_name(embedding: Embedding, texts: Sequence[str] = ()) -> Embedding:
    """`judged_embedding` of an embedding already read (its names as the file gives them)."""
    name = embedding.other_names[0] if embedding.other_names else embedding.token
    inside = not texts or any(name.lower() in text.lower() for text in texts)
    if inside and not (name.startswith("<") and name.endswith(">")):
        name = f"<{name}>"
    return replace(embedding, token=name, other_names=())


def _matchable(token: str) -> bool:
    return bool(token.strip()) and token == token.strip() and not any(c.isspace() and c != " " for c in token)


def named_as_written(embedding: Embedding, texts: Sequence[str]) -> Embedding:
    """The embedding under the name the prompts use: its token, else the name diffusers gives it (a
    prompt written for diffusers' `load_textual_inversion` of a one-key file uses its key)."""
    names = [embedding.token, *embedding.other_names]
    written = [text.lower() for text in texts]
    if any(written_as_a_word(text, embedding.token, names) for text in written):
        return embedding
    for name in embedding.other_names:
        if any(written_as_a_word(text, name, names) for text in written):
            return replace(embedding, token=name, other_names=())
    return embedding  # a token in no prompt (warned of), or inside a word (refused)


def written_as_a_word(text: str, name: str, names: Sequence[str]) -> bool:
    """`name` in `text` on its own: not inside a word ("ink" in "pink"), nor inside a longer name of
    the same embedding ("cat-toy" in "<cat-toy>", the key of cat-toy.safetensors)."""
    for longer in names:
        if name in longer and longer != name:
            text = text.replace(longer, " " * len(longer))
    return name in text and word_around(text, name) is None


def _embedding_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as file:
                names = list(file.keys())
                if len(names) <= 2 or has_lora_keys(names):  # else a model: named without reading GBs
                    return {name: file.get_tensor(name) for name in names}, dict(file.metadata() or {})
        except Exception as error:  # safetensors raises its own error types, OSError or ValueError
            raise _unreadable(path, error) from None
        raise LecoError(
            f"--embedding: {path} holds {len(names)} tensors (keys like {names[0]}), not an embedding "
            "(expected emb_params, clip_l + clip_g, or A1111's string_to_param); a model goes to --model"
        )
    if path.suffix.lower() not in (".pt", ".bin"):
        raise LecoError(f"--embedding: {path} is not .safetensors, .pt or .bin; give an embedding file")
    try:
        data = load_torch_file(path)  # never runs pickled code
    except LecoError as reason:
        raise LecoError(f"--embedding: {path} cannot be read ({reason})") from None
    vectors = data.get("string_to_param") if isinstance(data, dict) else None
    if isinstance(vectors, torch.nn.ParameterDict):  # the original textual inversion's
        vectors = vectors._parameters  # (a ParameterDict pickled by torch < 1.12 has no other index)
    if isinstance(vectors, dict):  # A1111, which names it by the file and never by this key ("*")
        keys = [A1111_KEY] if len(vectors) == 1 else list(vectors)
        data = {key: tensor.detach() for key, tensor in zip(keys, vectors.values(), strict=True)}
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()) or not data:
        raise LecoError(f"--embedding: {path} holds no embedding tensors (expected A1111's string_to_param)")
    return data, {}


def _unreadable(path: Path, error: BaseException) -> LecoError:
    return LecoError(f"--embedding: {path} cannot be read ({first_line(error)}); is it damaged?")


def text_encoder_pairs(pipe: DiffusionPipeline) -> list[tuple]:
    """(tokenizer, text encoder) pairs of the pipeline: one for SD1/SD2, two for SDXL."""
    pairs = [(pipe.tokenizer, pipe.text_encoder)]
    if getattr(pipe, "text_encoder_2", None) is not None:
        pairs.append((pipe.tokenizer_2, pipe.text_encoder_2))
    return pairs


def _check_embeddings(embeddings: list[Embedding], pairs: list[tuple]) -> None:
    """Each problem as one line naming the file, before anything is loaded."""
    for embedding in embeddings:
        path, token, option = embedding.path, embedding.token, embedding.option
        if len(embedding.vectors) != len(pairs):
            held = "clip_l + clip_g (SDXL)" if len(embedding.vectors) == 2 else "one text encoder's vectors"
            needed = "SDXL's clip_l + clip_g" if len(pairs) == 2 else "one text encoder's vectors (SD1/SD2)"
            raise LecoError(f"{option}: {path} holds {held}, but this model needs {needed}")
        for (tokenizer, encoder), vectors in zip(pairs, embedding.vectors, strict=True):
            width = encoder.get_input_embeddings().weight.shape[1]
            if vectors.shape[1] != width:
                raise LecoError(
                    f"{option}: {path} has vectors of width {vectors.shape[1]}, but this model's text "
                    f"encoder takes {width}; use an embedding made for this model family"
                )
            room = tokenizer.model_max_length - 2  # a prompt's tokens between its start and end
            if len(vectors) > room and tokenizer is pairs[0][0]:
                warn(
                    f"{option}: {path}: its {len(vectors)} vectors are more than the {room} tokens this "
                    "model reads of a prompt; the prompt is cut inside them, so the last are never read"
                )
            if _is_known_word(tokenizer, embedding.tokens):
                raise LecoError(
                    f"{option}: {path}: the token {token!r} is already a word of this model's tokenizer; "
                    f"name another one: {option} {path}:NEW_TOKEN"
                )
            if (words := words_a_token_spells(tokenizer, token)) and tokenizer is pairs[0][0]:
                warn(  # A1111 reads a file named "bad hands 5" so too; a warning, not a refusal
                    f"{option}: {path}: the token {token!r} is made of the words {', '.join(words)}: "
                    f"wherever a prompt writes {token!r} the embedding stands in for them; to keep the "
                    f"words, name it: {option} {path}:NEW_TOKEN"
                )
    refuse_shared_tokens(embeddings)


def refuse_shared_tokens(embeddings: list[Embedding]) -> None:
    """Two files under one token: the second would silently replace the first."""
    seen: dict[str, Path] = {}
    for embedding in embeddings:
        if embedding.token in seen:
            raise LecoError(
                f"--embedding: {embedding.path} and {seen[embedding.token]} both use the token "
                f"{embedding.token!r}; name one of them: --embedding {embedding.path}:NEW_TOKEN"
            )
        seen[embedding.token] = embedding.path


def _is_known_word(tokenizer, tokens: list[str]) -> bool:
    """A token the vocabulary has, or one that already reads as a single word ("cat" is "cat</w>")."""
    vocabulary = tokenizer.get_vocab()
    pieces = tokenizer.tokenize(tokens[0])
    return any(token in vocabulary for token in tokens) or (len(pieces) == 1 and pieces[0] in vocabulary)


@dataclass
class _TokenTable:
    """A text encoder's token table as loaded, to put back after the embeddings are unloaded."""

    module: torch.nn.Embedding
    weight: torch.Tensor
    vocab_size: int

    @classmethod
    def of(cls, encoder) -> _TokenTable:
        module = encoder.get_input_embeddings()
        return cls(module, module.weight.data, encoder.config.vocab_size)

    def restore(self, encoder) -> None:
        # transformers grows the table by swapping its weight's data, and diffusers' unload builds a
        # new, trainable module and leaves config.vocab_size grown: the caller's text encoder must
        # come back exactly as it was loaded (frozen, same tensors, same config).
        self.module.weight.data = self.weight
        self.module.num_embeddings = self.weight.shape[0]
        encoder.set_input_embeddings(self.module)
        encoder.config.vocab_size = self.vocab_size


@contextmanager
def embeddings_loaded(
    pipe: DiffusionPipeline, options: Sequence[str | Path | Embedding]
) -> Iterator[list[Embedding]]:
    """Load textual-inversion files (`FILE`, `FILE:TOKEN` or read ones) into the pipeline; unloaded on exit.

    diffusers' `load_textual_inversion` refuses SDXL's two-key files as a whole, so clip_l goes
    into the first tokenizer/text encoder and clip_g into the second, under the same token.
    """
    embeddings = [
        option if isinstance(option, Embedding) else read_embedding(*parse_embedding_option(option))
        for option in options
    ]
    if not embeddings:
        yield []
        return
    pairs = text_encoder_pairs(pipe)
    _check_embeddings(embeddings, pairs)
    tables = [_TokenTable.of(encoder) for _, encoder in pairs]
    try:
        for embedding in embeddings:
            for (tokenizer, encoder), vectors in zip(pairs, embedding.vectors, strict=True):
                try:
                    with quiet_library_logs():  # transformers explains how it initialises new rows
                        pipe.load_textual_inversion(
                            vectors, token=embedding.token, tokenizer=tokenizer, text_encoder=encoder
                        )
                except (ValueError, RuntimeError) as error:
                    raise LecoError(
                        f"{embedding.option}: {embedding.path} cannot be loaded ({first_line(error)})"
                    ) from None
        yield embeddings
    finally:
        tokens = [token for embedding in embeddings for token in embedding.tokens]
        for (tokenizer, encoder), table in zip(pairs, tables, strict=True):
            loaded = [token for token in tokens if token in tokenizer.get_vocab()]
            if loaded:
                pipe.unload_textual_inversion(tokens=loaded, tokenizer=tokenizer, text_encoder=encoder)
            table.restore(encoder)


def with_tokens_in_their_case(pipe: DiffusionPipeline, texts: list[str]) -> list[str]:
    """`texts` with the loaded embeddings' tokens (lower case) written so, wherever a prompt writes
    them in another case: A1111 finds EasyNegative in any case, diffusers only as loaded."""
    tokenizer = pipe.tokenizer
    special = set(tokenizer.all_special_tokens)
    tokens = [t for t in tokenizer.get_added_vocab() if t not in special and t == t.lower()]
    if not tokens:
        return list(texts)
    longest_first = sorted(tokens, key=len, reverse=True)  # easynegativev2 before easynegative
    pattern = re.compile("|".join(map(re.escape, longest_first)), re.IGNORECASE)
    return [pattern.sub(lambda match: match.group().lower(), text) for text in texts]


def check_embedding_options(
    options: Sequence[str], texts: Sequence[str], lora_options: Sequence[str] = ()
) -> list[str]:
    """`leco generate` and `leco eval`'s --embedding options (FILE or FILE:TOKEN) checked against the
    prompts and negative prompt (`texts`) before any model loads: missing or damaged files, a token
    the tokenizer would also find inside a word, a token shared with another file or with an
    embedding judged as a --lora (`lora_options`) stop the run; one whose token no prompt uses is
    pointed out (a typo in the token draws as plain words). Returns the options as to be loaded: a
    file the prompts name as diffusers would (its key) becomes FILE:THAT_NAME."""
    for name, values in (("options", options), ("texts", texts), ("lora_options", lora_options)):
        check_list(name, values, "texts")
    given = [(path.resolve(), token) for path, token in map(parse_embedding_option, options)]
    for (path, token), option in zip(given, options, strict=True):
        if given.count((path, token)) > 1:
            raise LecoError(
                f"--embedding: {option} is given {given.count((path, token))} times; give it once"
            )
    for lora in lora_options:
        if any(Path(lora).resolve() == path for path, _ in given):
            raise LecoError(
                f"--embedding: {lora} is also a --lora, where it is judged as a negative embedding; "
                "give it once"
            )
    judged: dict[str, str] = {}
    for lora in filter(is_embedding_file, lora_options):
        token = judged_embedding(lora).token  # eval names it bare where no judged prompt holds it
        judged |= {token: lora, token.removeprefix("<").removesuffix(">"): lora}
    read = [read_embedding(*parse_embedding_option(option)) for option in options]
    embeddings = [named_as_written(embedding, texts) for embedding in read]
    refuse_shared_tokens(embeddings)  # said before the model loads, and before any other note
    tokens = [embedding.token for embedding in embeddings]
    for embedding in embeddings:
        if embedding.token in judged:  # eval adds a --lora embedding's token to the negative prompt
            raise LecoError(
                f"--embedding: {embedding.path}: its token {embedding.token!r} is also the token of --lora "
                f"{judged[embedding.token]}, judged as a negative embedding; give this one another: "
                f"--embedding {embedding.path}:NEW_TOKEN"
            )
        for text in texts:
            word = word_around(text.lower(), embedding.token, [*tokens, *judged])
            if word is not None:
                raise LecoError(
                    f"--embedding {embedding.path}: its token {embedding.token!r} is inside the word "
                    f"{word!r} of a prompt, where the tokenizer reads it too; give it another: "
                    f"{embedding.path}:<TOKEN>"
                )
        if not any(embedding.token in text.lower() for text in texts):
            also = "".join(f" (or {name!r}, as diffusers names it)" for name in embedding.other_names)
            warn(
                f"--embedding {embedding.path}: its token {embedding.token!r}{also} is in no "
                f"prompt; write it in the prompt or the negative prompt (e.g. --negative {embedding.token!r})"
            )
    return [
        option if after.token == before.token else f"{option}:{after.token}"
        for option, before, after in zip(options, read, embeddings, strict=True)
    ]
