"""CLIP edit metrics: the formulas on constructed embeddings, and the command on a tiny random CLIP."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, offline_env
from igs2gs.clip_metrics import clip_metrics, direction_consistency, direction_similarity
from make_random_ip2p import write_tokenizer_files


def test_formulas_on_constructed_embeddings():
    original = torch.randn(5, 8, generator=torch.Generator().manual_seed(0))
    text_original, text_edited = torch.randn(8), torch.randn(8)
    # Every frame moves exactly along the caption change: similarity 1, consistency 1.
    edited = original + 2.0 * (text_edited - text_original)
    figures = clip_metrics(original, edited, text_original, text_edited)
    assert figures["clip_direction_similarity"] == pytest.approx(1.0, abs=1e-5)
    assert figures["clip_direction_consistency"] == pytest.approx(1.0, abs=1e-5)
    # Moving against the caption change gives -1; alternating directions give consistency -1.
    assert direction_similarity(original, original - (text_edited - text_original), text_original, text_edited).mean() == pytest.approx(-1.0, abs=1e-5)
    signs = torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0])[:, None]
    assert direction_consistency(original, original + signs * torch.ones(8)).mean() == pytest.approx(-1.0, abs=1e-5)
    edited_like_caption = text_edited.repeat(5, 1) * 3.0
    assert clip_metrics(original, edited_like_caption, text_original, text_edited)["clip_image_text_similarity"] == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ValueError, match="same number"):
        clip_metrics(original, edited[:3], text_original, text_edited)


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory) -> Path:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    folder = tmp_path_factory.mktemp("clip") / "tiny-clip"
    folder.mkdir()
    write_tokenizer_files(folder)
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)
    config = CLIPConfig(
        text_config=dict(vocab_size=max(1000, len(tokenizer)), hidden_size=32, intermediate_size=64, num_attention_heads=2,
                         num_hidden_layers=2, max_position_embeddings=77),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=2, image_size=32, patch_size=8),
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}), tokenizer=tokenizer)
    processor.save_pretrained(folder)
    return folder


def write_frames(folder: Path, seed: int, count: int = 4) -> Path:
    folder.mkdir(parents=True)
    generator = np.random.default_rng(seed)
    for index in range(count):
        Image.fromarray(generator.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(folder / f"{index:05d}.png")
    return folder


def test_eval_clip_command_on_a_tiny_local_clip(tiny_clip_dir, tmp_path):
    original = write_frames(tmp_path / "original", seed=0)
    edited = write_frames(tmp_path / "edited", seed=1)
    out = tmp_path / "clip.json"
    command = [
        sys.executable, str(ROOT / "scripts" / "eval_clip.py"), "--original", str(original), "--edited", str(edited),
        "--caption-original", "a photo of a horse", "--caption-edited", "a photo of a giraffe",
        "--clip-model", str(tiny_clip_dir), "--json", str(out),
    ]
    result = subprocess.run(command, env=offline_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert figures["frames"] == 4.0
    for name in ("clip_direction_similarity", "clip_direction_consistency", "clip_image_text_similarity"):
        assert -1.0 <= figures[name] <= 1.0 and name in result.stdout
    # Folders that are not renders of one path are refused clearly.
    mismatched = write_frames(tmp_path / "three", seed=2, count=3)
    refused = subprocess.run(command[:5] + [str(mismatched)] + command[6:], env=offline_env(), capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0 and "same frame names" in refused.stderr


def test_missing_clip_model_offline_says_how_to_supply_it(tmp_path):
    from igs2gs.clip_metrics import ClipEmbedder

    with pytest.raises(RuntimeError, match="--clip-model DIR"):
        ClipEmbedder("nobody/no-such-clip-model")


def test_embeddings_are_the_projected_ones(tiny_clip_dir):
    from igs2gs.clip_metrics import ClipEmbedder

    embedder = ClipEmbedder(str(tiny_clip_dir))
    texts = embedder.texts(["a horse", "a giraffe"])
    images = embedder.images([Image.new("RGB", (40, 40), (200, 10, 10))])
    assert texts.shape == (2, 16) and images.shape == (1, 16)  # projection_dim of the tiny model
