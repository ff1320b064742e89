"""Full-image datamanager with the two image sets Instruct-GS2GS needs.

``original_images`` are the photos as captured (undistorted), never modified: IP2P conditions on
them. The working set is nerfstudio's own image cache (``cached_train``), which the loss reads;
sweeps ``replace`` its images with edits. Edits are quantised to 8 bits on the way in, so what
the loss sees is exactly what the edit store writes to disk.

Photos with an alpha channel (objects cut out of their background) are shown to IP2P over
``background``, the colour the sweep renders are drawn over, and keep their transparency: an
edit is swapped in as straight RGBA with the photo's alpha, so that splatfacto's loss, which
composites the target over its random training background, still learns a transparent
background (the edit's changes outside the photo's silhouette are dropped).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Dict, List, Literal, Optional, Sequence, Tuple, Type

import torch
from torch import Tensor

from nerfstudio.cameras.cameras import Cameras
from nerfstudio.configs.dataparser_configs import AnnotatedDataParserUnion, all_dataparsers
from nerfstudio.data.datamanagers.full_images_datamanager import FullImageDatamanager, FullImageDatamanagerConfig
from nerfstudio.data.dataparsers.nerfstudio_dataparser import NerfstudioDataParserConfig


def unreadable_data(data, dataparser, error: BaseException) -> str:
    """The lead of the refusal of --data that ``dataparser`` (a dataparser config) failed to read."""
    return f"--data {data} could not be read with {type(dataparser).__name__} ({type(error).__name__}: {error})"


def without_point_cloud(dataparser):
    """``dataparser`` (a dataparser config) told not to read the scene's point cloud, where it has that setting: an
    edit's Gaussians come from its checkpoint, and the cloud costs seconds to read (nerfstudio-data's reader imports
    open3d: 2.8 s on a 2-core CPU; COLMAP's points3D.bin is parsed point by point)."""
    if getattr(dataparser, "load_3D_points", False):
        dataparser.load_3D_points = False
    return dataparser


IP2P_TRAINED_SIDE = 512
"""The image side InstructPix2Pix (and Stable Diffusion 1.5 under it) was trained at."""
LARGE_VIEW_SIDE = 768
"""Views with a longer side than this get ``large_view_advice``."""


def large_view_advice(sizes: Sequence[Tuple[int, int]], dataparser: Any, applied_factor: Optional[int] = None) -> Optional[str]:
    """What to do about views (``sizes``: (height, width) each) much larger than the 512 px InstructPix2Pix was trained
    at, or None. It edits each view at its size: slower (at least in proportion to the pixels) and usually worse;
    Instruct-NeRF2NeRF's authors advise scenes near 512 px on their longest side. ``dataparser`` (its config) names
    the subcommand and says whether it downscales; ``applied_factor`` is the factor it read the views at, if known."""
    height, width = max(sizes, key=lambda size: size[0] * size[1])
    side = max(height, width)
    if side <= LARGE_VIEW_SIDE:
        return None
    pixels = height * width / IP2P_TRAINED_SIDE**2
    advice = (
        f"the training views are up to {width}x{height}: InstructPix2Pix edits them at that size, {pixels:.1f}x the pixels "
        f"of the {IP2P_TRAINED_SIDE}x{IP2P_TRAINED_SIDE} it was trained at, so each edit takes at least {pixels:.1f}x as "
        "long and usually comes out worse"
    )
    if not hasattr(dataparser, "downscale_factor"):
        return advice + f"; scenes near {IP2P_TRAINED_SIDE} px on their longest side edit best"
    factor = min((2, 4, 8), key=lambda k: abs(math.log(side / k / IP2P_TRAINED_SIDE)))  # ns-process-data's images_2/4/8
    names = [name for name, config in all_dataparsers.items() if type(config) is type(dataparser)]
    total = f"{factor * applied_factor}" if applied_factor else f"{factor} times the one used now"
    return advice + (
        f". Scenes near {IP2P_TRAINED_SIDE} px on their longest side edit best: train the scene on views {factor}x smaller "
        f"and edit it so, with `{names[0] if names else 'DATAPARSER'} --downscale-factor {total}` at the end of both "
        "`ns-train splatfacto` and `ns-train igs2gs`"
    )


def applied_downscale_factor(dataparser: Any) -> Optional[int]:
    """The factor a set-up dataparser read its images at, where it says (nerfstudio-data's own choice when its
    config leaves it to it), else its config's."""
    factor = getattr(dataparser, "downscale_factor", None) or getattr(getattr(dataparser, "config", None), "downscale_factor", None)
    return int(factor) if factor else None


def to_uint8(images: Tensor) -> Tensor:
    """Float images in [0, 1] to uint8 (round to nearest)."""
    return (images.clamp(0, 1) * 255).round().to(torch.uint8)


def to_float(images: Tensor) -> Tensor:
    """Cached images (uint8, or float as ``cache_images_type float32`` keeps them) as float in [0, 1]."""
    return images.float() / 255.0 if images.dtype == torch.uint8 else images.float()


class ViewCamera(Cameras):
    """One training view's camera, made once and handed out (shallow-copied) every time the view is drawn.

    Per step, splatfacto rescales the camera by 1/1 and back, rebuilds the intrinsics on the CPU
    from device tensors and reads the image size with ``.item()``: nine host-device syncs and ~1 ms
    of host time for nothing at full resolution. Here the size stays on the CPU, the intrinsics are
    built once on the device, and a rescale by 1 is skipped (by another factor, the copy is rescaled
    as nerfstudio does; the cached camera is never changed).
    """

    _intrinsics: Optional[Tensor] = None

    @classmethod
    def of(cls, camera: Cameras, device: torch.device) -> "ViewCamera":
        view = camera.to(device)  # a new object
        view.__class__ = cls
        view.width, view.height = camera.width.cpu(), camera.height.cpu()
        view._intrinsics = Cameras.get_intrinsics_matrices(view).to(device)
        return view

    def rescale_output_resolution(self, scaling_factor, scale_rounding_mode: str = "floor") -> None:
        if isinstance(scaling_factor, (int, float)) and scaling_factor == 1:
            return
        self.width, self.height = self.width.to(self.device), self.height.to(self.device)
        self._intrinsics = None
        super().rescale_output_resolution(scaling_factor, scale_rounding_mode)

    def get_intrinsics_matrices(self) -> Tensor:
        return self._intrinsics if self._intrinsics is not None else super().get_intrinsics_matrices()


@dataclass
class IGS2GSDataManagerConfig(FullImageDatamanagerConfig):
    """Full images, with the original photos kept beside the edited working set."""

    _target: Type = field(default_factory=lambda: IGS2GSDataManager)
    dataparser: AnnotatedDataParserUnion = field(default_factory=lambda: NerfstudioDataParserConfig(load_3D_points=True))
    """How --data is read: nerfstudio-data by default; any nerfstudio dataparser as a subcommand at the end of the
    command (e.g. ``colmap``), the one the scene was trained with."""
    cache_images_type: Literal["uint8", "float32"] = "uint8"
    """Image type of the caches (uint8 holds four times as many views in the same memory)."""


class IGS2GSDataManager(FullImageDatamanager):
    """``FullImageDatamanager`` whose training images can be swapped for edits."""

    config: IGS2GSDataManagerConfig
    background: Tensor = torch.tensor([0.1490, 0.1647, 0.2157])
    """What transparent photo pixels show to IP2P: the colour the sweep renders are drawn over. The
    pipeline sets the model's; this default is splatfacto's eval background for ``background_color random``."""

    def _load_images(self, split: Literal["train", "eval"], cache_images_device: Literal["cpu", "gpu"]):
        # nerfstudio pins CPU caches, which needs a CUDA driver; without one the images stay
        # where they are, which is the training device (the CPU) anyway.
        if cache_images_device == "cpu" and not torch.cuda.is_available():
            cache_images_device = "gpu"
        return super()._load_images(split, cache_images_device)

    def next_train(self, step: int) -> Tuple[Cameras, Dict]:
        """nerfstudio's next training view and image, with the view's camera from a per-view cache."""
        view = self.train_unseen_cameras.pop(0)
        if not self.train_unseen_cameras:
            self.train_unseen_cameras = self.sample_train_cameras()
        data = dict(self.cached_train[view])  # a copy: the cache entry must not change
        data["image"] = data["image"].to(self.device)
        data["image_generation"] = self.image_generations[view]  # the loss keeps what it derives from one image
        return copy.copy(self._view_cameras[view]), data

    @cached_property
    def _view_cameras(self) -> List[ViewCamera]:
        cameras = []
        for view in range(len(self.train_cameras)):
            camera = ViewCamera.of(self.train_cameras[view : view + 1], torch.device(self.device))
            camera.metadata = {**(camera.metadata or {}), "cam_idx": view}
            cameras.append(camera)
        return cameras

    def view_size_advice(self, views: Optional[Sequence[int]] = None) -> Optional[str]:
        """``large_view_advice`` for these training views (default: all), read as this datamanager's dataparser read them."""
        photos = self.original_images
        sizes = [(int(photos[view].shape[0]), int(photos[view].shape[1])) for view in (range(len(photos)) if views is None else views)]
        return large_view_advice(sizes, self.config.dataparser, applied_downscale_factor(self.dataparser))

    @cached_property
    def original_images(self) -> List[Tensor]:
        """The undistorted training photos [H, W, 3 or 4 (alpha)], as cached before any edit."""
        return [entry["image"].clone() for entry in self.cached_train]

    @cached_property
    def image_generations(self) -> List[int]:
        """Per training view, how many times its image was replaced (0: the photo)."""
        return [0] * len(self.cached_train)

    @property
    def image_names(self) -> List[str]:
        """Training image file names, in view-id order (checked when edits are restored)."""
        return [path.name for path in self.train_dataparser_outputs.image_filenames]

    def originals(self, view_ids: Sequence[int], device: torch.device) -> Tensor:
        """Original photos of ``view_ids`` as float [B, 3, H, W] in [0, 1] on ``device``, over ``background``."""
        photos = [self.over_background(self.original_images[i]) for i in view_ids]
        return torch.stack(photos).permute(0, 3, 1, 2).to(device)

    def over_background(self, image: Tensor) -> Tensor:
        """A cached image [H, W, 3 or 4] as float RGB [H, W, 3], composited over ``background`` if it has alpha."""
        image = to_float(image)
        if image.shape[-1] != 4:
            return image
        alpha = image[..., 3:]
        return image[..., :3] * alpha + self.background.to(image.device) * (1 - alpha)

    def working_image(self, view_id: int) -> Tensor:
        """The image the loss currently uses for ``view_id`` [H, W, 3 or 4], as cached."""
        return self.cached_train[view_id]["image"]

    def replace(self, view_ids: Sequence[int], images: Tensor) -> Tensor:
        """Swap edits (float [B, 3, H, W] in [0, 1], drawn over ``background``) into the working set; returns them
        as uint8 [B, H, W, 3], the form the edit store writes and ``replace_uint8`` takes back."""
        if images.dim() != 4 or images.shape[0] != len(view_ids) or images.shape[1] != 3:
            raise ValueError(f"expected {len(view_ids)} images of shape [3, H, W], got {tuple(images.shape)}")
        quantised = to_uint8(images.permute(0, 2, 3, 1))
        self.replace_uint8(dict(zip(view_ids, quantised)))
        return quantised

    def replace_uint8(self, edits: Dict[int, Tensor]) -> None:
        """Swap uint8 [H, W, 3] edits into the working set (also used to restore persisted edits)."""
        photos = self.original_images  # kept before the first edit replaces one (a resume restores edits first)
        for view_id, edit in edits.items():
            entry = self.cached_train[view_id]
            current = entry["image"]
            if tuple(edit.shape) != (current.shape[0], current.shape[1], 3):
                raise ValueError(
                    f"edit for view {view_id} has shape {tuple(edit.shape)}, the view is {tuple(current.shape[:2])}"
                )
            if photos[view_id].shape[-1] == 4:
                edit = self._with_photo_alpha(edit, photos[view_id])
            image = edit if current.dtype == torch.uint8 else edit.float() / 255.0
            entry["image"] = image.to(current.device, current.dtype)
            self.image_generations[view_id] += 1

    def _with_photo_alpha(self, edit: Tensor, photo: Tensor) -> Tensor:
        """A uint8 edit drawn over ``background`` as uint8 straight RGBA with the photo's alpha: composited over
        ``background`` it is the edit again; over another colour, that colour shows where the photo is clear."""
        alpha = to_float(photo[..., 3:]).to(edit.device)
        drawn = edit.float() / 255.0
        behind = (1 - alpha) * self.background.to(edit.device)
        colour = torch.where(alpha > 0, (drawn - behind) / alpha.clamp(min=1e-6), drawn)
        return torch.cat([to_uint8(colour), to_uint8(alpha)], dim=-1)


class CachedPhotos:
    """The training photos as nerfstudio's ``Viewer.init_scene`` reads a dataset (its length, its cameras, each
    item's float image [H, W, C]), from the datamanager's cache. The dataset itself decodes every photo from disk
    again for the camera thumbnails, before the first training step (thumbnails of 90 512x512 PNGs on a 2-core CPU:
    0.37 s from the dataset, 0.05 s from the cache; of 73 JPEGs 0.17-0.19 s and 0.07-0.12 s; more for larger photos)."""

    def __init__(self, datamanager: IGS2GSDataManager) -> None:
        self.cameras = datamanager.train_dataset.cameras
        self._photos = datamanager.original_images

    def __len__(self) -> int:
        return len(self._photos)

    def __getitem__(self, view: int) -> Dict[str, Tensor]:
        return {"image": to_float(self._photos[view])}
