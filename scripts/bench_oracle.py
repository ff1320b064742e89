"""Oracle-edit propagation benchmark: does a known edit of the training views reach held-out views?

Reconstructs a scene (or loads a splatfacto checkpoint), then runs igs2gs with the oracle editor
(a known colour remap of each ORIGINAL photo, optionally perturbed per view like IP2P's
inconsistency) and scores renders of the held-out views against the same remap of their photos:
before editing and at the end of each sweep's training period. The unedited reconstruction's
score against the held-out photos is the ceiling. Writes ``oracle.json``, ``oracle.png`` (metric
vs step) and ``held_out_sheet.png`` (photo | oracle target | render before | render after).

    python scripts/bench_oracle.py --data DATA --load-dir RUN/nerfstudio_models [--perturb] --out DIR
    python scripts/bench_oracle.py --data DATA --reconstruct-steps 15000 --out DIR
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from edit_run import edit_trainer  # noqa: E402

# Perturbations of --perturb: a few pixels of shift, sensor-like noise, +-5% colour gain per view.
PERTURBED = {"max_shift_px": 2, "noise_std": 0.03, "colour_jitter": 0.05}


def _plot(history: List[Dict[str, float]], ceiling: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    steps = [row["step"] for row in history]
    for axis, metric in zip(axes, ("psnr", "ssim", "lpips")):
        axis.plot(steps, [row[metric] for row in history], marker="o", label="vs oracle edit")
        if metric == "psnr":
            axis.axhline(ceiling, color="grey", linestyle="--", label="ceiling (unedited vs photos)")
            axis.legend(fontsize=7)
        axis.set_xlabel("step")
        axis.set_title(f"held-out {metric.upper()}")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _sheet(photos, targets, before, after, views: int) -> np.ndarray:
    rows = []
    for index in range(min(views, len(photos))):
        row = [photos[index], targets[index], before[index], after[index]]
        rows.append(np.concatenate([np.round(image.cpu().numpy().clip(0, 1) * 255).astype(np.uint8) for image in row], axis=1))
    return np.concatenate(rows, axis=0)


def run(
    data: Path,
    load_dir: Path,
    out: Path,
    transform: str = "invert",
    perturb: bool = False,
    steps: Optional[int] = None,
    gs_steps: int = 2500,
    device: str = "cuda",
    model: Optional[Dict[str, object]] = None,
    features_lr: Optional[float] = None,
    overlap: bool = False,
) -> Dict[str, object]:
    """Run the benchmark and write its outputs into ``out``; returns the JSON figures."""
    from PIL import Image

    from igs2gs.evaluation import held_out_metrics, held_out_renders, held_out_targets
    from igs2gs.oracle import OracleEditorConfig
    from nerfstudio.engine.callbacks import TrainingCallback, TrainingCallbackLocation

    out.mkdir(parents=True, exist_ok=True)
    oracle = OracleEditorConfig(transform=transform, **(PERTURBED if perturb else {}))  # type: ignore[arg-type]
    started = time.perf_counter()
    trainer = edit_trainer(
        data, load_dir, out / "runs", steps=steps, device=device, model=model, editor="oracle", oracle=oracle, gs_steps=gs_steps,
        overlap_edits=overlap,
    )
    pipeline = trainer.pipeline
    if features_lr is not None:  # short CPU runs: a colour edit moves the SH DC term slowly at splatfacto's rate
        for group in trainer.optimizers.optimizers["features_dc"].param_groups:
            group["lr"] = features_lr
    start_step = trainer._start_step
    before = held_out_renders(pipeline)
    photos, targets = held_out_targets(pipeline), held_out_targets(pipeline, transform)
    ceiling = held_out_metrics(pipeline, photos, renders=before)
    history = [{"step": start_step, **held_out_metrics(pipeline, targets, renders=before)}]
    last_step = trainer.config.max_num_iterations + start_step - 1

    latest = {"renders": before}

    def score(step: int) -> None:
        if step == last_step or (step - start_step + 1) % gs_steps == 0:  # the end of a sweep's training period
            latest["renders"] = held_out_renders(pipeline)
            history.append({"step": step, **held_out_metrics(pipeline, targets, renders=latest["renders"])})
            print(f"step {step}: held-out PSNR vs oracle {history[-1]['psnr']:.2f} dB (ceiling {ceiling['psnr']:.2f})")

    trainer.callbacks.append(TrainingCallback([TrainingCallbackLocation.AFTER_TRAIN_ITERATION], score, update_every_num_iters=1))
    trainer.train()
    after = latest["renders"]  # the last step was scored: the splats have not changed since
    final = history[-1]
    result: Dict[str, object] = {
        "data": str(data),
        "transform": transform,
        "perturbations": PERTURBED if perturb else None,
        "overlap_edits": overlap,
        "held_out_views": len(photos),
        "ceiling": ceiling,
        "history": history,
        "final_minus_ceiling_psnr_db": final["psnr"] - ceiling["psnr"],
        "gain_psnr_db": final["psnr"] - history[0]["psnr"],
        "sweeps": pipeline.sweep_state.sweeps_completed,
        "wall_s": time.perf_counter() - started,
    }
    (out / "oracle.json").write_text(json.dumps(result, indent=2))
    _plot(history, ceiling["psnr"], out / "oracle.png")
    Image.fromarray(_sheet(photos, targets, before, after, views=4)).save(out / "held_out_sheet.png")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--load-dir", type=Path, help="splatfacto nerfstudio_models folder (else --reconstruct-steps)")
    parser.add_argument("--reconstruct-steps", type=int, default=15000)
    parser.add_argument("--out", type=Path, default=Path("outputs/bench_oracle"))
    parser.add_argument("--transform", default="invert", choices=["rotate_channels", "invert", "sepia"])
    parser.add_argument("--perturb", action="store_true", help=f"perturb each edit: {PERTURBED}")
    parser.add_argument("--steps", type=int, help="edit length (default: the method's 7500)")
    parser.add_argument("--gs-steps", type=int, default=2500)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--overlap", action="store_true", help="--pipeline.overlap-edits (edits arrive while training goes on)")
    args = parser.parse_args()
    load_dir = args.load_dir
    if load_dir is None:
        from reconstruct import reconstruct

        load_dir = reconstruct(args.data, args.out / "splatfacto", args.reconstruct_steps, args.device)
    result = run(args.data, load_dir, args.out, args.transform, args.perturb, args.steps, args.gs_steps, args.device, overlap=args.overlap)
    ceiling = result["ceiling"]["psnr"]  # type: ignore[index]
    print(f"ceiling (unedited reconstruction vs held-out photos): {ceiling:.2f} dB")
    for row in result["history"]:  # type: ignore[union-attr]
        print(f"step {row['step']:>6}: PSNR {row['psnr']:.2f} dB  SSIM {row['ssim']:.4f}  LPIPS {row['lpips']:.4f}")
    print(f"final - ceiling: {result['final_minus_ceiling_psnr_db']:+.2f} dB; gain over the run: {result['gain_psnr_db']:+.2f} dB")


if __name__ == "__main__":
    main()
