"""Time a full igs2gs edit of a reconstructed scene on one GPU and split the wall time.

Loads a splatfacto checkpoint, runs the default edit (3 sweeps, 7500 steps unless told otherwise)
in this process and prints: model set-up, per-sweep render / IP2P / store seconds, splat
training seconds and steps/s between sweeps, total wall time and peak GPU memory; JSON with
``--json``. With the random sd15 editor (``make_random_ip2p.py --shape sd15``) the timings are
real and the edits are noise.

    python scripts/bench_edit.py --data DATA --load-dir RUN/nerfstudio_models --ip2p-model DIR
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--load-dir", type=Path, required=True)
    parser.add_argument("--ip2p-model", required=True)
    parser.add_argument("--output-dir", type=Path, default=Path("outputs/bench_edit"))
    parser.add_argument("--steps", type=int, default=7500)
    parser.add_argument("--gs-steps", type=int, default=2500)
    parser.add_argument("--prompt", default="turn the horse into a giraffe")
    parser.add_argument("--lpips-loss-mult", type=float, default=1.0)
    parser.add_argument("--vis", default="tensorboard", help="nerfstudio --vis (tensorboard runs eval images; viewer does not)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    from igs2gs.config import igs2gs_method

    started = time.perf_counter()
    config = copy.deepcopy(igs2gs_method.config)
    config.pipeline.datamanager.data = args.data
    config.load_dir = args.load_dir
    config.output_dir = args.output_dir
    config.max_num_iterations = args.steps
    config.vis = args.vis
    config.viewer.quit_on_train_completion = True
    config.pipeline.model.lpips_loss_mult = args.lpips_loss_mult
    config.pipeline.prompt = args.prompt
    config.pipeline.gs_steps = args.gs_steps
    config.pipeline.ip2p_model = args.ip2p_model
    config.set_timestamp()
    config.save_config()  # as ns-train does: creates the run folder
    trainer = config.setup(local_rank=0, world_size=1)
    trainer.setup()
    setup_s = time.perf_counter() - started
    gaussians_at_load = trainer.pipeline.model.num_points
    torch.cuda.reset_peak_memory_stats()
    train_started = time.perf_counter()
    trainer.train()
    torch.cuda.synchronize()
    train_wall_s = time.perf_counter() - train_started
    total_s = time.perf_counter() - started
    sweeps = trainer.pipeline.sweep_timings
    sweep_s = sum(s["total_s"] for s in sweeps)
    splat_s = train_wall_s - sweep_s
    steps_done = trainer.step - trainer._start_step + 1
    result = {
        "device": torch.cuda.get_device_name(0),
        "views": len(trainer.pipeline.datamanager.image_names),
        "gaussians_at_load": gaussians_at_load,
        "gaussians_at_end": trainer.pipeline.model.num_points,
        "setup_s": setup_s,
        "sweeps": sweeps,
        "sweep_s": sweep_s,
        "ip2p_s_per_edit": sum(s["edit_s"] for s in sweeps) / max(1.0, sum(s["views"] for s in sweeps)),
        "splat_training_s": splat_s,
        "steps": steps_done,
        "steps_per_s_between_sweeps": steps_done / splat_s,
        "total_s": total_s,
        "peak_gpu_gb": torch.cuda.max_memory_allocated() / 1e9,
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
