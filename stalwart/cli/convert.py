"""``stalwart convert``: argument parsing and presentation; the work is in :mod:`stalwart.formats.convert`."""

from __future__ import annotations

import argparse
import json
import sys

from stalwart.cli.output import EXIT_OK, byte_progress, console, dtype_str, human_bytes

ORDER = 40

DESCRIPTION = """\
Convert a checkpoint from one format to another, streaming (peak memory stays near
the largest tensor plus a bounded buffer), all-or-nothing (written under a temporary
name, renamed at the end) and deterministic (the same input gives the same bytes).

Formats read (detected from SRC):
  stalwart      a stalwart checkpoint (manifest.json), or a root with a 'latest' pointer
  deepspeed     ZeRO stage 0/1/2/3 (fp32/fp16/bf16, BF16_Optimizer, any DP degree): a tag
                directory (global_step900/), a save directory with a 'latest' file, or a
                Hugging Face Trainer checkpoint-N/ holding global_stepN/. fp32 master weights
                are preferred over the low-precision module copies; every optimizer slot kept.
  ds-universal  DeepSpeed universal checkpoints (ZeRO-1/2 and ZeRO-3 forms; 'latest_universal')
  dcp           torch.distributed.checkpoint directories (.metadata + *.distcp, incl. the
                safetensors variant), any sharding
  hf            model.safetensors, sharded model-*.safetensors + index, DCP's HF storage
                layout, pytorch_model*.bin (+ index)
  hf-trainer    a Trainer checkpoint-N/ without DeepSpeed: weights, optimizer.pt, scheduler.pt,
                rng_state*.pth, scaler.pt, trainer_state.json (optimizer params named from
                param_names, --param-order, or config.json with transformers installed)
  accelerate    an Accelerate save_state() directory: weights, optimizer.bin, scheduler.bin,
                random_states_*.pkl, scaler.pt, sampler / custom objects
  torch         one torch.save file: a state dict, or {model, optimizer, step, ...}
Pickled files are read with an allow-list (torch.load(weights_only=True) semantics plus
stand-ins for DeepSpeed's pickled classes); nothing else is ever unpickled.

Formats written (--to):
  native        stalwart's universal format with optimizer slots, step and state
  hf            safetensors shards of at most --max-shard-size + model.safetensors.index.json,
                {"format": "pt"} metadata, tied weights stored once; weights only
  dcp           a directory torch.distributed.checkpoint.load reads; keys as get_state_dict
                gives them: {"model": ..., "optim": ...}
  ds-universal  DST/latest_universal + DST/<tag>/zero/...: DeepSpeed loads it with
                {"checkpoint": {"load_universal": true}} into ZeRO-1/2 or ZeRO-3, any DP degree
  torch         one torch.save file (DST is the file): a state dict with --weights-only,
                else {"model", "optimizer", "step", "lr_scheduler", "stalwart"}
"""

EPILOG = """\
examples:
  stalwart convert ds_ckpt/global_step900 out/ --to hf --dtype bf16
  stalwart convert ds_ckpt/ ucp/ --to ds-universal          # then resume at another DP degree
  stalwart convert run/checkpoint-500 ckpt/ --to native      # HF Trainer + DeepSpeed output
  stalwart convert dcp_ckpt/ model.pt --to torch --weights-only --rename '^model\\.='
  stalwart convert ckpt/ out/ --to hf --exclude 'lm_head' --max-shard-size 2GB --dry-run
  stalwart convert acc_state/ ckpt/ --to native --param-order model/config.json   # Accelerate

Filters are regexes searched (re.search) in the source's param/buffer names; optimizer
slots follow their param. --rename rules apply re.sub in the order given.
Nothing is dropped silently: files in SRC no reader consumes are listed in the notes, and
state that cannot be read (optimizer state without param names) fails a conversion that
would write it, unless --weights-only.
Exit status: 0 converted (or planned), 2 bad input or usage (one-line error, nothing written).
"""


def register(subparsers) -> argparse.ArgumentParser:
    """Add ``convert`` to the ``stalwart`` command's sub-parsers."""
    from stalwart.formats.convert_options import DEFAULT_MAX_SHARD, TARGETS

    p = subparsers.add_parser(
        "convert",
        help="convert between DeepSpeed, DCP, Hugging Face, torch.save and stalwart checkpoints",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("src", metavar="SRC", help="checkpoint to read (format detected)")
    p.add_argument("dst", metavar="DST", help="output directory (a file for --to torch)")
    p.add_argument("--to", required=True, choices=TARGETS, help="format to write")
    p.add_argument("--dtype", metavar="DTYPE", help="cast floating-point params and buffers (fp32, bf16, fp16, fp64);"
                   " optimizer slots keep their dtype (default: keep every dtype)")
    p.add_argument("--include", metavar="REGEX", action="append", help="keep only tensors whose name matches (repeatable)")
    p.add_argument("--exclude", metavar="REGEX", action="append", help="drop tensors whose name matches (repeatable)")
    p.add_argument("--rename", metavar="PATTERN=REPL", action="append",
                   help="rename tensors with re.sub, e.g. '^module\\.=' strips 'module.' (repeatable, in order)")
    p.add_argument("--weights-only", action="store_true", help="drop optimizer state (slots, param groups, scheduler)")
    p.add_argument("--param-order", metavar="FILE",
                   help="names of the params in optimizer order, for optimizer state indexed by position (HF Trainer"
                        " optimizer.pt, Accelerate optimizer.bin): a text file with one name per line, or the model's"
                        " config.json (the order is rebuilt with transformers)")
    p.add_argument("--max-shard-size", default=DEFAULT_MAX_SHARD, metavar="SIZE",
                   help=f"largest Hugging Face shard, e.g. 5GB (10^9), 2GiB, 500MB (default: {DEFAULT_MAX_SHARD})")
    p.add_argument("--tag", help="tag directory name for --to ds-universal (default: global_step<N>_universal)")
    p.add_argument("--workers", type=int, default=2, metavar="N", help="parallel reader threads (default: 2)")
    p.add_argument("--buffer-size", default="256MiB", metavar="SIZE",
                   help="read-ahead memory bound; peak memory is about the largest tensor plus this (default: 256MiB)")
    p.add_argument("--dry-run", action="store_true", help="print the plan (tensors, sizes, output files); write nothing")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists (atomically, at the end)")
    p.add_argument("--fsync", action="store_true", help="fsync the output before renaming it into place (durable against"
                   " power loss; slower). Default: off - the rename already makes the output all-or-nothing")
    p.add_argument("--all", action="store_true", help="with --dry-run: list every tensor (default: the first 40)")
    p.add_argument("--json", action="store_true", help="machine-readable plan / result on stdout")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_convert)
    return p


def _plan_json(plan) -> dict:
    return {
        "source": plan.source,
        "source_format": plan.source_format,
        "destination": plan.destination,
        "target": plan.target,
        "step": plan.state.meta.step,
        "tensors": [
            {"name": t.name, "source": t.source, "shape": list(t.shape), "dtype": dtype_str(t.dtype),
             "source_dtype": dtype_str(t.src_dtype), "role": t.role, "bytes": t.nbytes}
            for t in plan.tensors
        ],
        "aliases": plan.state.aliases,
        "files": [{"path": f.path, "bytes": f.nbytes, "tensors": f.tensors} for f in plan.files],
        "total_bytes": plan.total_bytes,
        "dropped": plan.dropped,
        "warnings": plan.warnings,
    }


def _print_plan(plan, show_all: bool) -> None:
    from rich.table import Table

    con = console()
    m = plan.state.meta
    con.print(f"[bold]plan[/]: {plan.source} ({plan.source_format}) -> {plan.destination} ({plan.target})", markup=True)
    con.print(f"step {m.step if m.step is not None else '-'}; {len(plan.tensors)} tensors, {human_bytes(plan.total_bytes)}",
              markup=False)
    table = Table(show_edge=False, header_style="bold")
    for col, kw in [("tensor", {}), ("shape", {}), ("dtype", {}), ("role", {}), ("size", {"justify": "right"})]:
        table.add_column(col, **kw)
    rows = plan.tensors if show_all else plan.tensors[:40]
    for t in rows:
        dt = dtype_str(t.dtype)
        if t.src_dtype != t.dtype:
            dt = f"{dtype_str(t.src_dtype)} -> {dt}"
        name = t.name if t.name == t.source else f"{t.source} -> {t.name}"
        table.add_row(name, str(tuple(t.shape)), dt, t.role, human_bytes(t.nbytes))
    con.print(table)
    if len(rows) < len(plan.tensors):
        con.print(f"... {len(plan.tensors) - len(rows)} more tensors (--all lists them)", markup=False)
    if plan.state.aliases:
        con.print("tied: " + ", ".join(f"{a} = {o}" for a, o in sorted(plan.state.aliases.items())), markup=False)
    if plan.dropped:
        con.print(f"dropped by filters: {len(plan.dropped)} ({', '.join(plan.dropped[:6])}{', ...' if len(plan.dropped) > 6 else ''})",
                  markup=False)
    con.print("output files:", markup=False)
    for f in plan.files[:30]:
        size = human_bytes(f.nbytes) if f.nbytes else "small"
        con.print(f"  {f.path}  {size}", markup=False)
    if len(plan.files) > 30:
        con.print(f"  ... {len(plan.files) - 30} more files", markup=False)
    for w in plan.warnings:
        con.print(f"note: {w}", markup=False)


def cmd_convert(args) -> int:
    from stalwart.formats.convert import convert, parse_size

    holder: dict = {}
    show_bar = not args.quiet and not args.dry_run and not args.json and sys.stderr.isatty()

    def on_plan(plan) -> None:
        holder["plan"] = plan
        if show_bar:
            holder["bar"] = byte_progress(plan.total_bytes, f"converting to {plan.target}", True)
            holder["advance"] = holder["bar"].__enter__()

    def progress(n: int) -> None:
        if "advance" in holder:
            holder["advance"](n)

    try:
        result = convert(
            args.src, args.dst, to=args.to, dtype=args.dtype, include=args.include, exclude=args.exclude,
            rename=args.rename, weights_only=args.weights_only, max_shard_size=args.max_shard_size,
            dry_run=args.dry_run, workers=args.workers, progress=progress, overwrite=args.overwrite,
            fsync=args.fsync, tag=args.tag, on_plan=on_plan, buffer_bytes=parse_size(args.buffer_size),
            param_order=args.param_order,
        )
    finally:
        if "bar" in holder:
            holder["bar"].__exit__(None, None, None)
    if args.dry_run:
        if args.json:
            print(json.dumps(_plan_json(result), indent=1))
        else:
            _print_plan(result, args.all)
        return EXIT_OK
    plan = result.plan
    if args.json:
        print(json.dumps({**_plan_json(plan), "seconds": round(result.seconds, 3), "bytes_written": result.bytes_written},
                         indent=1))
        return EXIT_OK
    con = console()
    rate = result.bytes_written / result.seconds if result.seconds > 0 else 0.0
    con.print(
        f"converted {plan.source} ({plan.source_format}) -> {plan.destination} ({plan.target}): {len(plan.tensors)} tensors,"
        f" {human_bytes(result.bytes_written)} in {result.seconds:.2f} s ({human_bytes(rate)}/s), {len(plan.files)} files",
        markup=False,
    )
    for w in plan.warnings:
        con.print(f"note: {w}", markup=False)
    return EXIT_OK


__all__ = ["cmd_convert", "register"]
