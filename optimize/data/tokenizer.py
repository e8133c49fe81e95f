"""Tokenizers written from a word list (no download), for the tiny text-to-image pipelines
(``optimize.methods.t2i_teacher``, the random test folders of ``tests/tiny_t2i.py``): CLIP tokenizer files, a
byte-level BPE ``vocab.json`` + ``merges.txt`` in which every listed word is ONE token, and a unigram T5 tokenizer.

The vocabulary is CLIP's layout: the 256 byte characters (GPT-2's reversible byte -> printable map), each also as a
word end ``c</w>``, then every prefix of every word reached by the merges ``prefix next-char`` (the last one with
``</w>``), then ``<|startoftext|>`` and ``<|endoftext|>``. A word outside the list still tokenizes, into its bytes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

from optimize.data.captioned import BACKGROUNDS, COLOURS, DIGIT_WORDS

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def caption_words() -> tuple[str, ...]:
    """Every word of the captioned digits' captions (``optimize.data.captioned.caption``), sorted."""
    return tuple(sorted({"a", "an", "on", "background", *DIGIT_WORDS, *COLOURS, *BACKGROUNDS}))


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character map (the base alphabet of a byte-level BPE)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, n = keep[:], 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(keep, map(chr, chars)))


def clip_bpe(words: Iterable[str]) -> tuple[dict[str, int], list[str]]:
    """(vocabulary token -> id, merges) of the BPE described in the module docstring. Words must be lower-case
    letters (CLIP lower-cases and splits on non-letters before BPE); ValueError otherwise."""
    words = list(dict.fromkeys(words))
    bad = [w for w in words if not (w.isascii() and w.isalpha() and w.islower())]
    if not words or bad:
        raise ValueError(f"tokenizer words must be a non-empty list of lower-case ASCII words, got {bad or words!r}.")
    base = list(bytes_to_unicode().values())
    vocab = base + [c + "</w>" for c in base]
    merges: list[str] = []
    seen = set(vocab)
    for w in sorted(words, key=len, reverse=True):  # longer words' merge chains first: each word stays one token
        left = w[0]
        for i, c in enumerate(w[1:], 1):
            right = c + "</w>" if i == len(w) - 1 else c
            merge = f"{left} {right}"
            left = left + right
            if left not in seen:
                merges.append(merge)
                vocab.append(left)
                seen.add(left)
    vocab = list(dict.fromkeys(vocab)) + [BOS, EOS]
    return {tok: i for i, tok in enumerate(vocab)}, merges


def clip_tokenizer_files(folder: str | Path, words: Iterable[str]) -> Path:
    """Write ``vocab.json`` and ``merges.txt`` of ``clip_bpe(words)`` into ``folder`` (created); returns the folder."""
    vocab, merges = clip_bpe(words)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return folder


def clip_tokenizer(folder: str | Path, words: Iterable[str], max_tokens: int) -> Any:
    """A ``transformers.CLIPTokenizer`` over the files ``clip_tokenizer_files(folder, words)`` writes, padding and
    truncating to ``max_tokens`` (its ``model_max_length``)."""
    from transformers import CLIPTokenizer  # optional heavy dependency: only the text-to-image pipelines need it

    files = clip_tokenizer_files(folder, words)
    return CLIPTokenizer(vocab=str(files / "vocab.json"), merges=str(files / "merges.txt"), model_max_length=int(max_tokens))


def t5_tokenizer(words: Iterable[str], max_tokens: int) -> Any:
    """A unigram ``transformers.T5Tokenizer`` over the pieces ``"▁word"`` of ``words`` plus single letters and digits
    (any other word still tokenizes, letter by letter), ``model_max_length = max_tokens``."""
    from transformers import T5Tokenizer  # optional heavy dependency: only the text-to-image pipelines need it

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [("▁" + w, -1.0) for w in dict.fromkeys(words)] + [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=int(max_tokens))
