"""Peer reads: byte ranges of another node's memory snapshot, assembled into a readable view."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import threading

from stalwart.ckpt.redundancy.config import (
    RedundancyError,
    read_text,
)
from stalwart.ckpt.slots import SlotStore
from stalwart.ckpt.storelink import StoreLink

log = logging.getLogger("stalwart.keeper")


_MAX_REQUEST = 64 * 1024 * 1024
SOURCES_FILE = "sources.json"  # in a view: rank -> {"node": who served its file, "rebuilt": decoded by EC}


def missing_reads(ckpt, plan) -> dict[int, list[list]]:
    """The reads of ``plan`` whose data files are not in ``ckpt``'s directory, by rank, as
    ``[entry, start, stop]`` (a node's memory slot holds only its own ranks' files)."""
    out: dict[int, list[list]] = {}
    present: dict[int, bool] = {}
    for read in plan.reads:
        if read.rank not in present:
            record = ckpt.manifest.file_of_rank(read.rank)
            present[read.rank] = record is None or os.path.exists(os.path.join(ckpt.path, record.path))
        if not present[read.rank]:
            out.setdefault(read.rank, []).append([read.entry, read.start, read.stop])
    return out


class PeerService:
    """Serves byte ranges of this keeper's memory snapshots to other nodes' keepers, and
    assembles *views*: a checkpoint directory holding this node's files (hard links to the
    slot) plus the byte ranges a restoring rank needs from other nodes' files (sparse
    files; every range is verified by the reader's checksums, as from any tier)."""

    def __init__(self, keeper: SlotStore, link: StoreLink, node: int, bind_host: str, nodes: int | None = None) -> None:
        self.keeper, self.link, self.node = keeper, link, node
        self.nodes = nodes if nodes is not None else link.nodes
        self.sock = socket.create_server((bind_host, 0), backlog=64)
        self.addr = f"{bind_host}:{self.sock.getsockname()[1]}"
        self.views = os.path.join(keeper.shm_dir, "views")
        link.keep(f"peer/node{node}", self.addr)
        threading.Thread(target=self._accept, name="peer", daemon=True).start()

    # ---------------------------------------------------------------- serving
    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                line = conn.makefile("rb").readline(_MAX_REQUEST)
                self._send(conn, json.loads(line))
            except Exception as e:  # the requester reports it; never take the keeper down
                with contextlib.suppress(OSError):
                    conn.sendall(json.dumps({"ok": False, "error": f"{type(e).__name__}: {e}"}).encode() + b"\n")

    def _send(self, conn: socket.socket, req: dict) -> None:
        if req.get("op") == "manifest":
            self._send_manifest(conn, int(req["step"]))
            return
        from stalwart.formats.datafile import FileRecord, read_header

        step, sid, path = int(req["step"]), req.get("sid"), str(req["path"])
        with self.keeper.cond:
            slot = next((s for s in self.keeper.slots if s.complete and s.step == step and (sid is None or s.sid == sid)
                         and any(r["path"] == path for r in s.done.values())), None)
            if slot is None:
                raise RedundancyError(f"node {self.node} holds no memory snapshot of step {step} with {path}")
            record = FileRecord.from_json(next(r for r in slot.done.values() if r["path"] == path))
            slot.pins += 1
        try:
            full = os.path.join(slot.dir, path)
            fd = os.open(full, os.O_RDONLY)
            try:
                header = read_header(fd, full, record)
                segments = []
                for entry, start, stop in req["ranges"]:
                    e = header.entries.get(entry)
                    if e is None or not 0 <= start <= stop <= e.nbytes:
                        raise RedundancyError(f"{path}: no bytes {start}..{stop} of entry {entry!r}")
                    segments.append([header.data_start + e.begin + start, stop - start])
                head = {"ok": True, "size": record.size, "head": header.data_start, "segments": segments,
                        "rebuilt": slot.rebuilt}
                conn.sendall(json.dumps(head).encode() + b"\n")
                for off, n in [[0, header.data_start], *segments]:
                    while n:
                        sent = os.sendfile(conn.fileno(), fd, off, n)
                        if sent <= 0:
                            raise RedundancyError("peer connection closed")
                        off, n = off + sent, n - sent
            finally:
                os.close(fd)
        finally:
            with self.keeper.cond:
                slot.pins -= 1
                self.keeper.cond.notify_all()

    def _send_manifest(self, conn: socket.socket, step: int) -> None:
        """The manifest and file owners of memory step ``step`` (for a node that holds none of it)."""
        from stalwart.formats.manifest import MANIFEST_NAME

        with self.keeper.cond:
            slot = next((s for s in self.keeper.slots if s.complete and s.step == step), None)
            if slot is None:
                raise RedundancyError(f"node {self.node} holds no memory snapshot of step {step}")
            reply = {"ok": True, "sid": slot.sid, "owners": {str(r): n for r, n in slot.owners.items()},
                     "manifest": read_text(os.path.join(slot.dir, MANIFEST_NAME))}
        conn.sendall(json.dumps(reply).encode() + b"\n")

    def _ask_manifest(self, step: int) -> dict:
        """Step ``step``'s manifest from the first other keeper that holds it in memory."""
        tried = []
        for node in range(self.nodes):
            addr = self.link.get(f"peer/node{node}") if node != self.node else None
            if not addr:
                continue
            host, port = addr.rsplit(":", 1)
            try:
                with socket.create_connection((host, int(port)), timeout=30) as s:
                    s.sendall(json.dumps({"op": "manifest", "step": step}).encode() + b"\n")
                    reply = json.loads(s.makefile("rb").readline(_MAX_REQUEST) or b"{}")
            except OSError as e:
                tried.append(f"node {node}: {e}")
                continue
            if reply.get("ok") and reply.get("manifest"):
                return reply
            tried.append(f"node {node}: {reply.get('error', 'no manifest')}")
        raise RedundancyError(f"no keeper holds step {step} in memory ({'; '.join(tried) or 'no peers'})")

    # ---------------------------------------------------------------- fetching
    def _fetch(self, addr: str, req: dict, dst: str) -> bool:
        """Fetch ranges of a peer's file into ``dst``; returns whether the peer rebuilt that file."""
        host, port = addr.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=120) as s:
            s.sendall(json.dumps(req).encode() + b"\n")
            f = s.makefile("rb")
            reply = json.loads(f.readline(_MAX_REQUEST) or b"{}")
            if not reply.get("ok"):
                raise RedundancyError(f"peer {addr}: {reply.get('error', 'no answer')}")
            fd = os.open(dst, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.ftruncate(fd, int(reply["size"]))
                buf = bytearray(4 << 20)
                for off, n in [[0, int(reply["head"])], *reply["segments"]]:
                    while n:
                        view = memoryview(buf)[: min(n, len(buf))]
                        got = f.readinto(view)
                        if not got:
                            raise RedundancyError(f"peer {addr} closed the connection mid-transfer")
                        os.pwrite(fd, view[:got], off)
                        off, n = off + got, n - got
            finally:
                os.close(fd)
            return bool(reply.get("rebuilt"))

    def view(self, step: int, reads: dict, requester: int) -> str:
        """A checkpoint directory of memory step ``step`` with the ranges ``reads``
        (``{rank: [[entry, start, stop], ...]}``) of other nodes' files fetched."""
        from stalwart.formats.manifest import MANIFEST_NAME, read_manifest

        with self.keeper.cond:
            held = [s for s in self.keeper.slots if s.complete and s.step == step]
            slot = held[0] if held else None
            if slot is not None:
                slot.pins += 1
                sid, owners = slot.sid, dict(slot.owners)
        remote = None
        if slot is None:  # a node that holds none of it (it joined later): everything comes from the peers
            remote = self._ask_manifest(step)
            sid, owners = remote["sid"], {int(r): int(n) for r, n in remote["owners"].items()}
        try:
            out = os.path.join(self.views, f"step-{step}-rank-{requester}")
            shutil.rmtree(out, ignore_errors=True)
            os.makedirs(out)
            if slot is not None:
                manifest = read_manifest(slot.dir)
                shutil.copyfile(os.path.join(slot.dir, MANIFEST_NAME), os.path.join(out, MANIFEST_NAME))
                for f in manifest.files:
                    src = os.path.join(slot.dir, f.path)
                    if os.path.exists(src):
                        os.link(src, os.path.join(out, f.path))
            else:
                with open(os.path.join(out, MANIFEST_NAME), "w") as f:
                    f.write(remote["manifest"])
                manifest = read_manifest(out)
            # where each rank's file came from: this keeper's memory, or a peer (and whether it was rebuilt)
            sources = {str(f.rank): {"node": self.node, "rebuilt": bool(slot.rebuilt)}
                       for f in manifest.files if slot is not None and os.path.exists(os.path.join(out, f.path))}
            for rank, ranges in reads.items():
                record = manifest.file_of_rank(int(rank))
                if record is None or os.path.exists(os.path.join(out, record.path)):
                    continue
                owner = owners.get(int(rank))
                addr = self.link.get(f"peer/node{owner}") if owner is not None else None
                if addr is None:
                    raise RedundancyError(f"step {step}: rank {rank}'s file is on node {owner}, whose keeper is not reachable")
                rebuilt = self._fetch(addr, {"step": step, "sid": sid, "path": record.path, "ranges": ranges},
                                      os.path.join(out, record.path))
                sources[str(rank)] = {"node": owner, "rebuilt": rebuilt}
            with open(os.path.join(out, SOURCES_FILE), "w") as f:
                json.dump(sources, f)
            return out
        finally:
            if slot is not None:
                with self.keeper.cond:
                    slot.pins -= 1
                    self.keeper.cond.notify_all()

    def release(self, path: str) -> None:
        if os.path.dirname(os.path.abspath(path)) == os.path.abspath(self.views):
            shutil.rmtree(path, ignore_errors=True)

    def purge(self) -> None:
        """Drop every view (a new plan means restores are over)."""
        shutil.rmtree(self.views, ignore_errors=True)
