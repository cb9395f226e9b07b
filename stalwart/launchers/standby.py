"""A keeper process started ahead of need: the launcher's next stand-in (see :mod:`.node`).

``python -m stalwart.launchers.standby`` imports the keeper (torch, the erasure codec) in a
thread of the lowest CPU priority, then waits for the keeper's arguments, a JSON list on one
line of its stdin (end of input: it leaves). A standby is started right after the previous
one became a stand-in, i.e. while the survivors of a failure take their first steps: its
imports (1-2 CPU-seconds) use cycles training leaves idle and do not compete with them. The
keeper itself then runs at the normal priority (``nice`` is per thread on Linux, and a
thread cannot raise its priority again without privileges, so only the import thread is
lowered).
"""

from __future__ import annotations

import json
import os
import sys
import threading

#: the import thread's niceness (``STALWART_STANDBY_NICE``; 0: the normal priority)
DEFAULT_NICE = 19


def _import_lowered(nice: int, failed: list) -> None:
    if nice > 0 and hasattr(os, "setpriority"):
        try:
            tid = threading.get_native_id()
            os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))
        except OSError:
            pass
    try:
        import stalwart.ckpt.erasure  # the codec a stand-in rebuilds with
        import stalwart.ckpt.keeper  # noqa: F401
    except BaseException as e:  # re-raised by the main thread
        failed.append(e)


def main() -> int:
    failed: list = []
    loader = threading.Thread(target=_import_lowered, args=(int(os.environ.get("STALWART_STANDBY_NICE", DEFAULT_NICE)),
                                                            failed), name="standby-imports")
    loader.start()
    loader.join()
    if failed:
        raise failed[0]
    line = sys.stdin.readline()
    if not line.strip():
        return 0
    from stalwart.ckpt.keeper import main as keeper_main

    return keeper_main(json.loads(line))


if __name__ == "__main__":
    sys.exit(main())
