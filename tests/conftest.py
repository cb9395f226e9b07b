"""Session-wide test setup.

Every process the tests start (trainers, keepers) keeps its shared memory under a
private base directory for this test session, so tests can check that they leave
nothing behind without ever touching another session's keepers.
"""

from __future__ import annotations

import os
import shutil

SHM_BASE = os.environ.setdefault("STALWART_SHM_BASE", f"/dev/shm/stalwart-tests-{os.getpid()}")
os.makedirs(SHM_BASE, exist_ok=True)


def pytest_sessionfinish(session, exitstatus):
    if SHM_BASE.startswith("/dev/shm/stalwart-tests-") and os.path.isdir(SHM_BASE) and not os.listdir(SHM_BASE):
        shutil.rmtree(SHM_BASE, ignore_errors=True)
