"""Write a random-weight InstructPix2Pix pipeline directory (diffusers ``save_pretrained`` layout).

Tests and benchmarks load it back through ``InstructPix2Pix.from_pretrained`` exactly like
``timbrooks/instruct-pix2pix``. ``--shape tiny`` runs in seconds on a CPU; ``--shape sd15`` has
the real SD-1.5 / IP2P architecture (860M-parameter UNet with 8 input channels) for speed and
memory measurements. The weights are random: outputs are noise, never an edit.

    python scripts/make_random_ip2p.py OUT --shape tiny|sd15
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Dict

import torch

# (UNet, VAE, CLIP text) sizes per shape. sd15 mirrors timbrooks/instruct-pix2pix's configs.
SHAPES: Dict[str, Dict[str, dict]] = {
    "tiny": {
        "unet": dict(
            block_out_channels=(32, 64),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            layers_per_block=1,
            cross_attention_dim=32,
            attention_head_dim=4,
            norm_num_groups=16,
            sample_size=8,
        ),
        "vae": dict(
            block_out_channels=(16, 16, 16, 16),
            layers_per_block=1,
            norm_num_groups=8,
            sample_size=64,
        ),
        "text": dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, projection_dim=32),
    },
    "sd15": {
        "unet": dict(
            block_out_channels=(320, 640, 1280, 1280),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            layers_per_block=2,
            cross_attention_dim=768,
            attention_head_dim=8,
            norm_num_groups=32,
            sample_size=64,
        ),
        "vae": dict(
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            norm_num_groups=32,
            sample_size=512,
        ),
        "text": dict(
            hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12, projection_dim=768
        ),
    },
}


def _byte_symbols() -> list:
    """The printable stand-ins CLIP's byte-level BPE uses for the 256 byte values."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes, extra = list(keep), 0
    for byte in range(256):
        if byte not in keep:
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def write_tokenizer_files(folder: Path) -> None:
    """A small byte-level vocabulary with a handful of merges: every string tokenizes."""
    symbols = _byte_symbols()
    merges = ["t h", "th e</w>", "a n", "an d</w>", "i n", "in g</w>"]
    vocab_tokens = symbols + [s + "</w>" for s in symbols]
    vocab_tokens += [a + b for a, b in (m.split(" ") for m in merges)]
    vocab_tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: index for index, token in enumerate(dict.fromkeys(vocab_tokens))}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")


def build_pipeline(shape: str, dtype: torch.dtype = torch.float32, seed: int = 0):
    """Build a random-weight ``StableDiffusionInstructPix2PixPipeline`` of the given shape."""
    import tempfile

    from diffusers import (
        AutoencoderKL,
        EulerAncestralDiscreteScheduler,
        StableDiffusionInstructPix2PixPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    sizes = SHAPES[shape]
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(in_channels=8, out_channels=4, **sizes["unet"])
    vae_blocks = len(sizes["vae"]["block_out_channels"])
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * vae_blocks,
        up_block_types=("UpDecoderBlock2D",) * vae_blocks,
        **sizes["vae"],
    )
    with tempfile.TemporaryDirectory() as folder:
        write_tokenizer_files(Path(folder))
        tokenizer = CLIPTokenizer(str(Path(folder) / "vocab.json"), str(Path(folder) / "merges.txt"), model_max_length=77)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=max(1000, len(tokenizer)),
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **sizes["text"],
        )
    )
    # The hub model ships an Euler scheduler config; the editor converts it to DDIM as the method does.
    scheduler = EulerAncestralDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000, steps_offset=1
    )
    pipe = StableDiffusionInstructPix2PixPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return pipe.to(dtype=dtype)


def make_random_ip2p(out: Path, shape: str = "tiny", dtype: torch.dtype = torch.float32, seed: int = 0) -> Path:
    """Write the pipeline directory and return its path."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose one of {sorted(SHAPES)}")
    build_pipeline(shape, dtype, seed).save_pretrained(str(out), safe_serialization=True)
    return Path(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--fp16", action="store_true", help="store weights in float16 (halves sd15's 4 GB)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(make_random_ip2p(args.out, args.shape, torch.float16 if args.fp16 else torch.float32, args.seed))


if __name__ == "__main__":
    main()
