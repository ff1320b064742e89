"""torch's CUDA libraries in the operating system's page cache: how much of them is there, and reading them ahead.

An edit's first CUDA calls of a kind (cuDNN's half-precision convolutions, cuBLASLt, flash attention) load their
kernels from libraries of hundreds of MB each. On an H100 host the first edit after a reconstruction paid ~4.4 s more
in the editor's warm-up than later processes (2026-12-07); if that is those files' first reads from disk, asking the
kernel to read them ahead while set-up imports and loads costs no waiting. ``scripts/cuda_library_cache.py`` measures.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import os
import sys
import threading
from pathlib import Path
from typing import Iterable, List, Optional, Sequence

LIBRARY_NAMES = ("cudnn", "cublas", "torch_cuda", "c10_cuda", "cudart", "nvrtc", "nvJitLink", "cufft", "cusparse", "curand", "cusolver")
"""Library file names that a CUDA edit loads (NCCL, NVSHMEM and cuSPARSELt are left out: one GPU, no sparse kernels)."""


def cuda_libraries() -> List[Path]:
    """torch's own CUDA libraries and those of the nvidia-* wheels beside it, largest first."""
    import torch

    folders = [Path(torch.__file__).parent / "lib"]
    folders += sorted(folder for entry in sys.path if entry and Path(entry, "nvidia").is_dir() for folder in Path(entry, "nvidia").glob("*/lib"))
    files = {path.resolve() for folder in folders for path in folder.glob("*.so*") if path.is_file() and any(name in path.name for name in LIBRARY_NAMES)}
    return sorted(files, key=lambda path: -path.stat().st_size)


@functools.lru_cache(maxsize=None)
def _libc() -> ctypes.CDLL:
    """The C library's mmap, mincore and munmap, typed once."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    return libc


def resident_bytes(path: Path) -> int:
    """Bytes of ``path`` in the page cache now (mincore over a read-only mapping, which reads nothing)."""
    size = path.stat().st_size
    if size == 0:
        return 0
    libc, page = _libc(), mmap.PAGESIZE
    with open(path, "rb") as file:
        address = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, file.fileno(), 0)
        if address in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), f"mmap of {path} failed")
        try:
            vector = ctypes.create_string_buffer((size + page - 1) // page)
            if libc.mincore(address, size, vector) != 0:
                raise OSError(ctypes.get_errno(), f"mincore of {path} failed")
            cached = sum(byte & 1 for byte in vector.raw)
        finally:
            libc.munmap(address, size)
    return min(size, cached * page)


def evict(paths: Iterable[Path]) -> None:
    """Drop the files' pages from the page cache (written back first: only clean pages go; pages a running process
    has mapped may stay). No root needed: it is how one machine times a cold first use again."""
    for path in paths:
        with open(path, "rb") as file:
            try:
                os.fdatasync(file.fileno())
            except OSError:  # e.g. a read-only file system: nothing there to write back
                pass
            os.posix_fadvise(file.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def read_ahead(paths: Iterable[Path]) -> None:
    """Ask the kernel to read the files into the page cache (posix_fadvise WILLNEED: no copy into this process)."""
    for path in paths:
        try:
            with open(path, "rb") as file:
                os.posix_fadvise(file.fileno(), 0, 0, os.POSIX_FADV_WILLNEED)
        except OSError:
            continue  # a library that cannot be read is loaded (or not) as without this


def start_read_ahead(paths: Optional[Sequence[Path]] = None) -> threading.Thread:
    """Read ahead ``paths`` (default: ``cuda_libraries()``) in a daemon thread: the advice may wait for the disk."""
    thread = threading.Thread(target=lambda: read_ahead(cuda_libraries() if paths is None else paths), name="igs2gs-cuda-read-ahead", daemon=True)
    thread.start()
    return thread
