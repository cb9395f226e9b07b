"""Presentation shared by the commands: exit codes, the console, sizes, progress bars.

Nothing here imports torch, and rich is imported only when something is printed
through it, so ``stalwart --help`` stays fast.
"""

from __future__ import annotations

import sys
from contextlib import nullcontext

EXIT_OK, EXIT_FOUND, EXIT_USAGE = 0, 1, 2


def console(stderr: bool = False):
    """A rich console; piped output is not wrapped at 80 columns (paths stay whole)."""
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    width = None if stream.isatty() else 240
    return Console(stderr=stderr, highlight=False, soft_wrap=False, width=width)


def human_bytes(n: float) -> str:
    """``1536`` -> ``"1.5 KiB"``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def dtype_str(dtype) -> str:
    """A dtype (stalwart's or torch's) as its short name: ``float32``."""
    return str(dtype).replace("torch.", "")


def byte_progress(total: int, description: str, enabled: bool):
    """A progress bar over bytes with rate and ETA; entering it gives ``advance(n)``.
    A no-op when disabled (e.g. stderr is not a terminal)."""
    if not enabled:
        return nullcontext(lambda n: None)
    return _Bar(total, description)


class _Bar:
    def __init__(self, total: int, description: str) -> None:
        self.total, self.description = total, description

    def __enter__(self):
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        self.p = Progress(
            TextColumn("{task.description}"), BarColumn(), DownloadColumn(binary_units=True),
            TransferSpeedColumn(), TimeRemainingColumn(), console=console(stderr=True), transient=True,
        )
        self.p.__enter__()
        task = self.p.add_task(self.description, total=self.total)
        return lambda n: self.p.advance(task, n)

    def __exit__(self, *exc):
        self.p.__exit__(*exc)


def print_lines(lines, stderr: bool = False) -> None:
    """Plain lines (no markup), through the console so wrapping rules are the same."""
    con = console(stderr)
    for line in lines:
        con.print(line, markup=False)
