"""Held-out-view metrics: how well the splats reproduce a known edit on views never trained on.

The oracle editor's right answer for any view is the same colour remap of its photo, so the
eval split's photos, remapped, are ground truth for the edited scene; without a transform the
photos themselves give the reconstruction's ceiling.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional

import torch
from torch import Tensor

from igs2gs.oracle import oracle_transform


def eval_photo(datamanager, index: int) -> Tensor:
    """Held-out photo ``index`` as float [H, W, 3] in [0, 1], over the render background if it has alpha."""
    return datamanager.over_background(datamanager.cached_eval[index]["image"])


@torch.no_grad()
def held_out_renders(pipeline) -> List[Tensor]:
    """Renders [H, W, 3] of every eval view from the current splats (over the pipeline's fixed background)."""
    datamanager, model = pipeline.datamanager, pipeline.model
    datamanager.cached_eval  # caching undistorts the photos and updates the cameras' intrinsics and sizes
    cameras = datamanager.eval_dataset.cameras
    was_training = model.training
    model.eval()
    try:
        with pipeline.fixed_background():
            return [model.get_outputs_for_camera(cameras[i : i + 1])["rgb"].clamp(0, 1) for i in range(len(cameras))]
    finally:
        model.train(was_training)


def held_out_targets(pipeline, transform: Optional[str] = None) -> List[Tensor]:
    """The eval photos [H, W, 3], oracle-remapped if ``transform`` is given."""
    photos = [eval_photo(pipeline.datamanager, index) for index in range(len(pipeline.datamanager.eval_dataset))]
    if transform is None:
        return photos
    return [oracle_transform(photo.permute(2, 0, 1)[None], transform)[0].permute(1, 2, 0) for photo in photos]


@torch.no_grad()
def held_out_metrics(pipeline, targets: List[Tensor], renders: Optional[List[Tensor]] = None) -> Dict[str, float]:
    """Mean PSNR, SSIM and LPIPS of the eval renders (made now unless given) against ``targets``
    (``held_out_targets``). PSNR is of the mean squared error over all views."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    renders = held_out_renders(pipeline) if renders is None else renders
    squared, ssims, lpipses = [], [], []
    for render, target in zip(renders, targets):
        ours, theirs = render.permute(2, 0, 1)[None], target.to(render.device).permute(2, 0, 1)[None]
        squared.append(torch.mean((ours - theirs) ** 2).item())
        ssims.append(structural_similarity_index_measure(ours, theirs, data_range=1.0).item())
        lpipses.append(pipeline.model.lpips(ours, theirs).item())
    return {
        "psnr": -10 * math.log10(max(sum(squared) / len(squared), 1e-12)),
        "ssim": sum(ssims) / len(ssims),
        "lpips": sum(lpipses) / len(lpipses),
        "views": float(len(renders)),
    }
