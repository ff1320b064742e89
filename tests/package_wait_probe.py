"""Run by ``test_aot_package`` in a process of its own (a crash in torch's package loader then fails one test, not
the whole GPU run): how fast a thread counts while the main thread sleeps, and while it makes sixteen calls of a
package made as the editor makes its parts' (a tiny random IP2P loaded by ``InstructPix2Pix``, its prompt encoded
eagerly, then ``packaged``: compiled, loaded and bound); on CUDA then while it makes sixteen calls of the same package
replayed from a CUDA graph. Prints JSON.

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

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

from make_random_ip2p import make_random_ip2p  # noqa: E402

from igs2gs.aot_package import VAEDecoderCall, packaged  # noqa: E402
from igs2gs.ip2p import InstructPix2Pix  # noqa: E402


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
    # The tiny VAE's decoder to 1024x1024 (latents of 128x128), 16 at a time: milliseconds of GPU work a call on CUDA
    # (gigabytes of activations read and written; estimated from its size, not timed).
    batch, side, dtype = (16, 128, torch.float16) if on_cuda else (1, 8, torch.float32)
    editor = InstructPix2Pix.from_pretrained(str(make_random_ip2p(folder / "tiny-ip2p", shape="tiny")), device=device, dtype=dtype)
    editor.encode_prompt("a probe")  # the text encoder runs eagerly before any package loads, as in an edit
    call = VAEDecoderCall(editor.vae)
    latents = torch.randn(batch, int(editor.vae.config.latent_channels), side, side, device=device, dtype=dtype)
    with torch.no_grad():
        expected = call(latents)
    package = packaged(call, (latents,), folder=folder / "packages")
    if package is None:
        sys.exit("the package could not be compiled or loaded (logged above)")
    # Relative to the largest output: the random decoder's images reach |5| and more, where fp16 steps by 0.004.
    error = float((package(latents) - expected).abs().max() / expected.abs().max())
    synchronize = torch.cuda.synchronize if on_cuda else (lambda: None)
    synchronize()
    alone = counting(lambda: time.sleep(0.2))
    beside = counting(lambda: [package(latents) for _ in range(16)] and synchronize())
    figures = {"alone": alone, "beside": beside, "max_relative_error": error}
    if on_cuda:  # the same package replayed from a CUDA graph from its next call on (--pipeline.ip2p-cuda-graph)
        package.cuda_graph = True
        figures["replayed_max_relative_error"] = float((package(latents) - expected).abs().max() / expected.abs().max())
        figures["beside_replays"] = counting(lambda: [package(latents) for _ in range(16)] and synchronize())
        figures["replaying"], figures["graph_failed"] = package.replaying, package.graph_failed
    print(json.dumps(figures))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
