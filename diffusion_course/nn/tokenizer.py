"""A word-level tokenizer for the small captions of lesson 07_cross_attention ("a red circle top left").

Text becomes token ids before the text encoder tau_theta turns them into context vectors. Id 0 is the
padding token ``<pad>``, id 1 the unknown word ``<unk>``, then the vocabulary in the order given. A text is
lower-cased, every punctuation character becomes a space, and the rest is split on whitespace into words;
the ids are padded with 0 to ``max_length``, and the mask (ids != 0) marks the real tokens.
"""
from __future__ import annotations

import string
from typing import Any, Dict, List, Sequence, Tuple, Union

import torch

PAD, UNK = "<pad>", "<unk>"
_PUNCTUATION = str.maketrans({ch: " " for ch in string.punctuation})


def split_words(text: str) -> List[str]:
    """Lower-case ``text``, turn punctuation into spaces and split on whitespace.

    ``"Red circle, top-left!"`` -> ``["red", "circle", "top", "left"]``. Lesson: 07_cross_attention.
    """
    return text.lower().translate(_PUNCTUATION).split()


class Tokenizer:
    """Words -> ids ``(B, max_length)`` long and a mask ``(B, max_length)`` bool (True = a real word).

    Ids: 0 = ``<pad>``, 1 = ``<unk>``, 2.. = ``vocabulary`` in order. Lesson: 07_cross_attention.
    """

    def __init__(self, vocabulary: Sequence[str], max_length: int) -> None:
        words = list(vocabulary)
        if not words:
            raise ValueError("the tokenizer needs a vocabulary: a list of the words the captions use")
        bad = [w for w in words if not isinstance(w, str) or split_words(w) != [w] or w in (PAD, UNK)]
        if bad:
            raise ValueError(f"vocabulary words must be single lower-case words without punctuation, got {bad}")
        dupes = sorted({w for w in words if words.count(w) > 1})
        if dupes:
            raise ValueError(f"the vocabulary lists {dupes} more than once; list every word once")
        if max_length < 1:
            raise ValueError(f"max_length must be at least 1, got {max_length}")
        self.vocabulary, self.max_length = words, int(max_length)
        self.ids = {w: i for i, w in enumerate([PAD, UNK] + words)}

    @property
    def vocab_size(self) -> int:
        """The number of ids: the vocabulary plus ``<pad>`` and ``<unk>``. Lesson: 07_cross_attention."""
        return len(self.vocabulary) + 2

    def encode(self, texts: Union[str, Sequence[str]], unknown: str = "error") -> Tuple[torch.Tensor, torch.Tensor]:
        """``texts`` (one string or B of them) -> ``(ids (B, max_length) long, mask (B, max_length) bool)``.

        Unknown words raise (``unknown="error"``) or become ``<unk>`` (``unknown="unk"``); an empty text or one
        longer than ``max_length`` words raises. Lesson: 07_cross_attention.
        """
        if unknown not in ("error", "unk"):
            raise ValueError(f"unknown must be 'error' or 'unk', got {unknown!r}")
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts:
            raise ValueError("encode needs at least one text")
        rows = [split_words(text) for text in texts]
        empty = [t for t, r in zip(texts, rows) if not r]
        if empty:
            raise ValueError(f"texts {empty} have no words; every caption needs at least one word")
        long = [(t, len(r)) for t, r in zip(texts, rows) if len(r) > self.max_length]
        if long:
            raise ValueError(f"texts longer than max_length {self.max_length} words: {long}; shorten them or build "
                             f"the tokenizer with a larger max_length")
        missing = sorted({w for r in rows for w in r if w not in self.ids})
        if missing and unknown == "error":
            raise ValueError(f"unknown words {missing}: add them to the vocabulary, or pass unknown='unk' to map "
                             f"them to <unk>")
        ids = torch.zeros(len(rows), self.max_length, dtype=torch.long)
        for b, row in enumerate(rows):
            ids[b, :len(row)] = torch.tensor([self.ids.get(w, 1) for w in row])
        return ids, ids != 0

    def decode(self, ids: Union[torch.Tensor, Sequence[Sequence[int]]]) -> List[str]:
        """Ids ``(B, L)`` (or one row ``(L,)``) -> B texts, padding dropped. Lesson: 07_cross_attention."""
        ids = torch.as_tensor(ids)
        if ids.ndim == 1:
            ids = ids[None]
        words = [PAD, UNK] + self.vocabulary
        bad = ids[(ids < 0) | (ids >= len(words))].tolist()
        if bad:
            raise ValueError(f"ids {sorted(set(bad))} are not in 0..{len(words) - 1}")
        return [" ".join(words[i] for i in row if i != 0) for row in ids.tolist()]

    def to_dict(self) -> Dict[str, Any]:
        """A JSON-friendly dict: ``vocabulary`` and ``max_length``. Lesson: 07_cross_attention."""
        return {"vocabulary": list(self.vocabulary), "max_length": self.max_length}

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "Tokenizer":
        """The inverse of :meth:`to_dict`. Lesson: 07_cross_attention."""
        extra = set(d) - {"vocabulary", "max_length"}
        if extra:
            raise ValueError(f"unknown tokenizer keys: {sorted(extra)}")
        return cls(d["vocabulary"], d["max_length"])
