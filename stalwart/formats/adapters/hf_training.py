"""Training state saved by Hugging Face's Trainer and by Accelerate, read whole.

* **Trainer** ``checkpoint-N/`` (without DeepSpeed): ``model.safetensors`` (or shards,
  or ``pytorch_model*.bin``), ``optimizer.pt``, ``scheduler.pt``, ``rng_state.pth``
  (``rng_state_<rank>.pth`` with several processes), ``scaler.pt``,
  ``trainer_state.json``, ``config.json``, ``generation_config.json``;
* **Accelerate** ``save_state()`` directory: ``model.safetensors`` (or
  ``pytorch_model.bin``), ``optimizer.bin``, ``scheduler.bin``,
  ``random_states_<rank>.pkl``, ``scaler.pt``, ``sampler.bin`` /
  ``dl_state_dict.bin``, ``custom_checkpoint_<i>.pkl``.

The weights are read as Hugging Face weights (:mod:`.hf`). The optimizer file is
torch's own state dict: its state is indexed by position, not by name, so the
params' order must come from somewhere:

1. ``param_names`` in the param groups (torch >= 2.6 saves them when the optimizer
   was built from named params);
2. the ``param_order`` option (``--param-order FILE``): the names in optimizer
   order, one per line (or a JSON list), or a model ``config.json``;
3. the checkpoint's own ``config.json`` when ``transformers`` is installed.

For a config, the model is built from it on the meta device (no memory, no
download) for its ``named_parameters()`` order; a Trainer's optimizer holds two
groups - the params Trainer decays, then the others, each in that order - which
transformers' own ``Trainer.get_decay_parameter_names`` says; an Accelerate
optimizer is taken to follow the plain order. Every slot's shape must match the
param it is mapped to. When no order can be established, the optimizer state is
not guessed: the source records it as :attr:`SourceMeta.unread_state`, and a
conversion that would write optimizer state fails naming it (``--weights-only``
converts the weights alone, on purpose).

Scheduler, loss scaler (``scaler.pt``), sampler and custom objects become JSON
state; RNG states (Python, NumPy, torch CPU/CUDA generator bytes) become the
``rng`` object, by rank; the step comes from ``trainer_state.json`` (or the RNG
file's ``step``). ``training_args.bin`` (a pickled ``TrainingArguments`` object, which
stalwart will not unpickle) and any other file are reported as not read.
"""

from __future__ import annotations

import base64
import json
import os
import re

from stalwart.errors import ConversionError, FormatError
from stalwart.formats.adapters.base import ConvertSource
from stalwart.formats.adapters.hf import HFSource, _shard_files
from stalwart.formats.adapters.param_order import model_param_order, read_param_order
from stalwart.formats.adapters.safe_load import LazyFile, TensorRef, jsonable, pread_into
from stalwart.formats.adapters.torch_save import add_optimizer_state, optimizer_param_names
from stalwart.formats.sources import register_source

TRAINER_OPTIM, ACCEL_OPTIM = "optimizer.pt", "optimizer.bin"
SCHEDULERS = ("scheduler.pt", "scheduler.bin")
TRAINER_RNG = re.compile(r"^rng_state(?:_(\d+))?\.pth$")
ACCEL_RNG = re.compile(r"^random_states_(\d+)\.pkl$")
ACCEL_EXTRA = re.compile(r"^(sampler(?:_\d+)?\.bin|dl_state_dict(?:_\d+)?\.bin|custom_checkpoint_\d+\.pkl)$")
MARKERS = (TRAINER_OPTIM, ACCEL_OPTIM, *SCHEDULERS, "trainer_state.json", "scaler.pt")


def _is_training_dir(path: str) -> bool:
    if not os.path.isdir(path):
        return False
    names = os.listdir(path)
    return any(n in MARKERS or TRAINER_RNG.match(n) or ACCEL_RNG.match(n) for n in names)


def _weights(path: str) -> tuple[str, list[str], dict | None] | None:
    """The model weights of a training directory. Accelerate names a second model's files
    ``model_1.safetensors``: only the first model's (``model.safetensors``, ``pytorch_model.bin``)
    are read, the others are reported as not read."""
    names = set(os.listdir(path))
    if "model.safetensors" in names and not any(n.endswith(".safetensors.index.json") for n in names):
        return "safetensors", [os.path.join(path, "model.safetensors")], None
    if "pytorch_model.bin" in names and "model.safetensors" not in names and not any(n.endswith(".index.json") for n in names):
        return "bin", [os.path.join(path, "pytorch_model.bin")], None
    return _shard_files(path)


def _bytes_of(ref: TensorRef) -> bytes:
    fd, off, n = ref.byte_range()
    buf = bytearray(n)
    pread_into(fd, memoryview(buf), off, ref.where)
    return bytes(buf)


def _rng_value(value, path: str):
    """An RNG state as JSON: tensors (torch generator states) as base64 bytes, numpy arrays as lists."""
    if isinstance(value, TensorRef):
        if not value.is_contiguous():
            raise FormatError(f"{path}: non-contiguous RNG state tensor")
        return {"dtype": value.dtype.name, "shape": list(value.shape), "base64": base64.b64encode(_bytes_of(value)).decode()}
    if isinstance(value, dict):
        return {str(k): _rng_value(v, path) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_rng_value(v, path) for v in value]
    if type(value).__module__ == "numpy" and hasattr(value, "tolist"):
        return value.tolist()
    out, dropped = jsonable(value)
    if dropped:
        raise FormatError(f"{path}: RNG state holds a value stalwart cannot represent ({type(value).__name__})")
    return out


def lazy_obj(src: ConvertSource, path: str):
    """The unpickled (restricted, lazy) content of a torch.save file, recorded as consumed by ``src``."""
    lf = LazyFile(path)
    src.on_close(lf.close)
    src.consume(path)
    return lf.obj


def read_side_state(src: ConvertSource, directory: str, names: set[str]) -> None:
    """The training state around the weights and optimizer that Trainer and Accelerate save
    in ``directory``: model configs, ``trainer_state.json`` (the step), ``scaler.pt``, RNG
    files by rank, Accelerate's sampler / data-loader / custom objects. Also used for a
    Trainer checkpoint written with DeepSpeed (the DeepSpeed reader reads the rest)."""
    m = src.meta
    for cfg, key in (("config.json", "hf_config"), ("generation_config.json", "generation_config")):
        if cfg in names:
            try:
                with open(os.path.join(directory, cfg), encoding="utf-8") as f:
                    m.extra_objects[key] = json.load(f)
            except (OSError, json.JSONDecodeError) as e:
                raise FormatError(f"{directory}/{cfg}: not valid JSON ({e})") from None
            src.consume(os.path.join(directory, cfg))
    if "trainer_state.json" in names:
        try:
            with open(os.path.join(directory, "trainer_state.json"), encoding="utf-8") as f:
                ts = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise FormatError(f"{directory}/trainer_state.json: not valid JSON ({e})") from None
        src.consume(os.path.join(directory, "trainer_state.json"))
        m.extra_objects["trainer_state"] = ts
        step = ts.get("global_step") if isinstance(ts, dict) else None
        if isinstance(step, int):
            if m.step is None:
                m.step = step
            elif m.step != step:
                m.warnings.append(f"trainer_state.json says step {step}, the checkpoint {m.step}")
    if "scaler.pt" in names:
        m.loss_scaler, dropped = jsonable(lazy_obj(src, os.path.join(directory, "scaler.pt")))
        if dropped:
            m.warnings.append(f"scaler.pt: values not representable as JSON, dropped: {dropped[:8]}")
    rng: dict = {}
    for n in sorted(names):
        match = TRAINER_RNG.match(n) or ACCEL_RNG.match(n)
        if match is None:
            continue
        state = lazy_obj(src, os.path.join(directory, n))
        if not isinstance(state, dict):
            raise FormatError(f"{directory}/{n}: expected a dict of RNG states, found {type(state).__name__}")
        state = dict(state)
        step = state.pop("step", None)
        if isinstance(step, int) and m.step is None:
            m.step = step
        rng[f"rank{match.group(1) or 0}"] = _rng_value(state, f"{directory}/{n}")
    if rng:
        m.extra_objects["rng"] = rng
    for n in sorted(names):
        if ACCEL_EXTRA.match(n):
            value, dropped = jsonable(lazy_obj(src, os.path.join(directory, n)))
            m.extra_objects[n.rsplit(".", 1)[0]] = value
            if dropped:
                m.warnings.append(f"{n}: values not representable as JSON, dropped: {dropped[:8]}")


class TrainingStateSource(HFSource):
    """A Trainer ``checkpoint-N/`` or an Accelerate ``save_state`` directory (see the module docstring)."""

    def __init__(self, path: str, param_order: str | None = None) -> None:
        found = _weights(path)
        if found is None:
            raise FormatError(f"{path}: training state without model weights (no model.safetensors / pytorch_model.bin)")
        kind, files, wmap = found
        super().__init__(path, kind, files, wmap)
        self.used_options = {"param_order"}
        names = set(os.listdir(path))
        self.accelerate = ACCEL_OPTIM in names or any(ACCEL_RNG.match(n) for n in names)
        self.meta.format = "accelerate" if self.accelerate else "hf-trainer"
        self.meta.topology = {"framework": self.meta.format}
        try:
            self._read_state(names, param_order)
        except BaseException:
            self.close()
            raise

    def _lazy(self, name: str):
        return lazy_obj(self, os.path.join(self.path, name))

    def _read_state(self, names: set[str], param_order: str | None) -> None:
        m = self.meta
        read_side_state(self, self.path, names)
        optim = ACCEL_OPTIM if ACCEL_OPTIM in names else TRAINER_OPTIM if TRAINER_OPTIM in names else None
        if optim is not None:
            self._read_optimizer(optim, param_order)
        for sched in SCHEDULERS:
            if sched in names:
                m.scheduler, dropped = jsonable(self._lazy(sched))
                if dropped:
                    m.warnings.append(f"{sched}: values not representable as JSON, dropped: {dropped[:8]}")

    def _read_optimizer(self, name: str, param_order: str | None) -> None:
        osd = self._lazy(name)
        where = f"{self.path}/{name}"
        if not (isinstance(osd, dict) and isinstance(osd.get("state"), dict) and isinstance(osd.get("param_groups"), list)):
            raise FormatError(f"{where}: not a torch optimizer state dict (no 'state' / 'param_groups')")
        sizes = [len(g.get("params", [])) for g in osd["param_groups"]]
        slots = sorted({str(s) for st in osd["state"].values() if isinstance(st, dict) for s in st})
        what = (f"{name}: optimizer state of {sum(sizes)} params in {len(sizes)} group(s) (slots {', '.join(slots) or '-'}),"
                " indexed by position")
        names = optimizer_param_names(osd)
        how = "the optimizer's own param_names"
        if names is None:
            names, how, reason = self._param_names(osd, sizes, param_order)
            if names is None:
                self.meta.unread_state.append(f"{what}: {reason}")
                self.meta.warnings.append(f"{what}, is NOT read: {reason}")
                return
        add_optimizer_state(self, osd, names, where)
        self.meta.warnings.append(f"{name}: params named from {how}")

    def _param_names(self, osd: dict, sizes: list[int], param_order: str | None):
        """(names, how, None) or (None, None, why not)."""
        config = None
        if param_order is not None:
            listed, config = read_param_order(param_order)
            if listed is not None:
                if len(listed) != sum(sizes):
                    raise ConversionError(f"--param-order {param_order} names {len(listed)} params, the optimizer holds {sum(sizes)}")
                self._check_shapes(osd, listed, f"--param-order {param_order}")
                return listed, f"--param-order {param_order}", None
        elif os.path.isfile(os.path.join(self.path, "config.json")):
            config = os.path.join(self.path, "config.json")
        if config is None:
            return None, None, ("no param_names in it and no config.json to rebuild the order from; give the names in"
                                " optimizer order with --param-order FILE (one per line) or the model's config.json")
        try:
            order, decay, cls = model_param_order(config)
        except ConversionError as e:
            if param_order is not None:
                raise
            return None, None, f"{e}; give the names with --param-order FILE"
        plain = list(order)
        trainer = [n for n in order if n in decay] + [n for n in order if n not in decay]
        candidates = [(plain, "named_parameters() order"), (trainer, "Trainer's weight-decay groups")]
        if not self.accelerate:
            candidates.reverse()
        errors = []
        for names, rule in candidates:
            if len(names) != sum(sizes) or (rule.startswith("Trainer") and not self._splits(names, decay, sizes)):
                errors.append(f"{rule}: {len(names)} params for groups of {sizes}")
                continue
            try:
                self._check_shapes(osd, names, rule)
            except ConversionError as e:
                errors.append(str(e))
                continue
            return names, f"{cls} built from {os.path.basename(config)} ({rule})", None
        reason = f"the params of {cls} built from {config} do not fit the optimizer: {'; '.join(errors)}"
        if param_order is not None:
            raise ConversionError(reason)
        return None, None, reason + "; give the names with --param-order FILE"

    @staticmethod
    def _splits(names: list[str], decay: set[str], sizes: list[int]) -> bool:
        """Trainer's groups: the decayed params, then the others (empty groups may be absent)."""
        nd = sum(1 for n in names if n in decay)
        return [s for s in sizes if s] == [s for s in (nd, len(names) - nd) if s]

    def _check_shapes(self, osd: dict, names: list[str], how: str) -> None:
        ids = [p for g in osd["param_groups"] for p in g.get("params", [])]
        for pid, name in zip(ids, names):
            t = self.tensors.get(name)
            if t is None:
                raise ConversionError(f"{how}: param {name!r} is not in the model weights")
            for slot, v in (osd["state"].get(pid) or {}).items():
                if isinstance(v, TensorRef) and v.shape != () and tuple(v.shape) != t.shape:
                    raise ConversionError(f"{how}: slot {slot!r} of optimizer param {pid} has shape {list(v.shape)},"
                                          f" {name!r} has {list(t.shape)}")


def _detect(path: str, options: dict) -> ConvertSource | None:
    if not _is_training_dir(path) or _weights(path) is None:
        return None
    return TrainingStateSource(path, options.get("param_order"))


register_source("hf-training", _detect, priority=40)

__all__ = ["TrainingStateSource", "read_side_state"]
