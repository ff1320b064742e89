"""The Gaussians' Adam steps replayed from a CUDA graph: the same updates as eager ones, where allowed."""

from __future__ import annotations

from typing import Dict

import pytest
import torch

from igs2gs.optimizer_graph import GraphedOptimizers, graphable_groups, is_adam_on
from igs2gs.trainer import use_fused_adam
from nerfstudio.engine.optimizers import AdamOptimizerConfig, Optimizers
from nerfstudio.engine.schedulers import ExponentialDecaySchedulerConfig
from test_pipeline import make_trainer

GAUSSIANS = ["means", "scales", "quats", "features_dc", "features_rest", "opacities"]


def splatfacto_like(device: str, max_norm=None) -> Optimizers:
    """Two Adam groups as splatfacto configures them (a decaying position LR), fused, and an SGD-like odd one."""
    generator = torch.Generator().manual_seed(0)
    config = {
        "means": {"optimizer": AdamOptimizerConfig(lr=1.6e-4, eps=1e-15), "scheduler": ExponentialDecaySchedulerConfig(lr_final=1.6e-6, max_steps=30)},
        "features_rest": {"optimizer": AdamOptimizerConfig(lr=2.5e-3 / 20, eps=1e-15, max_norm=max_norm), "scheduler": None},
    }
    params = {
        "means": [torch.nn.Parameter(torch.randn(300, 3, generator=generator).to(device))],
        "features_rest": [torch.nn.Parameter(torch.randn(300, 15, 3, generator=generator).to(device))],
    }
    optimizers = Optimizers(config, params)
    use_fused_adam(optimizers.optimizers, device_types=(device,))
    return optimizers


def train(optimizers: Optimizers, steps: int, seed: int = 1) -> None:
    """Steps as nerfstudio's trainer makes them: zero, backward (accumulating into .grad), step, schedule."""
    generator = torch.Generator().manual_seed(seed)
    names = list(optimizers.parameters)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    for step in range(steps):
        optimizers.zero_grad_some(names)
        params = [p for name in names for p in optimizers.parameters[name]]
        loss = sum((p * torch.randn(p.shape, generator=generator).to(p.device)).sum() + (p**2).sum() for p in params)
        loss.backward()
        optimizers.optimizer_scaler_step_some(scaler, names)
        optimizers.scheduler_step_all(step)


def states(optimizers: Optimizers) -> Dict[str, torch.Tensor]:
    out = {}
    for name, optimizer in optimizers.optimizers.items():
        (param,) = optimizer.param_groups[0]["params"]
        out[name] = param.detach().clone()
        for key, value in optimizer.state[param].items():
            out[f"{name}.{key}"] = value.detach().clone()
    return out


def test_only_unclipped_fused_adam_groups_stepped_every_step_are_graphable():
    optimizers = splatfacto_like("cpu")
    assert graphable_groups(optimizers, ["means", "features_rest"], {}, device_types=("cpu",)) == ["means", "features_rest"]
    assert graphable_groups(optimizers, ["means", "features_rest"], {}) == []  # CUDA only by default
    assert graphable_groups(optimizers, ["means", "features_rest"], {"means": 2}, device_types=("cpu",)) == ["features_rest"]
    assert graphable_groups(splatfacto_like("cpu", max_norm=1.0), ["means", "features_rest"], {}, device_types=("cpu",)) == ["means"]
    for group in optimizers.optimizers["means"].param_groups:
        group["fused"] = False
    assert graphable_groups(optimizers, ["means", "features_rest", "missing"], {}, device_types=("cpu",)) == ["features_rest"]


def test_only_torchs_own_adam_with_parameters_all_on_the_devices_is_an_adam_on_them():
    """What both the fused switch and the graph ask first: a subclass may step differently, a split one can't fuse."""
    here, there = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(3, device="meta"))
    assert is_adam_on(torch.optim.Adam([here]), ("cpu",))
    assert not is_adam_on(torch.optim.Adam([here]), ("cuda",))
    assert not is_adam_on(torch.optim.Adam([here, there]), ("cpu",))
    assert not is_adam_on(type("MyAdam", (torch.optim.Adam,), {})([here]), ("cpu",))
    assert not is_adam_on(torch.optim.SGD([here]), ("cpu",))
    assert not is_adam_on(torch.optim.Adam([{"params": []}]), ("cpu",)) and not is_adam_on(None, ("cpu",))


def test_stopped_graphed_optimizers_step_as_eager_ones():
    eager = splatfacto_like("cpu")
    graphed = GraphedOptimizers.adopt(splatfacto_like("cpu"), ["means", "features_rest"], warmup=1)
    graphed.stop_replaying("told to")
    train(eager, 4)
    train(graphed, 4)  # no capture tried (on the CPU it would fail)
    assert not graphed.captured and graphed.failed == "told to"
    expected, got = states(eager), states(graphed)
    assert expected.keys() == got.keys() and all(torch.equal(got[key], expected[key]) for key in expected)


def test_an_edit_on_the_cpu_steps_its_optimizers_eagerly(scene_dir, splatfacto_run, tiny_ip2p_dir, tmp_path):
    trainer = make_trainer(scene_dir, splatfacto_run / "nerfstudio_models", tiny_ip2p_dir, tmp_path, "adam-cpu")
    assert not isinstance(trainer.optimizers, GraphedOptimizers)


@pytest.mark.gpu
def test_graphed_adam_steps_equal_eager_ones_and_checkpoint_float_learning_rates():
    eager = splatfacto_like("cuda")
    graphed = GraphedOptimizers.adopt(splatfacto_like("cuda"), ["means", "features_rest"], warmup=2)
    train(eager, 8)
    train(graphed, 8)
    assert graphed.captured and graphed.failed is None
    expected, got = states(eager), states(graphed)
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-6, atol=1e-9, msg=key)
    assert graphed.optimizers["means"].param_groups[0]["lr"] == pytest.approx(eager.optimizers["means"].param_groups[0]["lr"])
    assert all(isinstance(o.param_groups[0]["lr"], float) for o in graphed.optimizers.values())  # checkpoints as eager ones
    assert not any(o.param_groups[0]["capturable"] for o in graphed.optimizers.values())


@pytest.mark.gpu
def test_replaced_parameters_turn_the_graph_off_without_losing_a_step():
    graphed = GraphedOptimizers.adopt(splatfacto_like("cuda"), ["means", "features_rest"], warmup=1)
    train(graphed, 3)
    assert graphed.captured
    optimizer = graphed.optimizers["means"]
    (old,) = optimizer.param_groups[0]["params"]
    new = torch.nn.Parameter(old.detach().clone())  # as densification does
    optimizer.state[new] = optimizer.state.pop(old)
    optimizer.param_groups[0]["params"] = [new]
    graphed.parameters["means"] = [new]
    before = new.detach().clone()
    with pytest.warns(UserWarning, match="parameters were replaced"):
        train(graphed, 1)
    assert not graphed.captured and graphed.failed is not None
    assert not torch.equal(new.detach(), before)  # this step's update was made eagerly


@pytest.mark.gpu
def test_a_cuda_edit_steps_the_gaussians_adam_from_a_graph(scene_dir, splatfacto_run, tiny_ip2p_dir, tmp_path):
    from nerfstudio.utils import writer

    from bench_edit import train_step

    trainer = make_trainer(scene_dir, splatfacto_run / "nerfstudio_models", tiny_ip2p_dir, tmp_path, "adam-cuda", device="cuda")
    assert isinstance(trainer.optimizers, GraphedOptimizers) and sorted(trainer.optimizers.graphed) == sorted(GAUSSIANS)
    means = trainer.pipeline.model.means.detach().clone()
    for step in range(trainer._start_step, trainer._start_step + 4):  # a sweep, two eager steps, the capture, a replay
        train_step(trainer, step)  # its callbacks hand the model its optimizers
    writer.EVENT_STORAGE.clear()
    assert trainer.optimizers.captured and trainer.optimizers.failed is None
    assert not torch.equal(trainer.pipeline.model.means.detach(), means)


@pytest.mark.gpu
def test_a_densifying_cuda_edit_steps_its_optimizers_eagerly(scene_dir, splatfacto_run, tiny_ip2p_dir, tmp_path):
    trainer = make_trainer(
        scene_dir, splatfacto_run / "nerfstudio_models", tiny_ip2p_dir, tmp_path, "adam-densify", device="cuda", model={"densify_from_load": True}
    )
    assert not isinstance(trainer.optimizers, GraphedOptimizers)
