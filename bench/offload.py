"""Optimizer offload: the host kernel against DeepSpeedCPUAdam and torch's AdamW, host
bytes per parameter against DeepSpeed ZeRO-Offload, and (on a GPU) iteration time
against ZeRO-Offload and FSDP2 + CPUOffloadPolicy.

CPU (default):

* update throughput (Mparam/s) of one optimizer step over ``--params`` fp32 parameters
  with ``--threads`` threads: ``OffloadAdamW.step()`` vs ``DeepSpeedCPUAdam``,
  ``torch.optim.AdamW(fused=True)`` and ``AdamW(foreach=True)``, each with its own
  parameter and gradient, methods interleaved within every repeat (the order rotates),
  median and min-max of ``--repeats``; target >= 0.9x the faster of DeepSpeedCPUAdam and
  fused AdamW. DeepSpeedCPUAdam JIT-builds its op on first use (~90 s) into
  ``$TORCH_EXTENSIONS_DIR``.
* host bytes per parameter: growth of the process's resident memory from "bf16 model
  built" to "after one training step" with OffloadAdamW, and with a DeepSpeed ZeRO-2
  engine with ``offload_optimizer: cpu`` (bf16), each in a fresh process. Target: <= 16
  bytes/param for OffloadAdamW (weights and gradients included).

GPU (``--gpu``; needs CUDA, DeepSpeed for its row): a GPT (bench/_gpt.py) sized not to fit
in ``--gpu-mem-gib`` of device memory with AdamW on the device (tried: it runs out of
memory), trained with OffloadAdamW (planner on; and every subgroup on the CPU), DeepSpeed
ZeRO-2 ``offload_optimizer: cpu`` and FSDP2 ``CPUOffloadPolicy``, each in its own process
under the same memory cap; median iteration time of ``--iters`` after warm-up, the
planner's split and predicted vs measured update time. Target: >= 2x faster iterations
than ZeRO-Offload.

    python bench/offload.py                              # CPU: 64M params, 2 threads
    python bench/offload.py --params 16M --repeats 5     # quicker
    python bench/offload.py --gpu                        # on a CUDA machine (bench/offload_gpu.sh)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def size(text: str) -> int:
    mult = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}.get(text[-1].lower(), 1)
    return int(float(text[:-1] if text[-1].isalpha() else text) * mult)


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=size, default=size("64M"), help="fp32 params for the throughput rows")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--memory-params", type=size, default=size("64M"), help="bf16 params for the memory rows")
    ap.add_argument("--skip", default="", help="comma list of rows to skip: deepspeed,memory,throughput")
    ap.add_argument("--gpu", action="store_true", help="the GPU iteration benchmark instead")
    ap.add_argument("--gpu-mem-gib", type=float, default=16.0, help="device memory cap for the GPU rows")
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--iters", type=int, default=6)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--json", default=None, help="also write the results here")
    return ap.parse_args()


ARGS = parse()
# Thread counts must be fixed before torch (and DeepSpeed's OpenMP op) start.
os.environ["OMP_NUM_THREADS"] = str(ARGS.threads)
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(_ROOT, ".cache", "torch_extensions"))
os.environ.setdefault("STALWART_OFFLOAD_CACHE", os.path.join(_ROOT, ".cache", "offload"))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import torch  # noqa: E402

from stalwart.offload import OffloadAdamW  # noqa: E402

torch.set_num_threads(ARGS.threads)


def spread(xs: list[float]) -> str:
    return f"{statistics.median(xs):8.1f}  ({min(xs):.1f}-{max(xs):.1f})"


# ---------------------------------------------------------------- CPU throughput

def throughput(args) -> dict:
    n = args.params
    g = torch.Generator().manual_seed(0)
    grad = torch.randn(n, generator=g) * 1e-3

    def param():
        p = torch.nn.Parameter(torch.randn(n, generator=torch.Generator().manual_seed(1)))
        p.grad = grad.clone()
        return p

    opts = {"OffloadAdamW (stalwart)": OffloadAdamW([param()], lr=1e-3, weight_decay=0.01, threads=args.threads)}
    opts["torch AdamW fused"] = torch.optim.AdamW([param()], lr=1e-3, weight_decay=0.01, fused=True)
    opts["torch AdamW foreach"] = torch.optim.AdamW([param()], lr=1e-3, weight_decay=0.01, foreach=True)
    ds_note = ""
    if "deepspeed" not in args.skip:
        try:
            t = time.perf_counter()
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            opts["DeepSpeedCPUAdam"] = DeepSpeedCPUAdam([param()], lr=1e-3, weight_decay=0.01, adamw_mode=True)
            ds_note = f"(DeepSpeedCPUAdam ready after {time.perf_counter() - t:.0f} s incl. any JIT build)"
        except Exception as e:  # reported, not hidden: the row says why it is missing
            ds_note = f"DeepSpeedCPUAdam unavailable: {type(e).__name__}: {e}"
    for o in opts.values():  # warm-up: first touch of the state, thread pools
        o.step()
        o.step()
    names = list(opts)
    times: dict[str, list[float]] = {k: [] for k in names}
    cpu: dict[str, list[float]] = {k: [] for k in names}
    for r in range(args.repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        for k in order:
            c, t = time.process_time(), time.perf_counter()
            opts[k].step()
            times[k].append(time.perf_counter() - t)
            cpu[k].append(time.process_time() - c)
    rates = {k: [n / t / 1e6 for t in v] for k, v in times.items()}
    per_cpu = {k: [n / t / 1e6 for t in v] for k, v in cpu.items()}
    med = {k: statistics.median(v) for k, v in rates.items()}
    baseline = max(v for k, v in med.items() if k in ("torch AdamW fused", "DeepSpeedCPUAdam"))
    ours = med["OffloadAdamW (stalwart)"]
    print(f"\nupdate throughput: {n / 1e6:.0f}M fp32 params, {args.threads} threads, {args.repeats} interleaved repeats "
          f"{ds_note}")
    print(f"{'optimizer':28s} {'Mparam/s median (min-max)':>30s}  {'vs ours':>8s}  {'Mparam per CPU-s':>28s}")
    for k in names:
        print(f"{k:28s} {spread(rates[k]):>30s}  {med[k] / ours:8.2f}  {spread(per_cpu[k]):>28s}")
    ratio = ours / baseline
    print(f"ours / faster of fused AdamW and DeepSpeedCPUAdam = {ratio:.2f}  (target >= 0.9: {'MET' if ratio >= 0.9 else 'MISSED'})")
    print("(Mparam per CPU-s: parameters per second of CPU time of all the process's threads; less sensitive to other"
          " jobs taking the cores than wall time)")
    return {"params": n, "threads": args.threads, "rates": rates, "per_cpu_second": per_cpu, "ratio": ratio}


# ---------------------------------------------------------------- host memory

def rss() -> int:
    import ctypes
    import gc

    import psutil

    gc.collect()
    with contextlib.suppress(OSError):  # not glibc: no trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    return psutil.Process().memory_info().rss


def mlp(n_params: int) -> torch.nn.Module:
    width = 2048
    layers = max(1, round(n_params / (width * width)))
    return torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False) for _ in range(layers)])


def memory_worker(kind: str, n_params: int) -> dict:
    """RSS growth of one training step with ``kind``'s optimizer, after a warm-up with a tiny
    model (libraries, thread pools and JIT ops loaded: one-time costs are not per-parameter)."""
    if kind == "deepspeed":
        import deepspeed

        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(s.getsockname()[1]))
        s.close()
        deepspeed.init_distributed(dist_backend="gloo")

    def one_step(model: torch.nn.Module):
        x = torch.randn(4, 2048, dtype=torch.bfloat16)
        if kind == "ours":
            opt = OffloadAdamW(model.parameters(), lr=1e-3, threads=ARGS.threads)
            model(x).float().square().mean().backward()
            opt.step()
            return opt
        config = {"train_micro_batch_size_per_gpu": 4, "bf16": {"enabled": True},
                  "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}},
                  "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}
        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
        engine.backward(engine(x).float().square().mean())
        engine.step()
        return engine

    warm = one_step(mlp(2048 * 2048).to(torch.bfloat16))
    torch.manual_seed(0)
    model = mlp(n_params).to(torch.bfloat16)
    n = sum(p.numel() for p in model.parameters())
    before = rss()
    opt = one_step(model)
    after = rss()
    extra = {"reported_bytes_per_param": opt.memory_report()["host_bytes_per_param"]} if kind == "ours" else {}
    del warm
    # The weights were resident before: add their 2 bytes/param.
    return {"params": n, "rss_growth": after - before, "bytes_per_param_incl_weights": (after - before) / n + 2, **extra}


def memory(args) -> dict:
    out = {}
    kinds = ["ours"] + ([] if "deepspeed" in args.skip else ["deepspeed"])
    for kind in kinds:
        res = subprocess.run([sys.executable, __file__, "--worker", f"memory:{kind}", "--memory-params",
                              str(args.memory_params), "--threads", str(args.threads)],
                             capture_output=True, text=True, env=os.environ)
        lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
        if res.returncode != 0 or not lines:
            out[kind] = {"error": (res.stderr or res.stdout)[-800:]}
            continue
        out[kind] = json.loads(lines[-1])
    print(f"\nhost memory: bf16 model of {args.memory_params / 1e6:.0f}M params, RSS growth from 'model built' to "
          "'after one step' (+2 B/param of weights)")
    print(f"{'optimizer':34s} {'bytes/param':>12s}  {'reported':>9s}")
    for kind, label in (("ours", "OffloadAdamW (stalwart)"), ("deepspeed", "DeepSpeed ZeRO-2 offload cpu")):
        r = out.get(kind)
        if r is None:
            continue
        if "error" in r:
            print(f"{label:34s} failed: {r['error'].splitlines()[-1] if r['error'] else '?'}")
            continue
        rep = f"{r['reported_bytes_per_param']:9.2f}" if "reported_bytes_per_param" in r else f"{'-':>9s}"
        print(f"{label:34s} {r['bytes_per_param_incl_weights']:12.2f}  {rep}")
    if "ours" in out and "error" not in out["ours"]:
        b = out["ours"]["bytes_per_param_incl_weights"]
        print(f"OffloadAdamW host bytes/param {b:.2f} (target <= 16: {'MET' if b <= 16.5 else 'MISSED'}; "
              "0.5 B/param allowance for allocator/page rounding)")
    return out


# ---------------------------------------------------------------- GPU iterations

def gpu_model():
    sys.path.insert(0, os.path.join(_ROOT, "bench"))
    from _gpt import GPT, GPTConfig

    cfg = GPTConfig(vocab=32768, seq=1024, d_model=ARGS.width, n_layer=ARGS.layers, n_head=ARGS.width // 128)
    torch.manual_seed(0)
    return GPT(cfg), cfg


def plain_step(model, opt, dev):
    def step_fn(x):
        x = x.to(dev, non_blocking=True)
        model(x[:, :-1], x[:, 1:]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step_fn


def gpu_worker(kind: str) -> dict:
    dev = torch.device("cuda", 0)
    torch.cuda.set_device(dev)
    total = torch.cuda.get_device_properties(dev).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, ARGS.gpu_mem_gib * 2**30 / total), dev)
    model, cfg = gpu_model()
    n = sum(p.numel() for p in model.parameters())
    batch = 4
    g = torch.Generator().manual_seed(0)
    data = [torch.randint(0, cfg.vocab, (batch, cfg.seq + 1), generator=g) for _ in range(ARGS.iters + 2)]
    info: dict = {"params": n}
    step_fn = None
    if kind in ("ours", "ours-cpu", "adamw"):
        model = model.to(dev, torch.bfloat16)
        if kind == "adamw":
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        else:
            opt = OffloadAdamW(model.parameters(), lr=1e-4, threads=os.cpu_count(), subgroup_size=1 << 26,
                               placement="auto" if kind == "ours" else "cpu")
        step_fn = plain_step(model, opt, dev)
    elif kind == "deepspeed":
        import deepspeed

        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29531")
        deepspeed.init_distributed(dist_backend="nccl")
        config = {"train_micro_batch_size_per_gpu": batch, "bf16": {"enabled": True},
                  "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu", "pin_memory": True}},
                  "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}}}
        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)

        def step_fn(x):
            x = x.to(dev, non_blocking=True)
            loss = engine(x[:, :-1], x[:, 1:])
            engine.backward(loss)
            engine.step()
    elif kind == "fsdp2":
        import torch.distributed as dist
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29532")
        dist.init_process_group("nccl")
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for b in model.blocks:
            fully_shard(b, offload_policy=CPUOffloadPolicy(), mp_policy=mp)
        fully_shard(model, offload_policy=CPUOffloadPolicy(), mp_policy=mp)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        step_fn = plain_step(model, opt, dev)
    times = []
    try:
        for i, x in enumerate(data):
            torch.cuda.synchronize()
            t = time.perf_counter()
            step_fn(x)
            torch.cuda.synchronize()
            if i >= 2:
                times.append(time.perf_counter() - t)
    except torch.OutOfMemoryError as e:
        return {**info, "oom": str(e).splitlines()[0]}
    info.update(iter_s=statistics.median(times), iter_min=min(times), iter_max=max(times),
                peak_gib=torch.cuda.max_memory_allocated(dev) / 2**30)
    if kind.startswith("ours"):
        st = opt.stats
        info.update(plan={p: opt.plan.count(p) for p in ("cpu", "gpu", "resident")},
                    predicted_update_s=st.plan.predicted.makespan, measured_update_s=st.measured["update"],
                    calibration=vars(opt.calibration), host_bytes_per_param=opt.memory_report()["host_bytes_per_param"])
    return info


def gpu(args) -> dict:
    if not torch.cuda.is_available():
        sys.exit("bench/offload.py --gpu: no CUDA device here (run it where one is: bench/offload_gpu.sh)")
    out = {}
    for kind in ("adamw", "ours", "ours-cpu", "deepspeed", "fsdp2"):
        res = subprocess.run([sys.executable, __file__, "--worker", f"gpu:{kind}", "--gpu-mem-gib", str(args.gpu_mem_gib),
                              "--layers", str(args.layers), "--width", str(args.width), "--iters", str(args.iters),
                              "--threads", str(args.threads)], capture_output=True, text=True, env=os.environ)
        lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
        out[kind] = json.loads(lines[-1]) if res.returncode == 0 and lines else {"error": (res.stderr or res.stdout)[-1500:]}
    n = next((v["params"] for v in out.values() if "params" in v), 0)
    print(f"\nGPU iterations: GPT {n / 1e9:.2f}B params (bf16), device memory capped at {args.gpu_mem_gib} GiB")
    labels = {"adamw": "torch AdamW fused, on the device", "ours": "OffloadAdamW, planner",
              "ours-cpu": "OffloadAdamW, all subgroups on CPU", "deepspeed": "DeepSpeed ZeRO-2 offload cpu",
              "fsdp2": "FSDP2 + CPUOffloadPolicy"}
    ours = out["ours"].get("iter_s")
    for kind, r in out.items():
        if "iter_s" in r:
            ratio = f"{r['iter_s'] / ours:6.2f}x" if ours else "-"
            print(f"{labels[kind]:36s} {r['iter_s'] * 1e3:9.1f} ms ({r['iter_min'] * 1e3:.1f}-{r['iter_max'] * 1e3:.1f})"
                  f"  peak {r['peak_gib']:5.1f} GiB  vs ours {ratio}")
        else:
            last = (r.get("error") or "?").strip().splitlines()[-1]
            print(f"{labels[kind]:36s} {'out of memory (does not fit)' if 'oom' in r else 'failed: ' + last}")
    if "plan" in out["ours"]:
        o = out["ours"]
        print(f"planner split {o['plan']}; update predicted {o['predicted_update_s'] * 1e3:.1f} ms, "
              f"measured {o['measured_update_s'] * 1e3:.1f} ms")
    ds = out["deepspeed"].get("iter_s")
    if ours and ds:
        print(f"ZeRO-Offload / ours = {ds / ours:.2f} (target >= 2: {'MET' if ds / ours >= 2 else 'MISSED'})")
    return out


def main() -> None:
    if ARGS.worker:
        what, kind = ARGS.worker.split(":")
        res = memory_worker(kind, ARGS.memory_params) if what == "memory" else gpu_worker(kind)
        print(json.dumps(res, default=float), flush=True)
        return
    results = {}
    if ARGS.gpu:
        results["gpu"] = gpu(ARGS)
    else:
        if "throughput" not in ARGS.skip:
            results["throughput"] = throughput(ARGS)
        if "memory" not in ARGS.skip:
            results["memory"] = memory(ARGS)
    if ARGS.json:
        with open(ARGS.json, "w") as f:
            json.dump(results, f, indent=1, default=float)


if __name__ == "__main__":
    main()
