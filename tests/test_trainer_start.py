"""The trainer's start: CUDA initialised beside set-up."""

from __future__ import annotations

import threading

import pytest
import torch

from igs2gs import trainer


@pytest.mark.parametrize("fails", [False, True])
def test_cuda_starts_in_a_thread_of_its_own_and_only_for_a_cuda_trainer(monkeypatch, fails):
    """``start_cuda_in_background``: CUDA's initialisation runs beside set-up; a failure is left for set-up's first
    CUDA call to raise (nothing raised, nothing printed by the thread)."""
    ran = []

    def init() -> None:
        ran.append(threading.current_thread().name)
        if fails:
            raise RuntimeError("no CUDA driver")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "init", init)
    unraised = []
    monkeypatch.setattr(threading, "excepthook", unraised.append)
    trainer.start_cuda_in_background("cpu")
    assert ran == []
    trainer.start_cuda_in_background("cuda:0")
    for thread in threading.enumerate():
        if thread.name == "igs2gs-cuda-init":
            thread.join(timeout=10)
    assert ran == ["igs2gs-cuda-init"] and unraised == []
