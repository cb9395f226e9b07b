"""``stalwart diff``: compare two checkpoints tensor by tensor, across formats."""

from __future__ import annotations

import json
import math

from stalwart.cli.output import EXIT_FOUND, EXIT_OK, console, dtype_str

ORDER = 30


def register(sub) -> None:
    p = sub.add_parser("diff", help="compare two checkpoints tensor by tensor (any supported formats)",
                       description="Compare tensors by name: bitwise equality, max absolute difference, missing tensors. "
                                   "A and B may be in different formats. Exit 0 if all equal, 1 otherwise.")
    p.add_argument("a", metavar="A")
    p.add_argument("b", metavar="B")
    p.add_argument("--atol", type=float, default=0.0, help="treat tensors within this max abs difference as equal (default: bitwise)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


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


def run(args) -> int:
    from rich.table import Table

    from stalwart.formats.sources import open_source

    con = console()
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
                status = f"dtype {dtype_str(x.dtype)} vs {dtype_str(y.dtype)}"
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
