"""Builds and loads the host optimizer kernel (``_host_kernel.c``).

The C source ships in the package and is compiled on first use with the system C
compiler (``$CC``, else ``cc``/``gcc``) into a cache directory keyed by a hash of the
source, the flags, the compiler's version and (with ``-march=native``) the CPU's
feature flags, so a changed source, compiler or machine never loads a stale build.
The build takes a couple of seconds; concurrent processes (ranks) wait on a file lock
and load the one build. Set ``STALWART_OFFLOAD_CACHE`` to choose the cache directory
(default ``~/.cache/stalwart/offload``).

``-ffp-contract=off`` keeps every multiply and add a separately rounded operation, so
the device path, a sequence of single torch ops, computes the same bits.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from functools import cache

import numpy as np

from stalwart.errors import StalwartError

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_host_kernel.c")
ABI = 5
BASE_FLAGS = ("-O3", "-ffp-contract=off", "-fno-math-errno", "-fPIC", "-shared", "-pthread", "-std=gnu11")
NATIVE_FLAGS = ("-march=native", "-mprefer-vector-width=512")

# Element types and rule ids shared with the C source.
F32, BF16, F16 = 0, 1, 2
RULE_ADAM = 0

SEG_DTYPE = np.dtype([("p", "u8"), ("g", "u8"), ("s0", "u8"), ("s1", "u8"), ("out", "u8"), ("n", "i8"),
                      ("gdt", "i4"), ("odt", "i4"), ("scal", "i4"), ("pad", "i4")])


class NativeBuildError(StalwartError):
    """The host optimizer kernel could not be compiled or loaded."""


def cache_dir() -> str:
    return os.environ.get("STALWART_OFFLOAD_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "stalwart", "offload")


def _compiler() -> str:
    for cand in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if cand and shutil.which(cand.split()[0]):
            return cand
    raise NativeBuildError("no C compiler found to build stalwart's native kernels (stalwart/offload/_host_kernel.c,"
                           " stalwart/sync/_sync_kernel.c): install gcc or set CC")


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _compile(cc: str, flags: tuple[str, ...], out: str, source: str = SOURCE) -> subprocess.CompletedProcess:
    return subprocess.run([*cc.split(), *flags, "-o", out, source], capture_output=True, text=True)


def build_library(source: str, name: str, base_flags: tuple[str, ...], native_flags: tuple[str, ...], root: str) -> str:
    """Compile ``source`` into ``root`` as ``<name>-<key>.so`` (``native_flags`` first, then
    without them), once per source, flags, compiler version and CPU; returns its path.
    Also used by the weight-sync kernel (:mod:`stalwart.sync.native`)."""
    cc = _compiler()
    with open(source, "rb") as f:
        src = f.read()
    try:
        version = subprocess.run([*cc.split(), "--version"], capture_output=True, text=True).stdout
    except OSError as e:
        raise NativeBuildError(f"cannot run the C compiler {cc!r}: {e}") from None
    os.makedirs(root, exist_ok=True)
    last_error = ""
    for arch in (native_flags, ()):
        flags = (*base_flags, *arch)
        key = hashlib.sha256(b"\0".join([src, " ".join(flags).encode(), version.encode(), platform.machine().encode(),
                                          (_cpu_flags() if arch else "").encode()])).hexdigest()[:20]
        path = os.path.join(root, f"{name}-{key}.so")
        if os.path.exists(path):
            return path
        with open(os.path.join(root, f".{name}-{key}.lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # another rank may be building the same key
            if os.path.exists(path):
                return path
            fd, tmp = tempfile.mkstemp(prefix=".build-", suffix=".so", dir=root)
            os.close(fd)
            try:
                res = _compile(cc, flags, tmp, source)
                if res.returncode == 0:
                    os.replace(tmp, path)
                    return path
                last_error = res.stderr.strip()
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)
    raise NativeBuildError(f"compiling {source} with {cc} failed: {last_error[-2000:]}")


@cache
def library_path() -> str:
    """Path of the built kernel library, compiling it if this machine has no build yet."""
    return build_library(SOURCE, "host_kernel", BASE_FLAGS, NATIVE_FLAGS, cache_dir())


@cache
def library() -> ctypes.CDLL:
    """The loaded kernel library (built on first use), with its function signatures set."""
    path = library_path()
    try:
        lib = ctypes.CDLL(path)
    except OSError as e:
        raise NativeBuildError(f"cannot load the host optimizer kernel {path}: {e}") from None
    lib.sw_abi.restype = ctypes.c_int
    if lib.sw_abi() != ABI or lib.sw_sizeof_seg() != SEG_DTYPE.itemsize:
        raise NativeBuildError(f"{path} does not match this stalwart version (ABI {lib.sw_abi()}, expected {ABI})")
    lib.sw_pool_create.restype = ctypes.c_void_p
    lib.sw_pool_create.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_int), ctypes.c_int]
    lib.sw_pool_destroy.restype = None
    lib.sw_pool_destroy.argtypes = [ctypes.c_void_p]
    lib.sw_pool_threads.restype = ctypes.c_int
    lib.sw_pool_threads.argtypes = [ctypes.c_void_p]
    lib.sw_step.restype = ctypes.c_int
    lib.sw_step.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]
    return lib


class HostKernel:
    """A bounded pool of ``threads`` native threads (the calling thread is one of them)
    that runs element-wise optimizer updates; reused for every call, joined by
    :meth:`close` (or when the object is collected).

    ``cpus`` pins the pool's worker threads (e.g. to the CPUs of the NUMA node holding
    the optimizer state); the calling thread is left as it is.
    """

    def __init__(self, threads: int | None = None, cpus: list[int] | None = None) -> None:
        self.threads = max(1, int(threads or len(os.sched_getaffinity(0))))
        self._lib = library()
        arr = (ctypes.c_int * len(cpus))(*cpus) if cpus else None
        self._pool = self._lib.sw_pool_create(self.threads, arr, len(cpus) if cpus else 0)
        if not self._pool:
            raise NativeBuildError(f"cannot start {self.threads} host kernel threads")
        self._lock = threading.Lock()

    def step(self, rule: int, segs: np.ndarray, scalars: np.ndarray) -> None:
        """Run ``rule`` over the segments ``segs`` (a :data:`SEG_DTYPE` array) with the
        rule's scalar table ``scalars`` (one row per ``scal`` index). Releases the GIL."""
        if segs.dtype != SEG_DTYPE or not segs.flags.c_contiguous or not scalars.flags.c_contiguous:
            raise ValueError("segments must be a contiguous SEG_DTYPE array and scalars a contiguous table")
        if len(segs) and (segs["scal"].min() < 0 or segs["scal"].max() >= len(scalars)):
            raise ValueError("a segment names a scalar row the table does not have")
        with self._lock:
            if not self._pool:
                raise RuntimeError("the host kernel is closed")
            rc = self._lib.sw_step(self._pool, rule, segs.ctypes.data, len(segs), scalars.ctypes.data)
        if rc == -4:
            raise MemoryError("the host kernel could not allocate its segment index")
        if rc != 0:
            raise ValueError(f"the host kernel rejected its segments (code {rc}): null pointer or unknown dtype")

    def close(self) -> None:
        with self._lock:
            if self._pool:
                self._lib.sw_pool_destroy(self._pool)
                self._pool = None

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # interpreter shutdown
            self.close()
