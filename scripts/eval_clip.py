"""CLIP edit metrics (Instruct-NeRF2NeRF's) of an edit, from renders of both scenes on one camera path.

Render the original and the edited run along the same path (fixed path, so the figures compare):

    ns-render camera-path --load-config ORIGINAL/config.yml --camera-path-filename path.json --output-format images --output-path renders/original
    ns-render camera-path --load-config EDITED/config.yml   --camera-path-filename path.json --output-format images --output-path renders/edited
    python scripts/eval_clip.py --original renders/original --edited renders/edited \\
        --caption-original "a photo of a stone horse" --caption-edited "a photo of a giraffe" --json clip.json

Frames are paired by sorted file name. ``--clip-model`` takes a hub id or a local folder.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from igs2gs.clip_metrics import DEFAULT_CLIP, ClipEmbedder, clip_metrics  # noqa: E402

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}


def frames(folder: Path) -> List[Path]:
    found = sorted(path for path in Path(folder).iterdir() if path.suffix.lower() in IMAGE_SUFFIXES)
    if not found:
        raise SystemExit(f"no .png/.jpg frames in {folder}")
    return found


def evaluate(original: Path, edited: Path, caption_original: str, caption_edited: str, model: str = DEFAULT_CLIP, device: str = "cpu") -> Dict[str, float]:
    """The metrics for two folders of frames paired by name."""
    original_frames, edited_frames = frames(original), frames(edited)
    if [p.name for p in original_frames] != [p.name for p in edited_frames]:
        raise SystemExit(f"{original} and {edited} must hold the same frame names (renders of one camera path)")
    embedder = ClipEmbedder(model, device)
    load = lambda paths: [Image.open(path).convert("RGB") for path in paths]  # noqa: E731
    texts = embedder.texts([caption_original, caption_edited])
    return clip_metrics(embedder.images(load(original_frames)), embedder.images(load(edited_frames)), texts[0], texts[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--original", type=Path, required=True, help="frames rendered from the original run")
    parser.add_argument("--edited", type=Path, required=True, help="frames rendered from the edited run (same path)")
    parser.add_argument("--caption-original", required=True)
    parser.add_argument("--caption-edited", required=True)
    parser.add_argument("--clip-model", default=DEFAULT_CLIP)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    result = evaluate(args.original, args.edited, args.caption_original, args.caption_edited, args.clip_model, args.device)
    for name, value in result.items():
        print(f"{name:<30} {value:.4f}")
    if args.json:
        args.json.write_text(json.dumps({**result, "clip_model": args.clip_model}, indent=2))


if __name__ == "__main__":
    main()
