"""The ``stalwart`` command: inspect, verify and diff checkpoints (and convert them).

Thin by design: argument parsing and presentation here, the work in the packages.
User errors print one line (``stalwart: error: ...``) and exit with status 2;
``verify`` and ``diff`` exit 1 when they find a problem or a difference.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence

from stalwart import __version__
from stalwart.errors import StalwartError

EXIT_OK, EXIT_FOUND, EXIT_USAGE = 0, 1, 2


def _console(stderr: bool = False):
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    # Piped output (scripts, CI logs) must not be wrapped at 80 columns mid-path.
    width = None if stream.isatty() else 240
    return Console(stderr=stderr, highlight=False, soft_wrap=False, width=width)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def byte_progress(total: int, description: str, enabled: bool):
    """A rich progress bar over bytes with rate and ETA (a no-op context when disabled)."""
    from contextlib import nullcontext

    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    if not enabled:
        return nullcontext(lambda n: None)

    class _Bar:
        def __enter__(self):
            self.p = Progress(
                TextColumn("{task.description}"), BarColumn(), DownloadColumn(binary_units=True),
                TransferSpeedColumn(), TimeRemainingColumn(), console=_console(stderr=True), transient=True,
            )
            self.p.__enter__()
            task = self.p.add_task(description, total=total)
            return lambda n: self.p.advance(task, n)

        def __exit__(self, *exc):
            self.p.__exit__(*exc)

    return _Bar()


# --------------------------------------------------------------------------- inspect


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


def cmd_inspect(args) -> int:
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
                "name": name, "shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", ""), "role": t.role,
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

    con = _console()
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


# --------------------------------------------------------------------------- verify


def cmd_verify(args) -> int:
    from stalwart.formats.reader import Checkpoint

    with Checkpoint(args.path) as ckpt:
        total = sum(f.size for f in ckpt.manifest.files)
        with byte_progress(total, "verifying", not args.quiet and sys.stderr.isatty()) as advance:
            report = ckpt.verify(progress=advance)
    con = _console()
    if report.ok:
        con.print(
            f"OK {report.path}: {report.files_checked} files, {human_bytes(report.bytes_checked)},"
            f" {report.tensors_checked} tensors; every checksum matches and every tensor is fully covered"
        )
        return EXIT_OK
    con.print(f"[bold red]FAILED[/] {report.path}: {len(report.problems)} problem(s)")
    for p in report.problems:
        con.print(f"  - {p}", markup=False)
    return EXIT_FOUND


# --------------------------------------------------------------------------- diff


def compare_tensors(a, b) -> tuple[bool, float]:
    """(bitwise equal, max |a - b|); NaN in the same place counts as equal, NaN against a number is NaN."""
    import torch

    from stalwart.formats.dtypes import tensor_bytes

    a = a.contiguous()
    b = b.contiguous()
    equal = a.dtype == b.dtype and a.shape == b.shape and bytes(tensor_bytes(a)) == bytes(tensor_bytes(b))
    if equal or a.numel() == 0:
        return equal, 0.0
    wide = torch.complex128 if (a.dtype.is_complex or b.dtype.is_complex) else torch.float64
    x, y = a.to(wide), b.to(wide)
    diff = (x - y).abs()
    both_nan = torch.isnan(x) & torch.isnan(y)
    if wide == torch.float64:
        same_inf = torch.isinf(x) & (x == y)
        diff = torch.where(both_nan | same_inf, torch.zeros_like(diff), diff)
    else:
        diff = torch.where(both_nan, torch.zeros_like(diff), diff)
    if bool(torch.isnan(diff).any()):
        return False, math.nan
    return False, float(diff.max())


def cmd_diff(args) -> int:
    from rich.table import Table

    from stalwart.formats.sources import open_source

    con = _console()
    with open_source(args.a) as sa, open_source(args.b) as sb:
        ia, ib = sa.infos(), sb.infos()
        names = list(dict.fromkeys([*ia, *ib]))
        rows, equal_count = [], 0
        for name in names:
            if name not in ia or name not in ib:
                rows.append((name, "missing in " + ("A" if name not in ia else "B"), ""))
                continue
            x, y = ia[name], ib[name]
            if x.shape != y.shape:
                rows.append((name, f"shape {tuple(x.shape)} vs {tuple(y.shape)}", ""))
                continue
            eq, maxdiff = compare_tensors(sa.read(name), sb.read(name))
            if eq:
                equal_count += 1
                continue
            if x.dtype != y.dtype:
                status = f"dtype {str(x.dtype)[6:]} vs {str(y.dtype)[6:]}"
            else:
                status = "differs"
            if not math.isnan(maxdiff) and maxdiff <= args.atol and x.dtype == y.dtype:
                equal_count += 1
                continue
            rows.append((name, status, f"{maxdiff:.6g}"))
    if args.json:
        print(json.dumps({"equal": equal_count, "different": [{"tensor": n, "status": s, "max_abs_diff": d} for n, s, d in rows]}, indent=1))
    else:
        con.print(f"A: {args.a} ({sa.format_name})   B: {args.b} ({sb.format_name})")
        if rows:
            table = Table(show_edge=False, header_style="bold")
            table.add_column("tensor")
            table.add_column("status")
            table.add_column("max |A-B|", justify="right")
            for r in rows:
                table.add_row(*r)
            con.print(table)
        con.print(f"{equal_count} tensors equal{' (bitwise)' if args.atol == 0 else f' (within {args.atol})'}, {len(rows)} differ or are missing")
    return EXIT_OK if not rows else EXIT_FOUND


# --------------------------------------------------------------------------- entry point


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2, like every other user error
        self.print_usage(sys.stderr)
        print(f"stalwart: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="stalwart",
        description="Inspect, verify, diff and convert checkpoints; keep PyTorch training alive and cheap to restart.",
        epilog="Run 'stalwart COMMAND --help' for a command's options. Exit status: 0 ok, 1 problems found, 2 usage or input error.",
    )
    parser.add_argument("--version", action="version", version=f"stalwart {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("inspect", help="list tensors, shapes, dtypes, roles, fragments, topology and steps",
                       description="Show what a checkpoint holds. PATH is a checkpoint directory or a root with a 'latest' pointer.")
    p.add_argument("path", metavar="PATH")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--all", action="store_true", help="list every tensor (default: the first 60)")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("verify", help="check every checksum and that every tensor is fully covered",
                       description="Read every byte of a checkpoint and check it against its checksums; check that each "
                                   "tensor's fragments cover it exactly. Exit 0 if sound, 1 otherwise (each problem is named).")
    p.add_argument("path", metavar="PATH")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("diff", help="compare two checkpoints tensor by tensor (any supported formats)",
                       description="Compare tensors by name: bitwise equality, max absolute difference, missing tensors. "
                                   "A and B may be in different formats. Exit 0 if all equal, 1 otherwise.")
    p.add_argument("a", metavar="A")
    p.add_argument("b", metavar="B")
    p.add_argument("--atol", type=float, default=0.0, help="treat tensors within this max abs difference as equal (default: bitwise)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_diff)

    _add_convert(sub)
    return parser


def _add_convert(sub) -> None:
    """The ``convert`` command lives with the format adapters; absent until they are built."""
    try:
        from stalwart.formats.convert_cli import add_convert_command
    except ModuleNotFoundError as e:
        if e.name != "stalwart.formats.convert_cli":
            raise
        return
    add_convert_command(sub)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    try:
        return args.func(args)
    except StalwartError as e:
        print(f"stalwart: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (OSError, ValueError) as e:
        print(f"stalwart: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("stalwart: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
