"""Describe and verify any checkpoint a reader opens (``stalwart inspect`` / ``verify``).

:func:`describe` says what a :class:`~.base.ConvertSource` holds: tensors, roles,
optimizer groups, state objects, the files read and the files not read.

:func:`verify` checks what each format allows:

* **checksums where they exist** - every record of every torch.save zip archive the
  reader uses (DeepSpeed files, ``.pt`` / ``.bin`` / ``.pth``, Trainer and Accelerate
  state) is read through and its CRC-32 compared;
* **completeness** - opening the source already checks that every file the format
  needs is there (rank files, shards an index names, chunks the metadata places) and
  that the pieces of each tensor add up to it; every byte range is then checked to
  lie inside its file and read (or covered by the CRC pass), tensors without byte
  ranges are read whole;
* **shape consistency** - each tensor read comes back with the dtype and shape the
  checkpoint declares.

Neither imports torch unless a tensor has no byte ranges (DCP chunks, views), so
verifying a DeepSpeed, Hugging Face or torch.save checkpoint does not.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field

from stalwart.errors import StalwartError
from stalwart.formats.adapters.base import ConvertSource, Scalar, fill_from_ranges
from stalwart.formats.adapters.safe_load import is_zip_file

CHUNK = 8 * 1024 * 1024
ZIP_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".ckpt", ".tar")


def _files(src: ConvertSource) -> list[str]:
    """The regular files the reader consumed (directories expanded), sorted."""
    out = []
    for p in sorted(src.consumed):
        if os.path.isdir(p):
            for dirpath, _, files in os.walk(p):
                out.extend(os.path.join(dirpath, f) for f in sorted(files))
        elif os.path.isfile(p):
            out.append(p)
    return out


def _rel(src: ConvertSource, path: str) -> str:
    base = os.path.realpath(src.path)
    if os.path.isdir(base):
        return os.path.relpath(path, base)
    return os.path.basename(path)


def describe(src: ConvertSource) -> dict:
    """A JSON-able description of ``src`` (what ``stalwart inspect`` prints)."""
    aliases: dict[str, list[str]] = {}
    for a, o in src.aliases.items():
        aliases.setdefault(o, []).append(a)
    rows = []
    for t in src.tensors.values():
        row = {"name": t.name, "shape": list(t.shape), "dtype": t.dtype.name, "role": t.role, "bytes": t.nbytes}
        if t.slot:
            row["slot"] = f"{t.slot} of {t.param}"
        if t.role == "param" and t.requires_grad is False:
            row["frozen"] = True
        if t.name in aliases:
            row["aliases"] = sorted(aliases[t.name])
        rows.append(row)
    files = _files(src)
    m = src.meta
    objects = sorted(k for k, v in (("optimizer", m.optimizer), ("scheduler", m.scheduler),
                                    ("loss_scaler", m.loss_scaler), ("client", m.client or None)) if v is not None)
    objects += sorted(m.extra_objects)
    info: dict = {
        "path": src.path, "format": m.format, "step": m.step, "topology": dict(m.topology),
        "files": [{"path": _rel(src, f), "bytes": os.path.getsize(f)} for f in files],
        "stored_bytes": sum(os.path.getsize(f) for f in files),
        "tensor_bytes": sum(t.nbytes for t in src.tensors.values()),
        "tensors": rows, "objects": objects, "not_read": src.not_read(), "warnings": list(m.warnings),
        "info": m.info,
    }
    if m.optimizer is not None:
        info["optimizer"] = {
            "class": m.optimizer.get("class"),
            "param_groups": [{"params": len(g.get("params", [])), **{k: v for k, v in g.items() if k != "params"}}
                             for g in m.optimizer.get("param_groups") or []],
        }
    return info


@dataclass
class ForeignVerifyReport:
    """What :func:`verify` found; ``ok`` when there is no problem."""

    path: str
    format: str
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    files_checked: int = 0
    bytes_checked: int = 0
    tensors_checked: int = 0
    checksums_checked: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_total(src: ConvertSource) -> int:
    """Bytes :func:`verify` reads at most (for a progress bar)."""
    return sum(os.path.getsize(f) for f in _files(src)) + sum(t.nbytes for t in src.tensors.values())


def _check_zip(path: str, advance: Callable[[int], None]) -> tuple[int, int]:
    """Read every record of a zip archive, comparing CRC-32s; (records, bytes). Raises on a mismatch."""
    records = nbytes = 0
    with zipfile.ZipFile(path) as zf:
        for zi in zf.infolist():
            if zi.is_dir():
                continue
            with zf.open(zi) as f:  # zipfile compares the CRC-32 when the record is read to its end
                while True:
                    chunk = f.read(CHUNK)
                    if not chunk:
                        break
                    nbytes += len(chunk)
                    advance(len(chunk))
            records += 1
    return records, nbytes


def _file_id(fd_or_path) -> tuple[int, int]:
    st = os.fstat(fd_or_path) if isinstance(fd_or_path, int) else os.stat(fd_or_path)
    return st.st_dev, st.st_ino


def verify(src: ConvertSource, progress: Callable[[int], None] | None = None) -> ForeignVerifyReport:
    """Check ``src`` as far as its format allows (see the module docstring)."""
    advance = progress or (lambda n: None)
    report = ForeignVerifyReport(src.path, src.meta.format)
    crc_checked: set[tuple[int, int]] = set()
    for path in _files(src):
        report.files_checked += 1
        if not (path.endswith(ZIP_SUFFIXES) and is_zip_file(path)):
            continue
        try:
            records, nbytes = _check_zip(path, advance)
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
            report.problems.append(f"{_rel(src, path)}: {e} (the file is corrupt or truncated)")
            continue
        report.checksums_checked += records
        report.bytes_checked += nbytes
        crc_checked.add(_file_id(path))
    sizes: dict[int, int] = {}
    buf = bytearray()
    for name, t in src.tensors.items():
        try:
            if isinstance(getattr(t.reader, "__self__", None), Scalar):
                pass  # a scalar's bytes were read when the source was opened
            elif t.ranges is not None:
                ranges = t.ranges()
                total = sum(n for _, _, n in ranges)
                if total != t.nbytes:
                    raise StalwartError(f"tensor {name!r}: its bytes in the files are {total}, {t.dtype}{list(t.shape)} needs {t.nbytes}")
                for fd, off, n in ranges:
                    size = sizes.get(fd)
                    if size is None:
                        size = sizes[fd] = os.fstat(fd).st_size
                    if off + n > size:
                        raise StalwartError(f"tensor {name!r}: bytes [{off}, {off + n}) run past the end of its file ({size} bytes)")
                if not all(_file_id(fd) in crc_checked for fd, _, _ in ranges):
                    if len(buf) < total:
                        buf = bytearray(total)
                    fill_from_ranges(ranges, memoryview(buf)[:total], src.path)
                    report.bytes_checked += total
                advance(total)
            else:
                src.read(name)  # checks dtype and shape against the declared ones
                report.bytes_checked += t.nbytes
                advance(t.nbytes)
        except StalwartError as e:
            report.problems.append(str(e))
            continue
        except (OSError, ValueError, RuntimeError) as e:
            report.problems.append(f"tensor {name!r}: {e}")
            continue
        report.tensors_checked += 1
    for alias, owner in src.aliases.items():
        if owner not in src.tensors:
            report.problems.append(f"tied name {alias!r} points at {owner!r}, which is not in the checkpoint")
    not_read = src.not_read()
    if not_read:
        report.notes.append(f"not read (not part of the {src.meta.format} checkpoint as stalwart reads it): "
                            + ", ".join(not_read[:12]) + (f" and {len(not_read) - 12} more" if len(not_read) > 12 else ""))
    report.notes.extend(src.meta.warnings)
    return report


__all__ = ["ForeignVerifyReport", "describe", "verify", "verify_total"]
