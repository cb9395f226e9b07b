"""Process entry points for the multi-process sync tests (spawned, so importable and picklable).

The trainer trains a small transformer for real (AdamW, RL-like learning rates) and
calls ``sender.sync()`` when the test says "go"; it saves the weights it sent for
every version. Each receiver applies updates into its own (differently initialised)
copy and saves what it holds after every verified version. The test compares the
files bit for bit, independently of the library's own digests.
"""

from __future__ import annotations

import logging
import os
import queue
import time
import traceback

import torch
from torch import nn


class TinyLM(nn.Module):
    """A two-layer transformer language model (about 90k parameters)."""

    def __init__(self, vocab: int = 128, d: int = 64, heads: int = 4, ff: int = 128, layers: int = 2) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        layer = nn.TransformerEncoderLayer(d, heads, ff, dropout=0.0, batch_first=True)
        self.body = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.body(self.emb(tokens))))


def make_model(seed: int, dtype: torch.dtype) -> TinyLM:
    torch.manual_seed(seed)
    return TinyLM().to(dtype)


def wire_state(model: nn.Module, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    out = {}
    for n, p in model.named_parameters():
        t = p.detach()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        out[n] = t.contiguous().clone()
    return out


def _setup_logging(path: str) -> None:
    h = logging.FileHandler(path)
    h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    lg = logging.getLogger("stalwart.sync")
    lg.addHandler(h)
    lg.setLevel(logging.INFO)


def _save(path: str, state: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, path + ".tmp")
    os.replace(path + ".tmp", path)


def _transport(cfg: dict, role: str):
    from stalwart.sync import DistTransport, ShmTransport, TcpTransport

    kind = cfg["transport"]
    if kind == "tcp":
        port = 0 if role == "sender" else cfg["port"]
        return TcpTransport("127.0.0.1", port, io_timeout=20, connect_timeout=30)
    if kind == "shm":
        return ShmTransport(cfg["shm_name"], io_timeout=20, connect_timeout=30)
    if kind == "dist":
        return DistTransport(cfg.get("group"), src=0, timeout=cfg.get("dist_timeout", 30))
    raise ValueError(kind)


def _init_dist(cfg: dict, rank: int, events=None) -> None:
    import datetime

    import torch.distributed as dist

    td = datetime.timedelta(seconds=60)
    if rank == 0:  # port 0: the OS picks a free one, so parallel test runs cannot collide
        store = dist.TCPStore("127.0.0.1", 0, cfg["world"], True, timeout=td, wait_for_workers=False)
        events.put(("store_port", store.port))
    else:
        store = dist.TCPStore("127.0.0.1", cfg["store_port"], cfg["world"], False, timeout=td)
    dist.init_process_group(
        "gloo", store=store, rank=rank, world_size=cfg["world"], timeout=datetime.timedelta(seconds=60)
    )
    # a group of its own for weight sync, separate from whatever training uses
    cfg["group"] = dist.new_group(
        list(range(cfg["world"])),
        backend="gloo",
        timeout=datetime.timedelta(seconds=cfg.get("dist_timeout", 30)),
    )


def trainer_main(cfg: dict, ctl, events) -> None:
    """Train and sync when told; report each sync's stats on ``events``."""
    torch.set_num_threads(1)
    out = cfg["out"]
    _setup_logging(os.path.join(out, "trainer.log"))
    try:
        from stalwart.sync import WeightSyncSender

        if cfg["transport"] == "dist":
            _init_dist(cfg, 0, events)
        train_dtype = getattr(torch, cfg["train_dtype"])
        wire_dtype = getattr(torch, cfg["wire_dtype"]) if cfg.get("wire_dtype") else None
        model = make_model(0, train_dtype)
        opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=0.01)
        transport = _transport(cfg, "sender")
        if cfg.get("corrupt_version"):
            from ._faults import CorruptingTransport

            transport = CorruptingTransport(transport, cfg["corrupt_version"])
        sender = WeightSyncSender(
            model, transport, num_receivers=cfg["receivers"], dtype=wire_dtype, bucket_bytes=cfg.get("bucket_bytes", 1 << 16),
            chunk_words=cfg.get("chunk_words", 4096), reconnect_timeout=30, ack_timeout=30, connect_timeout=60,
        )  # fmt: skip
        if cfg["transport"] == "tcp":
            events.put(("port", transport.port))
        g = torch.Generator().manual_seed(1)
        for _ in range(cfg["syncs"]):
            msg = ctl.get(timeout=120)
            if msg == "stop":
                break
            for _ in range(cfg.get("steps_per_sync", 1)):
                tokens = torch.randint(0, 128, (4, 16), generator=g)
                logits = model(tokens[:, :-1])
                loss = nn.functional.cross_entropy(logits.float().reshape(-1, 128), tokens[:, 1:].reshape(-1))
                loss.backward()
                opt.step()
                opt.zero_grad()
            _save(
                os.path.join(out, f"trainer_v{sender.version + 1}.safetensors"), wire_state(model, wire_dtype)
            )
            try:
                st = sender.sync()
            except Exception as e:
                events.put(("sync_error", sender.version, f"{type(e).__name__}: {e}"))
                raise
            events.put(
                ("synced", st.version, {
                    "changed": st.changed_elements, "total": st.total_elements, "wire_bytes": st.wire_bytes,
                    "update_bytes": st.update_bytes, "model_bytes": st.model_bytes, "full_syncs": st.full_syncs,
                    "resyncs": st.resyncs, "receivers": st.receivers, "causes": st.causes,
                    "idx": dict(st.index_encodings), "val": dict(st.value_encodings),
                })
            )  # fmt: skip
        sender.close()
        events.put(("trainer_done", sender.version))
    except Exception:
        events.put(("error", "trainer", traceback.format_exc()))
        raise
    finally:
        if cfg["transport"] == "dist":
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def receiver_main(cfg: dict, rid: str, events, rank: int = 1) -> None:
    """Receive until the last version (or the sender goes away); save what is held after each."""
    torch.set_num_threads(1)
    out = cfg["out"]
    _setup_logging(os.path.join(out, f"{rid}.log"))
    try:
        from stalwart.sync import WeightSyncReceiver

        if cfg["transport"] == "dist":
            _init_dist(cfg, rank)
        dtype = getattr(torch, cfg.get("wire_dtype") or cfg["train_dtype"])
        model = make_model(100 + rank, dtype)  # different init: only a sync makes it equal
        r = WeightSyncReceiver(
            model,
            _transport(cfg if cfg["transport"] != "tcp" else {**cfg, "port": cfg["rport"][rid]}, "receiver"),
            receiver_id=rid,
            resync_timeout=60,
        )
        events.put(("ready", rid))
        while True:
            st = r.receive(timeout=cfg.get("idle_timeout", 120))
            if st is None:
                break
            _save(os.path.join(out, f"{rid}_v{st.version}.safetensors"), wire_state(model, None))
            events.put(
                ("recv", rid, st.version, {"mode": st.mode, "attempts": st.attempts, "causes": st.causes})
            )
            if st.version >= cfg["syncs"]:
                break
        logging.getLogger("stalwart.sync").info(
            "test receiver %s: done at v%s (last receive: %s)", rid, r.version, st
        )
        r.close()
        events.put(("receiver_done", rid))
    except Exception:
        events.put(("error", rid, traceback.format_exc()))
        raise
    finally:
        if cfg["transport"] == "dist":
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def wait_for(events, pred, timeout: float, seen: list):
    """The first event (already ``seen`` or new) for which ``pred`` holds; new events are appended
    to ``seen``. Fails on child errors."""
    for ev in seen:
        if pred(ev):
            return ev
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"timed out waiting; events so far: {seen[-10:]}")
        try:
            ev = events.get(timeout=min(left, 1.0))
        except queue.Empty:
            continue
        seen.append(ev)
        if ev[0] == "error":
            raise AssertionError(f"child {ev[1]} failed:\n{ev[2]}")
        if pred(ev):
            return ev


# ---------------------------------------------------------------- as a new user tries it
# A 0.1M-parameter bf16 transformer, one trainer and two rollout processes over DistTransport:
# one rollout starts from the trainer's own initial weights (the usual case: both load the
# same checkpoint), the other from different ones. The trainer then moves 1 % of the elements
# by +1.0 (values that do not compress) and syncs again.


def newuser_model(seed: int) -> TinyLM:
    return make_model(seed, torch.bfloat16)


def newuser_trainer(cfg: dict, events) -> None:
    torch.set_num_threads(1)
    out = cfg["out"]
    _setup_logging(os.path.join(out, "trainer.log"))
    try:
        from stalwart.sync import DistTransport, WeightSyncSender

        _init_dist(cfg, 0, events)
        model = newuser_model(0)
        sender = WeightSyncSender(model, DistTransport(cfg["group"], src=0, timeout=60))
        g = torch.Generator().manual_seed(7)
        for v in (1, 2):
            if v == 2:
                with torch.no_grad():
                    for p in model.parameters():
                        p[torch.rand(p.shape, generator=g) < 0.01] += 1.0
            _save(os.path.join(out, f"trainer_v{v}.safetensors"), wire_state(model, None))
            st = sender.sync()
            events.put(("synced", v, {
                "changed": st.changed_elements, "model_bytes": st.model_bytes, "wire_bytes": st.wire_bytes,
                "update_bytes": st.update_bytes, "broadcast_bytes": st.broadcast_bytes, "full_syncs": st.full_syncs,
                "full_tensors": st.full_tensors, "tensors": st.tensors, "receivers": st.receivers,
            }))  # fmt: skip
        sender.close()
        events.put(("trainer_done", 2))
    except Exception:
        events.put(("error", "trainer", traceback.format_exc()))
        raise
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def newuser_receiver(cfg: dict, rid: str, events, rank: int, seed: int) -> None:
    torch.set_num_threads(1)
    out = cfg["out"]
    _setup_logging(os.path.join(out, f"{rid}.log"))
    try:
        from stalwart.sync import DistTransport, WeightSyncReceiver

        _init_dist(cfg, rank)
        model = newuser_model(seed)
        r = WeightSyncReceiver(model, DistTransport(cfg["group"], src=0, timeout=60), receiver_id=rid)
        for _ in (1, 2):
            st = r.receive()
            _save(os.path.join(out, f"{rid}_v{st.version}.safetensors"), wire_state(model, None))
            events.put(("recv", rid, st.version, {"mode": st.mode, "bytes": st.bytes_received}))
        r.close()
    except Exception:
        events.put(("error", rid, traceback.format_exc()))
        raise
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
