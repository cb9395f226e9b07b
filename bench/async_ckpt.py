"""Asynchronous checkpointing (issue 4): stalwart vs torch.save vs torch DCP, in one run.

    python bench/async_ckpt.py                 # GPT ~110M params + AdamW (~1.3 GB of state)
    python bench/async_ckpt.py --quick         # small model, a smoke run in about a minute
    python bench/async_ckpt.py --modes stalwart,dcp_async_stager --every 10

One process trains a GPT-style decoder (fp32, AdamW) on random tokens and checkpoints
it every step and every 10 steps with each method, on the same model, in one run:

  none              no checkpoint: the baseline, measured in a block right before every
                    other method and once at the end (so drift on a shared machine shows)
  torch_save        torch.save({"model", "optimizer"}) to a local file (no fsync, as users do)
  dcp_save          torch.distributed.checkpoint.save (FileSystemWriter defaults: fsync)
  dcp_async         dcp.async_save, default: thread executor, no stager (blocking
                    copy into fresh pageable memory, then a background upload)
  dcp_async_stager  dcp.async_save with one reused DefaultStager; on CPU:
                    StagingOptions(use_pinned_memory=False, use_shared_memory=True,
                    use_async_staging=True, use_non_blocking_copy=False) (pinning and
                    non-blocking copies need an accelerator); on CUDA: DefaultStager()
  stalwart          stalwart.protect(every=N, tiers=["memory", {"url": "local:...", "every": N}], slots=2)

Measured per method and cadence:

* blocking time per checkpoint: the time the training loop is stalled because of it.
  torch.save / dcp.save: the whole call. dcp.async_save: the call until it returns,
  plus the wait for the previous upload before a new save (the loop never starts a
  save before the previous one finished), plus (stager) the wait on
  staging_completion before the next optimizer.step(). stalwart: the time inside
  guard.step() plus the optimizer pre-hook waits (GuardStats.step_call_s + blocking_s,
  measured as deltas around every step, so non-snapshot steps count too);
* end-to-end overhead: (mean step time with checkpoints - mean without) / without,
  over the measured steps, after warm-up (the background work of every checkpoint
  in the window lands inside the window);
* persistence GB/s: bytes made durable on the local disk per checkpoint / the time
  that took (stalwart: the keeper's own log, slot -> local tier incl. fsync and
  commit; DCP async: staging done -> upload done; synchronous methods: bytes / call),
  against the disk's sequential write bandwidth measured in the same run (a fresh
  file of --disk-gib written in 16 MiB os.write chunks from a preallocated buffer,
  buffered + fsync and O_DIRECT + fsync, median of runs at the start and the end).

Targets (issue 4): stalwart blocking <= 1/50 of torch.save's and <= 1/5 of the best
DCP async mode; overhead at every 10 steps <= 5 %; persistence >= 0.8x the disk
bandwidth (the better of the two write methods). The machine may be shared: step
times are noisy, so overheads are given against the pooled baseline and against the
baseline block run right before the method, and the spread of the baseline blocks is
printed as the noise floor.

Environment: OMP_WAIT_POLICY defaults to PASSIVE (libgomp's spin-waiting otherwise
favours whichever mode runs torch ops on a background thread; see the comment in the
code); STALWART_SHM_BASE defaults to a private /dev/shm/swbench-async-<pid> (test suites
running beside the benchmark kill keepers under /dev/shm/stalwart-*). Both are kept if
already set.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import mmap
import os
import re
import resource
import shutil
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

# libgomp (torch's OpenMP on Linux) spin-waits at every parallel-region barrier unless it
# manages more threads than there are CPUs; then it throttles. On a loaded machine the
# spinning makes steps several times slower, and any background thread that runs a
# parallel torch op (stalwart's copier, DCP's stager) flips the whole process into the
# throttled regime - which made checkpointing runs *faster* than the baseline here.
# PASSIVE puts every mode in the same regime. It must be set before torch loads; an
# OMP_WAIT_POLICY already in the environment is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _gpt import GPT, GPTConfig, n_params

MODES = ("torch_save", "dcp_save", "dcp_async", "dcp_async_stager", "stalwart")
DCP_ASYNC = ("dcp_async", "dcp_async_stager")
TARGET_VS_TORCH_SAVE = 50.0
TARGET_VS_DCP_ASYNC = 5.0
TARGET_OVERHEAD_EVERY10 = 0.05
TARGET_PERSIST_RATIO = 0.8
CHUNK = 16 * 2**20
KEEPER_LINE = re.compile(r"step (\d+) -> (.+?): ([\d.]+) MB in ([\d.]+)s")


# ----------------------------------------------------------------------------- results
@dataclass
class Run:
    mode: str
    every: int
    step_s: list[float] = field(default_factory=list)  # measured steps
    blocking_s: list[float] = field(default_factory=list)  # per measured checkpoint
    wait_s: list[float] = field(default_factory=list)  # of which waits before optimizer.step()
    cold_blocking_s: float | None = None  # worst warm-up checkpoint of a fresh run (every == 1 only)
    persist: list[tuple[float, float]] = field(default_factory=list)  # (bytes, seconds) made durable
    idle_persist: tuple[float, float] | None = None  # stalwart: a persist with the loop idle
    ckpt_bytes: float | None = None  # bytes of one checkpoint on disk
    requested: int = 0  # checkpoints requested in the window
    durable: int | None = None  # of those, how many reached the disk
    skipped: int = 0  # stalwart: snapshots skipped (no free slot)
    drain_s: float = 0.0  # after the window: time until the last checkpoint is durable
    adjacent_base_s: float | None = None  # mean step of the baseline block run right before
    notes: list[str] = field(default_factory=list)

    @property
    def mean_step(self) -> float:
        return statistics.fmean(self.step_s)

    @property
    def block(self) -> float | None:
        return statistics.median(self.blocking_s) if self.blocking_s else None

    @property
    def persist_gbps(self) -> float | None:
        rates = [b / s / 1e9 for b, s in self.persist if s > 0]
        return statistics.median(rates) if rates else None


def med(xs) -> float:
    return statistics.median(xs) if xs else float("nan")


# ----------------------------------------------------------------------------- disk
def disk_write_gbps(path: str, nbytes: int, direct: bool) -> float:
    """GB/s of writing a fresh ``nbytes`` file in 16 MiB os.write chunks from a
    preallocated, pre-faulted buffer, then fsync (``direct``: O_DIRECT, page-aligned buffer)."""
    buf = mmap.mmap(-1, CHUNK)
    buf.write(os.urandom(CHUNK))
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    os.sync()
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | (os.O_DIRECT if direct else 0)
    t0 = time.perf_counter()
    fd = os.open(path, flags, 0o600)
    try:
        done = 0
        while done < nbytes:
            done += os.write(fd, buf)
        os.fsync(fd)
    finally:
        os.close(fd)
    dt = time.perf_counter() - t0
    os.unlink(path)
    buf.close()
    return nbytes / dt / 1e9


def disk_bench(dirpath: str, gib: float, runs: int, into: dict[str, list[float]]) -> None:
    nbytes = max(CHUNK, int(gib * 2**30) // CHUNK * CHUNK)
    path = os.path.join(dirpath, "disk-bench.bin")
    for _ in range(runs):
        into["buffered+fsync"].append(disk_write_gbps(path, nbytes, direct=False))
        try:
            into["O_DIRECT+fsync"].append(disk_write_gbps(path, nbytes, direct=True))
        except OSError as e:  # file systems without O_DIRECT (tmpfs)
            into.setdefault("errors", []).append(f"O_DIRECT: {e}")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- helpers
def tree_bytes(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    total = 0
    for d, _, files in os.walk(path):
        for f in files:
            with contextlib.suppress(FileNotFoundError):
                total += os.path.getsize(os.path.join(d, f))
    return total


def remove(path: str) -> None:
    if os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


def state_bytes(model: torch.nn.Module, opt: torch.optim.Optimizer) -> int:
    seen, total = set(), 0
    tensors = list(model.state_dict().values()) + [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]
    for t in tensors:
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


# ----------------------------------------------------------------------------- methods
class Method:
    """One checkpointing method. ``save`` runs after optimizer.step() on checkpoint steps;
    ``before_opt`` right before optimizer.step(); both return the seconds they stalled."""

    def __init__(self, name: str, every: int, model, opt, workdir: str, device: torch.device) -> None:
        self.name, self.every, self.model, self.opt, self.workdir, self.device = name, every, model, opt, workdir, device
        self.persist: list[tuple[float, float]] = []
        self.last_path: str | None = None

    def state(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.opt.state_dict()}

    def path(self, step: int) -> str:
        return os.path.join(self.workdir, f"step-{step:07d}")

    def keep_only(self, path: str) -> None:
        """Delete older checkpoints (disk stays bounded); done after the new one is durable."""
        for name in os.listdir(self.workdir):
            p = os.path.join(self.workdir, name)
            if name.startswith("step-") and p != path:
                remove(p)

    def before_opt(self) -> float:
        return 0.0

    def after_opt(self) -> float:
        """Stall that happened inside optimizer.step() (stalwart's pre-hook)."""
        return 0.0

    def save(self, step: int) -> float:
        raise NotImplementedError

    def drain(self) -> None:
        """Wait until the newest checkpoint is durable."""

    def close(self) -> None:
        pass


class NoCheckpoint(Method):
    def save(self, step: int) -> float:
        return 0.0


class TorchSave(Method):
    def save(self, step: int) -> float:
        t0 = time.perf_counter()
        path = self.path(step) + ".pt"
        torch.save({**self.state(), "step": step}, path)
        dt = time.perf_counter() - t0
        self.keep_only(path)
        self.last_path = path
        self.persist.append((os.path.getsize(path), dt))
        return dt


class DcpSave(Method):
    def save(self, step: int) -> float:
        import torch.distributed.checkpoint as dcp

        t0 = time.perf_counter()
        path = self.path(step)
        dcp.save(self.state(), checkpoint_id=path, no_dist=True)
        dt = time.perf_counter() - t0
        self.keep_only(path)
        self.last_path = path
        self.persist.append((tree_bytes(path), dt))
        return dt


class DcpAsync(Method):
    """dcp.async_save, default (no stager) or with one reused DefaultStager."""

    def __init__(self, *a, stager: bool, shared_memory: bool = True) -> None:
        super().__init__(*a)
        self.stager = None
        self.options = None
        if stager:
            from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

            if self.device.type == "cuda":
                self.options = StagingOptions()
            else:
                self.options = StagingOptions(use_pinned_memory=False, use_shared_memory=shared_memory,
                                              use_async_staging=True, use_non_blocking_copy=False)
            self.stager = DefaultStager(self.options)
        self.staging = None  # Future: staged (stager mode)
        self.upload = None  # Future: durable
        self.pending: tuple[str, float, list[float], list[float]] | None = None  # path, start, [staged], [done]

    def _finish_previous(self) -> float:
        if self.upload is None:
            return 0.0
        t0 = time.perf_counter()
        self.upload.result()
        waited = time.perf_counter() - t0
        path, t_start, staged, done = self.pending
        # Future callbacks run just after waiters wake: fall back to "now" if not run yet
        t_done = done[0] if done else time.perf_counter()
        self.persist.append((tree_bytes(path), t_done - (staged[0] if staged else t_start)))
        self.keep_only(path)
        self.last_path = path
        self.upload = self.staging = self.pending = None
        return waited

    def save(self, step: int) -> float:
        import torch.distributed.checkpoint as dcp

        waited = self._finish_previous()
        t0 = time.perf_counter()
        path = self.path(step)
        staged: list[float] = []
        done: list[float] = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if self.stager is None:
                fut = dcp.async_save(self.state(), checkpoint_id=path, no_dist=True)
                staged.append(time.perf_counter())
                self.upload = fut
            else:
                resp = dcp.async_save(self.state(), checkpoint_id=path, no_dist=True, async_stager=self.stager)
                self.staging, self.upload = resp.staging_completion, resp.upload_completion
                self.staging.add_done_callback(lambda _f: staged.append(time.perf_counter()))
        self.upload.add_done_callback(lambda _f: done.append(time.perf_counter()))
        self.pending = (path, t0, staged, done)
        return waited + time.perf_counter() - t0

    def before_opt(self) -> float:
        if self.staging is None:
            return 0.0
        t0 = time.perf_counter()
        self.staging.result()
        self.staging = None
        return time.perf_counter() - t0

    def drain(self) -> None:
        self._finish_previous()

    def close(self) -> None:
        self.drain()
        if self.stager is not None:
            self.stager.close()


class Stalwart(Method):
    def __init__(self, *a) -> None:
        super().__init__(*a)
        import stalwart

        self.root = os.path.join(self.workdir, "root")
        self.tier_dir = os.path.join(self.workdir, "tier")
        self.tier_url = f"local:{self.tier_dir}"
        self.guard = stalwart.protect(self.model, self.opt, root=self.root, every=self.every, slots=2, resume=False,
                                      final_checkpoint=False, tiers=["memory", {"url": self.tier_url, "every": self.every}])
        self.guard.__enter__()
        self._hook_seen = 0.0

    @property
    def stats(self):
        return self.guard.stats

    def after_opt(self) -> float:
        now = self.stats.blocking_s
        waited, self._hook_seen = now - self._hook_seen, now
        return waited

    def save(self, step: int) -> float:
        return 0.0  # guard.step() runs every step; see step_call()

    def step_call(self) -> float:
        before = self.stats.step_call_s
        self.guard.step()
        return self.stats.step_call_s - before

    def warm_snapshot(self) -> None:
        self.guard.save_now()
        self._hook_seen = self.stats.blocking_s

    def drain(self) -> None:
        self.guard.wait()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.guard.__exit__(None, None, None)

    def keeper_log(self) -> tuple[list[tuple[int, float, float]], list[str]]:
        """(step, bytes, seconds) of every persist to the local tier, from the keeper's log
        (keepers restarted by the guard append to the same file), and its warning/error lines."""
        out, problems = [], []
        path = os.path.join(self.root, ".stalwart", "keeper-node0.log")
        with contextlib.suppress(FileNotFoundError), open(path) as f:
            for line in f:
                m = KEEPER_LINE.search(line)
                if m and m.group(2) == self.tier_url:
                    out.append((int(m.group(1)), float(m.group(3)) * 1e6, float(m.group(4))))
                elif " WARNING " in line or " ERROR " in line or "Traceback" in line:
                    problems.append(line.strip())
        return out, problems


def make_method(name: str, every: int, model, opt, workdir: str, device: torch.device) -> Method:
    args = (name, every, model, opt, workdir, device)
    if name == "none":
        return NoCheckpoint(*args)
    if name == "torch_save":
        return TorchSave(*args)
    if name == "dcp_save":
        return DcpSave(*args)
    if name == "dcp_async":
        return DcpAsync(*args, stager=False)
    if name == "dcp_async_stager":
        return DcpAsync(*args, stager=True)
    if name == "dcp_async_stager_private":  # --scaling: staged into private memory (one shm file per tensor hits fd limits)
        return DcpAsync(*args, stager=True, shared_memory=False)
    if name == "stalwart":
        return Stalwart(*args)
    raise SystemExit(f"unknown mode {name!r}; choose from none, {', '.join(MODES)}")


# ----------------------------------------------------------------------------- training
class Trainer:
    def __init__(self, cfg: GPTConfig, batch: int, device: torch.device, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.device = device
        self.model = GPT(cfg).to(device)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=3e-4, weight_decay=0.1)
        g = torch.Generator().manual_seed(seed)
        self.batches = [
            (torch.randint(0, cfg.vocab, (batch, cfg.seq), generator=g).to(device),
             torch.randint(0, cfg.vocab, (batch, cfg.seq), generator=g).to(device))
            for _ in range(4)
        ]
        self.i = 0

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def step(self, before_opt: Callable[[], float]) -> float:
        """Forward, backward, ``before_opt()``, optimizer step; returns the stall in before_opt."""
        x, y = self.batches[self.i % len(self.batches)]
        self.i += 1
        loss = self.model(x, y)
        loss.backward()
        stalled = before_opt()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return stalled


def run_mode(tr: Trainer, name: str, every: int, steps: int, warmup: int, workdir: str, log) -> Run:
    """Warm up (incl. checkpoints, so one-time costs stay out), then time ``steps`` steps.

    Global step numbers start at 1; a checkpoint is due when ``step % every == 0``
    (stalwart's own cadence). With every > 1 the window starts every//2 steps before
    the first due checkpoint and two warm-up checkpoints are taken first (allocating
    and touching both of stalwart's slots; DCP's executor, planner and stager).
    """
    remove(workdir)
    os.makedirs(workdir)
    run = Run(name, every)
    m = make_method(name, every, tr.model, tr.opt, workdir, tr.device)
    is_stalwart = isinstance(m, Stalwart)
    try:
        n_warm = warmup if every == 1 else max(warmup, every // 2)
        ckpt_blocks: list[float] = []  # blocking per checkpoint, index-aligned with ckpt_steps
        ckpt_waits: list[float] = []  # of which: waits right before optimizer.step()
        ckpt_steps: list[int] = []

        def one(step: int, measured: bool) -> None:
            tr.sync()
            t0 = time.perf_counter()
            pre = tr.step(m.before_opt)
            pre += m.after_opt()
            tr.sync()
            due = step % every == 0 and name != "none"
            post = m.step_call() if is_stalwart else 0.0
            if due and not is_stalwart:
                post += m.save(step)
            tr.sync()
            dt = time.perf_counter() - t0
            # stalls before optimizer.step() belong to the checkpoint before them
            if ckpt_blocks:
                ckpt_blocks[-1] += pre
                ckpt_waits[-1] += pre
            if due:
                ckpt_steps.append(step)
                ckpt_blocks.append(post)
                ckpt_waits.append(0.0)
            elif ckpt_blocks:
                ckpt_blocks[-1] += post
            if measured:
                run.step_s.append(dt)

        step = 0
        for _ in range(n_warm):
            step += 1
            one(step, measured=False)
            if every > 1 and step in (1, n_warm) and name != "none":  # warm-up checkpoints
                if is_stalwart:
                    m.warm_snapshot()
                else:
                    m.save(step)
                    m.drain()
        if every > 1:
            m.drain()
        if every == 1 and ckpt_blocks:
            run.cold_blocking_s = max(ckpt_blocks)
        warm_ckpts = len(ckpt_blocks)
        first_measured = step + 1
        for _ in range(steps):
            step += 1
            one(step, measured=True)
        # one more (untimed) step without a checkpoint: the last checkpoint's stall before
        # optimizer.step() is counted too
        pre = tr.step(m.before_opt) + m.after_opt()
        if ckpt_blocks:
            ckpt_blocks[-1] += pre
            ckpt_waits[-1] += pre
        # the stall of the last checkpoint before the window spills into it: not counted
        run.blocking_s = ckpt_blocks[warm_ckpts:]
        run.wait_s = ckpt_waits[warm_ckpts:]
        requested = [s for s in ckpt_steps if s >= first_measured]
        run.requested = len(requested)
        t0 = time.perf_counter()
        m.drain()
        run.drain_s = time.perf_counter() - t0
        if is_stalwart:
            run.skipped = m.stats.skipped
            run.notes.append(f"host pool {m.stats.pool_bytes / 1e9:.2f} GB")
            if run.skipped:
                run.notes.append(f"{run.skipped} snapshots skipped (no free slot)")
            # one snapshot persisted while the loop is idle
            tr.step(lambda: 0.0)
            m.guard.step()
            before_idle = time.perf_counter()
            m.guard.save_now()
            idle_s = time.perf_counter() - before_idle
            m.close()
            persisted, problems = m.keeper_log()  # complete once the keeper exited
            for line in problems[:10]:
                log(f"    keeper: {line}")
            if problems:
                run.notes.append(f"{len(problems)} keeper warning/error lines")
            idle_step = m.guard.step_count
            run.persist = [(b, s) for st, b, s in persisted if first_measured <= st < idle_step]
            run.durable = len([st for st, _, _ in persisted if st in requested])
            idle = [(b, s) for st, b, s in persisted if st == idle_step]
            run.idle_persist = idle[0] if idle else None
            run.ckpt_bytes = idle[0][0] if idle else None
            run.notes.append(f"save_now {idle_s:.2f}s")
        elif name != "none":
            m.drain()
            run.persist = list(m.persist[-len(requested):]) if requested else []
            run.durable = len(requested)
            run.ckpt_bytes = tree_bytes(m.last_path) if m.last_path else None
    finally:
        m.close()
        remove(workdir)
        gc.collect()
        os.sync()
    if name == "none":
        log(f"  {'baseline':<17} {len(run.step_s)} steps, mean step {run.mean_step:.3f}s")
    else:
        log(f"  {name:<17} every {every:<3} mean step {run.mean_step:.3f}s  median blocking "
            f"{(run.block or 0) * 1e3:9.1f} ms  ckpts {run.requested}" + (f"  skipped {run.skipped}" if run.skipped else ""))
    return run


# ----------------------------------------------------------------------------- report
def fmt_ms(x: float | None) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x * 1e3:.1f}" if x < 10 else f"{x * 1e3:.0f}"


def fmt_ratio(x: float | None) -> str:
    if x is None or math.isnan(x) or math.isinf(x):
        return "-"
    return f"{x:.3g}x"


def table(headers: list[str], rows: list[list[str]], markdown: bool) -> str:
    if markdown:
        out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
        out += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(out)
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths))
    out = [line, "-" * len(line)]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(out)


def report(runs: list[Run], base_runs: list[Run], disk: dict, header: list[str], markdown: bool) -> tuple[str, dict]:
    base_steps = [s for r in base_runs for s in r.step_s]
    base_mean = statistics.fmean(base_steps)
    disk_meds = {k: med(v) for k, v in disk.items() if k != "errors" and v}
    disk_best = max(disk_meds.values()) if disk_meds else float("nan")
    out = list(header)
    out.append("")
    drift = ""
    if len(base_runs) > 1:
        means = [r.mean_step for r in base_runs]
        spread = statistics.pstdev(means) / statistics.fmean(means)
        drift = (f"; {len(base_runs)} blocks, block means {min(means):.3f}-{max(means):.3f}s"
                 f" (sd {spread * 100:.1f}% of the mean: the noise floor of the overheads)")
    out.append(f"baseline (no checkpoint): mean step {base_mean:.3f}s, median {med(base_steps):.3f}s over {len(base_steps)} steps{drift}")
    disk_desc = ", ".join(f"{k} {v:.2f} GB/s (runs {', '.join(f'{x:.2f}' for x in disk[k])})" for k, v in disk_meds.items())
    out.append(f"disk sequential write (fresh file, 16 MiB os.write chunks, fsync): {disk_desc}")
    out.append("")
    results: dict = {"baseline_mean_step_s": base_mean, "disk_gbps": disk_meds, "runs": [asdict(r) for r in runs + base_runs]}
    verdicts = []
    for every in sorted({r.every for r in runs}):
        rs = [r for r in runs if r.every == every]
        by = {r.mode: r for r in rs}
        ts = by.get("torch_save")
        dcp_async = [by[m] for m in DCP_ASYNC if m in by and by[m].block is not None]
        best_async = min(dcp_async, key=lambda r: r.block) if dcp_async else None
        rows = []
        for r in rs:
            ovh = (r.mean_step - base_mean) / base_mean
            adj = (r.mean_step - r.adjacent_base_s) / r.adjacent_base_s if r.adjacent_base_s else None
            vs_ts = (ts.block / r.block) if ts and r.block else None
            vs_async = (best_async.block / r.block) if best_async and r.block else None
            gbps = r.persist_gbps
            rows.append([
                r.mode, str(r.requested), fmt_ms(r.block), fmt_ms(max(r.blocking_s) if r.blocking_s else None),
                fmt_ms(r.cold_blocking_s) if every == 1 else "-",
                f"{r.mean_step:.3f}", f"{med(r.step_s):.3f}", f"{ovh * 100:+.1f}%",
                f"{adj * 100:+.1f}%" if adj is not None else "-",
                fmt_ratio(vs_ts), fmt_ratio(vs_async),
                f"{r.ckpt_bytes / 1e9:.2f}" if r.ckpt_bytes else "-",
                f"{gbps:.2f}" if gbps else "-",
                f"{r.durable}/{r.requested}" if r.durable is not None else "-",
                f"{r.drain_s:.2f}",
            ])
        out.append(f"checkpoint every {every} step{'s' if every > 1 else ''}:")
        split = ", ".join(
            f"{r.mode} {fmt_ms(med([b - w for b, w in zip(r.blocking_s, r.wait_s)]))} + {fmt_ms(med(r.wait_s))}"
            for r in rs if r.blocking_s and r.mode in ("stalwart", *DCP_ASYNC))
        out.append(table(["method", "ckpts", "block ms (med)", "max ms", "cold ms", "step s (mean)", "step s (med)",
                          "overhead", "ovh adj", "torch.save/this", "best DCP async/this", "GB/ckpt", "persist GB/s",
                          "durable", "tail s"], rows, markdown))
        if split:
            out.append(f"blocking split, median ms in the save call (guard.step()) + waiting before optimizer.step(): {split}")
        out.append("")
        st = by.get("stalwart")
        if st and st.block is not None:
            if ts and ts.block:
                ratio = ts.block / st.block
                verdicts.append((f"every {every}: stalwart blocking <= 1/{TARGET_VS_TORCH_SAVE:.0f} of torch.save",
                                 ratio >= TARGET_VS_TORCH_SAVE,
                                 f"{fmt_ms(st.block)} ms vs {fmt_ms(ts.block)} ms = 1/{ratio:.0f}"))
            if best_async:
                ratio = best_async.block / st.block
                verdicts.append((f"every {every}: stalwart blocking <= 1/{TARGET_VS_DCP_ASYNC:.0f} of the best DCP async ({best_async.mode})",
                                 ratio >= TARGET_VS_DCP_ASYNC,
                                 f"{fmt_ms(st.block)} ms vs {fmt_ms(best_async.block)} ms = 1/{ratio:.1f}"))
            ovh = (st.mean_step - base_mean) / base_mean
            if every == 10:
                adj = (st.mean_step - st.adjacent_base_s) / st.adjacent_base_s if st.adjacent_base_s else float("nan")
                verdicts.append((f"every {every}: stalwart end-to-end overhead <= {TARGET_OVERHEAD_EVERY10 * 100:.0f}%",
                                 ovh <= TARGET_OVERHEAD_EVERY10,
                                 f"{ovh * 100:+.1f}% vs the pooled baseline ({adj * 100:+.1f}% vs the block right before)"))
        results[f"every_{every}"] = {r.mode: {"block_s": r.block, "overhead": (r.mean_step - base_mean) / base_mean,
                                               "persist_gbps": r.persist_gbps} for r in rs}
    st_runs = [r for r in runs if r.mode == "stalwart"]
    idle = [r.idle_persist for r in st_runs if r.idle_persist]
    busy = [g for r in st_runs if (g := r.persist_gbps)]
    if idle and disk_meds:
        idle_gbps = med([b / s / 1e9 for b, s in idle])
        best_name = max(disk_meds, key=disk_meds.get)
        ratio = idle_gbps / disk_best
        verdicts.append((f"stalwart persistence >= {TARGET_PERSIST_RATIO}x disk bandwidth",
                         ratio >= TARGET_PERSIST_RATIO,
                         f"keeper {idle_gbps:.2f} GB/s with the loop idle (median of {len(idle)}) vs {best_name} "
                         f"{disk_best:.2f} GB/s = {ratio:.2f}x"
                         + (f"; vs buffered+fsync {idle_gbps / disk_meds['buffered+fsync']:.2f}x" if "buffered+fsync" in disk_meds else "")
                         + (f"; while training: {med(busy):.2f} GB/s = {med(busy) / disk_best:.2f}x" if busy else "")))
        results["stalwart_persist_idle_gbps"] = idle_gbps
    if verdicts:
        out.append("targets:")
        for what, ok, detail in verdicts:
            out.append(f"  [{'MET' if ok else 'MISSED'}] {what}: {detail}")
        results["targets"] = [{"target": w, "met": ok, "detail": d} for w, ok, d in verdicts]
    notes = [f"{r.mode} every {r.every}: {'; '.join(r.notes)}" for r in runs if r.notes]
    if notes:
        out.append("notes: " + " | ".join(notes))
    return "\n".join(out), results


# ----------------------------------------------------------------------------- scaling
class Stack(torch.nn.Module):
    """``layers`` small Linear(width, width) layers: 2 parameters each, 8 state tensors with AdamW."""

    def __init__(self, layers: int, width: int) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(width, width) for _ in range(layers))


def scaling_run(method: str, tensors: int, width: int, warm: int, ckpts: int, compute_s: float, workdir: str) -> list[float]:
    """Blocking per checkpoint (s) of ``method`` on a fresh model of ``tensors`` state tensors,
    one checkpoint per step. A step is AdamW's step plus ``compute_s`` of matmuls standing in
    for forward/backward (background copies run meanwhile, as they would in training)."""
    torch.manual_seed(0)
    model = Stack(max(1, round(tensors / 8)), width)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    opt.step()  # creates the optimizer state: 8 tensors per layer
    a = torch.randn(256, 256)
    remove(workdir)
    os.makedirs(workdir)
    m = make_method(method, 1, model, opt, workdir, torch.device("cpu"))
    is_stalwart = isinstance(m, Stalwart)
    blocks: list[float] = []
    try:
        for i in range(warm + ckpts + 1):
            t_end = time.perf_counter() + compute_s
            while time.perf_counter() < t_end:
                a = torch.tanh(a @ a)
            pre = m.before_opt()
            opt.step()
            pre += m.after_opt()
            if blocks:
                blocks[-1] += pre  # a wait before optimizer.step() belongs to the checkpoint before it
            if i == warm + ckpts:
                break  # this step only collected the last checkpoint's wait
            blocks.append(m.step_call() if is_stalwart else m.save(i + 1))
        m.drain()
    finally:
        m.close()
        remove(workdir)
    return blocks[warm:]


def scaling_main(args) -> int:
    """Blocking per checkpoint against the number of state tensors: stalwart vs DCP async + stager."""
    sizes = [int(x) for x in args.scaling_sizes.split(",") if x]
    methods = ["dcp_async_stager", "dcp_async_stager_private", "stalwart"]
    dcp_methods = methods[:2]
    failed: dict[tuple[str, int], str] = {}
    root = os.path.abspath(args.dir or os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench-out",
                                                     f"async_scaling-{os.getpid()}"))
    own_shm = "STALWART_SHM_BASE" not in os.environ
    if own_shm:
        os.environ["STALWART_SHM_BASE"] = f"/dev/shm/swbench-async-{os.getpid()}"
        os.makedirs(os.environ["STALWART_SHM_BASE"], exist_ok=True)
    logging_quiet()
    t0 = time.perf_counter()
    blocks: dict[tuple[str, int], list[float]] = {(m, n): [] for m in methods for n in sizes}
    run_medians: dict[tuple[str, int], list[float]] = {(m, n): [] for m in methods for n in sizes}
    try:
        for r in range(args.repeats):
            for n in sizes:
                # alternate which method goes first, so neither always runs on a warmer machine
                for m in (methods if r % 2 == 0 else methods[::-1]):
                    if (m, n) in failed:
                        continue
                    try:
                        got = scaling_run(m, n, args.scaling_width, args.warmup, args.scaling_ckpts,
                                          args.scaling_compute_ms / 1e3, os.path.join(root, f"{m}-{n}"))
                    except Exception as e:  # e.g. DCP's shared-memory staging: one file descriptor per tensor
                        if m == "stalwart":
                            raise
                        failed[(m, n)] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
                        print(f"[{time.perf_counter() - t0:7.1f}s] {m} {n} tensors failed: {failed[(m, n)]}", flush=True)
                        continue
                    blocks[(m, n)] += got
                    run_medians[(m, n)].append(statistics.median(got))
                    print(f"[{time.perf_counter() - t0:7.1f}s] repeat {r + 1}/{args.repeats} {m:17s} {n:6d} tensors: "
                          f"block median {statistics.median(got) * 1e3:8.2f} ms (min {min(got) * 1e3:.2f}, max {max(got) * 1e3:.2f})",
                          flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
        if own_shm:
            shutil.rmtree(os.environ["STALWART_SHM_BASE"], ignore_errors=True)
    rows, verdicts = [], []
    base = statistics.median(blocks[("stalwart", sizes[0])]) / sizes[0]
    for n in sizes:
        st = statistics.median(blocks[("stalwart", n)])
        dcp = {m: statistics.median(blocks[(m, n)]) for m in dcp_methods if blocks[(m, n)]}
        best = min(dcp, key=dcp.get) if dcp else None
        per = st / n
        row = [f"{n:,}"]
        for m in methods:
            b = blocks[(m, n)]
            if not b:
                row += ["failed", "-", "-"]
                continue
            meds = run_medians[(m, n)]
            row += [f"{statistics.median(b) * 1e3:.2f}", f"{min(b) * 1e3:.2f}-{max(b) * 1e3:.2f}",
                    f"{min(meds) * 1e3:.2f}-{max(meds) * 1e3:.2f}"]
        row += [f"{per * 1e6:.2f}", f"{per / base:.2f}x", f"{dcp[best] / st:.1f}x" if best else "-"]
        rows.append(row)
        if best:
            verdicts.append((f"{n:,} tensors: stalwart under the best DCP async + stager ({best})", st < dcp[best],
                             f"{st * 1e3:.2f} ms vs {dcp[best] * 1e3:.2f} ms"))
        if n != sizes[0]:
            verdicts.append((f"{n:,} tensors: growth no faster than linear (per-tensor cost <= that at {sizes[0]:,})",
                             per <= base, f"{per * 1e6:.2f} us vs {base * 1e6:.2f} us per tensor"))
    print()
    print(f"blocking per checkpoint vs state tensors (model: Linear({args.scaling_width}, {args.scaling_width}) layers + AdamW,"
          f" 8 tensors per layer; a checkpoint every step; step = AdamW + {args.scaling_compute_ms:g} ms of matmuls;"
          f" {args.repeats} interleaved repeats x {args.scaling_ckpts} checkpoints after {args.warmup} warm-up;"
          f" torch {torch.__version__}, {os.cpu_count()} CPUs, wall {time.perf_counter() - t0:.0f}s)")
    headers = ["tensors"]
    for m in methods:
        headers += [f"{m} ms (median)", "min-max", "run medians"]
    headers += ["stalwart us/tensor", f"per tensor vs {sizes[0]:,}", "best DCP / stalwart"]
    print(table(headers, rows, False))
    for (m, n), why in sorted(failed.items(), key=lambda kv: kv[0][1]):
        print(f"{m} at {n:,} tensors failed: {why}")
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table(headers, rows, True) + "\n")
            for (m, n), why in sorted(failed.items(), key=lambda kv: kv[0][1]):
                f.write(f"\n{m} at {n:,} tensors failed: {why}\n")
    print("targets:")
    for what, ok, detail in verdicts:
        print(f"  [{'MET' if ok else 'MISSED'}] {what}: {detail}")
    return 0


# ----------------------------------------------------------------------------- main
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small model and few steps: a smoke run")
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {','.join(MODES)} (default: all)")
    ap.add_argument("--every", default="1,10", help="checkpoint cadences to measure, comma-separated (default 1,10)")
    ap.add_argument("--steps", type=int, default=None, help="measured steps per method at every 1 (default 12; quick 6)")
    ap.add_argument("--steps-sparse", type=int, default=None,
                    help="measured steps per method at every N > 1 (default 3N; quick 2N)")
    ap.add_argument("--baseline-steps", type=int, default=None,
                    help="steps of each baseline block (one before every method, one at the end; default 10; quick 5)")
    ap.add_argument("--warmup", type=int, default=3, help="warm-up steps per method before timing (default 3)")
    ap.add_argument("--batch", type=int, default=None, help="sequences per step (default 2; quick 2)")
    ap.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 128; quick 64)")
    ap.add_argument("--layers", type=int, default=None, help="transformer blocks (default 12; quick 2)")
    ap.add_argument("--d-model", type=int, default=None, help="model width (default 768; quick 256)")
    ap.add_argument("--vocab", type=int, default=None, help="vocabulary (default 32768; quick 8192)")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    ap.add_argument("--dir", default=None, help="work directory on the disk to test (default bench-out/async_ckpt-<pid>)")
    ap.add_argument("--disk-gib", type=float, default=None, help="size of the disk bandwidth test file (default 2; quick 0.25)")
    ap.add_argument("--disk-runs", type=int, default=2, help="disk runs per method, at the start and again at the end (default 2)")
    ap.add_argument("--json", default=None, help="also write the raw results here")
    ap.add_argument("--markdown", default=None, help="also write the tables as markdown here (for docs/BENCHMARKS.md)")
    ap.add_argument("--scaling", action="store_true",
                    help="instead: blocking per checkpoint vs the number of state tensors (stalwart vs DCP async + stager)")
    ap.add_argument("--scaling-sizes", default="450,4500,45000", help="state tensor counts for --scaling")
    ap.add_argument("--scaling-width", type=int, default=16, help="--scaling: width of each Linear layer (default 16)")
    ap.add_argument("--scaling-ckpts", type=int, default=8, help="--scaling: measured checkpoints per run (default 8)")
    ap.add_argument("--scaling-compute-ms", type=float, default=200.0,
                    help="--scaling: forward/backward stand-in per step, ms of matmuls (default 200)")
    ap.add_argument("--repeats", type=int, default=3, help="--scaling: interleaved repeats (default 3)")
    args = ap.parse_args()
    if args.scaling:
        return scaling_main(args)

    q = args.quick
    cfg = GPTConfig(
        vocab=args.vocab or (8192 if q else 32768), seq=args.seq or (64 if q else 128),
        d_model=args.d_model or (256 if q else 768), n_layer=args.layers or (2 if q else 12),
        n_head=(args.d_model or (256 if q else 768)) // 64,
    )
    batch = args.batch or 2
    everies = sorted({int(e) for e in args.every.split(",") if e})
    modes = [m for m in args.modes.split(",") if m]
    for m in modes:
        if m not in MODES:
            raise SystemExit(f"unknown mode {m!r}; choose from {', '.join(MODES)}")
    n_dense = args.steps or (6 if q else 12)
    base_steps = args.baseline_steps or (5 if q else 10)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    root = os.path.abspath(args.dir or os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench-out",
                                                     f"async_ckpt-{os.getpid()}"))
    os.makedirs(root, exist_ok=True)
    disk_gib = args.disk_gib if args.disk_gib is not None else (0.25 if q else 2.0)

    # A private shared-memory base for stalwart's keepers: test suites running beside this
    # benchmark SIGKILL the keeper of any /dev/shm/stalwart-* directory they did not create.
    own_shm = "STALWART_SHM_BASE" not in os.environ
    if own_shm:
        os.environ["STALWART_SHM_BASE"] = f"/dev/shm/swbench-async-{os.getpid()}"
        os.makedirs(os.environ["STALWART_SHM_BASE"], exist_ok=True)  # the keeper client expects it
    t_start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:7.1f}s] {msg}", flush=True)

    logging_quiet()
    try:
        disk: dict[str, list[float]] = {"buffered+fsync": [], "O_DIRECT+fsync": []}
        log(f"disk bandwidth ({disk_gib:g} GiB x {args.disk_runs} per method) in {root}")
        disk_bench(root, disk_gib, args.disk_runs, disk)

        tr = Trainer(cfg, batch, device)
        nparam = n_params(tr.model)
        log(f"model: GPT {cfg.describe()}, batch {batch}: {nparam / 1e6:.1f}M params, AdamW, device {device}")
        for _ in range(3):  # creates the optimizer state and pre-faults every buffer
            tr.step(lambda: 0.0)
        sbytes = state_bytes(tr.model, tr.opt)
        log(f"state: {sbytes / 1e9:.2f} GB (params + AdamW exp_avg/exp_avg_sq)")

        runs: list[Run] = []
        base_runs: list[Run] = []
        order = sorted(everies, key=lambda e: (e == 1, e))  # sparse cadences first, every-step last
        base_dir = os.path.join(root, "none")
        for every in order:
            n = n_dense if every == 1 else (args.steps_sparse or (2 if q else 3) * every)
            log(f"checkpoint every {every}: {n} measured steps per method, each after {base_steps} baseline steps")
            for mode in modes:
                base_runs.append(run_mode(tr, "none", 1, base_steps, 1, base_dir, log))
                runs.append(run_mode(tr, mode, every, n, args.warmup, os.path.join(root, f"{mode}-e{every}"), log))
                runs[-1].adjacent_base_s = base_runs[-1].mean_step
        base_runs.append(run_mode(tr, "none", 1, base_steps, 1, base_dir, log))
        log("disk bandwidth again")
        disk_bench(root, disk_gib, args.disk_runs, disk)
    finally:
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)
        if own_shm:
            shutil.rmtree(os.environ["STALWART_SHM_BASE"], ignore_errors=True)

    header = [
        "",
        f"async checkpoint benchmark: GPT {nparam / 1e6:.1f}M params ({cfg.describe()}, batch {batch}), AdamW fp32, "
        f"{sbytes / 1e9:.2f} GB of state; device {device}; torch {torch.__version__}; {os.cpu_count()} CPUs, "
        f"{torch.get_num_threads()} torch threads, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}",
        f"work dir {root}; keeper shm base {os.environ['STALWART_SHM_BASE']}; peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f} GiB; "
        f"wall {time.perf_counter() - t_start:.0f}s",
        "block = loop stalled per checkpoint (median and max over the measured window; cold = worst of the warm-up"
        " checkpoints of a fresh run, one-time costs);"
        " overhead = mean step vs the pooled baseline mean (ovh adj: vs the baseline block run right before); tail = wait after the window until the last checkpoint is durable;"
        " durable = checkpoints of the window that reached the disk",
    ]
    text, results = report(runs, base_runs, disk, header, markdown=False)
    print(text, flush=True)
    if args.markdown:
        md, _ = report(runs, base_runs, disk, header, markdown=True)
        with open(args.markdown, "w") as f:
            f.write(md + "\n")
    if args.json:
        results["config"] = {**asdict(cfg), "batch": batch, "params": nparam, "state_bytes": sbytes, "device": str(device)}
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


def logging_quiet() -> None:
    import logging

    logging.getLogger("stalwart").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*pin_memory.*")
    warnings.filterwarnings("ignore", message=".*assuming the intent is to save in a single process.*")


if __name__ == "__main__":  # DCP's PROCESS executor spawns: keep the guard
    sys.exit(main())
