"""Splatfacto trained on edited images: L1 + LPIPS loss, and a CPU path for tests and tiny scenes.

Three things in nerfstudio 1.1.5's splatfacto stop it from running without a GPU or a network:
the SH initialisation from seed points and ``get_outputs`` call ``.cuda()``, and
``populate_modules`` builds torchmetrics' LPIPS, which downloads AlexNet. This subclass avoids
all three without forking the model: the eval LPIPS is built on first use, and on CPU the splats
are drawn by :mod:`igs2gs.rasterize_torch`.
"""

from __future__ import annotations

import contextlib
import io
import socket
import sys
import types
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Literal, Optional, Sequence, Tuple, Type, Union

import numpy as np
import torch
from torch import Tensor, nn

from igs2gs.graphed_loss import GraphedLoss
from nerfstudio.cameras.cameras import Cameras
from nerfstudio.models.splatfacto import RGB2SH, SplatfactoModel, SplatfactoModelConfig
from nerfstudio.utils.misc import step_check


class LPIPSUnavailableError(RuntimeError):
    """LPIPS's backbone weights are neither cached nor downloadable; the message says what to do."""


def build_lpips(net: Literal["alex", "vgg"], pretrained_backbone: bool) -> nn.Module:
    """The ``lpips`` package's LPIPS, frozen. Its linear heads ship with the package; the
    torchvision backbone is downloaded once into the torch hub cache (or random, if asked)."""
    import lpips

    previous_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(30)  # an unreachable download must fail, not hang
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # lpips prints its set-up
            model = lpips.LPIPS(net=net, pnet_rand=not pretrained_backbone, verbose=False)
    except Exception as error:  # urllib, SSL and socket errors all mean "could not fetch the backbone"
        import torchvision

        weights = {"alex": torchvision.models.AlexNet_Weights, "vgg": torchvision.models.VGG16_Weights}[net]
        url = weights.IMAGENET1K_V1.url
        cache = torch.hub.get_dir() + "/checkpoints/" + url.rsplit("/", 1)[-1]
        raise LPIPSUnavailableError(
            f"LPIPS ({net}) needs torchvision's pretrained backbone {url.rsplit('/', 1)[-1]}, which is not at {cache} "
            f"and could not be downloaded ({type(error).__name__}: {str(error)[:120]}). Copy {url} to {cache} "
            "(or set TORCH_HOME to a folder that has it), or pass --pipeline.model.lpips-pretrained-backbone False "
            "to use an untrained backbone."
        ) from None
    finally:
        socket.setdefaulttimeout(previous_timeout)
    assert model.version == "0.1" and model.lpips and not model.spatial  # what lpips_features/lpips_from_features split
    return model.eval().requires_grad_(False)


def tensor_bytes(tensors: Sequence[Tensor]) -> int:
    """The memory the tensors' elements take."""
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors)


def lpips_features(network: nn.Module, images: Tensor) -> List[Tensor]:
    """The unit-normalised backbone features LPIPS compares, of [B,3,H,W] images in [0,1]: the first half of
    ``lpips.LPIPS.forward(..., normalize=True)``, so that a training view's can be computed once per image."""
    import lpips

    return [lpips.normalize_tensor(output) for output in network.net(network.scaling_layer(2 * images - 1))]


def lpips_from_features(network: nn.Module, features: Sequence[Tensor], target_features: Sequence[Tensor]) -> Tensor:
    """The second half of ``lpips.LPIPS.forward``: the [B,1,1,1] LPIPS of two images from their :func:`lpips_features`."""
    import lpips

    layers = zip(network.lins, features, target_features)
    return sum(lpips.spatial_average(lin((ours - theirs) ** 2), keepdim=True) for lin, ours, theirs in layers)


class DeferredLPIPSMetric(nn.Module):
    """Stands in for torchmetrics' LPIPS metric in splatfacto: same call, [1,3,H,W] in [0,1], but
    the network is built only when an eval image is first scored, so loading a model for the
    viewer, ``ns-render`` or ``ns-export`` never downloads anything."""

    def __init__(self, net: Literal["alex", "vgg"], pretrained_backbone: bool) -> None:
        super().__init__()
        self.net_name, self.pretrained_backbone = net, pretrained_backbone
        self._network: Optional[nn.Module] = None

    def network(self, device: torch.device) -> nn.Module:
        """The LPIPS network, built on first use (also serves the model's LPIPS loss)."""
        if self._network is None:
            # A fixed network: set past nn.Module registration so it stays out of checkpoints.
            object.__setattr__(self, "_network", build_lpips(self.net_name, self.pretrained_backbone).to(device))
        assert self._network is not None
        return self._network

    def forward(self, images: Tensor, targets: Tensor) -> Tensor:
        return self.network(images.device)(images, targets, normalize=True).mean()


def view_matrix(camera_to_world: Tensor) -> Tensor:
    """gsplat's world-to-camera matrices [B, 4, 4] of nerfstudio camera-to-world poses [B, 3, 4].

    The analytic inverse of splatfacto's ``get_viewmat``, without its per-call ``torch.tensor`` of
    the axis flip: on CUDA that is a copy from pageable host memory, which waits for the GPU, in
    every training step. Differentiable (the camera optimizer's corrections train through it).
    """
    rotation = camera_to_world[:, :3, :3]
    # nerfstudio cameras look down -z with y up; gsplat's look down +z with y down.
    rotation = torch.cat([rotation[..., :1], -rotation[..., 1:]], dim=-1)
    inverse_rotation = rotation.transpose(1, 2)
    viewmat = torch.zeros(rotation.shape[0], 4, 4, device=rotation.device, dtype=rotation.dtype)
    viewmat[:, 3, 3] = 1.0
    viewmat[:, :3, :3] = inverse_rotation
    viewmat[:, :3, 3:4] = -torch.bmm(inverse_rotation, camera_to_world[:, :3, 3:4])
    return viewmat


def use_view_matrix() -> None:
    """Make splatfacto compute its view matrices with :func:`view_matrix`, in this process.

    nerfstudio's ``get_viewmat`` is wrapped in ``torch.compile``, so the first render of every
    process traced and compiled it (1.3 s of the first sweep on an H100, and it starts inductor's
    compile workers), and uncompiled it copies a constant from the host each call. Same matrices.
    """
    from nerfstudio.models import splatfacto

    splatfacto.get_viewmat = view_matrix


class TorchWithUncheckedInverse(types.ModuleType):
    """``torch``, except that ``inverse`` is ``linalg.inv_ex`` without its error check.

    gsplat's ``rasterization`` finds the camera centres for the SH view directions with ``torch.inverse``, whose
    CUDA error check copies a flag to the host: the host waits for the GPU there in every training step. A view
    matrix is a rigid transform, always invertible, so the check finds nothing; without it the host goes on queueing
    the step's kernels. Same values (the same kernel computes both).
    """

    def __getattr__(self, name: str):
        value = getattr(torch, name)
        setattr(self, name, value)  # found in the instance from now on, without this call
        return value

    @staticmethod
    def inverse(matrices: Tensor) -> Tensor:
        return torch.linalg.inv_ex(matrices).inverse


def use_unchecked_inverse_in_gsplat(enabled: bool) -> None:
    """Give gsplat's rendering module :class:`TorchWithUncheckedInverse` in place of ``torch`` (or, not ``enabled``,
    torch itself back), in this process."""
    import gsplat.rendering

    gsplat.rendering.torch = TorchWithUncheckedInverse("torch") if enabled else torch


class BatchPSNR(nn.Module):
    """PSNR of one call's images (data range 1), as torchmetrics' PSNR returns per call, without
    its accumulated state: splatfacto logs the training PSNR every step, and the metric's state
    bookkeeping cost ~1 ms of host time per step (~7 s of a 7500-step edit)."""

    def forward(self, preds: Tensor, target: Tensor) -> Tensor:
        return -10 * torch.log10(torch.mean((preds.float() - target.float()) ** 2))


@contextlib.contextmanager
def torchmetrics_standing_in(psnr: nn.Module, lpips: nn.Module) -> Iterator[None]:
    """splatfacto's ``populate_modules`` imports torchmetrics for its PSNR and LPIPS metrics and builds them; here
    it gets these instead, and torchmetrics is not imported: its package imports every metric it has (text, audio,
    transformers' BERT, scipy.signal, torchvision's datasets: 2.5 s on a 2-core CPU) and its LPIPS downloads AlexNet.
    Only the two modules splatfacto imports are stood in for, and only meanwhile (set-up imports nothing else of
    torchmetrics in other threads); not ``mock.patch.dict(sys.modules)``, whose exit would also drop every module
    imported meanwhile."""
    image, lpip = types.ModuleType("torchmetrics.image"), types.ModuleType("torchmetrics.image.lpip")
    image.PeakSignalNoiseRatio = lambda **_: psnr  # type: ignore[attr-defined]
    lpip.LearnedPerceptualImagePatchSimilarity = lambda **_: lpips  # type: ignore[attr-defined]
    stand_ins = {image.__name__: image, lpip.__name__: lpip}
    saved = {name: sys.modules.get(name) for name in stand_ins}
    sys.modules.update(stand_ins)
    try:
        yield
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


NEIGHBOURS_BY_TORCH_UP_TO = 4096
"""Points up to which the model's neighbour search runs in torch (a 4096 x 4096 distance matrix: 134 MB in float64)."""


@dataclass
class IGS2GSModelConfig(SplatfactoModelConfig):
    """Splatfacto as Instruct-GS2GS trains it on edited views."""

    _target: Type = field(default_factory=lambda: IGS2GSModel)
    l1_loss_mult: float = 1.0
    """Weight of the L1 photometric loss against the current (edited) training image."""
    lpips_loss_mult: float = 1.0
    """Weight of the LPIPS perceptual loss against the current (edited) training image."""
    lpips_net: Literal["alex", "vgg"] = "alex"
    """Backbone of the LPIPS loss."""
    lpips_bf16: bool = True
    """On CUDA, evaluate the LPIPS loss under bfloat16 autocast (19.8 -> 17.2 ms per step on a 470k-splat 512px scene; the L1 term stays float32)."""
    lpips_cuda_graph: bool = True
    """On CUDA, replay the LPIPS loss and its gradient from a CUDA graph per image size: its ~100 small kernels are launch-bound (stone_horse, 467k splats, 512px: 88.5 vs 53.1 steps/s)."""
    lpips_target_cache_mb: int = 1024
    """Keep each training view's LPIPS target features until its image is replaced, instead of computing them in every step (AlexNet under bf16 autocast: 10.6 MB per 512² view, float32 after LPIPS's normalisation); views past this many MB are computed per step. 0: none kept."""
    lpips_pretrained_backbone: bool = True
    """Use torchvision's ImageNet weights for the LPIPS backbone (downloaded once). False: untrained backbone (offline tests)."""
    rasterizer: Literal["auto", "gsplat", "torch"] = "auto"
    """Rasterizer: gsplat's CUDA kernels, the dense pure-torch one (CPU, tiny scenes only), or auto by device."""
    densify_from_load: bool = False
    """Densify and prune during the edit, counting splatfacto's schedule (warmup, stop-split) from the loaded step. Off by default: on noisy edits it can triple the splat count (stone_horse: 0.47M to 1.24M). Turn on for edits that change shape."""
    prompt: Optional[str] = None
    """Alias of --pipeline.prompt; ns-train's top-level --prompt sets this."""
    stop_split_at: int = 5000
    """Stop densifying this many steps after the edit started (with densify-from-load)."""
    num_downscales: int = 0
    """Train at 1/2^d resolution at first; an edit starts from a trained scene, so at full resolution."""
    reset_alpha_every: int = 1000
    """Reset opacities every this many refinements; the default never resets during an edit, which would blank the scene."""
    gsplat_unchecked_inverse: bool = True
    """Give gsplat's rasterization torch's inverse without its error check for the camera centres (same values): the check makes the host wait for the GPU once per step (stone_horse, 2026-12-05: median step 4.44-4.48 vs 4.60-4.63 ms). False: gsplat's checked inverse."""
    seed_points_used: Optional[int] = 16
    """Points the model is built from before the loaded checkpoint's Gaussians replace them. An edit's Gaussians come from the checkpoint, so a few suffice: the scene's point cloud is then not read (nerfstudio-data's reader imports open3d: ~3 s) and splatfacto starts from this many random points (or cloud points, where a dataparser still gives some); None: every point of the cloud (a reconstruction)."""


class IGS2GSModel(SplatfactoModel):
    """Splatfacto with the Instruct-GS2GS loss and a rasterizer that also runs on CPU."""

    config: IGS2GSModelConfig

    def populate_modules(self) -> None:
        placeholders = self.config.seed_points_used
        if self.seed_points is not None and placeholders is not None:
            self.seed_points = tuple(values[:placeholders] for values in self.seed_points)
        seed_colours = None
        if self.seed_points is not None and not torch.cuda.is_available():
            # splatfacto builds the SH from seed colours with .cuda(); give it none and set them below.
            points, seed_colours = self.seed_points
            self.seed_points = (points, seed_colours[:0])
        deferred = DeferredLPIPSMetric(self.config.lpips_net, self.config.lpips_pretrained_backbone)
        num_random = self.config.num_random  # splatfacto's random start, without seed points: placeholders too
        if placeholders is not None:
            self.config.num_random = min(num_random, placeholders)
        try:
            with torchmetrics_standing_in(psnr=BatchPSNR(), lpips=deferred):
                super().populate_modules()
        finally:
            self.config.num_random = num_random
        if seed_colours is not None and len(seed_colours) and not self.config.random_init:
            colours = seed_colours.float() / 255
            features = RGB2SH(colours) if self.config.sh_degree > 0 else torch.logit(colours, eps=1e-10)
            self.gauss_params["features_dc"].data.copy_(features)
        use_view_matrix()
        use_unchecked_inverse_in_gsplat(self.config.gsplat_unchecked_inverse)
        self.refine_origin: Optional[int] = 0  # step splatfacto's densification schedule counts from; None: no densification
        self._graphed_lpips: Optional[GraphedLoss] = None  # built on the first CUDA training step
        self._graphed_lpips_of_kept: Optional[GraphedLoss] = None  # the same against kept target features
        self._lpips_targets: Dict[int, Tuple[Tuple, List[Tensor]]] = {}  # view -> (image generation and size, features)
        self._lpips_view_bytes = 0  # the largest view's features: a view not kept yet is computed only if it fits
        # The trainer writes training metrics every steps_per_log steps only and sets this to match (IGS2GSTrainer).
        self.training_metrics_every = 1

    def k_nearest_sklearn(self, x: Tensor, k: int) -> Tuple[np.ndarray, np.ndarray]:
        """splatfacto's search for each point's ``k`` nearest others (distances and indices, float32), by torch for
        up to ``NEIGHBOURS_BY_TORCH_UP_TO`` points: an edit's model starts from a few, and importing scikit-learn
        alone takes ~2 s."""
        if len(x) > NEIGHBOURS_BY_TORCH_UP_TO:
            return super().k_nearest_sklearn(x, k)
        points = x.detach().cpu().double()
        distances, indices = torch.cdist(points, points).topk(k + 1, largest=False)
        return distances[:, 1:].numpy().astype(np.float32), indices[:, 1:].numpy().astype(np.float32)

    # ----------------------------------------------------------------------------- schedule
    def start_edit_at(self, step: int) -> None:
        """Make densification count from ``step`` (the loaded step) with ``densify_from_load``; without it, the edit
        neither densifies, prunes nor resets opacities, whatever step the scene was loaded at."""
        self.refine_origin = step if self.config.densify_from_load else None

    def step_post_backward(self, step: int) -> None:
        assert step == self.step
        if self.refine_origin is None:
            return
        self.strategy.step_post_backward(
            params=self.gauss_params,
            optimizers=self.optimizers,
            state=self.strategy_state,
            step=self.step - self.refine_origin,
            info=self.info,
            packed=False,
        )

    # ----------------------------------------------------------------------------- rendering
    def _use_torch_rasterizer(self) -> bool:
        if self.config.rasterizer == "auto":
            return self.device.type != "cuda"
        return self.config.rasterizer == "torch"

    def get_outputs(self, camera: Cameras) -> Dict[str, Union[Tensor, list]]:
        if not self._use_torch_rasterizer():
            return super().get_outputs(camera)
        return self._get_outputs_torch(camera)

    def _get_outputs_torch(self, camera: Cameras) -> Dict[str, Union[Tensor, list]]:
        """``SplatfactoModel.get_outputs`` with the pure-torch rasterizer and no ``.cuda()``."""
        from igs2gs.rasterize_torch import rasterize

        if self.training:
            assert camera.shape[0] == 1, "Only one camera at a time"
            camera_to_world = self.camera_optimizer.apply_to_camera(camera)
        else:
            camera_to_world = camera.camera_to_worlds
        keep = None
        if self.crop_box is not None and not self.training:
            keep = self.crop_box.within(self.means).squeeze()
            if keep.sum() == 0:
                return self.get_empty_outputs(int(camera.width.item()), int(camera.height.item()), self.background_color)
        params = {name: (value[keep] if keep is not None else value) for name, value in self.gauss_params.items()}

        scale = self._get_downscale_factor()
        camera.rescale_output_resolution(1 / scale)
        K = camera.get_intrinsics_matrices().to(self.device)
        width, height = int(camera.width.item()), int(camera.height.item())
        camera.rescale_output_resolution(scale)
        self.last_size = (height, width)
        viewmat = view_matrix(camera_to_world.to(self.device))

        colours = torch.cat((params["features_dc"][:, None, :], params["features_rest"]), dim=1)
        if self.config.sh_degree > 0:
            sh_degree: Optional[int] = min(self.step // self.config.sh_degree_interval, self.config.sh_degree)
        else:
            colours, sh_degree = torch.sigmoid(colours).squeeze(1), None
        render_depth = self.config.output_depth_during_training or not self.training
        render, alpha, self.info = rasterize(
            params["means"],
            params["quats"],
            torch.exp(params["scales"]),
            torch.sigmoid(params["opacities"]).squeeze(-1),
            colours,
            viewmat,
            K,
            width,
            height,
            sh_degree,
            render_depth=render_depth,
            antialiased=self.config.rasterize_mode == "antialiased",
        )
        if self.training:
            self.strategy.step_pre_backward(self.gauss_params, self.optimizers, self.strategy_state, self.step, self.info)
        background = self._get_background_color()
        rgb = torch.clamp(render[..., :3] + (1 - alpha) * background, 0.0, 1.0)
        depth = None
        if render_depth:
            depth = torch.where(alpha > 0, render[..., 3:4], render[..., 3:4].detach().max()).squeeze(0)
        if not self.training:
            background = background.expand(height, width, 3)
        return {"rgb": rgb.squeeze(0), "depth": depth, "accumulation": alpha.squeeze(0), "background": background}

    # ----------------------------------------------------------------------------- loss
    def get_metrics_dict(self, outputs, batch) -> Dict[str, Tensor]:
        """Splatfacto's metrics, in training only on the steps the trainer logs: nothing else reads them, and the PSNR
        costs ~0.2 ms of host time per step on a host-bound training loop."""
        if self.training and not step_check(self.step, self.training_metrics_every, run_at_zero=True):
            return {}
        return super().get_metrics_dict(outputs, batch)

    def _lpips_autocast(self, device: torch.device) -> torch.autocast:
        half = self.config.lpips_bf16 and device.type == "cuda"
        # cache_enabled=False: autocast's weight-cast cache must not outlive a CUDA graph capture.
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=half, cache_enabled=False)

    def _lpips_eager(self, prediction: Tensor, target: Tensor) -> Tensor:
        with self._lpips_autocast(prediction.device):
            return self.lpips.network(prediction.device)(prediction, target, normalize=True).mean().float()

    def _lpips_of_kept_eager(self, prediction: Tensor, *target_features: Tensor) -> Tensor:
        network = self.lpips.network(prediction.device)
        with self._lpips_autocast(prediction.device):
            return lpips_from_features(network, lpips_features(network, prediction), target_features).mean().float()

    def lpips_loss(self, prediction: Tensor, target: Tensor, target_features: Optional[Sequence[Tensor]] = None) -> Tensor:
        """Mean LPIPS of [1,3,H,W] images in [0,1] (or against the target's ``target_features``, from
        :meth:`kept_lpips_target`), from a CUDA graph where configured."""
        graphed = self.config.lpips_cuda_graph and prediction.device.type == "cuda"
        if target_features is not None:
            if not graphed:
                return self._lpips_of_kept_eager(prediction, *target_features)
            if self._graphed_lpips_of_kept is None:
                self._graphed_lpips_of_kept = GraphedLoss(self._lpips_of_kept_eager)
            return self._graphed_lpips_of_kept(prediction, *target_features)
        if not graphed:
            return self._lpips_eager(prediction, target)
        if self._graphed_lpips is None:
            self._graphed_lpips = GraphedLoss(self._lpips_eager)
        return self._graphed_lpips(prediction, target)

    def kept_lpips_target(self, batch: Dict, target: Tensor) -> Optional[List[Tensor]]:
        """The LPIPS features of a training view's ``target`` [1,3,H,W], computed once per image the datamanager
        gives the view (its ``image_generation``) and kept within ``lpips_target_cache_mb``; None where they are
        not kept: not training, an image with alpha (its target is drawn over a random background each step), or a
        batch without a generation."""
        generation, budget = batch.get("image_generation"), self.config.lpips_target_cache_mb * 2**20
        if generation is None or budget <= 0 or not self.training or batch["image"].shape[-1] != 3:
            return None
        view, key = int(batch["image_idx"]), (generation, tuple(target.shape))
        kept = self._lpips_targets.get(view)
        if kept is not None and kept[0] == key:
            return kept[1]
        self._lpips_targets.pop(view, None)  # features of the view's earlier image
        if kept is None and self.lpips_target_bytes + self._lpips_view_bytes > budget:
            return None  # full: this view's whole loss runs from its own graph
        network = self.lpips.network(target.device)
        with torch.no_grad(), self._lpips_autocast(target.device):
            features = lpips_features(network, target)
        self._lpips_view_bytes = max(self._lpips_view_bytes, tensor_bytes(features))
        if self.lpips_target_bytes + tensor_bytes(features) <= budget:
            self._lpips_targets[view] = (key, features)
        return features

    @property
    def lpips_target_bytes(self) -> int:
        """Memory the kept LPIPS target features take."""
        return sum(tensor_bytes(features) for _, features in self._lpips_targets.values())

    def get_loss_dict(self, outputs, batch, metrics_dict=None) -> Dict[str, Tensor]:
        """L1 + LPIPS against the current training image (an edit once the first sweep ran)."""
        target = self.composite_with_background(self.get_gt_img(batch["image"]), outputs["background"])
        prediction = outputs["rgb"]
        if "mask" in batch:
            mask = self._downscale_if_required(batch["mask"]).to(self.device)
            target, prediction = target * mask, prediction * mask
        loss_dict = {"main_loss": self.config.l1_loss_mult * torch.abs(target - prediction).mean()}
        if self.config.lpips_loss_mult > 0:
            as_batch = lambda image: image.permute(2, 0, 1)[None].clamp(0, 1)  # noqa: E731
            target = as_batch(target)
            lpips = self.lpips_loss(as_batch(prediction), target, self.kept_lpips_target(batch, target))
            loss_dict["lpips_loss"] = self.config.lpips_loss_mult * lpips
        if self.training:
            self.camera_optimizer.get_loss_dict(loss_dict)
        return loss_dict
