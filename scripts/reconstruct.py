"""Reconstruct a scene with splatfacto on any device, the CPU included.

On CUDA this is what ``ns-train splatfacto`` does. On a CPU, nerfstudio's splatfacto cannot run
(it calls ``.cuda()``), so the same trainer config is used with igs2gs's model class, whose CPU
path rasterizes in pure torch, and splatfacto's loss (L1 + SSIM, no LPIPS). The result is an
ordinary splatfacto run folder (``config.yml``, ``nerfstudio_models/``) that ``ns-train igs2gs
--load-dir`` accepts.

    python scripts/reconstruct.py --data DATA --output-dir outputs --steps 300 --device cpu
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path
from typing import Optional

from nerfstudio.configs.method_configs import method_configs
from nerfstudio.engine.trainer import TrainerConfig


def splatfacto_config(data: Path, output_dir: Path, steps: int, device: str, timestamp: Optional[str] = None) -> TrainerConfig:
    """nerfstudio's ``splatfacto`` config, made runnable on ``device``."""
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


def reconstruct(data: Path, output_dir: Path, steps: int, device: str, timestamp: Optional[str] = None) -> Path:
    """Train and return the run's ``nerfstudio_models`` folder."""
    from nerfstudio.scripts.train import main as train_main

    config = splatfacto_config(data, output_dir, steps, device, timestamp)
    train_main(config)
    return config.get_checkpoint_dir()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--output-dir", type=Path, default=Path("outputs"))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args()
    print(reconstruct(args.data, args.output_dir, args.steps, args.device))


if __name__ == "__main__":
    main()
