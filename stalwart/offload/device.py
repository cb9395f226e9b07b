"""The CUDA side of :class:`~stalwart.offload.optimizer.OffloadAdamW`.

Per step, following the current :class:`~stalwart.offload.planner.Plan`:

- Gradients of CPU-placed subgroups go to the pinned host staging buffer as backward
  produces them (post-accumulate-grad hooks, a D2H side stream), or at ``step()`` when
  hooks are off (DDP/FSDP without :meth:`attach_ddp`) or when a gradient changed after
  it was copied (``_version`` moved: e.g. ``torch.nn.utils.clip_grad_norm_``).
- Device-placed subgroups are launched first, asynchronously: state uploaded on the
  H2D stream into a scratch slot (or kept resident), updated on the compute stream
  with the rule's torch ops next to the gradient, the model's weights written in
  place, the state downloaded on the D2H stream; a slot is reused once its download
  has finished.
- Meanwhile the host kernel updates the CPU subgroups one by one (the GIL is released)
  and each one's new weights go up on the H2D stream behind the device subgroups'
  uploads (the link the model shares between them).
- The step ends when the host state is complete (last download finished); the
  caller's stream waits for the weight uploads and device updates. Measured times
  (CUDA events, host timers) refit the model, which re-plans for the next step.

Untested on real hardware in this repository's CI (no GPU there); the GPU tests in
tests/offload/test_gpu.py cover it where a device is present.
"""

from __future__ import annotations

import threading
import time
from dataclasses import replace

import numpy as np
import torch

from stalwart.offload import planner
from stalwart.offload.calibrate import device_free
from stalwart.offload.layout import local_tensor

MAX_SLOTS = 3  # device scratch slots for transient subgroups: a bounded pipeline (upload / update / download)
CHUNK = 1 << 24  # elements per batch of device update ops: bounds their temporaries
TEMP_BYTES = 28  # device temporaries per element of a batch (fp32 g, t, d, u; fp64 sqrt)


def _event() -> torch.cuda.Event:
    return torch.cuda.Event(enable_timing=True)


class DevicePath:
    def __init__(self, opt, grad_hooks: bool | None, resident_budget: str | int) -> None:
        self.opt = opt
        self.device = opt.device
        with torch.cuda.device(self.device):
            self.h2d, self.d2h, self.comp = torch.cuda.Stream(), torch.cuda.Stream(), torch.cuda.Stream()
        self.grad_hooks = grad_hooks
        self.resident_spec = resident_budget
        self._hooks: list = []
        self._resident: dict[int, torch.Tensor] = {}  # subgroup -> its state on the device
        self._resident_valid: set[int] = set()
        self._hosted: dict[int, tuple[int, int]] = {}  # entry -> (grad ptr, grad version) when copied
        self._grad_event: dict[int, torch.cuda.Event] = {}  # subgroup -> event after its last gradient copy
        self._h2d_done: torch.cuda.Event | None = None
        self._lock = threading.Lock()
        self._ddp = False
        self._callback_queued = False
        self._scratch_bytes = 0
        self._peak_before_update: int | None = None

    # ------------------------------------------------------------ set-up

    def _use_hooks(self) -> bool:
        if self.grad_hooks is not None:
            return self.grad_hooks
        if self._ddp:
            return False  # the DDP comm hook copies reduced gradients instead
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return False  # gradients are reduced after the hooks fire: copy them at step()
        return not any(local_tensor(e.param) is not e.param for e in self.opt.layout.entries)

    def build(self) -> None:
        """(Re)install the gradient hooks for the optimizer's current layout."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self._resident.clear()
        self._resident_valid.clear()
        self._entry_of = {id(e.param): e.index for e in self.opt.layout.entries}
        self._entry_pieces: list[list[int]] = [[] for _ in self.opt.layout.entries]
        for k, pc in enumerate(self.opt.layout.pieces):
            self._entry_pieces[pc.entry].append(k)
        if self._use_hooks():
            for e in self.opt.layout.entries:
                if e.param.requires_grad:
                    self._hooks.append(e.param.register_post_accumulate_grad_hook(
                        lambda p, i=e.index: self._copy_grad(i, p.grad)))

    def calibration_now(self) -> planner.Calibration:
        """The calibration with device memory as it is now. The resident budget ("auto") is
        the headroom left at the peak seen before the last update began (forward and
        backward included; none before the first step, when that peak is unknown)."""
        largest = max((sg.stop - sg.start for sg in self.opt.layout.subgroups), default=0) \
            if hasattr(self.opt, "layout") else self.opt.subgroup_size
        free = max(0, device_free(self.device) - TEMP_BYTES * min(CHUNK, largest))
        resident_now = sum(t.numel() * 4 for t in self._resident.values())
        if self.resident_spec != "auto":
            budget = int(self.resident_spec)
        elif self._peak_before_update is None:
            budget = 0
        else:
            total = torch.cuda.get_device_properties(self.device).total_memory
            budget = max(0, resident_now + total - self._peak_before_update - int(0.1 * total))
        return replace(self.opt.calibration, free_device=free, resident_budget=budget)

    def invalidate_resident(self) -> None:
        self._resident_valid.clear()

    def device_bytes(self) -> dict:
        return {"resident_state": sum(t.numel() * 4 for t in self._resident.values()),
                "scratch_last_step": self._scratch_bytes}

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self._resident.clear()

    # ------------------------------------------------------------ gradients to the host

    def _cpu_pieces(self, entry: int) -> list[int]:
        placements = self.opt.plan.placements
        return [k for k in self._entry_pieces[entry] if placements[self.opt.layout.pieces[k].subgroup] == "cpu"]

    def _copy_grad(self, entry: int, grad: torch.Tensor | None) -> None:
        """Copy ``grad``'s CPU-placed pieces into the staging buffer on the D2H stream."""
        if grad is None:
            return
        pieces = self._cpu_pieces(entry)
        if not pieces:
            return
        lay = self.opt.layout
        e = lay.entries[entry]
        grad = local_tensor(grad)
        seen = (grad.data_ptr(), grad._version)
        if grad.dtype != e.dtype:
            grad = grad.to(e.dtype)
        flat = grad.reshape(-1)
        staging = self.opt.regions["grad"]
        with self._lock:
            self.d2h.wait_stream(torch.cuda.current_stream(self.device))
            if self._h2d_done is not None:  # the staging buffer held last step's weights on their way up
                self.d2h.wait_event(self._h2d_done)
            with torch.cuda.stream(self.d2h):
                for k in pieces:
                    pc = lay.pieces[k]
                    host = staging.view(e.grad_offset + pc.start * e.dtype.itemsize, pc.n, e.dtype)
                    host.copy_(flat[pc.start:pc.start + pc.n], non_blocking=True)
                ev = torch.cuda.Event()
                ev.record(self.d2h)
            grad.record_stream(self.d2h)
            for k in pieces:
                self._grad_event[lay.pieces[k].subgroup] = ev
            self._hosted[entry] = seen

    def attach_ddp(self, ddp_model: torch.nn.Module) -> None:
        """Copy DDP's reduced gradients to the host as each bucket's all-reduce finishes."""
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        def hook(state, bucket):
            if not self._callback_queued:
                self._callback_queued = True
                # DDP queues its own end-of-backward callback (which writes the reduced
                # gradients into .grad) after the last bucket; ours queues a second one from
                # inside the first, so it runs after DDP's.
                engine = torch.autograd.Variable._execution_engine
                engine.queue_callback(lambda: engine.queue_callback(self._after_backward))
            params, grads = bucket.parameters(), bucket.gradients()

            def copy(fut):
                for p, g in zip(params, grads):
                    i = self._entry_of.get(id(p))
                    if i is not None:
                        self._copy_grad(i, g)
                return fut.value()[0]

            return allreduce_hook(state, bucket).then(copy)

        ddp_model.register_comm_hook(None, hook)
        self._ddp = True
        self.build()

    def _after_backward(self) -> None:
        """After DDP wrote the reduced gradients into ``.grad``: remember their versions so
        a later change (clipping in place) is noticed at step()."""
        self._callback_queued = False
        with self._lock:
            for i in list(self._hosted):
                g = self.opt.layout.entries[i].param.grad
                if g is not None:
                    self._hosted[i] = (g.data_ptr(), g._version)

    # ------------------------------------------------------------ the step

    def step(self, grads, table: np.ndarray, row_of: np.ndarray):
        from stalwart.offload.optimizer import StepStats

        opt = self.opt
        self._peak_before_update = torch.cuda.max_memory_allocated(self.device)
        plan = self._fit_residency(opt.plan)
        stats = StepStats(opt._step_count + 1, plan)
        cur = torch.cuda.current_stream(self.device)
        start = _event()
        start.record(cur)
        # 1. Gradients of CPU subgroups that are not (validly) in host memory yet.
        for i, g in enumerate(grads):
            if g is not None and self._hosted.get(i) != (g.data_ptr(), g._version):
                self._copy_grad(i, g)
        self._hosted.clear()
        # 2. Device subgroups, launched asynchronously.
        self.comp.wait_stream(cur)
        self.h2d.wait_stream(cur)
        dev_subs = [s for s, p in enumerate(plan.placements) if p != "cpu"]
        timings = self._launch_device(dev_subs, grads, table, row_of)
        # 3. CPU subgroups on the host kernel, each one's weights uploaded when done.
        cpu_elems = cpu_time = 0.0
        up_bytes = 0
        ups = []
        for s, place in enumerate(plan.placements):
            if place != "cpu":
                continue
            ev = self._grad_event.pop(s, None)
            if ev is not None:
                ev.synchronize()
            idx = opt._pieces_for(s, row_of)
            t0 = time.perf_counter()
            if len(idx):
                segs = opt._segments[idx]  # fancy indexing: a contiguous copy
                segs["scal"] = row_of[opt._piece_entry[idx]]
                opt.kernel.step(opt.rule.rule_id, segs, table)
            dt = time.perf_counter() - t0
            n = int(opt._segments["n"][idx].sum())
            cpu_elems, cpu_time = cpu_elems + n, cpu_time + dt
            stats.subgroups.append((s, "cpu", n, plan.per_subgroup[s], dt))
            a, b = _event(), _event()
            with torch.cuda.stream(self.h2d):
                a.record(self.h2d)
                up_bytes += self._upload_weights(idx)
                b.record(self.h2d)
            ups.append((a, b))
        # 4. Finish: host state complete; the caller's stream sees the new weights.
        done_h2d = torch.cuda.Event()
        done_h2d.record(self.h2d)
        self._h2d_done = done_h2d
        cur.wait_event(done_h2d)
        cur.wait_stream(self.comp)
        last = _event()
        last.record(self.d2h)
        last.synchronize()
        self.h2d.synchronize()
        self.comp.synchronize()
        measured = self._measure(timings, ups, up_bytes, (cpu_elems, cpu_time), start, last, stats)
        opt.calibration = planner.refit(opt.calibration, measured)
        opt.plan = opt.replan(previous=plan.placements)
        self._grad_event.clear()
        return stats

    def _fit_residency(self, plan: planner.Plan) -> planner.Plan:
        """Demote resident subgroups beyond the budget seen now to transient device updates
        (both are device placements: the gradient hooks are unaffected)."""
        budget = self.calibration_now().resident_budget
        sizes = [c.device_bytes for c in self.opt.costs]
        used = 0
        places = list(plan.placements)
        for s, p in enumerate(places):
            if p == "resident":
                if used + sizes[s] > budget:
                    places[s] = "gpu"
                else:
                    used += sizes[s]
        if places == plan.placements:
            return plan
        self.opt.plan = planner.fixed(self.opt.costs, places, plan.calibration)
        return self.opt.plan

    def _upload_weights(self, idx: np.ndarray) -> int:
        """H2D of the updated weights of pieces ``idx`` (from staging, or from the master
        for fp32 parameters) into the parameters; returns bytes moved."""
        opt, lay = self.opt, self.opt.layout
        moved = 0
        for k in idx:
            pc = lay.pieces[int(k)]
            e = lay.entries[pc.entry]
            if e.dtype == torch.float32:
                src = opt.regions["master"].view(4 * (e.master_offset + pc.start), pc.n, torch.float32)
            else:
                src = opt.regions["grad"].view(e.grad_offset + pc.start * e.dtype.itemsize, pc.n, e.dtype)
            local_tensor(e.param).detach().view(-1)[pc.start:pc.start + pc.n].copy_(src, non_blocking=True)
            moved += pc.n * e.dtype.itemsize
        return moved

    def _state_views(self, s: int, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """The device tensor ``flat`` cut into subgroup ``s``'s slots and master."""
        sg = self.opt.layout.subgroups[s]
        n, nm = sg.stop - sg.start, sg.master[1] - sg.master[0]
        out = {k: flat[i * n:(i + 1) * n] for i, k in enumerate(self.opt.rule.slots)}
        out["master"] = flat[len(self.opt.rule.slots) * n:len(self.opt.rule.slots) * n + nm]
        return out

    def _host_views(self, s: int) -> dict[str, torch.Tensor]:
        sg = self.opt.layout.subgroups[s]
        regions = self.opt.regions
        out = {k: regions[k].view(4 * sg.start, sg.stop - sg.start, torch.float32) for k in self.opt.rule.slots}
        out["master"] = regions["master"].view(4 * sg.master[0], sg.master[1] - sg.master[0], torch.float32)
        return out

    def _launch_device(self, subs, grads, table, row_of):
        opt, lay = self.opt, self.opt.layout
        plan = opt.plan
        size = lambda s: (len(opt.rule.slots) * (lay.subgroups[s].stop - lay.subgroups[s].start)  # noqa: E731
                          + lay.subgroups[s].master[1] - lay.subgroups[s].master[0])
        transient = [s for s in subs if plan.placements[s] == "gpu"]
        for s in list(self._resident):
            if plan.placements[s] != "resident":
                del self._resident[s]
                self._resident_valid.discard(s)
        slot_elems = max((size(s) for s in transient), default=0)
        nslots = 0
        if transient:
            nslots = max(1, min(len(transient), MAX_SLOTS, device_free(self.device) // (4 * slot_elems)))
        slots = [torch.empty(slot_elems, dtype=torch.float32, device=self.device) for _ in range(nslots)]
        self._scratch_bytes = 4 * slot_elems * nslots
        free_ev: list[torch.cuda.Event | None] = [None] * nslots
        timings = []
        turn = 0  # transient subgroups launched so far
        for s in subs:
            resident = plan.placements[s] == "resident"
            if resident:
                if s not in self._resident:
                    self._resident[s] = torch.empty(size(s), dtype=torch.float32, device=self.device)
                flat = self._resident[s]
                upload = s not in self._resident_valid
            else:
                j = turn % nslots
                turn += 1
                flat = slots[j][:size(s)]
                if free_ev[j] is not None:
                    self.h2d.wait_event(free_ev[j])
                upload = True
            dev, host = self._state_views(s, flat), self._host_views(s)
            ev = [_event() for _ in range(6)]
            with torch.cuda.stream(self.h2d):
                ev[0].record(self.h2d)
                if upload:
                    for key, t in dev.items():
                        t.copy_(host[key], non_blocking=True)
                ev[1].record(self.h2d)
            self.comp.wait_event(ev[1])
            with torch.cuda.stream(self.comp):
                ev[2].record(self.comp)
                n = self._update_on_device(s, dev, grads, table, row_of)
                ev[3].record(self.comp)
            self.d2h.wait_event(ev[3])
            with torch.cuda.stream(self.d2h):
                for key, t in dev.items():
                    host[key].copy_(t, non_blocking=True)
                ev[4].record(self.d2h)
            flat.record_stream(self.h2d)
            flat.record_stream(self.comp)
            flat.record_stream(self.d2h)
            if not resident:
                free_ev[j] = ev[4]
            else:
                self._resident_valid.add(s)
            moved = 4 * flat.numel()
            timings.append((s, plan.placements[s], n, moved if upload else 0, moved, ev))
        return timings

    def _update_on_device(self, s: int, dev: dict[str, torch.Tensor], grads, table, row_of) -> int:
        """Run the rule's torch ops on subgroup ``s``'s pieces that have gradients, in batches
        of at most :data:`CHUNK` elements; write the model's weights in place. Returns the
        elements updated."""
        opt, lay = self.opt, self.opt.layout
        sg = lay.subgroups[s]
        batch: list[tuple] = []
        size = done = 0

        def flush():
            if batch:
                ps, gs, sts, rows, outs = zip(*batch)
                opt.rule.apply(ps, gs, sts, rows)
                for o, p in zip(outs, ps):
                    o.copy_(p)  # round-to-nearest-even into the model's dtype, as the host kernel does
                batch.clear()

        for k in opt._pieces_for(s, row_of):
            pc = lay.pieces[int(k)]
            e = lay.entries[pc.entry]
            g = grads[pc.entry]
            g.record_stream(self.comp)
            flat_g, flat_out = g.reshape(-1), local_tensor(e.param).detach().view(-1)
            for lo in range(pc.start, pc.start + pc.n, CHUNK):
                n = min(CHUNK, pc.start + pc.n - lo)
                a = e.offset + lo - sg.start
                mo = e.master_offset + lo - sg.master[0]
                batch.append((dev["master"][mo:mo + n], flat_g[lo:lo + n], [dev[x][a:a + n] for x in opt.rule.slots],
                              table[row_of[pc.entry]], flat_out[lo:lo + n]))
                size, done = size + n, done + n
                if size >= CHUNK:
                    flush()
                    size = 0
        flush()
        return done

    def _measure(self, timings, ups, up_bytes, cpu, start, last, stats) -> dict[str, tuple[float, float]]:
        h2d_bytes = d2h_bytes = 0
        h2d_t = d2h_t = gpu_t = 0.0
        gpu_elems = 0
        for s, place, n, upb, downb, ev in timings:
            up_s = ev[0].elapsed_time(ev[1]) / 1e3
            comp_s = ev[2].elapsed_time(ev[3]) / 1e3
            down_s = ev[3].elapsed_time(ev[4]) / 1e3
            h2d_bytes, h2d_t = h2d_bytes + upb, h2d_t + (up_s if upb else 0.0)
            d2h_bytes, d2h_t = d2h_bytes + downb, d2h_t + down_s
            gpu_elems, gpu_t = gpu_elems + n, gpu_t + comp_s
            stats.subgroups.append((s, place, n, self.opt.plan.per_subgroup[s], up_s + comp_s + down_s))
        for a, b in ups:
            h2d_t += a.elapsed_time(b) / 1e3
        h2d_bytes += up_bytes
        stats.measured.update(cpu=cpu[1], h2d=h2d_t, gpu=gpu_t, d2h=d2h_t, device_span=start.elapsed_time(last) / 1e3)
        return {"cpu": cpu, "gpu": (gpu_elems, gpu_t), "h2d": (h2d_bytes, h2d_t), "d2h": (d2h_bytes, d2h_t)}
