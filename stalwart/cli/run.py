"""``stalwart run``: launch a training script with torchrun and stalwart's defaults.

Every argument after ``run`` goes to the launcher unparsed (torchrun's options, the
script and its arguments); ``stalwart run --help`` explains each default it changes.
"""

from __future__ import annotations

import argparse

ORDER = 5


def register(sub) -> None:
    # every token is the launcher's: no option of ours may swallow one of torchrun's
    p = sub.add_parser("run", help="launch a training script (torchrun with stalwart's rendezvous, restarts, keepers)",
                       add_help=False, prefix_chars="\x00")
    p.add_argument("argv", nargs=argparse.REMAINDER)
    p.set_defaults(func=run)


def run(args) -> int:
    from stalwart.launchers.run import main

    return main(args.argv)
