"""The dense pure-torch rasterizer: analytic cases on CPU, and agreement with gsplat on CUDA."""

from __future__ import annotations

import math

import pytest
import torch

from igs2gs.rasterize_torch import rasterize

SIZE = 32
K = torch.tensor([[[40.0, 0.0, 16.0], [0.0, 40.0, 16.0], [0.0, 0.0, 1.0]]])
IDENTITY_QUAT = torch.tensor([[1.0, 0.0, 0.0, 0.0]])


def one_gaussian(z: float, scale: float, opacity: float, colour):
    return dict(
        means=torch.tensor([[0.0, 0.0, z]]),
        quats=IDENTITY_QUAT.clone(),
        scales=torch.full((1, 3), scale),
        opacities=torch.tensor([opacity]),
        colors=torch.tensor([colour]),
    )


def test_single_gaussian_peaks_at_the_principal_point_with_its_opacity():
    g = one_gaussian(2.0, 0.05, 0.8, [1.0, 0.5, 0.25])
    render, alpha, info = rasterize(**g, viewmat=torch.eye(4)[None], K=K, width=SIZE, height=SIZE, sh_degree=None)
    assert render.shape == (1, SIZE, SIZE, 3) and alpha.shape == (1, SIZE, SIZE, 1)
    # The pixel centres nearest the principal point are half a pixel off: exp(-0.5 * d^2 / var).
    variance = (40 * 0.05 / 2.0) ** 2 + 0.3
    expected = 0.8 * math.exp(-0.5 * 0.5 / variance)
    assert alpha[0, 15, 15, 0].item() == pytest.approx(expected, rel=1e-4)
    assert torch.allclose(render[0, 15, 15], torch.tensor([1.0, 0.5, 0.25]) * expected, rtol=1e-4)
    assert alpha[0, 0, 0, 0] < 1e-3 and info["radii"][0, 0] > 0


def test_antialiased_mode_scales_opacity_by_the_blur_compensation():
    g = one_gaussian(2.0, 0.05, 0.8, [1.0, 0.5, 0.25])
    _, alpha, _ = rasterize(**g, viewmat=torch.eye(4)[None], K=K, width=SIZE, height=SIZE, sh_degree=None, antialiased=True)
    footprint = (40 * 0.05 / 2.0) ** 2  # isotropic: the 0.3 px² blur widens each axis alike
    compensation = footprint / (footprint + 0.3)  # sqrt of the determinants' ratio
    expected = 0.8 * compensation * math.exp(-0.5 * 0.5 / (footprint + 0.3))
    assert alpha[0, 15, 15, 0].item() == pytest.approx(expected, rel=1e-4)


def test_nearer_gaussian_occludes_the_farther_one():
    near, far = one_gaussian(2.0, 0.2, 0.99, [1.0, 0.0, 0.0]), one_gaussian(4.0, 0.4, 0.99, [0.0, 0.0, 1.0])
    both = {key: torch.cat([far[key], near[key]]) for key in near}  # far first: order must not matter
    render, _, _ = rasterize(**both, viewmat=torch.eye(4)[None], K=K, width=SIZE, height=SIZE, sh_degree=None)
    assert render[0, 16, 16, 0] > 0.95 and render[0, 16, 16, 2] < 0.05


def test_gradients_reach_every_parameter():
    g = {key: value.requires_grad_() for key, value in one_gaussian(2.0, 0.05, 0.8, [0.2, 0.4, 0.6]).items()}
    g["means"].data[0, 0] = 0.03  # off-centre, so the mean has a gradient
    g["scales"].data = torch.tensor([[0.05, 0.02, 0.03]])  # anisotropic and rotated: the rotation matters
    g["quats"].data = torch.tensor([[0.9, 0.1, 0.2, 0.3]])
    render, _, info = rasterize(**g, viewmat=torch.eye(4)[None], K=K, width=SIZE, height=SIZE, sh_degree=None)
    render.sum().backward()
    for name, value in g.items():
        assert value.grad is not None and value.grad.abs().sum() > 0, name
    assert info["means2d"].grad is not None and info["means2d"].absgrad.shape == info["means2d"].shape


def random_gaussians(count: int, device: str, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    means = torch.randn(count, 3, generator=generator) * 0.6 + torch.tensor([0.0, 0.0, 3.0])
    return dict(
        means=means.to(device),
        quats=torch.randn(count, 4, generator=generator).to(device),
        scales=(torch.rand(count, 3, generator=generator) * 0.08 + 0.01).to(device),
        opacities=torch.rand(count, generator=generator).to(device),
        colors=(torch.randn(count, 16, 3, generator=generator) * 0.3).to(device),
    )


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["classic", "antialiased"])
def test_torch_path_matches_gsplat_on_the_same_gaussians(mode):
    from gsplat.rendering import rasterization

    size = 128
    Ks = torch.tensor([[[150.0, 0.0, 64.0], [0.0, 150.0, 64.0], [0.0, 0.0, 1.0]]], device="cuda")
    viewmat = torch.eye(4, device="cuda")[None]
    gaussians = random_gaussians(3000, "cuda")
    ours, ours_alpha, _ = rasterize(
        **gaussians, viewmat=viewmat, K=Ks, width=size, height=size, sh_degree=3, antialiased=mode == "antialiased"
    )
    theirs, theirs_alpha, _ = rasterization(
        gaussians["means"], gaussians["quats"], gaussians["scales"], gaussians["opacities"], gaussians["colors"],
        viewmat, Ks, size, size, sh_degree=3, packed=False, rasterize_mode=mode,
    )
    mse = torch.mean((ours.clamp(0, 1) - theirs.clamp(0, 1)) ** 2).item()
    psnr = -10 * math.log10(max(mse, 1e-12))
    print(f"torch rasterizer vs gsplat ({mode}): PSNR {psnr:.1f} dB, alpha max diff {(ours_alpha - theirs_alpha).abs().max().item():.4f}")
    assert psnr >= 35.0
