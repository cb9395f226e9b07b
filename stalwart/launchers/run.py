"""``stalwart run``: torchrun with stalwart's defaults.

Every torchrun option works as in torchrun; ``stalwart run`` only changes defaults the
user did not set (see :data:`DEFAULTS` and ``stalwart run --help``).
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Sequence

#: (option, value, why) - applied when the option is absent from the command line.
DEFAULTS: list[tuple[str, str, str]] = [
    ("--rdzv-backend", "stalwart",
     "torch's dynamic rendezvous plus stable node identities, a keeper per node that outlives worker restarts, "
     "stand-in keepers for lost nodes and fast re-forms (torchrun: static, or c10d)"),
    ("--monitor-interval", "0.1", "a failed worker is noticed within 0.1 s (torchrun 2.13: the same; older releases 5 s)"),
    ("--max-restarts", "10", "node losses and worker failures are recovered up to 10 times per agent (torchrun: 0)"),
]

#: worker start: the options that choose how torchrun starts a worker; any of them given turns the warm start off
START_OPTIONS = ("--run-path", "--no-python", "--module", "-m", "--start-method")
WARM_START = ("--run-path --start-method=fork",
              "workers are forked from the agent, which has already imported torch, torch.distributed and stalwart,"
              " and run the script with runpy: a restarted worker skips the interpreter start and those imports"
              " (seconds per recovery). Give --start-method=spawn (or -m, --no-python) for torchrun's fresh"
              " interpreters, e.g. when the agent's environment must not leak into workers")

HELP = """\
usage: stalwart run [torchrun options] TRAINING_SCRIPT [script args]

Launch a training script like torchrun does, with stalwart's defaults for elastic,
fast recovery. Every torchrun option is accepted and wins over these defaults:

{defaults}

Single node without --rdzv-endpoint: a free local port is chosen (127.0.0.1:PORT) and
--nnodes defaults to 1. Several nodes: give the same --rdzv-endpoint=HOST:PORT and
--nnodes=MIN:MAX to every node's `stalwart run`. The rendezvous defaults stalwart
changes (--rdzv-conf key=value overrides each): last_call_timeout=1 (torchrun 30 s),
keep_alive_interval=1 (5 s), keep_alive_max_attempt=2 (3), close_timeout=10 (30 s).

What happens on a failure, the consistency guarantees and their limits: docs/ELASTIC.md.
torchrun's own options follow.
"""


def _given(argv: Sequence[str], option: str) -> bool:
    alt = "--" + option[2:].replace("-", "_")  # torchrun accepts --rdzv_backend as well as --rdzv-backend
    return any(a in (option, alt) or a.startswith((option + "=", alt + "=")) for a in argv)


def _script_index(argv: Sequence[str]) -> int:
    """Index of the training script: the first argument that is not an option or an option's value."""
    from torch.distributed.run import get_args_parser

    parser = get_args_parser()
    takes_value = {opt for action in parser._actions if action.nargs != 0 and action.option_strings
                   for opt in action.option_strings}
    i = 0
    while i < len(argv):
        a = argv[i]
        if not a.startswith("-"):
            return i
        if a == "--":
            return i + 1
        if "=" not in a and a in takes_value:
            i += 1
        i += 1
    return len(argv)


def build_argv(argv: Sequence[str]) -> list[str]:
    """torchrun's argument list: the user's options, stalwart's defaults for the missing ones, the script."""
    cut = _script_index(argv)
    options, rest = list(argv[:cut]), list(argv[cut:])
    for option, value, _ in DEFAULTS:
        if not _given(options, option):
            options.append(f"{option}={value}")
    if not _given(options, "--rdzv-endpoint") and not _given(options, "--standalone"):
        if not _given(options, "--nnodes"):
            options.append("--nnodes=1")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            options.append(f"--rdzv-endpoint=127.0.0.1:{s.getsockname()[1]}")
    if rest and rest[0].endswith(".py") and not any(_given(options, o) for o in START_OPTIONS):
        options += ["--run-path", "--start-method=fork"]
        rest[0] = os.path.abspath(rest[0])  # runpy needs the script's absolute path
    return options + rest


def warm_start(argv: Sequence[str]) -> bool:
    return "--run-path" in argv and "--start-method=fork" in argv


def preimport() -> None:
    """Import what every worker imports, once, in the agent: forked workers inherit it."""
    import torch.distributed
    import torch.nn.parallel  # noqa: F401

    import stalwart.ckpt
    import stalwart.elastic  # noqa: F401


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cut = _script_index(argv)
    help_asked = any(a in ("-h", "--help") for a in argv[:cut])
    if not help_asked and not argv[cut:]:
        print("stalwart run: error: no training script given (usage: stalwart run [torchrun options] TRAINING_SCRIPT"
              " [script args]; see stalwart run --help)", file=sys.stderr)
        return 2
    if help_asked:
        width = max(len(o) for o, _, _ in DEFAULTS) + len("=stalwart")
        lines = "\n".join(f"  {f'{o}={v}':<{width}}  {why}" for o, v, why in DEFAULTS)
        lines += f"\n  {WARM_START[0]}\n  {'':<{width}}  {WARM_START[1]}"
        print(HELP.format(defaults=lines))
        from torch.distributed.run import get_args_parser

        parser = get_args_parser()
        parser.prog = "stalwart run"
        parser.print_help()
        return 0
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun_main

    full = build_argv(argv)
    if warm_start(full):
        preimport()
    try:
        torchrun_main(full)
    except ChildFailedError as e:  # torchrun already printed which worker failed and why
        print(f"stalwart run: the job failed ({len(e.failures)} worker failure(s) reported above)", file=sys.stderr)
        return 1
    return 0
