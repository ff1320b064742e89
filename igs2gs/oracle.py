"""An editor with a known answer, for benchmarks that must not depend on diffusion weights.

It "edits" a view by applying a fixed colour remap to the view's ORIGINAL photo (as IP2P is
conditioned on it), optionally perturbed per edit (shift, noise, colour jitter) to mimic IP2P's
inconsistency between views. Because the right answer for any view, held-out ones included, is
the same remap of its photo, how well the splats reproduce it measures how edits propagate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Literal, Optional, Sequence, Union

import torch
from torch import Tensor


@dataclass
class OracleEditorConfig:
    """Settings of the oracle editor (``--pipeline.editor oracle``)."""

    transform: Literal["rotate_channels", "invert", "sepia"] = "rotate_channels"
    """The known edit: RGB -> BRG, colour inversion, or a sepia tone."""
    max_shift_px: int = 0
    """Largest random translation of each edit, in pixels (view inconsistency)."""
    noise_std: float = 0.0
    """Standard deviation of Gaussian pixel noise added to each edit."""
    colour_jitter: float = 0.0
    """Largest random per-channel gain change of each edit (0.1 = +-10%)."""


def oracle_transform(images: Tensor, transform: str) -> Tensor:
    """The unperturbed oracle edit of float images [B, 3, H, W] in [0, 1]."""
    if transform == "rotate_channels":
        return images[:, [2, 0, 1]]
    if transform == "invert":
        return 1.0 - images
    if transform == "sepia":
        sepia = torch.tensor([[0.393, 0.769, 0.189], [0.349, 0.686, 0.168], [0.272, 0.534, 0.131]], device=images.device)
        return torch.einsum("ij,bjhw->bihw", sepia, images).clamp(0, 1)
    raise ValueError(f"unknown oracle transform {transform!r}")


class OracleEditor:
    """Implements the editor contract of :class:`igs2gs.ip2p.InstructPix2Pix` with a known edit."""

    def __init__(self, config: OracleEditorConfig, device: Union[str, torch.device] = "cpu") -> None:
        self.config = config
        self.device = torch.device(device)

    def edit(
        self,
        renders: Tensor,
        originals: Tensor,
        prompt: str,
        generator: Optional[Union[torch.Generator, Sequence[torch.Generator]]] = None,
        **settings,
    ) -> Tensor:
        """The oracle edit of ``originals`` (``renders`` and the IP2P settings are ignored)."""
        edited = oracle_transform(originals.float(), self.config.transform)
        count = edited.shape[0]
        generators: List[Optional[torch.Generator]] = (
            [generator] * count if generator is None or isinstance(generator, torch.Generator) else list(generator)
        )
        perturbed = []
        for image, gen in zip(edited, generators):
            cfg = self.config
            if cfg.max_shift_px > 0:
                dy, dx = torch.randint(-cfg.max_shift_px, cfg.max_shift_px + 1, (2,), generator=gen).tolist()
                image = torch.roll(image, shifts=(dy, dx), dims=(1, 2))
            if cfg.colour_jitter > 0:
                gains = 1 + (torch.rand(3, 1, 1, generator=gen) * 2 - 1) * cfg.colour_jitter
                image = image * gains.to(image.device)
            if cfg.noise_std > 0:
                image = image + torch.randn(image.shape, generator=gen).to(image.device) * cfg.noise_std
            perturbed.append(image.clamp(0, 1))
        return torch.stack(perturbed).to(renders.device)
