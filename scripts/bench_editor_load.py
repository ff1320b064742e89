"""Where the seconds of loading the IP2P editor go, in a fresh process: the imports, CUDA's start, the pipeline's
first load, its weights' copy to the device, the first cuDNN/cuBLAS/SDPA calls, and a second load once all that is
paid. On an H100 host (2026-12-07) the first load took 6.9 s against 0.44 s for the second: Python importing
diffusers' pipeline and what transformers pulls in (see ``python -X importtime``), not GPU work.

With ``--packages BATCH HEIGHT WIDTH`` the second editor also loads its packages for that batch shape (compiled by
an earlier run into ``$IGS2GS_PACKAGE_DIR``; none is compiled here) and times each packaged network's first call
against its second, once cuDNN, cuBLAS and SDPA are started: what of the packaged warm-up (6.7 s in an H100 host's
first edit, 2026-12-07) is the packages' own first use - there, the next process: UNet 0.88 s against 0.10 s, the VAE
halves 0.08-0.09 s against 0.02-0.04 s (0.70 s for the UNet with ``CUDA_MODULE_LOADING=EAGER``, which loads every
kernel up front: the first cuDNN and cuBLAS calls then took 1.3 and 3.0 s). Then ten UNet calls and two whole edits of
the batch (20 diffusion steps) with the UNet called directly, against the same replayed from a CUDA graph
(``--pipeline.ip2p-cuda-graph``; its capture timed apart): the graph's seconds per edit.

    python scripts/bench_editor_load.py MODEL [--device cuda] [--packages 15 511 511] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Callable, Dict

STARTED = time.perf_counter()
import torch  # noqa: E402  (timed)

TORCH_IMPORT_S = time.perf_counter() - STARTED


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="IP2P folder or hub id (e.g. a make_random_ip2p.py --shape sd15 folder)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--packages", type=int, nargs=3, metavar=("BATCH", "HEIGHT", "WIDTH"),
                        help="load the editor's packages for this batch shape and time their first and second calls (CUDA)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.packages and device.type != "cuda":
        parser.error("--packages needs a CUDA --device: packages are compiled for CUDA")
    figures: Dict[str, float] = {"import torch": TORCH_IMPORT_S}
    is_cuda = device.type == "cuda"

    def timed(name: str, work: Callable[[], object]) -> object:
        started = time.perf_counter()
        result = work()
        if is_cuda:
            torch.cuda.synchronize(device)
        figures[name] = time.perf_counter() - started
        print(f"{name}: {figures[name]:.3f} s", flush=True)
        return result

    timed("import diffusers, transformers", lambda: (__import__("diffusers"), __import__("transformers")))
    if is_cuda:
        timed("CUDA start and context", lambda: torch.zeros(1, device=device))
    from igs2gs.ip2p import InstructPix2Pix, _load_pipeline

    dtype = torch.float16 if is_cuda else torch.float32
    pipe = timed("first pipeline load (its class imported)", lambda: _load_pipeline(args.model, dtype))
    for name in ("unet", "vae", "text_encoder"):
        timed(f"{name} to {device.type}", lambda: getattr(pipe, name).to(device))
    del pipe
    if is_cuda:
        x = torch.randn(4, 320, 64, 64, device=device, dtype=dtype)
        weight = torch.randn(320, 320, 3, 3, device=device, dtype=dtype)
        timed("first convolution (cuDNN)", lambda: torch.nn.functional.conv2d(x, weight, padding=1))
        a = torch.randn(4096, 320, device=device, dtype=dtype)
        timed("first matmul (cuBLAS)", lambda: a @ a.T)
        q = torch.randn(4, 8, 4096, 40, device=device, dtype=dtype)
        timed("first attention (SDPA)", lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q))
    packages = "cached" if args.packages else "off"
    editor = timed("second from_pretrained", lambda: InstructPix2Pix.from_pretrained(args.model, device, dtype, packages=packages))
    if args.packages:
        time_package_first_calls(editor, *args.packages, timed)
    if args.json:
        args.json.write_text(json.dumps({"device": str(device), "seconds": figures}, indent=2))


def time_package_first_calls(editor, batch: int, height: int, width: int, timed: Callable[[str, Callable[[], object]], object]) -> None:
    """Load ``editor``'s packages for this batch shape, then call each twice on zeros of its input shape; then the UNet's
    ten times directly and two default edits of a batch of random views, and the same replayed from a CUDA graph (its
    capture timed apart)."""
    from igs2gs.ip2p import cudnn_heuristics

    size, prompt = editor._unet_size(height, width), "turn it into marble"
    embeddings = editor.encode_prompt(prompt)
    timed(f"packages loaded for batch {batch} {size[1]}x{size[0]}", lambda: editor.prepare_compiled(batch, height, width, prompt))
    if "unet" not in editor._packages:
        raise SystemExit(f"no packages for batch {batch} at {size[1]}x{size[0]} in $IGS2GS_PACKAGE_DIR: compile them first "
                         "(gpu_bench.sh prepare, or an edit with --pipeline.ip2p-compile True)")
    part_inputs = editor.package_inputs(batch, *size, embeddings)
    with torch.no_grad(), cudnn_heuristics():  # as the editor calls them
        for part, inputs in part_inputs.items():
            package = editor._packages.get(part)
            if package is None:
                print(f"{part}: no package, left out")
                continue
            for call in ("first", "second"):
                timed(f"{part} package, {call} call", lambda: package(*inputs))
    unet, inputs = editor._packages["unet"], part_inputs["unet"]
    renders, originals = (torch.rand(batch, 3, height, width, generator=torch.Generator().manual_seed(seed)).to(editor.device) for seed in (0, 1))
    edit = lambda: editor.edit(renders, originals, prompt, generator=[torch.Generator().manual_seed(i) for i in range(batch)])  # noqa: E731
    with torch.no_grad(), cudnn_heuristics():
        timed("unet package, 10 direct calls", lambda: [unet(*inputs) for _ in range(10)])
    for run in ("first", "second"):  # the default edit: 20 diffusion steps, the photos' conditioning cached after the first
        timed(f"an edit of {batch} views, UNet called directly, {run}", edit)
    unet.cuda_graph = True  # the same package from now on replayed from a CUDA graph (--pipeline.ip2p-cuda-graph)
    with torch.no_grad(), cudnn_heuristics():
        timed("unet package, CUDA graph captured and its first call replayed", lambda: unet(*inputs))
        timed("unet package, 10 calls replayed from the CUDA graph", lambda: [unet(*inputs) for _ in range(10)])
    for run in ("first", "second"):
        timed(f"an edit of {batch} views, UNet replayed from the CUDA graph, {run}", edit)
    print(f"unet package: {'replayed from a CUDA graph' if unet.replaying else f'not replayed ({unet.graph_failed})'}")


if __name__ == "__main__":
    main()
