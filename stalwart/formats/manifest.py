"""The manifest: the single source of truth of a checkpoint (see docs/FORMAT.md).

``manifest.json`` is written last; its presence commits the checkpoint. It holds the
source layout (mesh, ZeRO groups, every tensor's shape, dtype, role, aliases and
placement rule), the data files (path, size, header length, header digest), the
step, the source topology, small JSON objects and the structure of the saved state.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from dataclasses import dataclass, field

from stalwart import __version__
from stalwart.errors import FormatError, LayoutError, StalwartError
from stalwart.formats.checksum import DEFAULT_BLOCK_SIZE
from stalwart.formats.datafile import FileRecord
from stalwart.formats.layout import Layout

MANIFEST_NAME = "manifest.json"
FORMAT_NAME = "stalwart-checkpoint"
FORMAT_VERSION = 2  # the newest this module reads; 2 adds per-tensor panels ("panels")


def rank_file_name(rank: int) -> str:
    return f"rank-{rank:05d}.safetensors"


def check_relative_path(path: str, where: str) -> str:
    """Reject paths that would escape the checkpoint directory."""
    if (
        not isinstance(path, str)
        or not path
        or path.startswith(("/", "\\"))
        or os.path.isabs(path)
        or any(part in ("", ".", "..") for part in path.replace("\\", "/").split("/"))
    ):
        raise FormatError(f"{where}: file path {path!r} points outside the checkpoint directory; refusing to read it")
    return path


@dataclass
class Manifest:
    layout: Layout
    files: list[FileRecord]
    step: int | None = None
    objects: dict = field(default_factory=dict)
    tree: dict | None = None
    topology: dict = field(default_factory=dict)
    block_size: int = DEFAULT_BLOCK_SIZE
    created: str = ""
    producer: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._by_rank = {f.rank: f for f in self.files if f.rank is not None}

    def file_of_rank(self, rank: int) -> FileRecord | None:
        return self._by_rank.get(rank)

    def _head(self) -> dict:
        # The lowest version that describes this checkpoint, so older readers still open
        # every checkpoint that uses no newer feature.
        version = 2 if self.layout.has_panels() else 1
        return {
            "format": FORMAT_NAME,
            "version": version,
            "producer": self.producer or {"tool": "stalwart", "version": __version__},
            "created": self.created or _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "step": self.step,
            "topology": {**self.layout.topology(), **self.topology},
            "block_size": self.block_size,
        }

    def _tail(self) -> dict:
        return {"files": [f.to_json() for f in self.files], "objects": self.objects, "tree": self.tree}

    def to_json(self) -> dict:
        layout = self.layout.to_json()
        return {**self._head(), "mesh": layout["mesh"], "groups": layout["groups"], "tensors": layout["tensors"],
                **self._tail()}

    def dumps(self) -> bytes:
        """``json.dumps(self.to_json())``, compact, with the layout's part spliced in from its
        cached encoding (:meth:`Layout.json_parts`): the per-step cost is the files and objects."""
        mesh, groups, tensors = self.layout.json_parts()
        head = json.dumps(self._head(), separators=(",", ":"), ensure_ascii=True)
        tail = json.dumps(self._tail(), separators=(",", ":"), ensure_ascii=True)
        text = f'{head[:-1]},"mesh":{mesh},"groups":{groups},"tensors":{tensors},{tail[1:]}'
        return text.encode("utf-8")

    @staticmethod
    def from_json(obj, where: str) -> Manifest:
        if not isinstance(obj, dict):
            raise FormatError(f"{where}: manifest is not a JSON object")
        if obj.get("format") != FORMAT_NAME:
            raise FormatError(f"{where}: not a stalwart manifest (format={obj.get('format')!r})")
        version = obj.get("version")
        if not isinstance(version, int):
            raise FormatError(f"{where}: manifest has no integer version")
        if version > FORMAT_VERSION:
            raise FormatError(
                f"{where}: manifest version {version} is newer than this stalwart {__version__} supports"
                f" (up to {FORMAT_VERSION}); upgrade stalwart to read it"
            )
        try:
            layout = Layout.from_json({"mesh": obj["mesh"], "groups": obj.get("groups", {}), "tensors": obj["tensors"]})
            files = [FileRecord.from_json(f) for f in obj["files"]]
        except KeyError as e:
            raise FormatError(f"{where}: manifest lacks the field {e.args[0]!r}") from None
        except LayoutError as e:
            raise FormatError(f"{where}: {e}") from None
        except StalwartError:
            raise
        except (TypeError, ValueError) as e:
            raise FormatError(f"{where}: malformed manifest ({e})") from None
        for f in files:
            check_relative_path(f.path, where)
        step = obj.get("step")
        if step is not None and not isinstance(step, int):
            raise FormatError(f"{where}: step {step!r} is not an integer")
        block_size = obj.get("block_size", DEFAULT_BLOCK_SIZE)
        return Manifest(
            layout=layout,
            files=files,
            step=step,
            objects=obj.get("objects") or {},
            tree=obj.get("tree"),
            topology=obj.get("topology") or {},
            block_size=int(block_size),
            created=str(obj.get("created", "")),
            producer=obj.get("producer") or {},
        )


def read_manifest(ckpt_dir: str) -> Manifest:
    path = os.path.join(ckpt_dir, MANIFEST_NAME)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise FormatError(f"{ckpt_dir} has no {MANIFEST_NAME}: not a committed stalwart checkpoint") from None
    except IsADirectoryError:
        raise FormatError(f"{path} is a directory, not a manifest") from None
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{path}: manifest is not valid JSON ({e})") from None
    return Manifest.from_json(obj, path)
