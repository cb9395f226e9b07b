"""The native (universal) format as a conversion source and target.

Written unsharded by one process: one streaming :class:`DataFileWriter` whose
entries are declared up front, tensors written one at a time, then the
manifest. Params and buffers keep their FQN, optimizer slots are
``optim.<fqn>.<slot>`` with ``role="optimizer_slot"``, tied names are aliases of
their owner, and the state around the tensors goes to the manifest's
``objects``: ``optimizer`` (class and param groups by FQN), ``scheduler``,
``loss_scaler``, ``client``, ``frozen_params`` and ``source`` (where it came from).
"""

from __future__ import annotations

import os

from stalwart import __version__
from stalwart.formats.adapters.base import ConvertSource, OutState, PlannedFile, SourceTensor, Target
from stalwart.formats.atomic import atomic_write
from stalwart.formats.checksum import DEFAULT_BLOCK_SIZE, block_count, packed_length
from stalwart.formats.datafile import DataFileWriter
from stalwart.formats.layout import Layout, Mesh, Replicated, TensorSpec
from stalwart.formats.manifest import MANIFEST_NAME, Manifest, rank_file_name
from stalwart.formats.reader import Checkpoint

KNOWN_OBJECTS = {"source", "optimizer", "scheduler", "loss_scaler", "client", "frozen_params", "step"}


class NativeConvertSource(ConvertSource):
    """A stalwart checkpoint read through the converter's interface."""

    default_format = "stalwart"

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.ckpt = Checkpoint(path)
        self.on_close(self.ckpt.close)
        self.consume(os.path.join(self.ckpt.path, MANIFEST_NAME), *(os.path.join(self.ckpt.path, f.path)
                                                                   for f in self.ckpt.manifest.files))
        if os.path.isdir(path) and os.path.realpath(path) != os.path.realpath(self.ckpt.path):
            self.consume(os.path.join(path, "latest"))
        objects = dict(self.ckpt.objects)
        frozen = set(objects.get("frozen_params") or [])
        for name, spec in self.ckpt.tensors.items():
            requires_grad = (name not in frozen) if spec.role == "param" else None
            self.add(SourceTensor(name, tuple(spec.shape), spec.dtype, spec.role, self._reader(name), spec.param,
                                  spec.slot, requires_grad))
        self.aliases = dict(self.ckpt.aliases())
        m = self.meta
        m.step = self.ckpt.step
        opt = objects.get("optimizer")
        m.optimizer = opt if isinstance(opt, dict) and isinstance(opt.get("param_groups"), list) else None
        m.scheduler = objects.get("scheduler")
        m.loss_scaler = objects.get("loss_scaler")
        m.client = objects.get("client") or {}
        m.topology = dict(self.ckpt.manifest.topology)
        origin = objects.get("source")
        if isinstance(origin, dict):
            m.info = {"origin": origin}
        m.extra_objects = {k: v for k, v in objects.items() if k not in KNOWN_OBJECTS}
        self.created = self.ckpt.manifest.created

    def _reader(self, name: str):
        return lambda: self.ckpt.read(name)


def native_objects(state: OutState) -> dict:
    """The manifest ``objects`` of a converted checkpoint."""
    m = state.meta
    origin = m.info.get("origin") if m.format == "stalwart" else None
    objects: dict = {"source": origin if isinstance(origin, dict) else {"format": m.format, **m.info}}
    if not state.weights_only:
        for key in ("optimizer", "scheduler", "loss_scaler"):
            value = getattr(m, key)
            if value is not None:
                objects[key] = value
    if m.client:
        objects["client"] = m.client
    frozen = [t.name for t in state.tensors if t.role == "param" and t.requires_grad is False]
    if frozen:
        objects["frozen_params"] = frozen
    for k, v in m.extra_objects.items():
        objects.setdefault(k, v)
    return objects


class NativeTarget(Target):
    name = "native"
    description = "stalwart's universal format: manifest.json + one checksummed safetensors data file"
    sync_writes = False  # DataFileWriter's last chunk of a tensor may still be in flight

    def _specs(self, state: OutState) -> list[TensorSpec]:
        aliases = state.aliases_of()
        return [
            TensorSpec(t.name, t.shape, t.dtype.torch, Replicated(), None, t.role if t.role in ("param", "buffer", "optimizer_slot") else "other",
                       t.param, t.slot, tuple(aliases.get(t.name, ())))
            for t in state.tensors
        ]

    def plan(self, state: OutState) -> list[PlannedFile]:
        data = sum(t.nbytes for t in state.tensors)
        sums = sum(packed_length(block_count(t.nbytes, DEFAULT_BLOCK_SIZE)) for t in state.tensors)
        header = 200 + sum(len(t.name) + 80 for t in state.tensors) + sums
        return [PlannedFile(rank_file_name(0), data + header, len(state.tensors)), PlannedFile(MANIFEST_NAME, 0)]

    def write(self, out: str, state: OutState, stream, *, fsync: bool = True) -> None:
        specs = self._specs(state)
        layout = Layout(Mesh.single(), specs)
        rel = rank_file_name(0)
        writer = DataFileWriter(os.path.join(out, rel), [(s.name, s.dtype, s.shape) for s in specs], rank=0, relpath=rel)
        try:
            for ot, tensor in stream:
                writer.write(ot.name, tensor)
        except BaseException:
            writer.abort()
            raise
        record = writer.close(fsync=fsync)
        manifest = Manifest(
            layout=layout,
            files=[record],
            step=state.meta.step,
            objects=native_objects(state),
            tree=None,
            topology=dict(state.meta.topology),
            block_size=DEFAULT_BLOCK_SIZE,
            created=state.created,
            producer={"tool": "stalwart convert", "version": __version__, "source_format": state.meta.format},
        )
        atomic_write(os.path.join(out, MANIFEST_NAME), manifest.dumps(), fsync=fsync)


__all__ = ["NativeConvertSource", "NativeTarget", "native_objects"]
