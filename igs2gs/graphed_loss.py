"""A scalar image loss and its gradient, replayed from CUDA graphs.

The LPIPS loss of a 512² view launches ~100 small kernels forward and backward: ~6 ms per step on
an H100 of which the GPU is busy ~1.3 ms. Capturing the loss *and* its gradient with respect to
the prediction in one graph per image size turns that into one launch.

A capture fails (and spoils the other thread's work) when another thread makes a call that is
illegal while a stream captures: cuDNN autotuning (``ns-train`` turns it on), a device-wide sync,
a copy on the legacy stream. Editor threads therefore edit inside ``CAPTURE_GATE.shared()`` and a
capture waits for them in ``CAPTURE_GATE.exclusive()`` (once per image size, for at most a batch).
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from typing import Callable, Dict, Iterator, Optional, Sequence, Tuple

import torch
from torch import Tensor

LossFunction = Callable[..., Tensor]  # (prediction, *targets) -> scalar


class CaptureGate:
    """Many threads' GPU work, or one CUDA graph capture, at a time; a waiting capture goes first."""

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._sharing = 0
        self._captures_waiting = 0
        self._capturing = False

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        with self._condition:
            self._condition.wait_for(lambda: not self._capturing and not self._captures_waiting)
            self._sharing += 1
        try:
            yield
        finally:
            with self._condition:
                self._sharing -= 1
                self._condition.notify_all()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._condition:
            self._captures_waiting += 1
            self._condition.wait_for(lambda: not self._capturing and not self._sharing)
            self._captures_waiting -= 1
            self._capturing = True
        try:
            yield
        finally:
            with self._condition:
                self._capturing = False
                self._condition.notify_all()


CAPTURE_GATE = CaptureGate()


class _LossGraph:
    """One captured ``loss_fn(prediction, *targets)`` and ``d loss / d prediction`` for one set of input shapes."""

    def __init__(self, loss_fn: LossFunction, prediction: Tensor, targets: Sequence[Tensor], warmup: int = 3) -> None:
        self.prediction = torch.zeros_like(prediction, requires_grad=True)
        self.targets = [torch.zeros_like(target) for target in targets]
        with torch.no_grad():  # warm up and capture on real values: no NaN paths in the warm-up
            self._fill(prediction, targets)
        with torch.cuda.device(prediction.device):  # the capture stream is made on the current device
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # lazy cuDNN/cuBLAS set-up must happen outside the capture
                for _ in range(warmup):
                    self._loss_and_gradient(loss_fn)
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with CAPTURE_GATE.exclusive(), torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
                self.loss, self.gradient = self._loss_and_gradient(loss_fn)

    def _fill(self, prediction: Tensor, targets: Sequence[Tensor]) -> None:
        self.prediction.copy_(prediction)
        for static, target in zip(self.targets, targets):
            static.copy_(target)

    def _loss_and_gradient(self, loss_fn: LossFunction) -> Tuple[Tensor, Tensor]:
        loss = loss_fn(self.prediction, *self.targets)
        (gradient,) = torch.autograd.grad(loss, self.prediction)
        return loss.detach(), gradient

    def replay(self, prediction: Tensor, targets: Sequence[Tensor]) -> Tuple[Tensor, Tensor]:
        with torch.no_grad(), torch.cuda.device(self.prediction.device):
            self._fill(prediction, targets)
            self.graph.replay()
            return self.loss.clone(), self.gradient.clone()


class _Replayed(torch.autograd.Function):
    """The graph's loss as an autograd node whose backward scales the captured gradient."""

    @staticmethod
    def forward(ctx, prediction: Tensor, graph: _LossGraph, *targets: Tensor) -> Tensor:  # type: ignore[override]
        loss, gradient = graph.replay(prediction.detach(), [target.detach() for target in targets])
        ctx.save_for_backward(gradient)
        ctx.targets = len(targets)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: Tensor):  # type: ignore[override]
        (gradient,) = ctx.saved_tensors
        return (grad_loss * gradient, None, *[None] * ctx.targets)


class GraphedLoss:
    """``loss_fn(prediction, *targets)`` (a scalar, differentiable in ``prediction`` only) run from a
    CUDA graph per set of input shapes; eager on CPU, past ``max_graphs`` shapes, or if a capture fails."""

    def __init__(self, loss_fn: LossFunction, max_graphs: int = 4) -> None:
        self.loss_fn = loss_fn
        self.max_graphs = max_graphs
        self._graphs: Dict[Tuple, Optional[_LossGraph]] = {}

    def __call__(self, prediction: Tensor, *targets: Tensor) -> Tensor:
        # Without grad mode there is no gradient to capture: eager, and no graph attempt spoiled for the shape.
        graph = self._graph_for(prediction, targets) if torch.is_grad_enabled() else None
        if graph is None:
            return self.loss_fn(prediction, *targets)
        return _Replayed.apply(prediction, graph, *targets)

    @property
    def graphs(self) -> int:
        """Shapes served from a captured graph."""
        return sum(graph is not None for graph in self._graphs.values())

    def _graph_for(self, prediction: Tensor, targets: Sequence[Tensor]) -> Optional[_LossGraph]:
        if prediction.device.type != "cuda" or not prediction.requires_grad:
            return None
        key = (prediction.device, *((tuple(tensor.shape), tensor.dtype) for tensor in (prediction, *targets)))
        if key not in self._graphs:
            if len(self._graphs) >= self.max_graphs:
                return None
            try:
                self._graphs[key] = _LossGraph(self.loss_fn, prediction.detach(), [target.detach() for target in targets])
            except RuntimeError as error:
                warnings.warn(f"CUDA graph capture of the loss failed ({error}); computing it eagerly for {key[0]}")
                self._graphs[key] = None
        return self._graphs[key]
