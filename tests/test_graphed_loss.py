"""The CUDA-graphed loss gives the eager loss and gradient, replay after replay."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from igs2gs.graphed_loss import CaptureGate, GraphedLoss, _Replayed
from igs2gs.model import build_lpips


def _squared_error(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return ((prediction - target) ** 2).mean()


def test_replayed_node_scales_the_captured_gradient_by_the_upstream_gradient():
    """The autograd node's backward (device-independent): d(3·loss)/dp = 3·captured gradient."""

    class Captured:
        def replay(self, prediction, targets):
            return torch.tensor(7.0), torch.full_like(prediction, 0.5)

    prediction = torch.rand(1, 3, 4, 4, requires_grad=True)
    loss = _Replayed.apply(prediction, Captured(), torch.rand(1, 3, 4, 4), torch.rand(2))
    (3 * loss).backward()
    assert loss.item() == 7.0
    assert torch.equal(prediction.grad, torch.full_like(prediction, 1.5))


def test_a_capture_waits_for_editors_and_editors_wait_for_a_waiting_capture():
    """No editor thread may run while a graph is captured; a capture is not starved by back-to-back edits."""
    gate, log = CaptureGate(), []
    editing, release = threading.Event(), threading.Event()

    def editor(name: str, hold: threading.Event) -> None:
        with gate.shared():
            log.append(f"{name} in")
            editing.set()
            hold.wait(5)
            log.append(f"{name} out")

    def capture() -> None:
        with gate.exclusive():
            log.append("capture")

    first = threading.Thread(target=editor, args=("first", release))
    first.start()
    editing.wait(5)
    capturer = threading.Thread(target=capture)
    capturer.start()
    time.sleep(0.2)
    no_hold = threading.Event()
    no_hold.set()
    second = threading.Thread(target=editor, args=("second", no_hold))  # would keep the gate busy
    second.start()
    time.sleep(0.2)
    assert log == ["first in"]  # the capture waits for the first edit, the second edit for the capture
    release.set()
    for thread in (first, capturer, second):
        thread.join(5)
    assert log[:3] == ["first in", "first out", "capture"] and log[3] == "second in"


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


@pytest.mark.gpu
def test_captures_succeed_while_an_editor_thread_autotunes_cudnn(tiny_ip2p_dir):
    """What broke overlapped sweeps under ns-train (cuDNN benchmark mode): an editor thread tuning
    convolutions for new image sizes while the training thread captured the LPIPS graph."""
    from igs2gs.edit_workers import EditJob, EditWorkers
    from igs2gs.ip2p import InstructPix2Pix

    torch.backends.cudnn.benchmark = True
    # The editor now edits with cuDNN's heuristics by default; this one keeps autotuning, the worst case for the gate.
    editor = InstructPix2Pix.from_pretrained(str(tiny_ip2p_dir), device="cuda", dtype=torch.float16, cudnn_benchmark=True)
    workers = EditWorkers([editor], lambda: ("make it bronze", {"diffusion_steps": 4}))
    for job, size in enumerate(range(64, 64 + 32 * 12, 32)):  # a new size per job: cuDNN tunes each
        images, views = torch.rand(2, 2, 3, size, size), [2 * job, 2 * job + 1]  # views name the condition cache
        workers.submit(EditJob(views, images[0], images[1], [torch.Generator().manual_seed(v) for v in views]))
    network = build_lpips("alex", pretrained_backbone=False).cuda()
    graphed = GraphedLoss(lambda p, t: network(p, t, normalize=True).mean())
    for size in (48, 56, 64, 72):
        prediction = torch.rand(1, 3, size, size, device="cuda", requires_grad=True)
        graphed(prediction, torch.rand(1, 3, size, size, device="cuda")).backward()
    edited = []
    while workers.outstanding:
        edited.extend(workers.results(block=True, timeout=120))
    workers.close()
    assert graphed.graphs == 4 and len(edited) == 12 and not workers.failures
