"""Build an igs2gs trainer in this process, as ``ns-train igs2gs`` would (for benchmarks and tests).

    trainer = edit_trainer(data, load_dir, output_dir, steps=7500, device="cuda", prompt="...")
    trainer.train()
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Dict, Optional


def edit_trainer(
    data: Path,
    load_dir: Optional[Path],
    output_dir: Path,
    steps: Optional[int] = None,
    device: str = "cuda",
    vis: str = "tensorboard",
    timestamp: Optional[str] = None,
    model: Optional[Dict[str, Any]] = None,
    trainer: Optional[Dict[str, Any]] = None,
    **pipeline: Any,
):
    """A set-up igs2gs trainer; ``model``, ``trainer`` and ``pipeline`` override fields of those configs."""
    from igs2gs.config import igs2gs_method

    config = copy.deepcopy(igs2gs_method.config)
    config.pipeline.datamanager.data = Path(data)
    config.load_dir = Path(load_dir) if load_dir is not None else None
    config.output_dir = Path(output_dir)
    config.machine.device_type = device
    config.vis = vis
    config.viewer.quit_on_train_completion = True
    if steps is not None:
        config.max_num_iterations = steps
    for key, value in (model or {}).items():
        setattr(config.pipeline.model, key, value)
    for key, value in pipeline.items():
        setattr(config.pipeline, key, value)
    for key, value in (trainer or {}).items():
        setattr(config, key, value)
    if timestamp is None:
        config.set_timestamp()
    else:
        config.timestamp = timestamp
    config.save_config()  # as ns-train does: creates the run folder
    built = config.setup(local_rank=0, world_size=1)
    built.setup()
    return built
