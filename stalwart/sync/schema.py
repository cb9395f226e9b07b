"""The list of tensors an update covers, as the trainer names them (the *wire schema*)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from stalwart.formats.checksum import digest
from stalwart.formats.dtypes import dtype_from_name, dtype_name
from stalwart.sync.codec import itemsize, word_size
from stalwart.sync.errors import ProtocolError


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """One wire tensor: its trainer-side name, the dtype sent and its shape."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    # sizes, worked out on first use (read for every chunk and entry)
    _numel: int = field(default=-1, init=False, repr=False, compare=False)
    _word: int = field(default=-1, init=False, repr=False, compare=False)
    _words: int = field(default=-1, init=False, repr=False, compare=False)

    @property
    def numel(self) -> int:
        n = self._numel
        if n < 0:
            n = 1
            for d in self.shape:
                n *= d
            object.__setattr__(self, "_numel", n)
        return n

    @property
    def word(self) -> int:
        w = self._word
        if w < 0:
            w = word_size(self.dtype)
            object.__setattr__(self, "_word", w)
        return w

    @property
    def nbytes(self) -> int:
        return self.numel * itemsize(self.dtype)

    @property
    def words(self) -> int:
        n = self._words
        if n < 0:
            n = self.nbytes // self.word
            object.__setattr__(self, "_words", n)
        return n

    def to_json(self) -> dict:
        return {"name": self.name, "dtype": dtype_name(self.dtype), "shape": list(self.shape)}


def small_words(chunk_words: int) -> int:
    """Tensors of at most this many words are *small*: the sender lists them last, side by side,
    so they share entries (see :func:`stalwart.sync.stream.plan_chunks`)."""
    return max(1, chunk_words // 8)


class Schema:
    """Ordered wire tensors; tensor ids on the wire are indices into this list."""

    def __init__(self, specs: Sequence[TensorSpec]) -> None:
        self.specs = list(specs)
        names = [s.name for s in self.specs]
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})
            raise ValueError(f"duplicate tensor names in schema: {dup[:5]}")
        self.index = {s.name: i for i, s in enumerate(self.specs)}
        self.json_text = json.dumps([s.to_json() for s in self.specs], separators=(",", ":"))
        self.digest = digest(self.json_text.encode("utf-8"))

    def __len__(self) -> int:
        return len(self.specs)

    def __iter__(self):
        return iter(self.specs)

    def __getitem__(self, i: int) -> TensorSpec:
        return self.specs[i]

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.specs)

    @property
    def numel(self) -> int:
        return sum(s.numel for s in self.specs)

    @staticmethod
    def from_json(obj, what: str = "schema") -> Schema:
        try:
            specs = [
                TensorSpec(str(o["name"]), dtype_from_name(o["dtype"]), tuple(int(d) for d in o["shape"]))
                for o in obj
            ]
        except (KeyError, TypeError, ValueError) as e:
            raise ProtocolError(f"{what}: malformed tensor list ({e})") from None
        except Exception as e:  # FormatError for unknown dtypes
            raise ProtocolError(f"{what}: {e}") from None
        return Schema(specs)
