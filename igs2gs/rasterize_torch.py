"""Dense pure-torch Gaussian rasterizer for machines without CUDA (tests, tiny scenes).

Projection and spherical harmonics are gsplat's own torch references; only the compositing is
here, done densely (every Gaussian against every pixel, in pixel chunks), which is exact but
O(N * H * W): fine for a few thousand Gaussians at 64 px, far too slow for real scenes, where
gsplat's CUDA kernels are used. Returns what ``gsplat.rasterization`` returns for one camera,
including the ``info`` the densification strategy reads.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from gsplat.cuda._torch_impl import _fully_fused_projection, _quat_scale_to_covar_preci, _spherical_harmonics
from torch import Tensor

ALPHA_MIN = 1.0 / 255.0  # gsplat skips fainter contributions
ALPHA_MAX = 0.999
PIXELS_PER_CHUNK = 4096


def _composite(
    pixel_xy: Tensor, means2d: Tensor, conics: Tensor, opacities: Tensor, features: Tensor
) -> Tuple[Tensor, Tensor]:
    """Front-to-back alpha compositing of depth-sorted 2D Gaussians over a set of pixels."""
    delta = pixel_xy[:, None, :] - means2d[None, :, :]  # [P, N, 2]
    sigma = 0.5 * (conics[:, 0] * delta[..., 0] ** 2 + conics[:, 2] * delta[..., 1] ** 2) + conics[:, 1] * delta[
        ..., 0
    ] * delta[..., 1]
    alpha = torch.clamp_max(opacities[None, :] * torch.exp(-sigma), ALPHA_MAX)
    alpha = torch.where((sigma >= 0) & (alpha >= ALPHA_MIN), alpha, torch.zeros_like(alpha))
    transmittance = torch.cumprod(torch.cat([torch.ones_like(alpha[:, :1]), 1 - alpha[:, :-1]], dim=1), dim=1)
    weights = alpha * transmittance  # [P, N]
    return weights @ features, weights.sum(dim=1, keepdim=True)


def rasterize(
    means: Tensor,
    quats: Tensor,
    scales: Tensor,
    opacities: Tensor,
    colors: Tensor,
    viewmat: Tensor,
    K: Tensor,
    width: int,
    height: int,
    sh_degree: Optional[int],
    render_depth: bool = False,
    eps2d: float = 0.3,
    near_plane: float = 0.01,
    far_plane: float = 1e10,
    antialiased: bool = False,
) -> Tuple[Tensor, Tensor, Dict]:
    """Render one camera. Shapes follow ``gsplat.rasterization`` with C = 1.

    means [N,3], quats [N,4] (unnormalised), scales [N,3] (activated), opacities [N] (activated),
    colors [N,K,3] SH coefficients (``sh_degree`` set) or [N,3] RGB, viewmat [1,4,4], K [1,3,3].
    ``antialiased`` scales each opacity by the ``eps2d`` blur's compensation, as gsplat's mode of that name.
    Returns render [1,H,W,3(+1 depth)], alpha [1,H,W,1] and the info dict.
    """
    covars, _ = _quat_scale_to_covar_preci(quats, scales, compute_covar=True, compute_preci=False, triu=False)
    radii, means2d, depths, conics, compensations = _fully_fused_projection(
        means, covars, viewmat, K, width, height, eps2d=eps2d, near_plane=near_plane, far_plane=far_plane,
        calc_compensations=antialiased,
    )
    if compensations is not None:
        opacities = opacities * compensations[0]
    if means2d.requires_grad:
        means2d.retain_grad()
        # gsplat's kernels accumulate |dL/dmean2d| per pixel ("absgrad"); autograd gives only the
        # sum, whose magnitude stands in for it so the densification strategy works unchanged.
        means2d.register_hook(lambda grad: setattr(means2d, "absgrad", grad.abs()))
    if sh_degree is None:
        rgb = colors
    else:
        directions = means - torch.linalg.inv(viewmat[0])[None, :3, 3]
        rgb = torch.clamp_min(_spherical_harmonics(sh_degree, directions, colors) + 0.5, 0.0)
    features = torch.cat([rgb, depths[0, :, None]], dim=-1) if render_depth else rgb

    visible = torch.nonzero(radii[0] > 0).squeeze(1)
    order = visible[torch.argsort(depths[0, visible])]
    ys, xs = torch.meshgrid(
        torch.arange(height, device=means.device, dtype=means.dtype) + 0.5,
        torch.arange(width, device=means.device, dtype=means.dtype) + 0.5,
        indexing="ij",
    )
    pixel_xy = torch.stack([xs, ys], dim=-1).reshape(-1, 2)
    chunks = [
        _composite(
            pixel_xy[start : start + PIXELS_PER_CHUNK],
            means2d[0, order],
            conics[0, order],
            opacities[order],
            features[order],
        )
        for start in range(0, pixel_xy.shape[0], PIXELS_PER_CHUNK)
    ]
    render = torch.cat([c[0] for c in chunks]).reshape(1, height, width, -1)
    alpha = torch.cat([c[1] for c in chunks]).reshape(1, height, width, 1)
    if render_depth:
        render = torch.cat([render[..., :-1], render[..., -1:] / alpha.clamp(min=1e-10)], dim=-1)
    info = {
        "means2d": means2d,
        "radii": radii,
        "depths": depths,
        "conics": conics,
        "width": width,
        "height": height,
        "n_cameras": 1,
        "camera_ids": None,
        "gaussian_ids": None,
    }
    return render, alpha, info
