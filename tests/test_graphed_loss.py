"""The CUDA-graphed loss gives the eager loss and gradient, replay after replay."""

from __future__ import annotations

import pytest
import torch

from igs2gs.graphed_loss import GraphedLoss, _Replayed
from igs2gs.model import build_lpips


def _squared_error(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return ((prediction - target) ** 2).mean()


def test_replayed_node_scales_the_captured_gradient_by_the_upstream_gradient():
    """The autograd node's backward (device-independent): d(3·loss)/dp = 3·captured gradient."""

    class Captured:
        def replay(self, prediction, target):
            return torch.tensor(7.0), torch.full_like(prediction, 0.5)

    prediction = torch.rand(1, 3, 4, 4, requires_grad=True)
    loss = _Replayed.apply(prediction, torch.rand(1, 3, 4, 4), Captured())
    (3 * loss).backward()
    assert loss.item() == 7.0
    assert torch.equal(prediction.grad, torch.full_like(prediction, 1.5))


def test_cpu_inputs_run_eagerly():
    graphed = GraphedLoss(_squared_error)
    prediction = torch.rand(1, 3, 8, 8, requires_grad=True)
    target = torch.rand(1, 3, 8, 8)
    graphed(prediction, target).backward()
    assert graphed.graphs == 0
    assert torch.allclose(prediction.grad, 2 * (prediction - target).detach() / prediction.numel())


@pytest.mark.gpu
@pytest.mark.parametrize("half", [False, True])
def test_graphed_lpips_equals_eager_on_new_inputs(half: bool):
    """Each replay sees the new inputs (no stale static buffers) and gives the eager loss and gradient."""
    network = build_lpips("alex", pretrained_backbone=False).cuda()

    def lpips(prediction, target):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=half, cache_enabled=False):
            return network(prediction, target, normalize=True).mean().float()

    graphed = GraphedLoss(lpips)
    generator = torch.Generator("cuda").manual_seed(0)
    for _ in range(3):
        target = torch.rand(1, 3, 128, 160, device="cuda", generator=generator)
        base = (target + 0.2 * torch.randn(target.shape, device="cuda", generator=generator)).clamp(0, 1)
        eager_input = base.clone().requires_grad_(True)
        graph_input = base.clone().requires_grad_(True)
        eager = lpips(eager_input, target)
        (2 * eager).backward()
        replayed = graphed(graph_input, target)
        (2 * replayed).backward()
        assert replayed.item() == pytest.approx(eager.item(), rel=1e-4, abs=1e-6)
        assert torch.allclose(graph_input.grad, eager_input.grad, rtol=1e-3, atol=1e-7)
    assert graphed.graphs == 1
