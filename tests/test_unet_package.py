"""The UNet's ahead-of-time compiled package: compiled once, loaded from disk, bound to the weights in memory.

One real compilation (CPU, tiny UNet, ~1 min on two cores) serves the module; the other tests load it
or stand in for the compiler."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import pytest
import torch

import igs2gs.unet_package as unet_package
from igs2gs.ip2p import InstructPix2Pix
from igs2gs.unet_package import PackagedUNet, package_folder, package_key, packaged_unet

PROMPT = "make it look like bronze"
BATCH, SIZE = 2, 32


def images(count: int, seed: int) -> torch.Tensor:
    return torch.rand(count, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def edit(editor: InstructPix2Pix) -> torch.Tensor:
    generators = [torch.Generator().manual_seed(i) for i in range(BATCH)]
    return editor.edit(images(BATCH, 0), images(BATCH, 1), PROMPT, guidance_scale=3.0, diffusion_steps=3, generator=generators)


def compiled_editor(tiny_ip2p_dir: Path) -> InstructPix2Pix:
    editor = InstructPix2Pix.from_pretrained(str(tiny_ip2p_dir), device="cpu")
    editor.compiled = True  # from_pretrained compiles on CUDA only; the package logic is the same on the CPU
    return editor


@pytest.fixture(scope="module")
def eager(tiny_ip2p_dir) -> InstructPix2Pix:
    return InstructPix2Pix.from_pretrained(str(tiny_ip2p_dir), device="cpu")


@pytest.fixture(scope="module")
def unet_inputs(eager):
    """What the editor hands its UNet for a batch of BATCH views (three guidance branches each)."""
    seen = []
    real = eager._unet
    eager._unet = lambda sample, timestep, **kwargs: seen.append((sample, timestep, kwargs["encoder_hidden_states"])) or real(sample, timestep, **kwargs)
    try:
        edit(eager)
    finally:
        eager._unet = real
    return seen[0]


@pytest.fixture(scope="module")
def packaged(tmp_path_factory, tiny_ip2p_dir):
    """A compiled editor after its first edit: the package compiled into a fresh folder."""
    folder = tmp_path_factory.mktemp("packages")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("IGS2GS_PACKAGE_DIR", str(folder))
        editor = compiled_editor(tiny_ip2p_dir)
        edited = edit(editor)
    return folder, editor, edited


def test_compiled_editor_edits_through_the_package_as_the_eager_one(packaged, eager, unet_inputs):
    folder, editor, edited = packaged
    assert isinstance(editor._unet, PackagedUNet) and editor.compiled
    assert [path.name for path in folder.iterdir()] == [f"unet-{package_key(eager.unet, *unet_inputs)}.pt2"]  # no partial file left
    assert (edited - edit(eager)).abs().max() < 1e-4


def test_other_shapes_run_the_eager_unet(packaged, unet_inputs):
    _, editor, _ = packaged
    packaged_call, calls = editor._unet, []
    real_runner = packaged_call.runner
    packaged_call.runner = lambda *args: calls.append(args[0].shape[0]) or real_runner(*args)
    try:
        sample, timestep, text = unet_inputs
        packaged_call(sample[:3], timestep[:3], encoder_hidden_states=text[:3])
        packaged_call(sample, timestep, encoder_hidden_states=text)
    finally:
        packaged_call.runner = real_runner
    assert calls == [sample.shape[0]]


def test_a_later_run_loads_the_package_and_binds_it_to_its_own_weights(packaged, tiny_ip2p_dir, unet_inputs, monkeypatch):
    """The package holds kernels, not weights: another checkpoint of the architecture loads it without compiling."""
    folder, first, _ = packaged
    monkeypatch.setattr(unet_package, "_compile", lambda *args: pytest.fail("compiled again"))
    # torch's public loader first builds and runs CPU test programs (~50 s of a fresh process on the H100 machine)
    monkeypatch.setattr(torch._inductor, "aoti_load_package", lambda *args, **kwargs: pytest.fail("the slow loader"))
    other = copy.deepcopy(first.unet)
    with torch.no_grad():
        for parameter in other.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    loaded = packaged_unet(other, *unet_inputs, folder=folder)
    assert loaded is not None
    sample, timestep, text = unet_inputs
    expected = other(sample, timestep, encoder_hidden_states=text).sample
    output = loaded(sample, timestep, encoder_hidden_states=text)[0]
    assert (output - expected).abs().max() < 1e-4
    assert (output - first.unet(sample, timestep, encoder_hidden_states=text).sample).abs().max() > 1e-2


def test_prepared_at_set_up_an_editor_edits_through_the_package_its_first_edit_would_have_made(packaged, tiny_ip2p_dir, monkeypatch):
    folder, _, edited = packaged
    monkeypatch.setenv("IGS2GS_PACKAGE_DIR", str(folder))
    monkeypatch.setattr(unet_package, "_compile", lambda *args: pytest.fail("prepared a package of another key"))
    editor = compiled_editor(tiny_ip2p_dir)
    editor.prepare_compiled(BATCH, SIZE, SIZE, PROMPT)
    assert isinstance(editor._unet, PackagedUNet) and editor.fixed_batch == BATCH
    calls = []
    real_runner = editor._unet.runner
    editor._unet.runner = lambda *args: calls.append(1) or real_runner(*args)
    assert (edit(editor) - edited).abs().max() < 1e-5
    assert len(calls) == 3  # every diffusion step through the package


def test_a_damaged_package_is_compiled_again(packaged, unet_inputs, tmp_path, monkeypatch):
    folder, editor, _ = packaged
    good = next(folder.iterdir())
    damaged = tmp_path / good.name
    damaged.write_bytes(b"not a package")
    compiled = []

    def compile_(unet, inputs, path):  # stands in for the compiler: puts the good package in place
        compiled.append(path)
        shutil.copyfile(good, path)

    monkeypatch.setattr(unet_package, "_compile", compile_)
    loaded = packaged_unet(editor.unet, *unet_inputs, folder=tmp_path)
    assert compiled == [damaged] and loaded is not None


def test_without_a_compiler_the_editor_edits_eagerly_and_unpadded(tiny_ip2p_dir, eager, tmp_path, monkeypatch):
    def no_compiler(exported, package_path, inductor_configs):
        Path(package_path).write_bytes(b"half a package")
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", no_compiler)
    monkeypatch.setenv("IGS2GS_PACKAGE_DIR", str(tmp_path))
    editor = compiled_editor(tiny_ip2p_dir)
    edited = edit(editor)
    assert not editor.compiled and editor.fixed_batch is None and editor._unet is editor.unet
    assert list(tmp_path.iterdir()) == []  # the partial file is gone and never had the package's name
    assert (edited - edit(eager)).abs().max() < 1e-4


def test_package_key_follows_the_inputs_and_architecture_not_the_weights(eager, unet_inputs):
    sample, timestep, text = unet_inputs
    key = package_key(eager.unet, *unet_inputs)
    assert package_key(copy.deepcopy(eager.unet).requires_grad_(False), *unet_inputs) == key
    assert package_key(eager.unet, sample[:3], timestep[:3], text[:3]) != key
    assert package_key(copy.deepcopy(eager.unet).double(), sample.double(), timestep, text.double()) != key


def test_packages_live_in_the_user_cache_unless_a_folder_is_named(monkeypatch, tmp_path):
    monkeypatch.delenv("IGS2GS_PACKAGE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert package_folder() == tmp_path / "cache" / "igs2gs" / "unet-packages"
    monkeypatch.setenv("IGS2GS_PACKAGE_DIR", str(tmp_path / "mine"))
    assert package_folder() == tmp_path / "mine"
