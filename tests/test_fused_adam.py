"""use_fused_adam: a loaded Adam state, switched to the fused kernel, makes the same updates."""

from __future__ import annotations

import copy
from typing import Dict, List

import pytest
import torch

from igs2gs.trainer import use_fused_adam


def trained_optimizers(device: str) -> Dict[str, torch.optim.Optimizer]:
    """Two Adam optimizers (splatfacto-like eps) with three steps of state, and an SGD one."""
    generator = torch.Generator().manual_seed(0)
    optimizers: Dict[str, torch.optim.Optimizer] = {}
    for name, shape in {"means": (500, 3), "features_rest": (500, 15, 3)}.items():
        param = torch.nn.Parameter(torch.randn(shape, generator=generator).to(device))
        optimizers[name] = torch.optim.Adam([param], lr=1e-2, eps=1e-15)
    optimizers["other"] = torch.optim.SGD([torch.nn.Parameter(torch.zeros(4, device=device))], lr=0.1)
    for _ in range(3):
        for optimizer in optimizers.values():
            for group in optimizer.param_groups:
                for param in group["params"]:
                    param.grad = torch.randn(param.shape, generator=generator).to(device)
            optimizer.step()
    return optimizers


def reloaded(optimizers: Dict[str, torch.optim.Optimizer]) -> Dict[str, torch.optim.Optimizer]:
    """Fresh optimizers on copies of the parameters, given the saved state (as a checkpoint load does)."""
    copies = {}
    for name, optimizer in optimizers.items():
        params = [torch.nn.Parameter(p.detach().clone()) for group in optimizer.param_groups for p in group["params"]]
        copy_ = type(optimizer)(params, **{k: v for k, v in optimizer.defaults.items() if k != "params"})
        copy_.load_state_dict(copy.deepcopy(optimizer.state_dict()))
        copies[name] = copy_
    return copies


def params_of(optimizers: Dict[str, torch.optim.Optimizer]) -> List[torch.Tensor]:
    return [p for optimizer in optimizers.values() for group in optimizer.param_groups for p in group["params"]]


def step_both(first, second, steps: int = 3) -> None:
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for a, b in zip(params_of(first), params_of(second)):
            grad = torch.randn(a.shape, generator=generator).to(a.device)
            a.grad, b.grad = grad, grad.clone()
        for optimizer in (*first.values(), *second.values()):
            optimizer.step()


def check_switch_keeps_the_update(device: str) -> None:
    reference = trained_optimizers(device)
    fused = reloaded(reference)
    assert use_fused_adam(fused, device_types=(device,)) == ["means", "features_rest"]
    assert all(g["fused"] and not g["foreach"] for name in ("means", "features_rest") for g in fused[name].param_groups)
    assert "fused" not in fused["other"].param_groups[0] or not fused["other"].param_groups[0].get("fused")
    step_both(reference, fused)
    for a, b in zip(params_of(reference), params_of(fused)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # The state stays fused through a save/load (a resumed edit keeps the fast path).
    again, plain = reloaded(fused), reloaded(reference)
    assert again["means"].param_groups[0]["fused"]
    step_both(plain, again, steps=1)
    for a, b in zip(params_of(plain), params_of(again)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_fused_adam_keeps_the_loaded_state_and_the_update():
    check_switch_keeps_the_update("cpu")


def test_only_optimizers_wholly_on_the_given_devices_are_switched():
    optimizers = trained_optimizers("cpu")
    assert use_fused_adam(optimizers) == []  # default: CUDA only
    assert not optimizers["means"].param_groups[0]["fused"]


@pytest.mark.gpu
def test_fused_adam_on_cuda_after_a_cpu_saved_state():
    """A checkpoint saved by the multi-tensor Adam keeps its step counts on the CPU; fused needs them on the GPU."""
    check_switch_keeps_the_update("cuda")
