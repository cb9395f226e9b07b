"""Hugging Face checkpoints: safetensors (single or sharded + index) and ``pytorch_model*.bin``.

Reading: ``model.safetensors``, ``model-0000i-of-0000N.safetensors`` +
``model.safetensors.index.json``, any directory of ``*.safetensors``, DCP's
Hugging Face storage layout (per-rank ``shard-*`` files whose ``DCP_SHARDING_INFO``
metadata places each piece in its global tensor), and ``pytorch_model.bin`` /
``pytorch_model-0000i-of-0000N.bin`` + index (through the restricted unpickler).
Safetensors headers are parsed here and tensors read with ``pread``: every dtype
safetensors has (ints and bools included), no memory mapping.

Writing: shards of at most ``max_shard_size`` (greedy in model order, a tensor
larger than that alone in its shard, Hugging Face's naming; one shard is plain
``model.safetensors`` without index), ``{"format": "pt"}`` metadata, tied weights
stored once (the alias is left out, as transformers expects, and recorded in the
``stalwart`` metadata entry so a round trip restores it).
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import TYPE_CHECKING

from stalwart.errors import ConversionError, FormatError
from stalwart.formats.adapters.base import (
    ConvertSource,
    OutState,
    PlannedFile,
    RawBytes,
    SourceTensor,
    Target,
)
from stalwart.formats.adapters.safe_load import LazyFile, TensorRef, is_zip_file, pread_into
from stalwart.formats.direct_io import DirectWriter
from stalwart.formats.dtypes import DType, dtype_from_code, itemsize, safetensors_code, tensor_bytes
from stalwart.formats.sources import register_source

if TYPE_CHECKING:
    import torch

MAX_HEADER = 100 * 1024 * 1024
INDEX_NAMES = ("model.safetensors.index.json",)
BIN_INDEX = "pytorch_model.bin.index.json"
STALWART_KEY = "stalwart"


# --------------------------------------------------------------------------- safetensors files


class SafetensorsFile:
    """A parsed safetensors file: entries (dtype, shape, absolute byte range) and metadata."""

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            self.fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise FormatError(f"{path}: file is missing") from None
        try:
            self._parse()
        except BaseException:
            os.close(self.fd)
            raise

    def _parse(self) -> None:
        size = os.fstat(self.fd).st_size
        head = os.pread(self.fd, 8, 0)
        if len(head) < 8:
            raise FormatError(f"{self.path}: truncated safetensors file ({size} bytes)")
        n = int.from_bytes(head, "little")
        if n > MAX_HEADER or 8 + n > size:
            raise FormatError(f"{self.path}: header length {n} is impossible for a {size}-byte file (truncated or not safetensors)")
        try:
            header = json.loads(os.pread(self.fd, n, 8).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise FormatError(f"{self.path}: safetensors header is not valid JSON ({e})") from None
        if not isinstance(header, dict):
            raise FormatError(f"{self.path}: safetensors header is not a JSON object")
        meta = header.pop("__metadata__", None) or {}
        self.metadata: dict[str, str] = meta if isinstance(meta, dict) else {}
        self.data_start = 8 + n
        self.entries: dict[str, tuple[DType, tuple[int, ...], int, int]] = {}
        end_max = 0
        for name, info in header.items():
            try:
                dtype = dtype_from_code(info["dtype"])
                shape = tuple(int(x) for x in info["shape"])
                begin, end = (int(x) for x in info["data_offsets"])
            except (KeyError, TypeError, ValueError) as e:
                raise FormatError(f"{self.path}: malformed entry {name!r} ({e!r})") from None
            if end - begin != math.prod(shape) * itemsize(dtype) or begin < 0:
                raise FormatError(f"{self.path}: entry {name!r} offsets [{begin}, {end}) do not fit {dtype}{list(shape)}")
            self.entries[name] = (dtype, shape, self.data_start + begin, end - begin)
            end_max = max(end_max, end)
        if self.data_start + end_max > size:
            raise FormatError(f"{self.path} is truncated: its entries need {self.data_start + end_max} bytes, it has {size}")

    def ranges(self, name: str):
        _, _, offset, nbytes = self.entries[name]
        return lambda: [(self.fd, offset, nbytes)]

    def reader(self, name: str):
        dtype, shape, offset, nbytes = self.entries[name]

        def read() -> torch.Tensor:
            import torch

            out = torch.empty(shape, dtype=dtype.torch)
            if nbytes:
                pread_into(self.fd, tensor_bytes(out), offset, self.path)
            return out

        return read

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _stalwart_meta(metadata: dict) -> dict:
    raw = metadata.get(STALWART_KEY)
    if not raw:
        return {}
    try:
        out = json.loads(raw)
    except (TypeError, json.JSONDecodeError):
        return {}
    return out if isinstance(out, dict) else {}


# --------------------------------------------------------------------------- reading


def _shard_files(path: str) -> tuple[str, list[str], dict[str, str] | None] | None:
    """(kind, files, weight_map) of a Hugging Face checkpoint at ``path``, or None."""
    if os.path.isfile(path):
        if path.endswith(".safetensors"):
            return "safetensors", [path], None
        return None
    if not os.path.isdir(path):
        return None
    names = sorted(os.listdir(path))
    for idx in [*INDEX_NAMES, *[n for n in names if n.endswith(".safetensors.index.json") and n not in INDEX_NAMES]]:
        if idx in names:
            wmap = _read_index(os.path.join(path, idx))
            files = sorted(set(wmap.values()))
            return "safetensors", [os.path.join(path, idx), *(os.path.join(path, f) for f in files)], wmap
    st = [n for n in names if n.endswith(".safetensors")]
    if st:
        return "safetensors", [os.path.join(path, n) for n in st], None
    if BIN_INDEX in names:
        wmap = _read_index(os.path.join(path, BIN_INDEX))
        return "bin", [os.path.join(path, BIN_INDEX), *(os.path.join(path, f) for f in sorted(set(wmap.values())))], wmap
    bins = [n for n in names if re.match(r"^pytorch_model(-\d+-of-\d+)?\.bin$", n)]
    if bins:
        return "bin", [os.path.join(path, n) for n in bins], None
    return None


def _read_index(path: str) -> dict[str, str]:
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
        wmap = obj["weight_map"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise FormatError(f"{path}: not a valid shard index ({e})") from None
    if not isinstance(wmap, dict) or not all(isinstance(v, str) and "/" not in v and v not in (".", "..") for v in wmap.values()):
        raise FormatError(f"{path}: weight_map must map tensor names to file names in the same directory")
    return {str(k): v for k, v in wmap.items()}


class HFSource(ConvertSource):
    """A Hugging Face checkpoint (see the module docstring)."""

    default_format = "hf"

    def __init__(self, path: str, kind: str, files: list[str], weight_map: dict[str, str] | None) -> None:
        super().__init__(path)
        self.meta.format = "hf-safetensors" if kind == "safetensors" else "hf-bin"
        self.consume(*files)
        files = [f for f in files if not f.endswith(".index.json")]
        if kind == "safetensors":
            self._read_safetensors(files, weight_map)
        else:
            self._read_bin(files, weight_map)

    def _read_safetensors(self, files: list[str], weight_map: dict[str, str] | None) -> None:
        opened = []
        try:
            for f in files:
                opened.append(SafetensorsFile(f))
        except BaseException:
            for sf in opened:
                sf.close()
            raise
        for sf in opened:
            self.on_close(sf.close)
        extra: dict = {}
        for sf in opened:
            extra.update(_stalwart_meta(sf.metadata))
        if any("DCP_SHARDING_INFO" in sf.metadata for sf in opened):
            self._read_dcp_sharded(opened)
        else:
            owner: dict[str, SafetensorsFile] = {}
            for sf in opened:
                for name in sf.entries:
                    if name in owner:
                        raise FormatError(f"{self.path}: tensor {name!r} is in both {owner[name].path} and {sf.path}")
                    if weight_map is not None and os.path.basename(sf.path) != weight_map.get(name, os.path.basename(sf.path)):
                        continue
                    owner[name] = sf
            if weight_map is not None:
                missing = [n for n, f in weight_map.items() if n not in owner]
                if missing:
                    raise FormatError(f"{self.path}: the index lists {missing[:5]}, which its shard files do not hold")
                names = list(weight_map)
            else:
                names = [n for sf in opened for n in sf.entries]
            self._add_model(names, lambda n: owner[n].entries[n][:2], lambda n: owner[n].reader(n), extra,
                            lambda n: owner[n].ranges(n))
        self.meta.info = {"files": len(opened)}

    def _read_dcp_sharded(self, opened: list[SafetensorsFile]) -> None:
        pieces: dict[str, list] = {}
        for sf in opened:
            try:
                info = json.loads(sf.metadata.get("DCP_SHARDING_INFO") or "{}")
            except json.JSONDecodeError:
                raise FormatError(f"{sf.path}: malformed DCP_SHARDING_INFO metadata") from None
            for name, (dtype, shape, _, _) in sf.entries.items():
                offsets = tuple((info.get(name) or {}).get("saved_offsets") or [0] * len(shape))
                pieces.setdefault(name, []).append((sf, name, dtype, shape, offsets))
        shapes = {}
        for name, ps in pieces.items():
            dims = len(ps[0][3])
            shapes[name] = tuple(max(p[4][d] + p[3][d] for p in ps) for d in range(dims))
            if len({p[2] for p in ps}) != 1:
                raise FormatError(f"{self.path}: pieces of {name!r} have different dtypes")

        def reader(name):
            def read():
                import torch

                ps = pieces[name]
                out = torch.empty(shapes[name], dtype=ps[0][2].torch)
                covered = 0
                for sf, n, _, shape, offs in ps:
                    part = sf.reader(n)()
                    out[tuple(slice(o, o + s) for o, s in zip(offs, shape))] = part
                    covered += part.numel()
                if covered != out.numel():
                    raise FormatError(f"{self.path}: the pieces of {name!r} do not cover it exactly")
                return out
            return read

        self._add_model(list(pieces), lambda n: (pieces[n][0][2], shapes[n]), reader, {})

    def _read_bin(self, files: list[str], weight_map: dict[str, str] | None) -> None:
        owner: dict[str, TensorRef] = {}
        for f in files:
            lf = LazyFile(f)
            self.on_close(lf.close)
            sd = lf.obj
            if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
                sd = sd["state_dict"]
            if not isinstance(sd, dict):
                raise FormatError(f"{f}: not a state dict")
            for name, ref in sd.items():
                if isinstance(ref, TensorRef):
                    if name in owner:
                        raise FormatError(f"{self.path}: tensor {name!r} is in two .bin shards")
                    owner[name] = ref
        names = list(weight_map) if weight_map is not None else list(owner)
        missing = [n for n in names if n not in owner]
        if missing:
            raise FormatError(f"{self.path}: the index lists {missing[:5]}, which its .bin shards do not hold")
        seen: dict[tuple, str] = {}
        for n in list(names):
            key = owner[n].alias_key()
            if owner[n].numel and key in seen:
                self.aliases[n] = seen[key]
                names.remove(n)
            else:
                seen.setdefault(key, n)
        self._add_model(names, lambda n: (owner[n].dtype, owner[n].shape), lambda n: owner[n].read, {},
                        lambda n: _ref_ranges(owner[n]))
        self.aliases = {a: o for a, o in self.aliases.items() if o in self.tensors}

    def _add_model(self, names, info, reader, extra: dict, ranges=None) -> None:
        buffers = set(extra.get("buffers") or [])
        frozen = set(extra.get("frozen") or [])
        aliases = extra.get("aliases") or {}
        for name in names:
            if name in aliases:
                continue
            dtype, shape = info(name)
            role = "buffer" if name in buffers else "param"
            self.add(SourceTensor(name, tuple(shape), dtype, role, reader(name),
                                  requires_grad=(name not in frozen) if role == "param" else None,
                                  ranges=ranges(name) if ranges is not None else None))
        for alias, owner in aliases.items():
            if owner in self.tensors and alias not in self.tensors:
                self.aliases[alias] = owner
        if isinstance(extra.get("step"), int):
            self.meta.step = extra["step"]


def _ref_ranges(ref: TensorRef):
    if not ref.is_contiguous():
        return None
    return lambda: [ref.byte_range()]


def open_hf(path: str) -> HFSource | None:
    """The Hugging Face weights at ``path`` (a file or a directory), or None if there are none."""
    found = _shard_files(path)
    if found is None:
        if os.path.isfile(path) and path.endswith(".bin") and is_zip_file(path):
            return None  # a single pytorch_model.bin is a torch.save file
        return None
    kind, files, wmap = found
    return HFSource(path, kind, files, wmap)


def _detect(path: str, options: dict) -> HFSource | None:
    return open_hf(path)


register_source("hf", _detect, priority=50)


# --------------------------------------------------------------------------- writing


def shard_plan(tensors: list, max_bytes: int) -> list[list]:
    """Hugging Face's greedy split: in order, a new shard when the next tensor would not fit."""
    shards: list[list] = []
    current: list = []
    size = 0
    for t in tensors:
        n = t.nbytes
        if current and size + n > max_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(t)
        size += n
    if current:
        shards.append(current)
    return shards


def shard_name(i: int, n: int) -> str:
    return "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def safetensors_header(entries: list[tuple[str, DType, tuple[int, ...]]], metadata: dict[str, str]) -> tuple[bytes, dict]:
    """Header bytes (length prefix included, space padded to 8) and each entry's data offset.

    Entries are laid out as safetensors' own writer does: by element size
    (largest first), then by name, so every tensor is naturally aligned.
    """
    order = sorted(entries, key=lambda e: (-itemsize(e[1]), e[0]))
    header: dict = {"__metadata__": metadata}
    offsets = {}
    pos = 0
    for name, dtype, shape in order:
        code = safetensors_code(dtype)
        if code is None:
            raise ConversionError(f"tensor {name!r} has dtype {dtype}, which safetensors cannot store")
        n = math.prod(shape) * itemsize(dtype)
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [pos, pos + n]}
        offsets[name] = pos
        pos += n
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=True).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw, offsets


class SafetensorsStreamWriter:
    """Writes a safetensors file sequentially: the header (known up front), then every
    tensor in file order (element size descending, then name), past the page cache."""

    def __init__(self, path: str, entries: list[tuple[str, DType, tuple[int, ...]]], metadata: dict[str, str]) -> None:
        self.path = path
        head, self.offsets = safetensors_header(entries, metadata)
        self.data_start = len(head)
        self.sizes = {n: math.prod(s) * itemsize(d) for n, d, s in entries}
        self.order = sorted(self.offsets, key=lambda n: self.offsets[n])
        self.next = 0
        self.file = DirectWriter(path)
        self.file.write(head)

    def write(self, name: str, tensor) -> None:
        """Append ``tensor`` (or the source bytes of :class:`RawBytes`), which must be the next entry."""
        if self.next >= len(self.order) or self.order[self.next] != name:
            raise FormatError(f"{self.path}: {name!r} written out of file order")
        size = tensor.nbytes if isinstance(tensor, RawBytes) else tensor.numel() * tensor.element_size()
        if size != self.sizes[name]:
            raise FormatError(f"{self.path}: {name!r} is {size} bytes, declared {self.sizes[name]}")
        if isinstance(tensor, RawBytes):
            for fd, off, n in tensor.ranges:
                try:
                    self.file.write_from_fd(fd, off, n, tensor.where)
                except EOFError as e:
                    raise FormatError(str(e)) from None
        elif size:
            self.file.write(tensor_bytes(tensor.contiguous()))
        self.next += 1

    def close(self, fsync: bool = False) -> None:
        if self.next != len(self.order):
            raise FormatError(f"{self.path}: tensors never written: {self.order[self.next:][:5]}")
        self.file.close(fsync)

    def abort(self) -> None:
        self.file.abort()


class HFTarget(Target):
    name = "hf"
    description = "Hugging Face safetensors, sharded by --max-shard-size, with index"
    keeps_optimizer = False
    accepts_raw = True

    def _shards(self, state: OutState) -> list[list]:
        return shard_plan(state.model(), int(self.options.get("max_shard_size") or 5 * 10**9))

    def order(self, state: OutState) -> list:
        # each shard's tensors in their file order, so every file is written sequentially
        return [t for shard in self._shards(state) for t in sorted(shard, key=lambda t: (-itemsize(t.dtype), t.name))]

    def _metadata(self, state: OutState) -> dict[str, str]:
        extra: dict = {}
        if state.aliases:
            extra["aliases"] = dict(sorted(state.aliases.items()))
        buffers = [t.name for t in state.model() if t.role == "buffer"]
        if buffers:
            extra["buffers"] = buffers
        frozen = [t.name for t in state.model() if t.role == "param" and t.requires_grad is False]
        if frozen:
            extra["frozen"] = frozen
        if state.meta.step is not None:
            extra["step"] = state.meta.step
        meta = {"format": "pt"}
        if extra:
            meta[STALWART_KEY] = json.dumps(extra, separators=(",", ":"), sort_keys=True)
        return meta

    def plan(self, state: OutState) -> list[PlannedFile]:
        shards = self._shards(state)
        meta = self._metadata(state)
        out = []
        for i, shard in enumerate(shards):
            head, _ = safetensors_header([(t.name, t.dtype, t.shape) for t in shard], meta)
            out.append(PlannedFile(shard_name(i, len(shards)), len(head) + sum(t.nbytes for t in shard), len(shard)))
        if len(shards) > 1:
            out.append(PlannedFile(INDEX_NAMES[0], 0))
        return out

    def notes(self, state: OutState) -> list[str]:
        if state.aliases:
            return [f"hf: tied aliases {sorted(state.aliases)[:4]} are stored once (under their owner), as transformers expects"]
        return []

    def write(self, out: str, state: OutState, stream, *, fsync: bool = True) -> None:
        shards = self._shards(state)
        meta = self._metadata(state)
        n = len(shards)
        file_of = {t.name: i for i, shard in enumerate(shards) for t in shard}
        writers: dict[int, SafetensorsStreamWriter] = {}
        remaining = {i: len(s) for i, s in enumerate(shards)}
        try:
            for ot, tensor in stream:
                i = file_of[ot.name]
                w = writers.get(i)
                if w is None:
                    w = writers[i] = SafetensorsStreamWriter(
                        os.path.join(out, shard_name(i, n)), [(t.name, t.dtype, t.shape) for t in shards[i]], meta
                    )
                w.write(ot.name, tensor)
                remaining[i] -= 1
                if remaining[i] == 0:
                    w.close(fsync)
        except BaseException:
            for w in writers.values():
                w.abort()
            raise
        if n > 1:
            index = {
                "metadata": {"total_size": sum(t.nbytes for t in state.model())},
                "weight_map": {t.name: shard_name(file_of[t.name], n) for t in state.model()},
            }
            data = (json.dumps(index, indent=2, sort_keys=True) + "\n").encode("utf-8")
            with open(os.path.join(out, INDEX_NAMES[0]), "wb") as f:
                f.write(data)
                if fsync:
                    os.fsync(f.fileno())


__all__ = ["HFSource", "HFTarget", "SafetensorsFile", "SafetensorsStreamWriter", "open_hf", "safetensors_header", "shard_plan"]
