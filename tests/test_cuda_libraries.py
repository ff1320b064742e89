"""torch's CUDA libraries in the page cache: measuring, evicting and reading them ahead (``igs2gs.cuda_libraries``)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch

import igs2gs.cuda_libraries as cuda_libraries
from igs2gs.cuda_libraries import evict, resident_bytes, start_read_ahead
from test_pipeline import make_trainer

SIZE = 8 << 20


def resident_after(path: Path, at_least: int, seconds: float = 10.0) -> int:
    """The file's cached bytes once they reach ``at_least`` (the kernel reads ahead asynchronously), or at the deadline."""
    deadline = time.monotonic() + seconds
    while (cached := resident_bytes(path)) < at_least and time.monotonic() < deadline:
        time.sleep(0.05)
    return cached


def test_read_ahead_brings_an_evicted_file_back_into_the_page_cache(tmp_path):
    library = tmp_path / "libexample.so.1"
    library.write_bytes(os.urandom(SIZE))
    evict([library])
    assert resident_bytes(library) < SIZE // 10
    thread = start_read_ahead([library, tmp_path / "missing.so"])  # an unreadable file is passed over
    thread.join(10)
    assert not thread.is_alive() and thread.daemon
    assert resident_after(library, SIZE) == SIZE


@pytest.mark.skipif(not torch.version.cuda, reason="a CPU build of torch has no CUDA libraries")
def test_the_cuda_libraries_of_a_cuda_build_of_torch_are_found():
    names = [path.name for path in cuda_libraries.cuda_libraries()]
    assert any(name.startswith("libcudnn") for name in names) and any(name.startswith("libcublasLt") for name in names), names
    assert any(name.startswith("libtorch_cuda") for name in names) and not any("nccl" in name for name in names), names


class ReadAheadStarted(Exception):
    pass


def test_the_trainer_reads_ahead_only_when_told_and_on_cuda(scene_dir, splatfacto_run, tiny_ip2p_dir, tmp_path, monkeypatch):
    def started(paths=None):
        raise ReadAheadStarted

    monkeypatch.setattr(cuda_libraries, "start_read_ahead", started)
    load_dir = splatfacto_run / "nerfstudio_models"
    make_trainer(scene_dir, load_dir, tiny_ip2p_dir, tmp_path, "read-ahead-cpu", trainer={"read_ahead_cuda_libraries": True})  # CPU: none
    with pytest.raises(ReadAheadStarted):  # first thing in set-up, before anything touches the GPU
        make_trainer(scene_dir, load_dir, tiny_ip2p_dir, tmp_path, "read-ahead-cuda", trainer={"read_ahead_cuda_libraries": True}, device="cuda")
