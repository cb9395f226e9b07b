"""Atomic file operations and the commit protocol's on-disk pointers.

Commit order (DESIGN.md): data files, fsync; manifest to a temporary name, fsync,
rename, fsync the directory; then the root's ``latest`` pointer the same way.
A step directory without a manifest does not exist.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import uuid

from stalwart.errors import FormatError

LATEST_NAME = "latest"
STEP_RE = re.compile(r"^step-(\d+)$")


def step_dirname(step: int) -> str:
    return f"step-{step:08d}"


def parse_step_dirname(name: str) -> int | None:
    m = STEP_RE.match(name)
    return int(m.group(1)) if m else None


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str, data: bytes, *, fsync: bool = True) -> None:
    """Write ``data`` to ``path`` so that readers see the old content or the new, never a mix."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex[:12]}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        if fsync:
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        _silent_unlink(tmp)
        raise
    os.close(fd)
    try:
        os.replace(tmp, path)
    except BaseException:
        _silent_unlink(tmp)
        raise
    if fsync:
        fsync_dir(directory)


def _silent_unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def write_latest(root: str, name: str, *, fsync: bool = True) -> None:
    atomic_write(os.path.join(root, LATEST_NAME), (name + "\n").encode(), fsync=fsync)


def read_latest(root: str) -> str | None:
    """The directory name ``root/latest`` points to, or None when there is no pointer."""
    try:
        with open(os.path.join(root, LATEST_NAME), encoding="utf-8") as f:
            name = f.read().strip()
    except FileNotFoundError:
        return None
    if not name or "/" in name or name in (".", ".."):
        raise FormatError(f"{os.path.join(root, LATEST_NAME)} holds an invalid pointer {name!r}")
    return name


def temp_sibling(path: str) -> str:
    """A fresh temporary directory next to ``path`` (same file system, so rename is atomic)."""
    parent = os.path.dirname(os.path.abspath(path)) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(os.path.abspath(path))}.tmp-{uuid.uuid4().hex[:12]}")
    os.mkdir(tmp)
    return tmp


def install_dir(tmp: str, path: str, *, fsync: bool = True) -> None:
    """Move a finished temporary directory to ``path``, replacing an existing one."""
    parent = os.path.dirname(os.path.abspath(path)) or "."
    trash = None
    if os.path.lexists(path):
        trash = os.path.join(parent, f".{os.path.basename(os.path.abspath(path))}.old-{uuid.uuid4().hex[:12]}")
        os.rename(path, trash)
    try:
        os.rename(tmp, path)
    except BaseException:
        if trash is not None:
            os.rename(trash, path)
        raise
    if fsync:
        fsync_dir(parent)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)
