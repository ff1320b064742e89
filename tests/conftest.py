"""Shared fixtures: a tiny generated scene, a tiny random IP2P and a CPU splatfacto checkpoint.

Nothing here touches the network or ../shared: scenes and models are made in temporary folders.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from make_random_ip2p import make_random_ip2p  # noqa: E402
from make_scene import make_scene  # noqa: E402

SCENE_SIZE = 40  # px: the smallest that LPIPS's AlexNet accepts comfortably
SCENE_VIEWS = 10  # nerfstudio holds out one view in ten: 9 training views
RECONSTRUCT_STEPS = 300


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def own_package_folder(tmp_path_factory):
    """The editor's compiled packages in a folder of the test session's, not the user's cache: by default an editor
    uses packages it finds there (tests that compile or look for packages name their own folder)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("IGS2GS_PACKAGE_DIR", str(tmp_path_factory.mktemp("packages-of-the-session")))
        yield


def offline_env(**extra: str) -> Dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", **extra)
    env.pop("WANDB_API_KEY", None)
    return env


def run_cli(args: List[str], cwd: Path, env: Optional[Dict[str, str]] = None, check: bool = True, timeout: int = 600):
    """Run an ns-* command (or any console script of the venv) and return the completed process."""
    executable = Path(sys.executable).parent / args[0]
    result = subprocess.run(
        [str(executable), *args[1:]], cwd=cwd, env=env or offline_env(), capture_output=True, text=True, timeout=timeout
    )
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return result


@pytest.fixture(scope="session")
def scene_dir(tmp_path_factory) -> Path:
    return make_scene(tmp_path_factory.mktemp("scene") / "tiny", views=SCENE_VIEWS, size=SCENE_SIZE, seed=0, points=800)


@pytest.fixture(scope="session")
def tiny_ip2p_dir(tmp_path_factory) -> Path:
    return make_random_ip2p(tmp_path_factory.mktemp("ip2p") / "tiny-ip2p", shape="tiny")


@pytest.fixture(scope="session")
def splatfacto_run(scene_dir, tmp_path_factory) -> Path:
    """A splatfacto run folder (config.yml, nerfstudio_models/) reconstructed on the CPU."""
    from reconstruct import reconstruct

    output = tmp_path_factory.mktemp("splatfacto")
    checkpoints = reconstruct(scene_dir, output, RECONSTRUCT_STEPS, "cpu", timestamp="base")
    assert any(checkpoints.glob("step-*.ckpt"))
    return checkpoints.parent


def step_pipeline(trainer, step: int, wait_for_writes: bool = True) -> None:
    """One pipeline step as the trainer makes it (its pre-iteration callbacks, then the loss), without the
    optimizer; then, unless told not to, wait for the edit writes (sweeps store in the background)."""
    from nerfstudio.engine.callbacks import TrainingCallbackLocation

    for callback in trainer.callbacks:
        callback.run_callback_at_location(step, location=TrainingCallbackLocation.BEFORE_TRAIN_ITERATION)
    trainer.pipeline.get_train_loss_dict(step)
    if wait_for_writes:
        trainer.pipeline.raise_failed_writes(wait=True)


def igs2gs_args(scene: Path, load_dir: Path, ip2p: Path, output: Path, *extra: str) -> List[str]:
    """``ns-train igs2gs`` on the CPU with the tiny editor and a short schedule."""
    return [
        "ns-train",
        "igs2gs",
        "--data",
        str(scene),
        "--load-dir",
        str(load_dir),
        "--output-dir",
        str(output),
        "--machine.device-type",
        "cpu",
        "--vis",
        "tensorboard",
        "--viewer.quit-on-train-completion",
        "True",
        "--pipeline.prompt",
        "make it look like a watercolour painting",
        "--pipeline.ip2p-model",
        str(ip2p),
        "--pipeline.diffusion-steps",
        "4",
        "--pipeline.model.lpips-pretrained-backbone",
        "False",
        "--pipeline.model.stop-split-at",
        "0",
        "--steps-per-eval-image",
        "1000",
        *extra,
    ]
