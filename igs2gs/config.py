"""The registered ``igs2gs`` method (entry point ``nerfstudio.method_configs``).

Every ``ns-*`` command imports this module to list methods, so it must stay light: it imports
nerfstudio configs and our config dataclasses only (diffusers and transformers load when an edit
starts).
"""

from __future__ import annotations

from nerfstudio.configs.base_config import ViewerConfig
from nerfstudio.engine.optimizers import AdamOptimizerConfig
from nerfstudio.engine.schedulers import ExponentialDecaySchedulerConfig
from nerfstudio.plugins.types import MethodSpecification

from igs2gs.pipeline import IGS2GSPipelineConfig
from igs2gs.trainer import IGS2GSTrainerConfig

# Edits are short: 7500 steps (3 sweeps of 2500) after the loaded step.
EDIT_STEPS = 7500


def _optimizers() -> dict:
    """Splatfacto's optimizers; the position schedule decays over the edit instead of over 30k steps."""
    return {
        "means": {
            "optimizer": AdamOptimizerConfig(lr=1.6e-4, eps=1e-15),
            "scheduler": ExponentialDecaySchedulerConfig(lr_final=1.6e-6, max_steps=EDIT_STEPS),
        },
        "features_dc": {"optimizer": AdamOptimizerConfig(lr=0.0025, eps=1e-15), "scheduler": None},
        "features_rest": {"optimizer": AdamOptimizerConfig(lr=0.0025 / 20, eps=1e-15), "scheduler": None},
        "opacities": {"optimizer": AdamOptimizerConfig(lr=0.05, eps=1e-15), "scheduler": None},
        "scales": {"optimizer": AdamOptimizerConfig(lr=0.005, eps=1e-15), "scheduler": None},
        "quats": {"optimizer": AdamOptimizerConfig(lr=0.001, eps=1e-15), "scheduler": None},
        "camera_opt": {
            "optimizer": AdamOptimizerConfig(lr=1e-4, eps=1e-15),
            "scheduler": ExponentialDecaySchedulerConfig(lr_final=5e-7, max_steps=EDIT_STEPS),
        },
        "bilateral_grid": {
            "optimizer": AdamOptimizerConfig(lr=2e-3, eps=1e-15),
            "scheduler": ExponentialDecaySchedulerConfig(lr_final=1e-4, max_steps=EDIT_STEPS),
        },
    }


igs2gs_method = MethodSpecification(
    config=IGS2GSTrainerConfig(
        method_name="igs2gs",
        steps_per_eval_image=500,
        steps_per_eval_batch=0,
        steps_per_save=1000,
        steps_per_eval_all_images=100000,
        max_num_iterations=EDIT_STEPS,
        mixed_precision=False,
        save_only_latest_checkpoint=True,
        pipeline=IGS2GSPipelineConfig(),
        optimizers=_optimizers(),
        viewer=ViewerConfig(num_rays_per_chunk=1 << 15),
        vis="viewer",
    ),
    description="Instruct-GS2GS: edit a trained splatfacto scene with a text instruction (InstructPix2Pix).",
)
