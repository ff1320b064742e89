"""Reconstruct a scene with splatfacto on any device, the CPU included.

On CUDA this is what ``ns-train splatfacto`` does. On a CPU, nerfstudio's splatfacto cannot run
(it calls ``.cuda()``), so the same trainer config is used with igs2gs's model class, whose CPU
path rasterizes in pure torch, and splatfacto's loss (L1 + SSIM, no LPIPS). The result is an
ordinary splatfacto run folder (``config.yml``, ``nerfstudio_models/``) that ``ns-train igs2gs
--load-dir`` accepts.

    python scripts/reconstruct.py --data DATA --output-dir outputs --steps 300 --device cpu [--no-eval]

``--no-eval`` leaves out splatfacto's evaluations (one held-out image every 100 steps, all of them every
1,000: ~270 renders with their metrics in 15k steps), for a benchmark that only needs the splats.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path
from typing import Optional

from nerfstudio.configs.method_configs import method_configs
from nerfstudio.engine.trainer import TrainerConfig


def splatfacto_config(
    data: Path, output_dir: Path, steps: int, device: str, timestamp: Optional[str] = None, evaluate: bool = True
) -> TrainerConfig:
    """nerfstudio's ``splatfacto`` config, made runnable on ``device`` (without evaluations unless ``evaluate``)."""
    from igs2gs.datamanager import IGS2GSDataManagerConfig
    from igs2gs.model import IGS2GSModelConfig

    config = copy.deepcopy(method_configs["splatfacto"])
    config.pipeline.datamanager.data = Path(data)
    config.output_dir = Path(output_dir)
    config.max_num_iterations = steps
    config.steps_per_save = steps
    config.machine.device_type = device
    config.vis = "tensorboard"
    config.viewer.quit_on_train_completion = True
    if timestamp is not None:
        config.timestamp = timestamp
    if not evaluate:  # nerfstudio evaluates at no step for an interval of 0
        config.steps_per_eval_image = config.steps_per_eval_batch = config.steps_per_eval_all_images = 0
    if device != "cuda":
        config.pipeline.datamanager = IGS2GSDataManagerConfig(data=Path(data))
        config.pipeline.model = IGS2GSModelConfig(
            lpips_loss_mult=0.0,
            lpips_pretrained_backbone=False,
            densify_from_load=False,
            # Tiny scenes: the seed points suffice (dense CPU rasterization scales with the
            # Gaussian count, so no densification), full resolution from the start.
            stop_split_at=0,
            num_downscales=0,
            seed_points_used=None,  # a reconstruction starts from every seed point
            sh_degree_interval=max(1, steps // 4),
        )
    return config


def reconstruct(
    data: Path, output_dir: Path, steps: int, device: str, timestamp: Optional[str] = None, evaluate: bool = True
) -> Path:
    """Train and return the run's ``nerfstudio_models`` folder."""
    from nerfstudio.scripts.train import main as train_main

    config = splatfacto_config(data, output_dir, steps, device, timestamp, evaluate)
    train_main(config)
    return config.get_checkpoint_dir()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--output-dir", type=Path, default=Path("outputs"))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--no-eval", dest="evaluate", action="store_false", help="leave out splatfacto's evaluations")
    args = parser.parse_args()
    print(reconstruct(args.data, args.output_dir, args.steps, args.device, evaluate=args.evaluate))


if __name__ == "__main__":
    main()
