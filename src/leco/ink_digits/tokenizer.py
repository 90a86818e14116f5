"""A small CLIP BPE vocabulary of our own in which every caption word is one token.

Both bundled models use the same vocab.json / merges.txt; they differ only in the padding token,
as SD 1.x (pads with the end-of-text token) and SD 2.x (OpenCLIP pads with "!", id 0) do.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from transformers import CLIPTokenizer

SPECIALS = ("<|startoftext|>", "<|endoftext|>")
MAX_LENGTH = 16  # tokens per caption, start and end included
SD1_PAD = SPECIALS[1]
SD2_PAD = "!"  # the first byte token, id 0, as in OpenCLIP's vocabulary
VOCAB_FILES = ("vocab.json", "merges.txt")


def _byte_alphabet() -> list[str]:
    """The 256 stand-in characters byte-level BPE uses for raw bytes (GPT-2/CLIP convention)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    extra = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(extra))]


def build_tokenizer(words: list[str], folder: Path, pad_token: str = SD1_PAD) -> CLIPTokenizer:
    """Write vocab.json / merges.txt so that each word becomes exactly one token, then load it.

    Merges are added until every word tokenizes whole: BPE applies them by rank, so a word's own
    chain of merges can be pre-empted by another word's; the loop adds what that leaves missing.
    """
    folder.mkdir(parents=True, exist_ok=True)
    alphabet = _byte_alphabet()
    merges: list[tuple[str, str]] = []
    for _ in range(20):
        tokens = [*alphabet, *(c + "</w>" for c in alphabet), *("".join(m) for m in merges), *SPECIALS]
        tokens = list(dict.fromkeys(tokens))
        _write_vocabulary(folder, tokens, merges)
        _write_config(folder, pad_token)
        tokenizer = _load(folder, len(tokens))
        missing = split_words(tokenizer, words)
        if not missing:
            return tokenizer
        firsts = [tuple(tokenizer.tokenize(word)[:2]) for word in missing]
        merges += [m for m in dict.fromkeys(firsts) if m not in merges]
    raise RuntimeError("could not make every caption word a single token")


def copy_tokenizer(source: Path, folder: Path, words: list[str], pad_token: str) -> CLIPTokenizer:
    """The vocabulary of `source` (a tokenizer folder) in `folder`, padding with `pad_token`.

    Raises if a word of `words` is not one token there (a source built before the word existed).
    """
    folder.mkdir(parents=True, exist_ok=True)
    for name in VOCAB_FILES:
        shutil.copyfile(source / name, folder / name)
    _write_config(folder, pad_token)
    tokenizer = _load(folder, len(json.loads((folder / "vocab.json").read_text())))
    missing = split_words(tokenizer, words)
    if missing:
        raise RuntimeError(f"{source}: these words are not one token there: {', '.join(missing)}; rebuild it")
    return tokenizer


def split_words(tokenizer: CLIPTokenizer, words: list[str]) -> list[str]:
    """The words that `tokenizer` does not keep as one token."""
    return [word for word in words if len(tokenizer.tokenize(word)) != 1]


def _load(folder: Path, size: int) -> CLIPTokenizer:
    tokenizer = CLIPTokenizer.from_pretrained(folder)
    # transformers 5 has been seen to build a 3-token vocabulary from files it did not like.
    if len(tokenizer) != size:
        raise RuntimeError(f"{folder}: the tokenizer loaded {len(tokenizer)} tokens of {size}")
    return tokenizer


def _write_vocabulary(folder: Path, tokens: list[str], merges: list[tuple[str, str]]) -> None:
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))


def _write_config(folder: Path, pad_token: str) -> None:
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "bos_token": SPECIALS[0],
        "eos_token": SPECIALS[1],
        "unk_token": SPECIALS[1],
        "pad_token": pad_token,
        "model_max_length": MAX_LENGTH,
        "do_lower_case": True,
        "errors": "replace",
        "add_prefix_space": False,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    # Older transformers read the special tokens from here.
    specials = {name: config[name] for name in ("bos_token", "eos_token", "unk_token", "pad_token")}
    (folder / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")
