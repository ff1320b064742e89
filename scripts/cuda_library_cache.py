"""How much of torch's CUDA libraries sits in the operating system's page cache, and moving them in or out of it.

An H100 host's first edit after `gpu_bench.sh prepare` paid ~6.7 s for the editor's warm-up, the next processes
2.2-2.4 s (2026-12-07). One guess is the libraries' first reads from disk (cuDNN's fp16 engines, cuBLASLt, the flash
attention kernels in libtorch_cuda): this tells it apart (``igs2gs.cuda_libraries``). `resident` lists each library's
size and cached share; `evict` drops their pages from the cache (no root needed), so that one machine can time a cold
first use again; `prefetch` reads them into it and prints the read's pace.

    python scripts/cuda_library_cache.py resident|evict|prefetch [--files PATH ...] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Dict, Iterable, List

from igs2gs.cuda_libraries import cuda_libraries, evict, resident_bytes


def prefetch(paths: Iterable[Path]) -> int:
    """Read the files whole into the page cache (timed: the disk's pace); returns the bytes read."""
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
