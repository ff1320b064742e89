"""The Gaussians' Adam updates and the zeroing of their gradients, replayed from one CUDA graph.

An igs2gs training step is bound by host time, not by the GPU (stone_horse on an H100: ~6.5 ms of
host work per step while the GPU is busy ~4 ms), and ~1.2 ms of it is nerfstudio stepping one fused
Adam per Gaussian attribute and zeroing their gradients. Once the optimizers' state exists, those
updates always touch the same tensors, so they are captured once and replayed: one graph launch,
plus one fill of the position learning rate, which its schedule changes every step.

Only where the update is exactly the eager one: fused CUDA Adam, one parameter group, no gradient
clipping or accumulation, no gradient scaler, no gradient logging, and no densification (which
replaces the parameters; a replaced parameter also turns the graph off). Schedules keep writing
float learning rates into the parameter groups, so checkpoints are those of eager optimizers.
"""

from __future__ import annotations

import warnings
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import Tensor

from igs2gs.graphed_loss import CAPTURE_GATE
from nerfstudio.engine.optimizers import Optimizers


def is_adam_on(optimizer: Optional[torch.optim.Optimizer], device_types: Sequence[str]) -> bool:
    """Whether ``optimizer`` is torch's own Adam (not a subclass) with parameters, all on ``device_types``."""
    params = [p for group in optimizer.param_groups for p in group["params"]] if optimizer is not None else []
    return type(optimizer) is torch.optim.Adam and bool(params) and all(p.device.type in device_types for p in params)


def graphable_groups(
    optimizers: Optimizers, names: Sequence[str], accumulation: Dict[str, int], device_types: Sequence[str] = ("cuda",)
) -> List[str]:
    """Which of ``names`` step a fused Adam of one parameter group on ``device_types``, unclipped, every step."""
    groups = []
    for name in names:
        optimizer = optimizers.optimizers.get(name)
        if not is_adam_on(optimizer, device_types) or len(optimizer.param_groups) != 1 or not optimizer.param_groups[0]["fused"]:
            continue
        if optimizers.config[name]["optimizer"].max_norm is not None or accumulation.get(name, 1) != 1:
            continue
        groups.append(name)
    return groups


class GraphedOptimizers(Optimizers):
    """nerfstudio's ``Optimizers`` whose ``graphed`` groups step from one CUDA graph after ``warmup`` eager steps.

    Until the capture their gradients are zeroed in place (not freed), so that backward keeps
    accumulating into the same memory; after it, the graph zeroes them behind each update.
    """

    graphed: List[str]
    warmup: int
    eager_steps: int
    graph: Optional[torch.cuda.CUDAGraph]
    failed: Optional[str]
    _learning_rates: List[Tensor]
    _written_rates: List[float]
    _params: List[Tensor]

    @classmethod
    def adopt(cls, optimizers: Optimizers, graphed: Sequence[str], warmup: int = 2) -> "GraphedOptimizers":
        """These optimizers (their state kept), with ``graphed`` groups stepped from a graph."""
        adopted = cls.__new__(cls)
        adopted.__dict__.update(optimizers.__dict__)
        adopted.graphed, adopted.warmup, adopted.eager_steps = list(graphed), warmup, 0
        adopted.graph, adopted.failed = None, None
        adopted._learning_rates, adopted._written_rates, adopted._params = [], [], []
        return adopted

    @property
    def captured(self) -> bool:
        return self.graph is not None

    def zero_grad_some(self, param_groups: List[str]) -> None:
        eager = [name for name in param_groups if name not in self.graphed or self.failed is not None]
        super().zero_grad_some(eager)
        if self.graph is None and self.failed is None:
            for name in param_groups:
                if name in self.graphed:
                    self.optimizers[name].zero_grad(set_to_none=False)

    def optimizer_scaler_step_some(self, grad_scaler, param_groups: List[str]) -> None:
        graphed = [name for name in param_groups if name in self.graphed and self.failed is None]
        super().optimizer_scaler_step_some(grad_scaler, [name for name in param_groups if name not in graphed])
        if not graphed:
            return
        if len(graphed) != len(self.graphed):
            self._turn_off("only some of its groups stepped", grad_scaler, graphed)
        elif self.graph is None and (self.eager_steps < self.warmup or self._missing_gradients()):
            self.eager_steps += 1
            super().optimizer_scaler_step_some(grad_scaler, graphed)
        elif self.graph is None:
            self._capture()
            if self.graph is None:
                super().optimizer_scaler_step_some(grad_scaler, graphed)
            else:
                self._replay()
        elif any(self.optimizers[name].param_groups[0]["params"][0] is not param for name, param in zip(self.graphed, self._params)):
            self._turn_off("its parameters were replaced", grad_scaler, graphed)
        else:
            self._replay()

    def _missing_gradients(self) -> bool:
        return any(p.grad is None for name in self.graphed for p in self.optimizers[name].param_groups[0]["params"])

    def _groups(self) -> List[Dict[str, Any]]:
        return [self.optimizers[name].param_groups[0] for name in self.graphed]

    def _capture(self) -> None:
        groups = self._groups()
        self._params = [group["params"][0] for group in groups]
        device = self._params[0].device
        gradients = [p.grad for group in groups for p in group["params"]]
        saved = [(group["lr"], group["capturable"]) for group in groups]
        self._learning_rates = [torch.tensor(float(group["lr"]), dtype=torch.float32, device=device) for group in groups]
        self._written_rates = [float(group["lr"]) for group in groups]
        graph = torch.cuda.CUDAGraph()
        try:
            for group, rate in zip(groups, self._learning_rates):  # read from memory at each replay
                group["lr"], group["capturable"] = rate, True
            with torch.cuda.device(device), CAPTURE_GATE.exclusive():
                with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                    for name in self.graphed:
                        self.optimizers[name].step()
                    torch._foreach_zero_(gradients)
            self.graph = graph
        except RuntimeError as error:
            self.failed = f"capture failed: {error}"
            warnings.warn(f"CUDA graph capture of the Adam steps failed ({error}); stepping them eagerly")
        finally:
            for group, (rate, capturable) in zip(groups, saved):
                group["lr"], group["capturable"] = rate, capturable

    def _replay(self) -> None:
        assert self.graph is not None
        for index, group in enumerate(self._groups()):
            if group["lr"] != self._written_rates[index]:  # the position schedule moves every step
                self._learning_rates[index].fill_(group["lr"])
                self._written_rates[index] = group["lr"]
        self.graph.replay()

    def stop_replaying(self, why: str) -> None:
        """Step the graphed groups eagerly from the next step on, for good (``why`` is kept in ``failed``)."""
        self.failed, self.graph = why, None

    def _turn_off(self, why: str, grad_scaler, graphed: List[str]) -> None:
        """Step the graphed groups eagerly from now on, starting with this step's ``graphed`` ones."""
        self.stop_replaying(why)
        warnings.warn(f"Adam steps no longer replayed from a CUDA graph: {why}")
        super().optimizer_scaler_step_some(grad_scaler, graphed)
