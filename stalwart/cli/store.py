"""``stalwart store``: host the rendezvous store outside the job, so any node may be lost."""

from __future__ import annotations

import sys

ORDER = 6


def register(sub) -> None:
    p = sub.add_parser("store", help="host the rendezvous store on this machine (outside the job's nodes)",
                       description="Host a TCPStore for --rdzv-endpoint=THIS_HOST:PORT. torchrun's c10d rendezvous keeps "
                                   "its store in one of the job's agents, and the job ends if that node dies; a store "
                                   "hosted here instead survives the loss of any node. Runs until interrupted.")
    p.add_argument("--port", type=int, default=29400, help="port to listen on (default 29400, torchrun's)")
    p.add_argument("--host", default="0.0.0.0", help="address to listen on (default: all)")
    p.set_defaults(func=run)


def run(args) -> int:
    from stalwart.launchers.store import serve

    serve(args.port, args.host, ready=lambda port: print(f"stalwart store: listening on port {port}", file=sys.stderr,
                                                         flush=True))
    return 0
