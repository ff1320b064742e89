"""The oracle editor (a known edit) and the propagation of edits to held-out views."""

from __future__ import annotations

import math

import torch

from igs2gs.oracle import OracleEditor, OracleEditorConfig, oracle_transform
from test_pipeline import make_trainer


def test_oracle_edits_the_original_photo_and_ignores_the_render():
    originals = torch.rand(2, 3, 16, 16)
    editor = OracleEditor(OracleEditorConfig(transform="rotate_channels"))
    edited = editor.edit(torch.rand(2, 3, 16, 16), originals, "anything")
    assert torch.equal(edited, originals[:, [2, 0, 1]])
    assert torch.allclose(oracle_transform(originals, "invert"), 1 - originals)


def test_perturbations_are_seeded_per_edit():
    config = OracleEditorConfig(max_shift_px=2, noise_std=0.05, colour_jitter=0.1)
    editor, originals = OracleEditor(config), torch.rand(2, 3, 16, 16)

    def seeded():
        return [torch.Generator().manual_seed(i) for i in range(2)]

    first = editor.edit(originals, originals, "x", generator=seeded())
    assert torch.equal(first, editor.edit(originals, originals, "x", generator=seeded()))
    assert (first - oracle_transform(originals, "rotate_channels")).abs().mean() > 0.01


def held_out_psnr(trainer) -> float:
    """PSNR of renders of the held-out views against the oracle edit of their photos."""
    datamanager, model = trainer.pipeline.datamanager, trainer.pipeline.model
    model.eval()
    errors = []
    with torch.no_grad():
        for index in range(len(datamanager.eval_dataset)):
            photo = datamanager.cached_eval[index]["image"][..., :3].float() / 255.0
            target = oracle_transform(photo.permute(2, 0, 1)[None], "invert")[0].permute(1, 2, 0)
            render = model.get_outputs_for_camera(datamanager.eval_dataset.cameras[index : index + 1])["rgb"]
            errors.append(torch.mean((render - target) ** 2).item())
    model.train()
    return -10 * math.log10(sum(errors) / len(errors))


def test_oracle_edit_propagates_to_held_out_views(scene_dir, splatfacto_run, tiny_ip2p_dir, tmp_path):
    trainer = make_trainer(
        scene_dir, splatfacto_run / "nerfstudio_models", tiny_ip2p_dir, tmp_path, "oracle",
        editor="oracle", oracle=OracleEditorConfig(transform="invert"), gs_steps=30,
    )
    trainer.config.max_num_iterations = 90
    # A colour edit moves the SH DC term; splatfacto's rate (0.0025) needs ~1000 steps for an
    # inversion, so this short CPU run uses a faster one.
    for group in trainer.optimizers.optimizers["features_dc"].param_groups:
        group["lr"] = 0.05
    before = held_out_psnr(trainer)
    trainer.train()
    after = held_out_psnr(trainer)
    print(f"held-out PSNR against the oracle: {before:.2f} dB before, {after:.2f} dB after")
    assert trainer.pipeline.sweep_state.sweeps_completed == 3
    # Measured 10.35 -> 13.44 dB (+3.09). Training uses random backgrounds, so the figure varies
    # from run to run; 2.5 dB keeps the test stable until the tiny reconstruction (15 dB against
    # its own held-out photo after 300-400 CPU steps) leaves more room.
    assert after - before >= 2.5
