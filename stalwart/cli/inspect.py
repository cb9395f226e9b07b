"""``stalwart inspect``: what a checkpoint holds, in any format convert reads."""

from __future__ import annotations

import json
import math
import os

from stalwart.cli.output import EXIT_OK, console, dtype_str, human_bytes

ORDER = 10


def register(sub) -> None:
    p = sub.add_parser(
        "inspect", help="list tensors, shapes, dtypes, roles, fragments, topology and steps (any format)",
        description="Show what a checkpoint holds. PATH is a stalwart checkpoint (or a root with a 'latest' pointer), "
                    "or any format 'stalwart convert' reads: DeepSpeed ZeRO / universal, DCP, Hugging Face "
                    "(safetensors, .bin, Trainer checkpoint-N/, Accelerate save_state), torch.save. Files in PATH "
                    "that the reader does not consume are listed.")
    p.add_argument("path", metavar="PATH")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--all", action="store_true", help="list every tensor (default: the first 60)")
    p.add_argument("--param-order", metavar="FILE", help="for optimizer state indexed by position (Trainer, Accelerate):"
                   " the param names in optimizer order, one per line, or the model's config.json")
    p.set_defaults(func=run)


def run(args) -> int:
    from stalwart.formats.sources import NativeSource, open_source

    src = open_source(args.path, param_order=args.param_order)
    if isinstance(src, NativeSource):
        src.close()
        return inspect_native(args)
    with src:
        return inspect_foreign(args, src)


def inspect_foreign(args, src) -> int:
    from stalwart.formats.adapters.check import describe

    info = describe(src)
    if args.json:
        print(json.dumps(info, indent=1))
        return EXIT_OK
    from rich.table import Table

    con = console()
    step = info["step"] if info["step"] is not None else "-"
    con.print(f"[bold]{info['path']}[/]  format {info['format']}  step {step}")
    topo = ", ".join(f"{k}={v}" for k, v in info["topology"].items()) or "-"
    con.print(f"topology: {topo}   files read: {len(info['files'])} ({human_bytes(info['stored_bytes'])})", markup=False)
    table = Table(show_edge=False, header_style="bold")
    for col, kw in [("tensor", {}), ("shape", {}), ("dtype", {}), ("role", {}), ("size", {"justify": "right"})]:
        table.add_column(col, **kw)
    tensors = info["tensors"]
    limit = None if args.all else 60
    for row in tensors[:limit]:
        role = row["role"] + (f" ({row['slot']})" if "slot" in row else "")
        name = row["name"] + (f" = {', '.join(row['aliases'])}" if "aliases" in row else "")
        table.add_row(name, str(tuple(row["shape"])), row["dtype"], role, human_bytes(row["bytes"]))
    con.print(table)
    if limit is not None and len(tensors) > limit:
        con.print(f"... {len(tensors) - limit} more tensors (--all shows them)")
    con.print(f"{len(tensors)} tensors, {human_bytes(info['tensor_bytes'])} of tensor data;"
              f" objects: {', '.join(info['objects']) or '-'}", markup=False)
    opt = info.get("optimizer")
    if opt:
        con.print(f"optimizer: {opt['class'] or '?'}, {len(opt['param_groups'])} param group(s)", markup=False)
    for path in info["not_read"]:
        con.print(f"not read: {path}", markup=False)
    for w in info["warnings"]:
        con.print(f"note: {w}", markup=False)
    return EXIT_OK


# --------------------------------------------------------------------------- native checkpoints


def _placement_summary(spec, layout) -> str:
    p = spec.placement.to_json()
    kind = p["kind"]
    if kind == "sharded":
        parts = [f"{s['mesh_dim']}@dim{s['dim']}{'/' + s['mode'] if s.get('mode', 'chunk') != 'chunk' else ''}" for s in p["shards"]]
        text = "tp " + ",".join(parts) if parts else "whole"
    elif kind == "zero_flat":
        text = f"zero1/2 {p['group']}"
    elif kind == "zero_param":
        text = "zero3"
    elif kind == "explicit":
        text = f"explicit x{len(p['fragments'])}"
    else:
        text = "whole"
    if kind in ("zero_flat", "zero_param") and p.get("base", {}).get("kind") == "sharded":
        text += " +tp"
    if spec.stage is not None:
        text += f" pp{spec.stage}"
    return text


def _fragment_counts(layout) -> dict[str, int] | None:
    if layout.world_size * max(1, len(layout.tensors)) > 200_000:
        return None  # counting would enumerate ranks x tensors; the rule column says enough
    counts = {n: 0 for n in layout.tensors}
    for rank in range(layout.world_size):
        for name, shard in layout.writes(rank):
            counts[name] += len(shard.pieces)
    return counts


def _steps_of_root(root: str) -> list[dict]:
    from stalwart.formats.atomic import parse_step_dirname, read_latest
    from stalwart.formats.manifest import MANIFEST_NAME

    latest = read_latest(root)
    out = []
    for name in sorted(os.listdir(root)):
        step = parse_step_dirname(name)
        if step is None:
            continue
        committed = os.path.exists(os.path.join(root, name, MANIFEST_NAME))
        out.append({"step": step, "dir": name, "committed": committed, "latest": name == latest})
    return out


def _tier_records(root: str) -> list[dict]:
    """Durability records written by the checkpoint engine (if this is one of its roots)."""
    from stalwart.ckpt.tiers import read_durability_records

    return read_durability_records(root)


def inspect_native(args) -> int:
    from stalwart.formats.reader import Checkpoint, resolve_checkpoint_dir

    path = args.path
    ckpt_dir = resolve_checkpoint_dir(path)
    steps = _steps_of_root(path) if ckpt_dir != os.path.normpath(path) and os.path.isdir(path) else []
    tiers = _tier_records(path) if steps else []
    with Checkpoint(ckpt_dir) as ckpt:
        m = ckpt.manifest
        layout = ckpt.layout
        counts = _fragment_counts(layout)
        total = sum(math.prod(t.shape) * t.dtype.itemsize for t in layout.tensors.values())
        stored = sum(f.size for f in m.files)
        tensors = []
        for name, t in layout.tensors.items():
            nbytes = math.prod(t.shape) * t.dtype.itemsize
            row = {
                "name": name, "shape": list(t.shape), "dtype": dtype_str(t.dtype), "role": t.role,
                "bytes": nbytes, "placement": _placement_summary(t, layout),
                "fragments": counts[name] if counts is not None else None,
            }
            if t.slot:
                row["slot"] = f"{t.slot} of {t.param}"
            if t.aliases:
                row["aliases"] = list(t.aliases)
            tensors.append(row)
        info = {
            "path": ckpt_dir, "format_version": 1, "step": m.step, "created": m.created, "producer": m.producer,
            "topology": {**layout.topology(), **m.topology}, "block_size": m.block_size,
            "files": len(m.files), "stored_bytes": stored, "tensor_bytes": total, "tensors": tensors,
            "objects": sorted(m.objects), "steps": steps, "tiers": tiers,
        }
    if args.json:
        print(json.dumps(info, indent=1))
        return EXIT_OK
    from rich.table import Table

    con = console()
    topo = ", ".join(f"{k}={v}" for k, v in info["topology"].items())
    con.print(f"[bold]{ckpt_dir}[/]  step {m.step if m.step is not None else '-'}  created {m.created or '-'}")
    con.print(f"topology: {topo}   files: {len(m.files)} ({human_bytes(stored)})   block size: {human_bytes(m.block_size)}")
    table = Table(show_edge=False, header_style="bold")
    for col, kw in [("tensor", {}), ("shape", {}), ("dtype", {}), ("role", {}), ("size", {"justify": "right"}),
                    ("placement", {}), ("frags", {"justify": "right"})]:
        table.add_column(col, **kw)
    limit = None if args.all else 60
    for row in tensors[:limit]:
        role = row["role"] + (f" ({row['slot']})" if "slot" in row else "")
        name = row["name"] + (f" = {', '.join(row['aliases'])}" if "aliases" in row else "")
        table.add_row(name, str(tuple(row["shape"])), row["dtype"], role, human_bytes(row["bytes"]), row["placement"],
                      "rule" if row["fragments"] is None else str(row["fragments"]))
    con.print(table)
    if limit is not None and len(tensors) > limit:
        con.print(f"... {len(tensors) - limit} more tensors (--all shows them)")
    con.print(f"{len(tensors)} tensors, {human_bytes(total)} of tensor data; objects: {', '.join(info['objects']) or '-'}")
    if steps:
        con.print("steps: " + "  ".join(
            f"{s['step']}{'*' if s['latest'] else ''}{'' if s['committed'] else ' (uncommitted)'}" for s in steps
        ) + "   (* = latest)")
    for tier in tiers:
        con.print(f"tier {tier.get('tier')}: steps {tier.get('steps')}")
    return EXIT_OK
