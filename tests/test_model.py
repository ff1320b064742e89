"""The splatfacto subclass: no network at construction, a clear LPIPS error, CPU rendering."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error

import pytest
import torch

from igs2gs.model import BatchPSNR, DeferredLPIPSMetric, LPIPSUnavailableError, build_lpips


def test_lpips_without_cached_backbone_offline_names_the_file_and_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(LPIPSUnavailableError) as error:
        build_lpips("alex", pretrained_backbone=True)
    message = str(error.value)
    assert "alexnet-owt-7be5be79.pth" in message and str(tmp_path / "empty-torch-home") in message
    assert "--pipeline.model.lpips-pretrained-backbone False" in message


def test_random_backbone_lpips_builds_offline_and_scores():
    network = build_lpips("alex", pretrained_backbone=False)
    a, b = torch.rand(1, 3, 48, 48), torch.rand(1, 3, 48, 48)
    assert network(a, a, normalize=True).item() == pytest.approx(0.0, abs=1e-6)
    assert network(a, b, normalize=True).item() > 0


def test_batch_psnr_returns_what_torchmetrics_returns_for_each_call():
    from torchmetrics.image import PeakSignalNoiseRatio

    reference, ours = PeakSignalNoiseRatio(data_range=1.0), BatchPSNR()
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):  # torchmetrics also accumulates; each call still returns that call's PSNR
        a, b = torch.rand(1, 3, 20, 30, generator=generator), torch.rand(1, 3, 20, 30, generator=generator) * 0.5
        assert ours(a, b).item() == pytest.approx(reference(a, b).item(), rel=1e-5)


def test_eval_metric_builds_its_network_only_when_first_used(monkeypatch):
    built = []
    monkeypatch.setattr("igs2gs.model.build_lpips", lambda *a: built.append(a) or build_lpips("alex", False))
    metric = DeferredLPIPSMetric("alex", pretrained_backbone=True)
    assert not built and not list(metric.state_dict())
    image = torch.rand(1, 3, 48, 48)
    assert metric(image, image).item() == pytest.approx(0.0, abs=1e-6)
    assert built == [("alex", True)]


def test_model_renders_and_trains_on_cpu(scene_dir):
    from nerfstudio.data.dataparsers.nerfstudio_dataparser import NerfstudioDataParserConfig

    from igs2gs.model import IGS2GSModelConfig

    outputs = NerfstudioDataParserConfig(data=scene_dir, load_3D_points=True).setup().get_dataparser_outputs("train")
    seeds = (outputs.metadata["points3D_xyz"], outputs.metadata["points3D_rgb"])
    model = IGS2GSModelConfig(lpips_pretrained_backbone=False, seed_points_used=None).setup(  # as a reconstruction
        scene_box=outputs.scene_box, num_train_data=len(outputs.image_filenames), seed_points=seeds
    )
    # Seed colours reach the SH DC term although splatfacto's own initialisation needs CUDA.
    assert torch.equal(model.means.detach(), seeds[0].float())
    assert torch.allclose(model.colors, seeds[1].float() / 255, atol=1e-5)
    camera = outputs.cameras[0:1]
    model.eval()
    rendered = model.get_outputs_for_camera(camera)
    assert rendered["rgb"].shape == (camera.height.item(), camera.width.item(), 3)
    assert rendered["depth"] is not None and rendered["accumulation"].max() > 0.5


def test_splatfacto_computes_its_view_matrices_with_igs2gs_view_matrix_once_the_model_is_built(scene_dir):
    from nerfstudio.data.dataparsers.nerfstudio_dataparser import NerfstudioDataParserConfig
    from nerfstudio.models import splatfacto

    from igs2gs.model import IGS2GSModelConfig, view_matrix

    outputs = NerfstudioDataParserConfig(data=scene_dir).setup().get_dataparser_outputs("train")
    IGS2GSModelConfig(lpips_pretrained_backbone=False).setup(scene_box=outputs.scene_box, num_train_data=len(outputs.image_filenames))
    assert splatfacto.get_viewmat is view_matrix  # no torch.compile at the first render, no constant copied per call
    camera_to_world = outputs.cameras.camera_to_worlds[:2].clone().requires_grad_(True)
    viewmat = splatfacto.get_viewmat(camera_to_world)
    flipped = camera_to_world * torch.tensor([1.0, -1.0, -1.0, 1.0])  # gsplat looks down +z with y down
    bottom = torch.tensor([[[0.0, 0.0, 0.0, 1.0]]]).expand(2, 1, 4)
    assert torch.allclose(viewmat @ torch.cat([flipped, bottom], dim=1), torch.eye(4).expand(2, 4, 4), atol=1e-5)
    inverse_rotation = flipped[:, :, :3].transpose(1, 2)  # the analytic inverse, as nerfstudio's get_viewmat
    expected = torch.cat([torch.cat([inverse_rotation, -inverse_rotation @ flipped[:, :, 3:]], dim=2), bottom], dim=1)
    assert torch.allclose(viewmat, expected, atol=1e-6)
    (gradient,) = torch.autograd.grad(viewmat.sum(), camera_to_world)  # pose corrections train through it
    (expected_gradient,) = torch.autograd.grad(expected.sum(), camera_to_world)
    assert torch.allclose(gradient, expected_gradient, atol=1e-4)


@pytest.mark.parametrize("unchecked", [True, False])
def test_the_model_gives_gsplat_the_inverse_its_config_asks_for(scene_dir, monkeypatch, unchecked):
    import gsplat.rendering
    from nerfstudio.data.dataparsers.nerfstudio_dataparser import NerfstudioDataParserConfig

    from igs2gs.model import IGS2GSModelConfig, TorchWithUncheckedInverse

    monkeypatch.setattr(gsplat.rendering, "torch", TorchWithUncheckedInverse("torch") if not unchecked else torch)  # the other
    outputs = NerfstudioDataParserConfig(data=scene_dir).setup().get_dataparser_outputs("train")
    config = IGS2GSModelConfig(lpips_pretrained_backbone=False, gsplat_unchecked_inverse=unchecked)
    config.setup(scene_box=outputs.scene_box, num_train_data=len(outputs.image_filenames))
    proxy = gsplat.rendering.torch
    if not unchecked:
        assert proxy is torch
        return
    assert isinstance(proxy, TorchWithUncheckedInverse)
    rotation, _ = torch.linalg.qr(torch.randn(2, 3, 3, generator=torch.Generator().manual_seed(0)))
    viewmats = torch.eye(4).repeat(2, 1, 1)
    viewmats[:, :3, :3], viewmats[:, :3, 3] = rotation, torch.tensor([[1.0, 2.0, 3.0], [-1.0, 0.5, 2.0]])
    assert torch.allclose(proxy.inverse(viewmats), torch.inverse(viewmats), atol=1e-6)
    assert proxy.zeros is torch.zeros and proxy.Tensor is torch.Tensor and proxy.distributed is torch.distributed


def test_lpips_from_the_two_images_features_is_lpips_of_the_two_images():
    from igs2gs.model import lpips_features, lpips_from_features

    network = build_lpips("alex", pretrained_backbone=False)
    generator = torch.Generator().manual_seed(0)
    ours, theirs = torch.rand(2, 1, 3, 64, 80, generator=generator)
    split = lpips_from_features(network, lpips_features(network, ours), lpips_features(network, theirs))
    assert torch.allclose(split, network(ours, theirs, normalize=True), rtol=1e-5, atol=1e-7)


def _model_in_training(scene_dir, **config):
    from nerfstudio.data.dataparsers.nerfstudio_dataparser import NerfstudioDataParserConfig

    from igs2gs.model import IGS2GSModelConfig

    outputs = NerfstudioDataParserConfig(data=scene_dir).setup().get_dataparser_outputs("train")
    model = IGS2GSModelConfig(lpips_pretrained_backbone=False, **config).setup(
        scene_box=outputs.scene_box, num_train_data=len(outputs.image_filenames)
    )
    return model.train()


def test_a_view_s_lpips_target_is_computed_once_per_image_and_kept_within_its_budget(scene_dir, monkeypatch):
    import igs2gs.model

    computed = []
    features = igs2gs.model.lpips_features
    monkeypatch.setattr(igs2gs.model, "lpips_features", lambda net, images: computed.append(1) or features(net, images))
    model = _model_in_training(scene_dir)
    view_bytes = 64 * 15 * 15 * 4 + 192 * 7 * 7 * 4 + (384 + 256 + 256) * 3 * 3 * 4  # AlexNet's layers at 64x64, float32
    model.config.lpips_target_cache_mb = 2.5 * view_bytes / 2**20  # room for two views
    images = torch.rand(4, 64, 64, 3)
    target = lambda view: images[view].permute(2, 0, 1)[None]  # noqa: E731
    batch = lambda view, generation=0: {"image_idx": view, "image": images[view], "image_generation": generation}  # noqa: E731
    first = model.kept_lpips_target(batch(0), target(0))
    assert model.kept_lpips_target(batch(0), target(0)) is first and len(computed) == 1  # kept
    assert model.kept_lpips_target(batch(1), target(1)) is not None and len(computed) == 2
    assert model.kept_lpips_target(batch(2), target(2)) is None and len(computed) == 2  # no room: not even computed
    replaced = model.kept_lpips_target(batch(0, generation=1), target(3))  # an edit swapped in: its features now
    assert replaced is not first and len(computed) == 3
    assert all(torch.equal(a, b) for a, b in zip(replaced, features(model.lpips.network(images.device), target(3))))
    assert model.lpips_target_bytes == 2 * view_bytes
    assert model.kept_lpips_target({**batch(0), "image": torch.rand(64, 64, 4)}, target(0)) is None  # alpha: per step
    assert model.kept_lpips_target({"image_idx": 0, "image": images[0]}, target(0)) is None  # no generation
    model.eval()
    assert model.kept_lpips_target(batch(0, generation=1), target(3)) is None and len(computed) == 3
    off = _model_in_training(scene_dir, lpips_target_cache_mb=0)  # nothing computed apart from the loss
    assert off.kept_lpips_target(batch(3), target(3)) is None and len(computed) == 3


def test_the_loss_against_kept_lpips_features_is_the_loss_against_the_image(scene_dir):
    kept, computed = _model_in_training(scene_dir), _model_in_training(scene_dir, lpips_target_cache_mb=0)
    computed.lpips.network(torch.device("cpu")).load_state_dict(kept.lpips.network(torch.device("cpu")).state_dict())
    generator = torch.Generator().manual_seed(1)
    image, render = torch.rand(2, 48, 40, 3, generator=generator)
    batch = {"image_idx": 1, "image": image, "image_generation": 0}
    results = []
    for model in (kept, kept, computed):  # the second call reads the kept features
        prediction = render.clone().requires_grad_(True)
        losses = model.get_loss_dict({"rgb": prediction, "background": torch.zeros(3)}, batch)
        losses["lpips_loss"].backward()
        results.append((losses["lpips_loss"].detach(), prediction.grad))
    assert len(kept._lpips_targets) == 1 and not computed._lpips_targets
    for loss, gradient in results[:2]:
        assert torch.allclose(loss, results[2][0], rtol=1e-5) and torch.allclose(gradient, results[2][1], rtol=1e-4, atol=1e-8)


@pytest.mark.gpu
def test_on_cuda_the_graphed_loss_against_kept_features_is_the_graphed_loss_against_the_image(scene_dir):
    kept, computed = (_model_in_training(scene_dir, lpips_target_cache_mb=mb).cuda() for mb in (1024, 0))
    computed.lpips.network(torch.device("cuda")).load_state_dict(kept.lpips.network(torch.device("cuda")).state_dict())
    generator = torch.Generator("cuda").manual_seed(2)
    images = torch.rand(3, 96, 128, 3, device="cuda", generator=generator)
    for step in range(4):  # replays on new renders; the third step's view has a new image
        image = images[1] if step < 2 else images[2]
        batch = {"image_idx": 0, "image": image, "image_generation": int(step >= 2)}
        render = (image + 0.2 * torch.randn(image.shape, device="cuda", generator=generator)).clamp(0, 1)
        results = []
        for model in (kept, computed):
            prediction = render.clone().requires_grad_(True)
            loss = model.get_loss_dict({"rgb": prediction, "background": torch.zeros(3, device="cuda")}, batch)["lpips_loss"]
            loss.backward()
            results.append((loss.item(), prediction.grad))
        assert results[0][0] == pytest.approx(results[1][0], rel=1e-3)
        assert torch.allclose(results[0][1], results[1][1], rtol=1e-2, atol=1e-6)
    assert kept._graphed_lpips_of_kept.graphs == 1 and kept._graphed_lpips is None
    assert computed._graphed_lpips.graphs == 1 and computed._graphed_lpips_of_kept is None


def test_building_the_model_imports_neither_torchmetrics_nor_scikit_learn(scene_dir):
    """splatfacto's set-up imports torchmetrics for a PSNR and an LPIPS metric that igs2gs replaces (the package's
    import pulls in its text and audio metrics, transformers' BERT, scipy.signal and torchvision's datasets: 2.5 s on
    the 2-core CPU machine), and scikit-learn (~2 s) for the neighbours of the points it starts from, which for an
    edit are a few placeholders (``seed_points_used``) that the checkpoint replaces. In a process of its own: this
    test session imports both elsewhere."""
    build = f"""
import json, sys
from pathlib import Path
from nerfstudio.data.dataparsers.nerfstudio_dataparser import NerfstudioDataParserConfig
from igs2gs.model import IGS2GSModelConfig
outputs = NerfstudioDataParserConfig(data=Path({str(scene_dir)!r})).setup().get_dataparser_outputs("train")
model = IGS2GSModelConfig(lpips_pretrained_backbone=False).setup(scene_box=outputs.scene_box, num_train_data=len(outputs.image_filenames))
print(json.dumps({{"imported": sorted(name for name in sys.modules if name.split(".")[0] in ("torchmetrics", "sklearn")),
                  "metrics": [type(model.psnr).__name__, type(model.lpips).__name__],
                  "points": model.num_points, "num_random": model.config.num_random}}))
"""
    result = subprocess.run([sys.executable, "-c", build], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    # No seed points given: splatfacto's random start, of seed_points_used points (its config left as it was).
    assert figures == {"imported": [], "metrics": ["BatchPSNR", "DeferredLPIPSMetric"], "points": 16, "num_random": 50000}


def test_the_neighbour_search_of_a_few_points_finds_what_scikit_learn_finds():
    from nerfstudio.models.splatfacto import SplatfactoModel

    from igs2gs.model import IGS2GSModel

    points = torch.rand(300, 3, generator=torch.Generator().manual_seed(0))
    distances, indices = IGS2GSModel.k_nearest_sklearn(None, points, 3)  # type: ignore[arg-type]
    expected_distances, expected_indices = SplatfactoModel.k_nearest_sklearn(None, points, 3)  # type: ignore[arg-type]
    assert distances.dtype == expected_distances.dtype and indices.dtype == expected_indices.dtype
    assert distances.shape == expected_distances.shape == (300, 3)
    assert abs(distances - expected_distances).max() < 1e-6 and (indices == expected_indices).all()


@pytest.mark.parametrize("densify", [False, True])
def test_the_edit_densifies_only_with_densify_from_load_whatever_step_the_scene_was_loaded_at(scene_dir, densify):
    """A scene loaded before splatfacto's stop-split step (5000 by default) used to densify with the option off."""
    from nerfstudio.data.dataparsers.nerfstudio_dataparser import NerfstudioDataParserConfig

    from igs2gs.model import IGS2GSModelConfig

    outputs = NerfstudioDataParserConfig(data=scene_dir).setup().get_dataparser_outputs("train")
    model = IGS2GSModelConfig(lpips_pretrained_backbone=False, densify_from_load=densify).setup(
        scene_box=outputs.scene_box, num_train_data=len(outputs.image_filenames)
    )
    seen = []
    model.strategy.step_post_backward = lambda **kwargs: seen.append(kwargs["step"])
    model.optimizers, model.info = {}, {}  # set by splatfacto's training callbacks and renders
    model.start_edit_at(3000)
    model.step = 3100
    model.step_post_backward(3100)
    assert seen == ([100] if densify else [])


@pytest.mark.gpu
def test_view_matrix_does_not_wait_for_the_gpu():
    from igs2gs.model import view_matrix

    camera_to_world = torch.eye(4, device="cuda")[:3].expand(2, 3, 4).clone()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        viewmat = view_matrix(camera_to_world)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(viewmat.cpu(), torch.diag(torch.tensor([1.0, -1.0, -1.0, 1.0])).expand(2, 4, 4))


@pytest.mark.gpu
def test_bf16_lpips_loss_and_gradient_agree_with_float32():
    """What ``lpips_bf16`` does to the loss: same value and descent direction, within bf16 error."""
    network = build_lpips("alex", pretrained_backbone=False).cuda()
    target = torch.rand(1, 3, 256, 256, device="cuda")
    prediction = (target + 0.2 * torch.randn_like(target)).clamp(0, 1).requires_grad_(True)
    results = []
    for half in (False, True):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=half):
            loss = network(prediction, target, normalize=True).mean()
        (gradient,) = torch.autograd.grad(loss.float(), prediction)
        results.append((loss.float().item(), gradient))
    (full, full_grad), (half, half_grad) = results
    cosine = torch.nn.functional.cosine_similarity(full_grad.flatten(), half_grad.flatten(), dim=0).item()
    print(f"LPIPS float32 {full:.5f} vs bf16 {half:.5f}; gradient cosine {cosine:.4f}")
    assert half == pytest.approx(full, rel=0.03) and cosine > 0.98
