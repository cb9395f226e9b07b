"""Writing checkpoints.

Two levels:

* :func:`save` - one process holds the (global) state and writes a whole
  checkpoint, optionally sharded as a layout would shard it. Atomic: everything is
  written into a temporary sibling directory that is renamed into place at the end;
  a failure leaves nothing behind.
* :func:`write_rank` + :func:`commit` - the multi-writer protocol: every rank writes
  its own data file into the step directory in parallel, then one coordinator
  writes the manifest (the commit marker) and the root's ``latest`` pointer.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor

import torch

from stalwart.errors import FormatError, LayoutError
from stalwart.formats.atomic import atomic_write, install_dir, step_dirname, temp_sibling, write_latest
from stalwart.formats.checksum import DEFAULT_BLOCK_SIZE
from stalwart.formats.datafile import FileRecord, write_datafile
from stalwart.formats.layout import Layout, LocalShard, TensorSpec
from stalwart.formats.manifest import MANIFEST_NAME, Manifest, rank_file_name
from stalwart.formats.tree import flatten

Progress = Callable[[int], None]


def find_aliases(tensors: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, list[str]]]:
    """Split tied tensors (same storage, offset, shape, strides, dtype) into owners and aliases."""
    owners: dict[tuple, str] = {}
    unique: dict[str, torch.Tensor] = {}
    aliases: dict[str, list[str]] = {}
    for name, t in tensors.items():
        if t.numel() == 0:
            unique[name] = t
            continue
        key = (
            t.device.type,
            t.untyped_storage().data_ptr(),
            t.storage_offset(),
            tuple(t.shape),
            tuple(t.stride()),
            t.dtype,
        )
        owner = owners.get(key)
        if owner is None:
            owners[key] = name
            unique[name] = t
        else:
            aliases.setdefault(owner, []).append(name)
    return unique, aliases


def local_view(layout: Layout, name: str, tensor: torch.Tensor, rank: int, shard: LocalShard) -> torch.Tensor:
    """``rank``'s local tensor of global ``tensor`` *as stored*: a view when the shard is a
    contiguous run of it; for a tensor with panels, a flat tensor of them (one copy)."""
    if layout.spec(name).panels is not None:
        stored = layout.stored(name, rank)
        covered = sum(p.box.numel for p in stored.pieces) == stored.numel
        flat = (torch.empty if covered else torch.zeros)(stored.numel, dtype=tensor.dtype)
        for p in stored.pieces:
            src = tensor[tuple(slice(o, o + n) for o, n in zip(p.box.offsets, p.box.lengths))]
            flat.as_strided(p.box.lengths, p.strides, p.offset).copy_(src)
        return flat
    if len(shard.pieces) == 1 and tensor.is_contiguous():
        p = shard.pieces[0]
        start, stop = p.span()
        if p.offset == 0 and stop - start == shard.numel == p.box.numel and _contiguous_in_global(p.box, tensor.shape):
            first = sum(o * s for o, s in zip(p.box.offsets, tensor.stride()))
            return tensor.reshape(-1)[first : first + shard.numel].view(shard.shape)
    return layout.split(name, tensor, rank)


def _contiguous_in_global(box, shape) -> bool:
    # A box is one run of the row-major order iff after its first dim of length > 1
    # every dim is whole.
    seen_long = False
    for o, n, full in zip(box.offsets, box.lengths, shape):
        if seen_long and (o != 0 or n != full):
            return False
        if n > 1:
            seen_long = True
    return True


def write_rank(
    ckpt_dir: str,
    layout: Layout,
    rank: int,
    local_tensors: Mapping[str, torch.Tensor],
    *,
    objects: dict | None = None,
    fsync: bool = True,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> FileRecord | None:
    """Write what ``rank`` stores under ``layout`` into ``ckpt_dir``; return its file record.

    ``local_tensors`` maps tensor names to this rank's local shards (the layout's
    local shapes). Replicas that are not the designated writer of a tensor skip it.
    Tensors with panels (:meth:`Layout.with_storage_panels`) are stored arranged in
    them. Returns None when the rank stores nothing and has no objects.
    """
    return _write_rank(ckpt_dir, layout, rank, local_tensors, objects=objects, fsync=fsync, block_size=block_size)


def _write_rank(
    ckpt_dir: str,
    layout: Layout,
    rank: int,
    local_tensors: Mapping[str, torch.Tensor],
    *,
    objects: dict | None,
    fsync: bool,
    block_size: int,
    arranged: bool = False,
) -> FileRecord | None:
    # ``arranged``: the tensors of entries with panels hold their bytes arranged already.
    entries = []
    for name, shard in layout.writes(rank):
        t = local_tensors.get(name)
        if t is None:
            raise LayoutError(f"rank {rank} must store its share of {name!r} but was not given it")
        if tuple(t.shape) != shard.shape and t.numel() != shard.numel:
            raise LayoutError(
                f"rank {rank}: local shard of {name!r} has shape {list(t.shape)}, layout expects {list(shard.shape)}"
            )
        spec = layout.spec(name)
        if t.dtype != spec.dtype:
            raise LayoutError(f"rank {rank}: {name!r} is {t.dtype}, layout says {spec.dtype}")
        entries.append((name, t.reshape(shard.shape)))  # arranged: the panels' bytes, in the shard's shape
    if not entries and not objects:
        return None
    rel = rank_file_name(rank)
    panels = {n: layout.spec(n).panels for n, _ in entries if layout.spec(n).panels is not None}
    return write_datafile(
        os.path.join(ckpt_dir, rel), entries, rank=rank, objects=objects, block_size=block_size, fsync=fsync,
        relpath=rel, panels=panels, arranged=arranged,
    )


def commit(
    ckpt_dir: str,
    layout: Layout,
    records: list[FileRecord],
    *,
    step: int | None = None,
    objects: dict | None = None,
    tree: dict | None = None,
    topology: dict | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
    fsync: bool = True,
    created: str | None = None,
    producer: dict | None = None,
) -> Manifest:
    """Write the manifest of a checkpoint whose data files are all written (the commit point).

    ``created`` / ``producer`` override the timestamp and tool record (converters pass
    fixed values so the same input gives byte-identical output).
    """
    records = sorted(records, key=lambda r: (r.rank if r.rank is not None else -1, r.path))
    manifest = Manifest(
        layout=layout,
        files=records,
        step=step,
        objects=dict(objects or {}),
        tree=tree,
        topology=dict(topology or {}),
        block_size=block_size,
        created=created or "",
        producer=dict(producer or {}),
    )
    atomic_write(os.path.join(ckpt_dir, MANIFEST_NAME), manifest.dumps(), fsync=fsync)
    return manifest


def save(
    state_dict: Mapping,
    path: str,
    *,
    layout: Layout | None = None,
    objects: dict | None = None,
    step: int | None = None,
    fsync: bool = True,
    workers: int = 2,
    progress: Progress | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
    storage_panels: bool = True,
) -> str:
    """Save ``state_dict`` as a stalwart checkpoint; return the checkpoint directory.

    ``state_dict`` may be nested (dicts, lists, tensors, numbers, strings, bytes); it
    comes back from :func:`~stalwart.formats.load` with the same structure. Tied
    tensors are stored once and come back tied. With ``layout``, the (global)
    tensors are written as that layout shards them, one data file per rank; with
    ``storage_panels`` (default), tensors sharded along a dim other than 0 store their
    shards as panels along it (:meth:`Layout.with_storage_panels`), so that loading
    them resharded along it reads only about the bytes it needs.

    With ``step``, ``path`` is a checkpoint *root*: the checkpoint goes to
    ``path/step-XXXXXXXX`` and ``path/latest`` is updated after it commits. Without,
    ``path`` is the checkpoint directory itself (replaced atomically if it exists).
    """
    tensors, tree = flatten(state_dict)
    unique, alias_map = find_aliases(tensors)
    if layout is None:
        layout = Layout.single(unique)
    else:
        _check_layout_matches(layout, unique, alias_map)
    specs = []
    for name, spec in layout.tensors.items():
        t = unique[name]
        if tuple(t.shape) != spec.shape:
            raise LayoutError(f"tensor {name!r} has shape {list(t.shape)}, layout says {list(spec.shape)}")
        specs.append(_with_aliases(spec, alias_map.get(name, []), t.dtype))
    layout = layout.with_tensors(specs)
    if storage_panels:
        layout = layout.with_storage_panels()

    if step is not None:
        os.makedirs(path, exist_ok=True)
        final = os.path.join(path, step_dirname(step))
    else:
        final = path
    tmp = temp_sibling(final)
    try:
        def write_one(rank: int) -> FileRecord | None:
            local = {name: local_view(layout, name, unique[name], rank, shard) for name, shard in layout.writes(rank)}
            rec = _write_rank(tmp, layout, rank, local, objects=None, fsync=fsync, block_size=block_size, arranged=True)
            if progress is not None and rec is not None:
                progress(rec.size)
            return rec

        if workers > 1 and layout.world_size > 1:
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="stalwart-save") as pool:
                records = [r for r in pool.map(write_one, range(layout.world_size)) if r is not None]
        else:
            records = [r for r in map(write_one, range(layout.world_size)) if r is not None]
        commit(tmp, layout, records, step=step, objects=objects, tree=tree, block_size=block_size, fsync=fsync)
        install_dir(tmp, final, fsync=fsync)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if step is not None:
        write_latest(path, os.path.basename(final), fsync=fsync)
    return final


def _with_aliases(spec: TensorSpec, aliases: list[str], dtype: torch.dtype) -> TensorSpec:
    from dataclasses import replace

    if spec.dtype != dtype:
        raise LayoutError(f"tensor {spec.name!r} is {dtype}, layout says {spec.dtype}")
    return replace(spec, aliases=tuple(dict.fromkeys((*spec.aliases, *aliases))))


def _check_layout_matches(layout: Layout, unique: Mapping[str, torch.Tensor], alias_map: Mapping[str, list[str]]) -> None:
    names = set(unique)
    described = set(layout.tensors)
    missing = sorted(names - described)
    extra = sorted(described - names)
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"tensors without a placement: {missing[:5]}")
        if extra:
            parts.append(f"layout tensors not in the state: {extra[:5]}")
        raise FormatError("the layout does not describe the state being saved: " + "; ".join(parts))


__all__ = ["commit", "find_aliases", "save", "write_rank"]
