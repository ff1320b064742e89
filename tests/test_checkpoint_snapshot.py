"""cpu_snapshot: the checkpoint copy that training does not wait for holds the state of the moment it was taken."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from igs2gs.trainer import cpu_snapshot


def test_snapshot_copies_tensors_and_turns_numpy_scalars_into_numbers():
    weights = torch.arange(6.0)
    state = {"pipeline": {"w": weights}, "schedulers": [{"base_lrs": [np.float64(0.5)], "last_epoch": np.int64(3)}], "step": 7}
    snapshot, copied = cpu_snapshot(state)
    weights.add_(1)  # training goes on changing the tensor in place
    assert copied == []  # CPU tensors are copied at once
    assert torch.equal(snapshot["pipeline"]["w"], torch.arange(6.0))
    lrs, epoch = snapshot["schedulers"][0]["base_lrs"][0], snapshot["schedulers"][0]["last_epoch"]
    assert type(lrs) is float and type(epoch) is int and snapshot["step"] == 7


@pytest.mark.gpu
def test_cuda_snapshot_is_taken_before_the_kernels_queued_after_it():
    """The copies to pinned memory are queued, not waited for: kernels queued after them (the next
    training steps) must not reach them, and the events say when they are complete."""
    means = torch.rand(4_000_000, 3, device="cuda")
    step = torch.tensor(3.0, device="cuda")
    expected = means.cpu()
    snapshot, copied = cpu_snapshot({"means": means, "state": {"step": step}})
    for _ in range(20):  # the next steps, queued at once behind the copies
        means.mul_(1.5).add_(1.0)
    step.add_(1)
    assert len(copied) == 1
    for event in copied:
        event.synchronize()
    assert snapshot["means"].is_pinned() and torch.equal(snapshot["means"], expected)
    assert snapshot["state"]["step"].item() == 3.0
