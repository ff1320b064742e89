"""How much of torch's CUDA libraries sits in the operating system's page cache, and moving them in or out of it.

An H100 host's first edit after `gpu_bench.sh prepare` paid ~6.7 s for the editor's warm-up, the next processes
2.2-2.4 s (2026-12-07). One guess is the libraries' first reads from disk (cuDNN's fp16 engines, cuBLASLt, the flash
attention kernels in libtorch_cuda): this tells it apart. `resident` lists each library's size and cached share;
`evict` drops their pages from the cache (posix_fadvise DONTNEED: no root needed), so that one machine can time a
cold first use again; `prefetch` reads them into it and prints the read's pace.

    python scripts/cuda_library_cache.py resident|evict|prefetch [--files PATH ...] [--json out.json]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import os
import sys
import time
from pathlib import Path
from typing import Dict, Iterable, List

LIBRARY_NAMES = ("cudnn", "cublas", "torch_cuda", "c10_cuda", "cudart", "nvrtc", "nvJitLink", "cufft", "cusparse", "curand", "cusolver")
"""Library file names that a CUDA edit loads (NCCL, NVSHMEM and cuSPARSELt are left out: one GPU, no sparse kernels)."""


def cuda_libraries() -> List[Path]:
    """torch's own CUDA libraries and those of the nvidia-* wheels beside it, largest first."""
    import torch

    folders = [Path(torch.__file__).parent / "lib"]
    folders += sorted(folder for entry in sys.path if entry and Path(entry, "nvidia").is_dir() for folder in Path(entry, "nvidia").glob("*/lib"))
    files = {path.resolve() for folder in folders for path in folder.glob("*.so*") if path.is_file() and any(name in path.name for name in LIBRARY_NAMES)}
    return sorted(files, key=lambda path: -path.stat().st_size)


def resident_bytes(path: Path) -> int:
    """Bytes of ``path`` in the page cache now (mincore over a read-only mapping, which reads nothing)."""
    size = path.stat().st_size
    if size == 0:
        return 0
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    page = mmap.PAGESIZE
    pages = (size + page - 1) // page
    with open(path, "rb") as file:
        address = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, file.fileno(), 0)
        if address in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), f"mmap of {path} failed")
        try:
            vector = ctypes.create_string_buffer(pages)
            if libc.mincore(address, size, vector) != 0:
                raise OSError(ctypes.get_errno(), f"mincore of {path} failed")
            cached = sum(byte & 1 for byte in vector.raw)
        finally:
            libc.munmap(address, size)
    return min(size, cached * page)


def evict(paths: Iterable[Path]) -> None:
    """Drop the files' pages from the page cache (written back first: only clean pages go; pages a process has
    mapped may stay)."""
    for path in paths:
        with open(path, "rb") as file:
            os.fdatasync(file.fileno())
            os.posix_fadvise(file.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def prefetch(paths: Iterable[Path]) -> int:
    """Read the files whole into the page cache; returns the bytes read."""
    total = 0
    for path in paths:
        with open(path, "rb", buffering=0) as file:
            while chunk := file.read(16 << 20):
                total += len(chunk)
    return total


def report(paths: List[Path]) -> Dict[str, Dict[str, float]]:
    rows = {}
    for path in paths:
        size = path.stat().st_size
        rows[str(path)] = {"mb": size / 1e6, "resident_share": resident_bytes(path) / size if size else 1.0}
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=("resident", "evict", "prefetch"))
    parser.add_argument("--files", type=Path, nargs="+", help="these files instead of torch's CUDA libraries")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    paths = [path.resolve() for path in args.files] if args.files else cuda_libraries()
    missing = [str(path) for path in paths if not path.is_file()]
    if missing or not paths:
        parser.error(f"no such files: {', '.join(missing)}" if missing else "found no CUDA libraries beside torch")
    figures: Dict[str, object] = {"action": args.action}
    if args.action == "evict":
        evict(paths)
    elif args.action == "prefetch":
        started = time.perf_counter()
        read = prefetch(paths)
        seconds = time.perf_counter() - started
        figures.update(read_mb=read / 1e6, read_s=seconds)
        print(f"read {read / 1e6:.0f} MB in {seconds:.2f} s ({read / 1e6 / max(seconds, 1e-9):.0f} MB/s)")
    rows = report(paths)
    total = sum(row["mb"] for row in rows.values())
    cached = sum(row["mb"] * row["resident_share"] for row in rows.values())
    for name, row in rows.items():
        print(f"{row['mb']:9.1f} MB {100 * row['resident_share']:5.1f}% cached  {Path(name).name}")
    print(f"{total:9.1f} MB {100 * cached / max(total, 1e-9):5.1f}% cached  in all ({len(rows)} files)")
    figures.update(files=rows, total_mb=total, cached_mb=cached)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
