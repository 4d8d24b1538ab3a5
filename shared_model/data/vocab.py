"""Word-level vocabulary: tokenizer, special tokens, build, encode/decode, save/load."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Iterable, Sequence

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIALS = (PAD, START, END, UNK)
_WORD = re.compile(r"\w+(?:'\w+)?")


def tokenize(text: str) -> list[str]:
    """Lower-cased words; punctuation is dropped."""
    if not isinstance(text, str):
        raise TypeError(f"caption must be a str, got {type(text).__name__}")
    return _WORD.findall(text.lower())


class Vocabulary:
    """Maps words to ids. Ids 0..3 are pad, start, end and unknown."""

    pad_id, start_id, end_id, unk_id = 0, 1, 2, 3

    def __init__(self, words: Iterable[str]) -> None:
        self.itos: list[str] = list(SPECIALS)
        for w in words:
            if not isinstance(w, str) or not w:
                raise ValueError(f"vocabulary words must be non-empty strings, got {w!r}")
            if w not in SPECIALS:
                self.itos.append(w)
        self.stoi = {w: i for i, w in enumerate(self.itos)}
        if len(self.stoi) != len(self.itos):
            dupes = sorted(w for w, c in Counter(self.itos).items() if c > 1)
            raise ValueError(f"duplicate vocabulary words: {dupes[:5]}")

    @classmethod
    def build(cls, captions: Iterable[str], *, min_count: int = 1, max_size: int | None = None) -> "Vocabulary":
        """Words seen at least `min_count` times, most frequent first (ties alphabetical), at most
        `max_size` words (special tokens not counted)."""
        if min_count < 1:
            raise ValueError(f"min_count must be >= 1, got {min_count}")
        if max_size is not None and max_size < 1:
            raise ValueError(f"max_size must be >= 1, got {max_size}")
        counts = Counter(w for c in captions for w in tokenize(c))
        kept = sorted((w for w, n in counts.items() if n >= min_count), key=lambda w: (-counts[w], w))
        return cls(kept[:max_size])

    def coverage(self, captions: Iterable[str]) -> float:
        """The fraction of the captions' tokens that are in the vocabulary (not <unk>); 1.0 for none."""
        tokens = [w for c in captions for w in tokenize(c)]
        return sum(w in self.stoi for w in tokens) / len(tokens) if tokens else 1.0

    def __len__(self) -> int:
        return len(self.itos)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocabulary) and self.itos == other.itos

    def encode(self, text: str, *, max_len: int | None = None) -> list[int]:
        """<start> w1 .. wn <end>; words beyond max_len - 2 are cut, unknown words map to <unk>."""
        ids = [self.stoi.get(w, self.unk_id) for w in tokenize(text)]
        if max_len is not None:
            if max_len < 3:
                raise ValueError(f"max_len must be >= 3, got {max_len}")
            ids = ids[: max_len - 2]
        return [self.start_id, *ids, self.end_id]

    def decode(self, ids: Sequence[int]) -> str:
        """Words up to the first <end>; pad and start are dropped."""
        words = []
        for i in ids:
            i = int(i)
            if i == self.end_id:
                break
            if i in (self.pad_id, self.start_id):
                continue
            words.append(self.itos[i] if 0 <= i < len(self.itos) else UNK)
        return " ".join(words)

    def to_dict(self) -> dict:
        return {"format": "fedcap-vocab/1", "itos": self.itos}

    @classmethod
    def from_dict(cls, data: dict) -> "Vocabulary":
        if not isinstance(data, dict) or data.get("format") != "fedcap-vocab/1" or not isinstance(data.get("itos"), list):
            raise ValueError("not a FedCap vocabulary (expected format 'fedcap-vocab/1' with a list 'itos')")
        itos = data["itos"]
        if tuple(itos[: len(SPECIALS)]) != SPECIALS:
            raise ValueError(f"vocabulary must start with {SPECIALS}, got {tuple(itos[:4])}")
        return cls(itos[len(SPECIALS):])

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), ensure_ascii=False, indent=0), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> "Vocabulary":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"vocabulary file not found: {path}")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"vocabulary file {path} is not valid JSON: {e}") from e
        return cls.from_dict(data)
