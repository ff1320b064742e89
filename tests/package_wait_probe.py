"""Run by ``test_aot_package`` in a process of its own (a crash in torch's package loader then fails one test, not
the whole GPU run): how fast a thread counts while the main thread sleeps, and while it makes sixteen calls of a
package compiled and bound as the editor's parts are. Prints JSON.

    python tests/package_wait_probe.py FOLDER cuda|cpu
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import torch

import igs2gs.aot_package as aot_package


class Heavy(torch.nn.Module):
    """Sixteen 3x3 convolutions: 4.9 TFLOP a call at the CUDA size (~10 ms on an H100)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.convs = torch.nn.ModuleList(torch.nn.Conv2d(channels, channels, 3, padding=1) for _ in range(16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in self.convs:
            x = torch.nn.functional.silu(conv(x))
        return x


def counting(seconds_or_work: Callable[[], object]) -> float:
    """Iterations per second of a counting thread while ``seconds_or_work`` sleeps or runs."""
    stop, count = threading.Event(), [0]

    def count_up() -> None:
        while not stop.is_set():
            count[0] += 1

    thread = threading.Thread(target=count_up)
    started = time.perf_counter()
    thread.start()
    seconds_or_work()
    elapsed = time.perf_counter() - started
    stop.set()
    thread.join()
    return count[0] / elapsed


def main(folder: Path, device: str) -> None:
    on_cuda = device == "cuda"
    channels, batch, side, dtype = (256, 16, 128, torch.float16) if on_cuda else (8, 1, 16, torch.float32)
    model = Heavy(channels).to(device, dtype).requires_grad_(False)
    x = torch.randn(batch, channels, side, side, device=device, dtype=dtype)
    with torch.no_grad():
        # Eagerly first, as the editor encodes its prompt before it loads packages: on the H100 machine (torch 2.11)
        # loading packages of models that had not run eagerly in the process segfaulted it (three models tried).
        expected = model(x)
    path = folder / "heavy.pt2"
    aot_package._compile(model, (x,), path)  # weights bound at load, as the editor's parts
    heavy = aot_package._bind(path, model, (x,))
    error = float((heavy(x) - expected).abs().max())
    synchronize = torch.cuda.synchronize if on_cuda else (lambda: None)
    synchronize()
    alone = counting(lambda: time.sleep(0.2))
    beside = counting(lambda: [heavy(x) for _ in range(16)] and synchronize())
    print(json.dumps({"alone": alone, "beside": beside, "max_error": error}))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
