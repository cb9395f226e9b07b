"""torch.distributed.checkpoint (DCP) storage layer for the stalwart format.

DCP users switch with one argument::

    dcp.save(state_dict, storage_writer=stalwart.ckpt.StorageWriter(path))
    dcp.load(state_dict, storage_reader=stalwart.ckpt.StorageReader(path))

:class:`StorageWriter` writes a native stalwart checkpoint: every rank writes its own
data file (``rank-%05d.safetensors``) holding the chunks DCP's planner gave it; the
coordinator's ``finish`` writes ``manifest.json`` last (temp name, fsync, rename), which
is the commit. DCP chunks are N-D boxes of the global tensor; a tensor whose chunks are
exactly ``torch.chunk`` slices of one dimension over the ranks in order (DTensor /
FSDP2 ``Shard(d)``) is stored as a :class:`~stalwart.formats.layout.Sharded` rule,
anything else as :class:`~stalwart.formats.layout.Explicit` fragments. Non-tensor values
(which DCP serialises itself) are stored as raw ``uint8`` entries, checksummed like
every other entry, and listed in ``objects["dcp"]["bytes"]``.

:class:`StorageReader` reads **any** stalwart checkpoint - DCP-written, ``protect()``
snapshots, ``stalwart.formats.save`` with ZeRO flat placements: every stored piece is
(decomposed into) boxes, which become DCP chunks, and DCP's planner reshards from them.
Every byte read is verified against its block checksums. Tied aliases are exposed under
their own names too.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import (
    LoadItemType,
    LoadPlan,
    LoadPlanner,
    SavePlan,
    SavePlanner,
    WriteItemType,
)
from torch.distributed.checkpoint.storage import StorageReader as _DCPStorageReader
from torch.distributed.checkpoint.storage import StorageWriter as _DCPStorageWriter
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future

from stalwart.errors import FormatError, LayoutError
from stalwart.formats.checksum import DEFAULT_BLOCK_SIZE
from stalwart.formats.datafile import FileRecord, write_datafile
from stalwart.formats.geometry import Box
from stalwart.formats.layout import Explicit, Fragment, Layout, Mesh, Placement, Shard, Sharded, TensorSpec
from stalwart.formats.manifest import MANIFEST_NAME, rank_file_name
from stalwart.formats.reader import Checkpoint, resolve_checkpoint_dir
from stalwart.formats.writer import commit

__all__ = ["StorageReader", "StorageWriter"]


def _done(value) -> Future:
    fut: Future = Future()
    fut.set_result(value)
    return fut


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class StorageWriter(_DCPStorageWriter):
    """Write a DCP save as a native stalwart checkpoint in directory ``path``.

    ``fsync`` (default on) makes every data file and the manifest durable before the
    commit; ``block_size`` is the checksum block size. Saving over an existing
    checkpoint first removes its manifest (the old checkpoint stops existing before
    any of its files is overwritten).
    """

    def __init__(self, path: str | os.PathLike, *, fsync: bool = True, block_size: int = DEFAULT_BLOCK_SIZE) -> None:
        super().__init__()
        self.path = os.fspath(path)
        self.fsync = fsync
        self.block_size = block_size
        self.is_coordinator = False
        self.rank = 0
        self.use_collectives = True

    @property
    def checkpoint_id(self) -> str:
        return self.path

    def reset(self, checkpoint_id: str | os.PathLike | None = None) -> None:
        if checkpoint_id is not None:
            self.path = os.fspath(checkpoint_id)

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.is_coordinator = is_coordinator
        rank = kwargs.get("rank")
        self.rank = int(rank) if rank is not None else _rank()
        self.use_collectives = bool(kwargs.get("use_collectives", True))
        if not self.use_collectives:
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                raise FormatError("stalwart's StorageWriter needs use_collectives=True: the coordinator writes one"
                                  " manifest describing every rank's file")

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        # The coordinator runs this before any rank writes: an older checkpoint in the
        # directory is uncommitted before its files can be overwritten.
        os.makedirs(self.path, exist_ok=True)
        old = os.path.join(self.path, MANIFEST_NAME)
        if os.path.exists(old):
            os.remove(old)
        return plans

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        os.makedirs(self.path, exist_ok=True)
        entries: list[tuple[str, torch.Tensor]] = []
        results: list[WriteResult] = []
        seen: set[str] = set()
        for item in plan.items:
            fqn = item.index.fqn
            if fqn in seen:
                raise LayoutError(f"rank {self.rank} holds two chunks of {fqn!r}; stalwart stores one piece per rank per tensor")
            seen.add(fqn)
            data = planner.resolve_data(item)
            if item.type == WriteItemType.BYTE_IO:
                raw = data.getvalue() if isinstance(data, io.BytesIO) else bytes(data)
                t = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
                info = {"rank": self.rank, "nbytes": t.numel()}
            else:
                t = data.detach()
                if t.device.type != "cpu":
                    t = t.cpu()
                t = t.contiguous()
                chunk = item.tensor_data.chunk
                info = {"rank": self.rank, "offsets": tuple(chunk.offsets), "sizes": tuple(chunk.sizes)}
            if t.numel():
                entries.append((fqn, t))
            else:
                info["empty"] = True
            results.append(WriteResult(index=item.index, size_in_bytes=t.numel() * t.element_size(), storage_data=info))
        record = None
        if entries:
            rel = rank_file_name(self.rank)
            record = write_datafile(os.path.join(self.path, rel), entries, rank=self.rank, block_size=self.block_size,
                                    fsync=self.fsync, relpath=rel)
        if results:
            results[0] = WriteResult(results[0].index, results[0].size_in_bytes,
                                     {**results[0].storage_data, "record": record.to_json() if record else None})
        return _done(results)

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        world = len(results)
        records: list[FileRecord] = []
        where: dict[str, list[tuple[int, dict]]] = {}
        for per_rank in results:
            for r in per_rank:
                info = r.storage_data
                if info.get("record") is not None:
                    records.append(FileRecord.from_json(info["record"]))
                where.setdefault(r.index.fqn, []).append((int(info["rank"]), info))
        mesh = Mesh(("dp",), (max(world, 1),))
        specs: list[TensorSpec] = []
        byte_items: list[str] = []
        for fqn, md in metadata.state_dict_metadata.items():
            found = [(rank, info) for rank, info in where.get(fqn, []) if not info.get("empty")]
            if isinstance(md, BytesStorageMetadata):
                if len(found) != 1:
                    raise FormatError(f"{fqn!r}: expected one rank to write this non-tensor value, got {len(found)}")
                rank, info = found[0]
                n = int(info["nbytes"])
                specs.append(TensorSpec(fqn, (n,), torch.uint8, Explicit(((rank, Fragment(Box((0,), (n,)))),))))
                byte_items.append(fqn)
                continue
            shape = tuple(md.size)
            frags = {rank: Box(tuple(info["offsets"]), tuple(info["sizes"])) for rank, info in found}
            if len(frags) != len(found):
                raise LayoutError(f"{fqn!r}: a rank wrote two chunks")
            specs.append(TensorSpec(fqn, shape, md.properties.dtype, _placement(shape, frags, world)))
        layout = Layout(mesh, specs)
        planner_data = metadata.planner_data if isinstance(metadata.planner_data, Mapping) else {}
        objects = {"dcp": {
            "bytes": byte_items,
            "planner_data": {k: [p if isinstance(p, (int, str)) else str(p) for p in v] for k, v in planner_data.items()
                             if isinstance(v, (tuple, list))},
            "version": getattr(metadata, "version", None),
        }}
        commit(self.path, layout, records, objects=objects, topology={"framework": "torch.distributed.checkpoint"},
               block_size=self.block_size, fsync=self.fsync)

    def storage_meta(self) -> StorageMeta | None:
        return StorageMeta(checkpoint_id=self.path)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        return isinstance(checkpoint_id, (str, os.PathLike))


def _placement(shape: tuple[int, ...], frags: dict[int, Box], world: int) -> Placement:
    """A Sharded rule when the chunks are torch.chunk slices of one dim over ranks 0..world-1, else Explicit."""
    if world > 1 and shape and len(frags) >= 1:
        for dim in range(len(shape)):
            rule = Shard(dim, "dp")
            ok = True
            for i in range(world):
                start, backed, _ = rule.parts(shape[dim], world, i)[0]
                box = frags.get(i)
                if backed == 0:
                    ok = box is None
                else:
                    want = Box(tuple(start if d == dim else 0 for d in range(len(shape))),
                               tuple(backed if d == dim else n for d, n in enumerate(shape)))
                    ok = box == want
                if not ok:
                    break
            if ok:
                return Sharded((rule,))
    return Explicit(tuple(sorted((rank, Fragment(box)) for rank, box in frags.items())))


class StorageReader(_DCPStorageReader):
    """Read any stalwart checkpoint (a checkpoint dir, or a root with ``latest``) through DCP.

    DCP's planner sees every stored piece as chunks (N-D boxes) and reshards from them;
    each chunk read is a verified byte-range read of the data file that holds it.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        super().__init__()
        self.path = os.fspath(path)
        self._ckpt: Checkpoint | None = None
        self._where: dict[MetadataIndex, str] = {}

    def reset(self, checkpoint_id: str | os.PathLike | None = None) -> None:
        if checkpoint_id is not None:
            self.path = os.fspath(checkpoint_id)
        self._close()

    def _open(self) -> Checkpoint:
        if self._ckpt is None:
            self._ckpt = Checkpoint(self.path)
        return self._ckpt

    def _close(self) -> None:
        if self._ckpt is not None:
            self._ckpt.close()
            self._ckpt = None

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        ckpt = self._open()
        layout = ckpt.layout
        dcp_objects = ckpt.objects.get("dcp", {}) if isinstance(ckpt.objects, Mapping) else {}
        byte_items = set(dcp_objects.get("bytes", []))
        boxes: dict[str, dict[tuple[int, ...], Box]] = {name: {} for name in layout.tensors}
        for rank in range(layout.world_size):
            for name, shard in layout.writes(rank):
                for piece in shard.pieces:
                    if not piece.box.is_empty():
                        boxes[name].setdefault(piece.box.offsets, piece.box)
        state: dict[str, Any] = {}
        self._where = {}
        aliases: dict[str, list[str]] = {}
        for alias, owner in ckpt.aliases().items():
            aliases.setdefault(owner, []).append(alias)
        for name, spec in layout.tensors.items():
            for key in (name, *aliases.get(name, ())):
                if name in byte_items:
                    state[key] = BytesStorageMetadata()
                    self._where[MetadataIndex(key)] = name
                    continue
                chunks = []
                for box in sorted(boxes[name].values(), key=lambda b: b.offsets):
                    chunks.append(ChunkStorageMetadata(offsets=torch.Size(box.offsets), sizes=torch.Size(box.lengths)))
                    self._where[MetadataIndex(key, box.offsets)] = name
                state[key] = TensorStorageMetadata(properties=TensorProperties(dtype=spec.dtype),
                                                   size=torch.Size(spec.shape), chunks=chunks)
        planner_data = {k: tuple(v) for k, v in dcp_objects.get("planner_data", {}).items()}
        for key in state:
            planner_data.setdefault(key, tuple(key.split(".")))
        return Metadata(state_dict_metadata=state, planner_data=planner_data, storage_data=dict(self._where),
                        storage_meta=StorageMeta(checkpoint_id=self.path))

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        if not self._where:
            self._where = dict(metadata.storage_data or {})

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        ckpt = self._open()
        for item in plan.items:
            idx = item.storage_index
            name = self._where.get(idx) or self._where.get(MetadataIndex(idx.fqn, idx.offset))
            if name is None:
                raise FormatError(f"{self.path}: no stored chunk {idx.fqn!r} at {list(idx.offset or ())}")
            if item.type == LoadItemType.BYTE_IO:
                raw = ckpt.read(name)
                planner.load_bytes(item, io.BytesIO(raw.numpy().tobytes()))
                continue
            base = tuple(idx.offset or ())
            offsets = tuple(b + o for b, o in zip(base, item.storage_offsets))
            data = ckpt.read(name, Box(offsets, tuple(item.lengths)))
            target = planner.resolve_tensor(item).detach()
            target.copy_(data.reshape(target.shape))
            planner.commit_tensor(item, target)
        return _done(None)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        try:
            resolve_checkpoint_dir(os.fspath(checkpoint_id))
        except (FormatError, TypeError):
            return False
        return True

    def __del__(self) -> None:  # pragma: no cover - best effort
        with contextlib.suppress(Exception):
            self._close()
