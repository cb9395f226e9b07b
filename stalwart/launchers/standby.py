"""A keeper process started ahead of need: the launcher's next stand-in (see :mod:`.node`).

``python -m stalwart.launchers.standby`` imports the keeper (torch, the erasure codec) in a
thread of the lowest CPU priority, then waits for the keeper's arguments, a JSON list on one
line of its stdin (end of input: it leaves). A standby is started right after the previous
one became a stand-in, i.e. while the survivors of a failure take their first steps: its
imports (1-2 CPU-seconds) use cycles training leaves idle and do not compete with them. The
keeper itself then runs at the normal priority (``nice`` is per thread on Linux, and a
thread cannot raise its priority again without privileges, so only the import thread is
lowered).

With Linux's ``sched_autogroup`` (the default on many hosts outside CPU cgroups), CPU time
is shared between *sessions* first and a thread's ``nice`` only ranks it within its own
session; the standby runs in a session of its own (the launcher starts it with
``start_new_session``), so its session's niceness (``/proc/self/autogroup``, which an
unprivileged process may set anywhere in 0..19) is lowered during the imports and set back
after. A standby that becomes a stand-in keeper (``--standin``) keeps its session at the
erasure-coding niceness (``--ec-nice``, default 10): its work is rebuilding and holding the
lost node's snapshot in the background; when a restore waits on it, training is idle anyway.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time

#: the import thread's niceness (``STALWART_STANDBY_NICE``; 0: the normal priority)
DEFAULT_NICE = 19


def _autogroup_nice(nice: int) -> None:
    """Set this process's autogroup niceness when the process leads its own session (its
    autogroup holds only it); no-op elsewhere (no autogroup, a shared session)."""
    try:
        if os.getsid(0) != os.getpid() or not os.path.exists("/proc/self/autogroup"):
            return
    except OSError:
        return
    for _ in range(5):  # unprivileged writes are rate-limited system-wide (EAGAIN within 0.1 s)
        try:
            with open("/proc/self/autogroup", "w") as f:
                f.write(str(max(0, min(19, nice))))
            return
        except BlockingIOError:
            time.sleep(0.1)
        except OSError:
            return


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
    nice = int(os.environ.get("STALWART_STANDBY_NICE", DEFAULT_NICE))
    _autogroup_nice(nice)
    loader = threading.Thread(target=_import_lowered, args=(nice, failed), name="standby-imports")
    loader.start()
    loader.join()
    _autogroup_nice(0)
    if failed:
        raise failed[0]
    line = sys.stdin.readline()
    if not line.strip():
        return 0
    argv = json.loads(line)
    if "--standin" in argv:
        ec_nice = argv[argv.index("--ec-nice") + 1] if "--ec-nice" in argv[:-1] else "10"
        _autogroup_nice(int(ec_nice))
    from stalwart.ckpt.keeper import main as keeper_main

    return keeper_main(argv)


if __name__ == "__main__":
    sys.exit(main())
