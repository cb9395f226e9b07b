"""``stalwart verify``: check a checkpoint as far as its format allows.

stalwart checkpoints: every checksum, every tensor fully covered by its fragments.
Other formats: their own checksums where they have them (the CRC-32 of every record
of torch.save zip archives: DeepSpeed, torch.save, ``.bin``, ``optimizer.pt``), and
everywhere that the checkpoint is complete (every file a reader needs is there, no
tensor runs past the end of its file, every byte of every tensor can be read) and
consistent (fragments add up to their tensor's shape, ranks agree on the step).
"""

from __future__ import annotations

import sys

from stalwart.cli.output import EXIT_FOUND, EXIT_OK, byte_progress, console, human_bytes

ORDER = 20


def register(sub) -> None:
    p = sub.add_parser(
        "verify", help="check checksums, completeness and shape consistency (any format)",
        description="Read every byte of a checkpoint and check it: stalwart checkpoints against their checksums, each "
                    "tensor's fragments covering it exactly; other formats against their own checksums where they have "
                    "them (CRC-32 of torch.save zip records) and for completeness and shape consistency. Exit 0 if "
                    "sound, 1 otherwise (each problem is named).")
    p.add_argument("path", metavar="PATH")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.add_argument("--param-order", metavar="FILE", help="for optimizer state indexed by position (Trainer, Accelerate):"
                   " the param names in optimizer order, one per line, or the model's config.json")
    p.set_defaults(func=run)


def run(args) -> int:
    from stalwart.errors import FormatError
    from stalwart.formats.sources import NativeSource, open_source

    try:
        src = open_source(args.path, param_order=args.param_order)
    except FormatError as e:
        # A checkpoint too broken to open is a verification failure, not a usage error,
        # unless nothing there is a checkpoint at all.
        if "not a checkpoint format" in str(e) or "no such file" in str(e):
            raise
        console().print(f"[bold red]FAILED[/] {args.path}: 1 problem(s)")
        console().print(f"  - {e}", markup=False)
        return EXIT_FOUND
    if isinstance(src, NativeSource):
        src.close()
        return verify_native(args)
    with src:
        return verify_foreign(args, src)


def verify_foreign(args, src) -> int:
    from stalwart.formats.adapters.check import verify, verify_total

    with byte_progress(verify_total(src), "verifying", not args.quiet and sys.stderr.isatty()) as advance:
        report = verify(src, progress=advance)
    con = console()
    if report.ok:
        sums = f"{report.checksums_checked} checksums match" if report.checksums_checked else "the format has no checksums"
        con.print(
            f"OK {report.path} ({report.format}): {report.files_checked} files, {human_bytes(report.bytes_checked)},"
            f" {report.tensors_checked} tensors; {sums}; every tensor is complete and consistent", markup=False)
        for line in report.notes:
            con.print(f"note: {line}", markup=False)
        return EXIT_OK
    con.print(f"[bold red]FAILED[/] {report.path} ({report.format}): {len(report.problems)} problem(s)")
    for p in report.problems:
        con.print(f"  - {p}", markup=False)
    return EXIT_FOUND


def verify_native(args) -> int:
    from stalwart.formats.reader import Checkpoint

    with Checkpoint(args.path) as ckpt:
        total = sum(f.size for f in ckpt.manifest.files)
        with byte_progress(total, "verifying", not args.quiet and sys.stderr.isatty()) as advance:
            report = ckpt.verify(progress=advance)
    con = console()
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
