"""Regenerate src/leco/model_configs/clip_tokenizer/{vocab.json,merges.txt}.

The CLIP byte-level BPE vocabulary (MIT licence, OpenAI) is distributed as a gzipped merge list,
e.g. inside the `open_clip_torch` wheel (open_clip/bpe_simple_vocab_16e6.txt.gz). Hugging Face's
CLIPTokenizer wants it as vocab.json + merges.txt, so we convert once and ship the result; loading
a single-file checkpoint then needs no hub access for its tokenizer.

usage: python tools/make_clip_tokenizer.py bpe_simple_vocab_16e6.txt.gz OUT_DIR
"""

import gzip
import json
import sys
from pathlib import Path

# CLIP keeps 49152 - 256 - 2 merges of the published list (the rest are never used).
N_MERGES = 49152 - 256 - 2


def byte_alphabet() -> list[str]:
    """The 256 printable stand-ins GPT-2/CLIP byte-level BPE uses for raw bytes, in id order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for byte in range(256):
        if byte in printable:
            chars.append(chr(byte))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    # Printable bytes come first, then the remapped ones, as in the original table.
    ordered = [chr(b) for b in printable] + [chr(256 + i) for i in range(extra)]
    assert sorted(ordered) == sorted(chars)
    return ordered


def main(gz_path: str, out_dir: str) -> None:
    with gzip.open(gz_path, "rt", encoding="utf-8") as file:
        lines = file.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : N_MERGES + 1]]
    alphabet = byte_alphabet()
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    print(f"{len(tokens)} tokens, {len(merges)} merges -> {out}")


if __name__ == "__main__":
    main(*sys.argv[1:])
