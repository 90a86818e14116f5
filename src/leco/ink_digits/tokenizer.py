"""A small CLIP BPE vocabulary of our own in which every caption word is one token."""

from __future__ import annotations

import json
from pathlib import Path

from transformers import CLIPTokenizer

SPECIALS = ("<|startoftext|>", "<|endoftext|>")
MAX_LENGTH = 16  # tokens per caption, start and end included


def _byte_alphabet() -> list[str]:
    """The 256 stand-in characters byte-level BPE uses for raw bytes (GPT-2/CLIP convention)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    extra = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(extra))]


def build_tokenizer(words: list[str], folder: Path) -> CLIPTokenizer:
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
        _write(folder, tokens, merges)
        tokenizer = CLIPTokenizer.from_pretrained(folder)
        # transformers 5 has been seen to build a 3-token vocabulary from files it did not like.
        if len(tokenizer) != len(tokens):
            raise RuntimeError(f"{folder}: the tokenizer loaded {len(tokenizer)} tokens of {len(tokens)}")
        missing = []
        for word in words:
            pieces = tokenizer.tokenize(word)
            if len(pieces) > 1:
                missing.append((pieces[0], pieces[1]))
        if not missing:
            return tokenizer
        merges += [m for m in dict.fromkeys(missing) if m not in merges]
    raise RuntimeError("could not make every caption word a single token")


def _write(folder: Path, tokens: list[str], merges: list[tuple[str, str]]) -> None:
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "bos_token": SPECIALS[0],
        "eos_token": SPECIALS[1],
        "unk_token": SPECIALS[1],
        "pad_token": SPECIALS[1],
        "model_max_length": MAX_LENGTH,
        "do_lower_case": True,
        "errors": "replace",
        "add_prefix_space": False,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    # Older transformers read the special tokens from here.
    specials = {name: config[name] for name in ("bos_token", "eos_token", "unk_token", "pad_token")}
    (folder / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")
