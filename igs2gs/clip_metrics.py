"""CLIP edit metrics as Instruct-NeRF2NeRF reports them, on renders of an original and an edited scene.

For frames ``o_i`` (original scene) and ``e_i`` (edited scene, same camera), image embeddings
``I(.)`` and captions ``c_o`` (of the original) and ``c_e`` (of the edit), text embeddings ``T(.)``:

- text-image direction similarity: mean_i cos(I(e_i) - I(o_i), T(c_e) - T(c_o));
- direction consistency: mean_i cos(I(e_i) - I(o_i), I(e_{i+1}) - I(o_{i+1})) along the path;
- image-text similarity: mean_i cos(I(e_i), T(c_e)).
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

DEFAULT_CLIP = "openai/clip-vit-large-patch14"


def direction_similarity(original_images: Tensor, edited_images: Tensor, original_text: Tensor, edited_text: Tensor) -> Tensor:
    """Per-frame cosine between the image change and the caption change ([N, D] images, [D] texts)."""
    return F.cosine_similarity(edited_images - original_images, (edited_text - original_text)[None], dim=-1)


def direction_consistency(original_images: Tensor, edited_images: Tensor) -> Tensor:
    """Per consecutive pair of frames, cosine between their image changes ([N, D] -> [N-1])."""
    change = edited_images - original_images
    return F.cosine_similarity(change[:-1], change[1:], dim=-1)


def image_text_similarity(edited_images: Tensor, edited_text: Tensor) -> Tensor:
    """Per-frame cosine between the edited frame and the edited caption."""
    return F.cosine_similarity(edited_images, edited_text[None], dim=-1)


def clip_metrics(original_images: Tensor, edited_images: Tensor, original_text: Tensor, edited_text: Tensor) -> Dict[str, float]:
    """The three metrics (means over frames) from embeddings."""
    if original_images.shape != edited_images.shape or original_images.shape[0] < 2:
        raise ValueError(
            f"need the same number (>= 2) of original and edited frames, got {original_images.shape[0]} and {edited_images.shape[0]}"
        )
    return {
        "clip_direction_similarity": direction_similarity(original_images, edited_images, original_text, edited_text).mean().item(),
        "clip_direction_consistency": direction_consistency(original_images, edited_images).mean().item(),
        "clip_image_text_similarity": image_text_similarity(edited_images, edited_text).mean().item(),
        "frames": float(original_images.shape[0]),
    }


def _projected(features) -> Tensor:
    """CLIP's projected embeddings: transformers 4 returns them, transformers 5 wraps them as ``pooler_output``."""
    return (features if isinstance(features, Tensor) else features.pooler_output).float()


class ClipEmbedder:
    """A CLIP model and processor (hub id or local folder) that embed images and captions."""

    def __init__(self, model: str = DEFAULT_CLIP, device: str = "cpu") -> None:
        from transformers import CLIPModel, CLIPProcessor

        source = Path(model).expanduser()
        local = source.exists()
        try:
            self.model = CLIPModel.from_pretrained(str(source) if local else model, local_files_only=local).to(device).eval()
            self.processor = CLIPProcessor.from_pretrained(str(source) if local else model, local_files_only=local)
        except (OSError, ValueError) as error:
            raise RuntimeError(
                f"Could not load CLIP {model!r} ({str(error).splitlines()[0][:200]}). Download it where there is network "
                f"(`huggingface-cli download {DEFAULT_CLIP} --local-dir DIR`) and pass --clip-model DIR."
            ) from None
        self.device = device

    @torch.no_grad()
    def images(self, images: Sequence) -> Tensor:
        """Embeddings [N, D] of PIL images."""
        inputs = self.processor(images=list(images), return_tensors="pt").to(self.device)
        return _projected(self.model.get_image_features(**inputs))

    @torch.no_grad()
    def texts(self, texts: List[str]) -> Tensor:
        """Embeddings [N, D] of captions."""
        inputs = self.processor(text=texts, return_tensors="pt", padding=True).to(self.device)
        return _projected(self.model.get_text_features(**inputs))
