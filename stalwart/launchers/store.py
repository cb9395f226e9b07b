"""A rendezvous store that outlives any node: ``stalwart store --port 29400``.

torch's c10d rendezvous hosts its TCPStore in the agent whose host matches
``--rdzv-endpoint``; when that node dies, every other node loses the rendezvous and
the job ends. Running the store on a machine outside the job (a login or head node)
removes that single point of failure: the agents find the port taken, connect as
clients, and any node may be lost. The store keeps nothing on disk: if *it* dies,
the job's agents fail as they would with c10d.
"""

from __future__ import annotations

import datetime
import signal
import threading


def serve(port: int, host: str = "0.0.0.0", ready=None) -> None:
    """Host a TCPStore on ``port`` until SIGTERM/SIGINT (``ready`` is called once listening)."""
    import torch.distributed as dist

    store = dist.TCPStore(host, port, is_master=True, wait_for_workers=False, timeout=datetime.timedelta(seconds=60))
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    if ready is not None:
        ready(store.port)
    stop.wait()
