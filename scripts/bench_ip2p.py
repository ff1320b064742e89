"""Benchmark the IP2P editor on one GPU: reference-style configuration vs ours at several batch sizes.

Reference-style = what the public Instruct-GS2GS does: batch 1, model CPU offload, attention
slicing, the original image re-encoded for every edit. Ours = resident model, SDPA, cached
prompt and conditioning latents, batched. All figures come from this one run; the model is the
real SD-1.5/IP2P architecture with random weights (``make_random_ip2p.py --shape sd15``), so
speed and memory are real and the pictures are noise.

    python scripts/bench_ip2p.py [--model DIR] [--views 16] [--batch-sizes 1,4,8,16] [--compile-batch 16] [--json out.json]

Also printed: the VAE's share of an edit (encode + decode, timed alone) and, at the
``--compile-batch`` size, the ``--variants``, each from a fresh editor with its first call (compile,
autotuning, lazy CUDA set-up) timed apart, each of ours timed over a sweep of all views with every photo's
conditioning already encoded, as in every igs2gs sweep (``steady_sweep``): ``eager`` (the default editor), ``autotuned`` (cuDNN's
benchmark mode kept for the editor), ``bfloat16``, and the UNet and VAE run from their ahead-of-time
compiled packages (``compiled``: the first such row compiles them unless ``~/.cache/igs2gs/packages`` has
them, a second one loads them; ``compiled_vae8`` encodes and decodes 8 at a time). The process turns cuDNN's benchmark mode on,
as ``ns-train`` does; the editor edits with cuDNN's heuristics unless ``autotuned``.

Peak memory is each editor's own: what an earlier editor left allocated is measured and left out
(torch 2.11's package loader keeps the weights a ``compiled`` editor bound until the process ends:
1.94 GB on the H100 after the editor and its packages were gone), and printed when there is any.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from igs2gs.ip2p import InstructPix2Pix  # noqa: E402

PROMPT = "turn the horse into a giraffe"
# Dense bf16 tensor-core peaks (TFLOP/s), by device name.
BF16_PEAK_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0}


VARIANTS = {  # row name -> from_pretrained arguments, given the --dtype
    "eager": lambda dtype: dict(dtype=dtype),
    "autotuned": lambda dtype: dict(dtype=dtype, cudnn_benchmark=True),
    "bfloat16": lambda dtype: dict(dtype=torch.bfloat16),
    "compiled": lambda dtype: dict(dtype=dtype, packages="compile"),
    "compiled_vae8": lambda dtype: dict(dtype=dtype, packages="compile", vae_batch_size=8),
}


def bf16_peak(name: str) -> float:
    for key in sorted(BF16_PEAK_TFLOPS, key=len, reverse=True):
        if key in name:
            return BF16_PEAK_TFLOPS[key]
    return float("nan")


def timed_edits(editor: InstructPix2Pix, renders: torch.Tensor, originals: torch.Tensor, steps: int, batch: int) -> float:
    """Seconds to edit all views in chunks of ``batch`` (as a sweep does), synchronised."""
    synchronize = torch.cuda.synchronize if renders.is_cuda else (lambda: None)
    synchronize()
    start = time.perf_counter()
    for first in range(0, renders.shape[0], batch):
        part = slice(first, first + batch)
        editor.edit(
            renders[part], originals[part], PROMPT, diffusion_steps=steps,
            generator=[torch.Generator().manual_seed(i) for i in range(part.start, min(part.stop, renders.shape[0]))],
            cond_keys=list(range(part.start, min(part.stop, renders.shape[0]))),
        )
    synchronize()
    return time.perf_counter() - start


def steady_sweep(editor: InstructPix2Pix, renders: torch.Tensor, originals: torch.Tensor, steps: int, batch: int) -> Dict[str, float]:
    """Seconds per edit of a sweep as igs2gs runs one after set-up: every photo's conditioning encoded first
    (``encode_conditions``, as the editor's warm-up does beside set-up; the photos never change) and the batch shape
    warmed up, so the timed sweep encodes no conditioning (``encoded_while_timed``, 0). On CUDA the peak-memory
    counter restarts with the timed sweep."""
    editor.encode_conditions(originals, list(range(originals.shape[0])))  # the keys timed_edits gives
    timed_edits(editor, renders[:batch], originals[:batch], steps, batch)  # the batch shape's first-use costs
    encoded = editor.condition_encodings
    if renders.is_cuda:
        torch.cuda.reset_peak_memory_stats()
    seconds = timed_edits(editor, renders, originals, steps, batch) / renders.shape[0]
    return {"seconds": seconds, "encoded_while_timed": editor.condition_encodings - encoded}


def figures(sweep: Dict[str, float], reference_s: float, flops: float, peak_tflops: float, held_over: int = 0) -> Dict[str, float]:
    """One row of the table from a ``steady_sweep``: time per edit, speed-up, achieved TFLOP/s and share of peak, and
    peak memory since the last reset less ``held_over`` bytes (allocated before the row's editor loaded, beyond the
    views)."""
    seconds = sweep["seconds"]
    achieved = flops / seconds / 1e12
    return {
        "s_per_edit": seconds,
        "conditions_encoded_while_timed": sweep["encoded_while_timed"],
        "speedup_vs_reference": reference_s / seconds,
        "tflops": achieved,
        "fraction_of_bf16_peak": achieved / peak_tflops,
        "peak_gb": (torch.cuda.max_memory_allocated() - held_over) / 1e9,
        "held_over_gb": held_over / 1e9,
    }


def vae_seconds(editor: InstructPix2Pix, renders: torch.Tensor) -> float:
    """Seconds per edit spent in the VAE: encoding the render and decoding the result."""
    with torch.no_grad():
        latents = torch.cat([p.mean for p in editor._encode(renders)]) * editor.latent_scaling
        editor._decode(latents)  # warm-up
        torch.cuda.synchronize()
        start = time.perf_counter()
        latents = torch.cat([p.mean for p in editor._encode(renders)]) * editor.latent_scaling
        editor._decode(latents)
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / renders.shape[0]


def flops_per_edit(editor: InstructPix2Pix, size: int, steps: int, batch: int) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    renders = torch.rand(batch, 3, size, size, device="cuda")
    counter = FlopCounterMode(display=False)
    with counter:
        editor.edit(renders, renders, PROMPT + " (flops)", diffusion_steps=steps, cond_keys=[("flops", i) for i in range(batch)])
    return counter.get_total_flops() / batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="IP2P folder (default: build a random sd15 one)")
    parser.add_argument("--views", type=int, default=16)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-sizes", default="1,4,8,16")
    parser.add_argument("--dtype", choices=["float16", "bfloat16"], default="float16")
    parser.add_argument("--reference-views", type=int, default=4, help="views timed for the (slow) reference-style run")
    parser.add_argument("--compile-batch", type=int, default=16, help="batch of the variant rows (0: skip them)")
    parser.add_argument("--variants", default="eager,autotuned,compiled", help="variant rows to time")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    unknown = set(args.variants.split(",")) - set(VARIANTS)
    if args.compile_batch and unknown:
        parser.error(f"unknown --variants {sorted(unknown)}; known: {', '.join(VARIANTS)}")
    if args.reference_views < 1:
        parser.error("--reference-views must be at least 1: every speed-up is measured against it")
    if not torch.cuda.is_available():
        sys.exit("bench_ip2p.py needs a CUDA GPU")
    torch.backends.cudnn.benchmark = True  # as in ns-train, whose train.py sets it for every method
    dtype = getattr(torch, args.dtype)
    folder = args.model
    if folder is None:
        from make_random_ip2p import make_random_ip2p

        folder = make_random_ip2p(Path(tempfile.mkdtemp()) / "sd15", shape="sd15", dtype=torch.float16)
    generator = torch.Generator(device="cuda").manual_seed(0)
    renders = torch.rand(args.views, 3, args.size, args.size, device="cuda", generator=generator)
    originals = torch.rand(args.views, 3, args.size, args.size, device="cuda", generator=generator)
    inputs = torch.cuda.memory_allocated()  # the views above: in every row's peak, as in a sweep's

    def held_over() -> int:
        """Bytes still allocated from earlier editors (none should be, but see the module's docstring)."""
        torch.cuda.empty_cache()
        return max(0, torch.cuda.memory_allocated() - inputs)

    device_name = torch.cuda.get_device_name(0)
    results: Dict[str, object] = {"device": device_name, "size": args.size, "diffusion_steps": args.steps, "dtype": args.dtype}

    # Reference-style: offload + slicing, batch 1, conditioning re-encoded every edit.
    reference = InstructPix2Pix.from_pretrained(
        str(folder), device="cuda", dtype=torch.float16, cpu_offload=True, attention_slicing=True,
        max_batch_size=1, cache_conditioning=False,
    )
    timed_edits(reference, renders[:1], originals[:1], args.steps, 1)  # warm-up
    torch.cuda.reset_peak_memory_stats()
    count = min(args.reference_views, args.views)
    reference_s = timed_edits(reference, renders[:count], originals[:count], args.steps, 1) / count
    results["reference"] = {"s_per_edit": reference_s, "peak_gb": torch.cuda.max_memory_allocated() / 1e9}
    del reference

    held = held_over()
    torch.cuda.reset_peak_memory_stats()
    ours = InstructPix2Pix.from_pretrained(str(folder), device="cuda", dtype=dtype)
    weights_gb = (torch.cuda.max_memory_allocated() - held - inputs) / 1e9
    flops = flops_per_edit(ours, args.size, args.steps, 1)
    peak_tflops = bf16_peak(device_name)
    rows: List[Dict[str, float]] = []
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        ours.max_batch_size, ours.batch_size = batch, None
        rows.append({"batch": batch, **figures(steady_sweep(ours, renders, originals, args.steps, batch), reference_s, flops, peak_tflops, held)})
    results.update({"ours": rows, "weights_gb": weights_gb, "tflop_per_edit": flops / 1e12, "bf16_peak_tflops": peak_tflops})
    results["vae_s_per_edit"] = vae_seconds(ours, renders[: max(1, args.compile_batch)])

    variants: List[Dict[str, float]] = []
    if args.compile_batch:
        batch = args.compile_batch
        del ours
        for name in args.variants.split(","):
            held = held_over()
            editor = InstructPix2Pix.from_pretrained(str(folder), device="cuda", max_batch_size=batch, **VARIANTS[name](dtype))
            first = timed_edits(editor, renders[:batch], originals[:batch], args.steps, batch)  # compiles, autotunes, if asked
            sweep = steady_sweep(editor, renders, originals, args.steps, batch)
            variants.append({"variant": name, "batch": batch, "first_call_s": first, **figures(sweep, reference_s, flops, peak_tflops, held)})
            del editor
    results["variants"] = variants

    print(f"{device_name}: {args.size}x{args.size}, {args.steps} DDIM steps, model weights {weights_gb:.2f} GB, {flops / 1e12:.1f} TFLOP per edit")
    print(f"reference-style (batch 1, offload, slicing, re-encoded conditioning): {reference_s:.3f} s/edit, peak {results['reference']['peak_gb']:.2f} GB")
    print(f"{'batch':>5} {'s/edit':>8} {'speed-up':>9} {'TFLOP/s':>8} {'of peak':>8} {'peak GB':>8}")
    for row in rows:
        print(
            f"{row['batch']:>5} {row['s_per_edit']:>8.3f} {row['speedup_vs_reference']:>8.1f}x {row['tflops']:>8.1f} "
            f"{row['fraction_of_bf16_peak']:>7.1%} {row['peak_gb']:>8.2f}"
        )
    print(f"VAE (encode render + decode edit) alone: {results['vae_s_per_edit']:.4f} s/edit")
    for row in variants:
        print(
            f"{row['variant']:>9} batch {row['batch']}: {row['s_per_edit']:.3f} s/edit ({row['speedup_vs_reference']:.1f}x), "
            f"{row['tflops']:.1f} TFLOP/s = {row['fraction_of_bf16_peak']:.1%} of peak, peak {row['peak_gb']:.2f} GB, "
            f"first call {row['first_call_s']:.1f} s"
            + (f" ({row['held_over_gb']:.2f} GB allocated before this editor loaded, beyond the views: not counted)" if row["held_over_gb"] > 0.01 else "")
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
