"""The trainer's side of an update: which tensors are sent, in which dtype, read chunk by chunk."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import torch
from torch import nn

from stalwart.sync import native
from stalwart.sync.codec import torch_word_dtype, word_size, words_torch
from stalwart.sync.errors import SyncError
from stalwart.sync.schema import Schema, TensorSpec, small_words

ModelLike = nn.Module | Mapping[str, torch.Tensor] | Callable[[], Mapping[str, torch.Tensor]]


def collect_tensors(model: ModelLike, include_buffers: bool = True) -> list[tuple[str, torch.Tensor]]:
    """Named tensors to sync: parameters (tied weights once) and persistent buffers, or a mapping's items."""
    if isinstance(model, nn.Module):
        out: list[tuple[str, torch.Tensor]] = []
        seen: set[tuple] = set()

        def add(name: str, t: torch.Tensor) -> None:
            key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
            if key not in seen:
                seen.add(key)
                out.append((name, t.detach()))

        for n, p in model.named_parameters():
            add(n, p)
        if include_buffers:
            persistent = set(model.state_dict(keep_vars=True).keys())
            for n, b in model.named_buffers():
                if n in persistent:
                    add(n, b)
        return out
    if callable(model) and not isinstance(model, Mapping):
        model = model()
    if isinstance(model, Mapping):
        return [(str(n), t.detach()) for n, t in model.items()]
    raise TypeError(
        f"cannot sync a {type(model).__name__}: pass an nn.Module, a mapping of tensors or a callable returning one"
    )


class Source:
    """Reads the trainer's tensors as wire words (optionally cast to the rollout dtype).

    ``dtype`` casts floating-point tensors (e.g. fp32 master weights -> bf16 as the
    rollout engine holds them); the cast goes through one reused staging buffer.
    """

    def __init__(
        self, model: ModelLike, *, dtype: torch.dtype | None, include_buffers: bool, chunk_words: int
    ) -> None:
        self.model = model
        self.dtype = dtype
        self.include_buffers = include_buffers
        self.chunk_words = int(chunk_words)
        self.tensors: list[torch.Tensor] = []
        self.schema: Schema | None = None
        self._cast: dict[tuple, torch.Tensor] = {}
        self._stage_np: dict[tuple, np.ndarray] = {}
        self._fast: dict[int, tuple | None] = {}  # id of a flat tensor -> _fast_cast's answer
        self._host: torch.Tensor | None = None
        self._flat: list[torch.Tensor] = []  # each tensor flattened (a view)
        self._words: list[np.ndarray | None] = []  # host tensors sent as they are: their words (a view)

    def wire_dtype(self, t: torch.Tensor) -> torch.dtype:
        if self.dtype is not None and t.is_floating_point() and t.dtype != self.dtype:
            return self.dtype
        return t.dtype

    def refresh(self) -> Schema:
        """Re-read the model's tensors (their storage may have been replaced); returns the schema."""
        named = collect_tensors(self.model, self.include_buffers)
        specs = []
        tensors = []
        for n, t in named:
            if not t.is_contiguous():
                raise SyncError(f"trainer tensor {n!r} is not contiguous; weight sync reads tensors in place")
            specs.append(TensorSpec(n, self.wire_dtype(t), tuple(t.shape)))
            tensors.append(t)
        # small tensors last, by word size, so they share chunks (and entries) with each other
        small = small_words(self.chunk_words)
        order = sorted(
            range(len(specs)),
            key=lambda j: (specs[j].words <= small, specs[j].word if specs[j].words <= small else 0),
        )
        specs = [specs[j] for j in order]
        tensors = [tensors[j] for j in order]
        if self.schema is None or [s for s in self.schema] != specs:
            self.schema = Schema(specs)
        self.tensors = tensors
        self._flat = [t.reshape(-1) for t in tensors]
        self._fast = {}  # keyed by the flat views just made (alive until the next refresh)
        self._words = [
            words_torch(t).numpy() if t.device.type == "cpu" and spec.dtype == t.dtype else None
            for t, spec in zip(tensors, specs)
        ]
        return self.schema

    def casts(self, i: int) -> bool:
        """Whether tensor ``i`` is sent in another dtype than it has (reading it costs a cast)."""
        return self.schema[i].dtype != self.tensors[i].dtype

    def read_blocks(self, i: int, start: int, n: int) -> tuple[np.ndarray, Callable[[int, int], None] | None]:
        """Words ``[start, start + n)`` of tensor ``i`` on the host, filled block by block.

        Returns the words and ``fill(lo, hi)``, which must be called for every block (in
        order) before its words are read; None when the words are there already (a host
        tensor sent as it is). Casting block by block keeps each block in cache for what
        reads it next.
        """
        words = self._words[i]
        if words is not None:
            return words[start : start + n], None
        t = self.tensors[i]
        spec = self.schema[i]
        if t.device.type != "cpu":
            return self.read(i, start, n)[1], None
        stage = self._stage(t.device, spec.dtype)
        src = self._flat[i]
        fast = self._fast_cast(src, stage)
        if fast is not None:
            kern, ps, pd = fast
            ps += 4 * start

            def fill(lo: int, hi: int) -> None:
                if not kern.cast_f32_bf16(ps + 4 * lo, pd + 2 * lo, hi - lo):
                    stage[lo:hi].copy_(src[start + lo : start + hi])

        else:

            def fill(lo: int, hi: int) -> None:
                stage[lo:hi].copy_(src[start + lo : start + hi])

        return self._stage_words(stage)[:n], fill

    def _stage_words(self, stage: torch.Tensor) -> np.ndarray:
        """The host stage's words as a numpy array (made once: torch views cost microseconds)."""
        key = (stage.data_ptr(), stage.dtype)
        words = self._stage_np.get(key)
        if words is None:
            words = self._stage_np[key] = words_torch(stage).numpy()
        return words

    def _fast_cast(self, src: torch.Tensor, stage: torch.Tensor):
        """(kernel, source address, stage address) when the native kernel casts ``src`` into
        ``stage`` (fp32 -> bf16 on the host, the rollout's usual cast), else None; worked out
        once per tensor and refresh."""
        key = id(src)
        got = self._fast.get(key, False)
        if got is False:
            got = None
            if (
                src.dtype == torch.float32
                and stage.dtype == torch.bfloat16
                and src.device.type == "cpu"
                and src.is_contiguous()
            ):
                kern = native.kernel()
                got = None if kern is None else (kern, src.data_ptr(), stage.data_ptr())
            self._fast[key] = got
        return got

    def _stage(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        key = (device, dtype)
        stage = self._cast.get(key)
        if stage is None:
            stage = self._cast[key] = torch.empty(self.chunk_words, dtype=dtype, device=device)
        return stage

    def read(
        self, i: int, start: int, n: int, need_host: bool = True
    ) -> tuple[torch.Tensor, np.ndarray | None]:
        """Words ``[start, start + n)`` of tensor ``i``: (on the tensor's device, on the host)."""
        t = self.tensors[i]
        spec = self.schema[i]
        if spec.dtype != t.dtype:  # cast (element == word for every castable dtype)
            stage = self._stage(t.device, spec.dtype)
            src = self._flat[i]
            fast = self._fast_cast(src, stage)
            if fast is None or not fast[0].cast_f32_bf16(fast[1] + 4 * start, fast[2], n):
                stage[:n].copy_(src[start : start + n])
            dev = words_torch(stage)[:n]
        else:
            dev = words_torch(t)[start : start + n]
        if dev.device.type == "cpu":
            return dev, dev.numpy()
        if not need_host:
            return dev, None
        w = word_size(spec.dtype)
        if self._host is None:
            self._host = torch.empty(
                self.chunk_words * 8, dtype=torch.uint8, pin_memory=torch.cuda.is_available()
            )
        host = self._host[: n * w].view(torch_word_dtype(w))
        host.copy_(dev)
        return dev, host.numpy()
