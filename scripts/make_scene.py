"""Write a small procedural scene in nerfstudio format, deterministic from a seed.

The scene (three textured spheres on a checkered ground under a sky gradient) is ray traced
analytically, so views are exactly consistent and need no renderer of ours. Output:
``transforms.json`` (OpenGL camera-to-world poses, pinhole intrinsics), ``images/*.png`` and
``sparse_pc.ply`` (coloured surface points in the pose frame, as SfM would give).

    python scripts/make_scene.py OUT --views 12 --size 64 --seed 0
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import List, Tuple

import numpy as np
from PIL import Image

SPHERES = (  # centre xyz, radius, base colour, stripe colour
    ((0.0, 0.0, 0.55), 0.55, (0.85, 0.25, 0.2), (0.95, 0.85, 0.3)),
    ((0.9, 0.5, 0.35), 0.35, (0.2, 0.45, 0.85), (0.9, 0.9, 0.95)),
    ((-0.8, 0.6, 0.3), 0.3, (0.25, 0.75, 0.3), (0.1, 0.2, 0.1)),
)
GROUND_COLOURS = ((0.8, 0.78, 0.7), (0.35, 0.3, 0.28))
GROUND_EXTENT = 2.5
DOME_RADIUS = 6.0  # a sky sphere around everything, so every pixel shows geometry splats can fit
LIGHT = np.array([0.4, -0.3, 0.85]) / np.linalg.norm([0.4, -0.3, 0.85])


def _sphere_albedo(points: np.ndarray, index: int) -> np.ndarray:
    centre, _, base, stripe = SPHERES[index]
    height = points[:, 2] - centre[2]
    stripes = (np.floor(height * 12.0 + 100).astype(int) % 2)[:, None]
    return np.where(stripes == 1, np.array(stripe), np.array(base))


def _ground_albedo(points: np.ndarray) -> np.ndarray:
    checker = ((np.floor(points[:, 0] * 2.5) + np.floor(points[:, 1] * 2.5)).astype(int) % 2)[:, None]
    return np.where(checker == 1, np.array(GROUND_COLOURS[0]), np.array(GROUND_COLOURS[1]))


def _shade(albedo: np.ndarray, normals: np.ndarray) -> np.ndarray:
    return albedo * (0.35 + 0.65 * np.clip(normals @ LIGHT, 0.0, 1.0))[:, None]


def _sky(points: np.ndarray) -> np.ndarray:
    """Colour of the sky dome at ``points`` (a gradient with height and a few bands)."""
    up = np.clip(points[:, 2:3] / DOME_RADIUS, 0.0, 1.0)
    bands = 0.08 * np.sin(np.arctan2(points[:, 1:2], points[:, 0:1]) * 6)
    return np.clip(np.concatenate([0.45 + 0.3 * up + bands, 0.55 + 0.3 * up, 0.75 + 0.25 * up - bands], axis=1), 0, 1)


def _trace(origins: np.ndarray, dirs: np.ndarray) -> np.ndarray:
    """Colour of each ray: the nearest sphere, the ground, else the sky dome."""
    n = len(dirs)
    best_t = np.full(n, np.inf)
    b = np.sum(origins * dirs, axis=1)
    t_dome = -b + np.sqrt(np.maximum(b * b - (np.sum(origins * origins, axis=1) - DOME_RADIUS**2), 0.0))
    colour = _sky(origins + dirs * t_dome[:, None])
    with np.errstate(divide="ignore", invalid="ignore"):
        t_ground = -origins[:, 2] / dirs[:, 2]
    hit_ground = (t_ground > 1e-4) & np.isfinite(t_ground)
    hit_points = origins + dirs * np.where(hit_ground, t_ground, 0.0)[:, None]
    hit_ground &= np.abs(hit_points).max(axis=1) < GROUND_EXTENT
    best_t[hit_ground] = t_ground[hit_ground]
    normals_up = np.tile(np.array([0.0, 0.0, 1.0]), (n, 1))
    colour[hit_ground] = _shade(_ground_albedo(hit_points[hit_ground]), normals_up[hit_ground])
    for index, (centre, radius, _, _) in enumerate(SPHERES):
        oc = origins - np.array(centre)
        b = np.sum(oc * dirs, axis=1)
        disc = b * b - (np.sum(oc * oc, axis=1) - radius * radius)
        t = -b - np.sqrt(np.maximum(disc, 0.0))
        hit = (disc > 0) & (t > 1e-4) & (t < best_t)
        points = origins[hit] + dirs[hit] * t[hit, None]
        normals = (points - np.array(centre)) / radius
        colour[hit] = _shade(_sphere_albedo(points, index), normals)
        best_t[hit] = t[hit]
    return np.clip(colour, 0.0, 1.0)


def _look_at(eye: np.ndarray, target: np.ndarray) -> np.ndarray:
    """OpenGL/nerfstudio camera-to-world: x right, y up, camera looks down -z."""
    forward = target - eye
    forward /= np.linalg.norm(forward)
    right = np.cross(forward, np.array([0.0, 0.0, 1.0]))
    right /= np.linalg.norm(right)
    up = np.cross(right, forward)
    c2w = np.eye(4)
    c2w[:3, 0], c2w[:3, 1], c2w[:3, 2], c2w[:3, 3] = right, up, -forward, eye
    return c2w


def _camera_poses(views: int, rng: np.random.Generator) -> List[np.ndarray]:
    poses = []
    for i in range(views):
        azimuth = 2 * math.pi * i / views + rng.uniform(-0.1, 0.1)
        elevation = math.radians(25 + 15 * math.sin(3 * azimuth) + rng.uniform(-3, 3))
        distance = 3.6 + rng.uniform(-0.2, 0.2)
        eye = distance * np.array(
            [math.cos(azimuth) * math.cos(elevation), math.sin(azimuth) * math.cos(elevation), math.sin(elevation)]
        )
        poses.append(_look_at(eye, np.array([0.0, 0.1, 0.35]) + rng.uniform(-0.05, 0.05, 3)))
    return poses


def _render(c2w: np.ndarray, size: int, focal: float) -> np.ndarray:
    pixels = (np.arange(size) + 0.5 - size / 2) / focal
    x, y = np.meshgrid(pixels, -pixels)
    dirs_cam = np.stack([x, y, -np.ones_like(x)], axis=-1).reshape(-1, 3)
    dirs = dirs_cam @ c2w[:3, :3].T
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    origins = np.broadcast_to(c2w[:3, 3], dirs.shape)
    return _trace(np.ascontiguousarray(origins), dirs).reshape(size, size, 3)


def _surface_points(count: int, rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
    """Points on the visible surfaces with their shaded colours (what SfM would triangulate)."""
    on_spheres = count * 2 // 3
    which = rng.integers(0, len(SPHERES), 2 * on_spheres)
    normals = rng.normal(size=(2 * on_spheres, 3))
    normals /= np.linalg.norm(normals, axis=1, keepdims=True)
    centres = np.array([s[0] for s in SPHERES])[which]
    radii = np.array([s[1] for s in SPHERES])[which]
    sphere_points = centres + normals * radii[:, None]
    keep = np.flatnonzero(sphere_points[:, 2] > 0.02)[:on_spheres]  # above the ground
    sphere_points, normals, which = sphere_points[keep], normals[keep], which[keep]
    sphere_colours = np.zeros_like(sphere_points)
    for index in range(len(SPHERES)):
        mask = which == index
        sphere_colours[mask] = _shade(_sphere_albedo(sphere_points[mask], index), normals[mask])
    on_dome = count // 6
    on_ground = count - on_spheres - on_dome
    ground = np.concatenate([rng.uniform(-2.0, 2.0, (on_ground, 2)), np.zeros((on_ground, 1))], 1)
    ground_colours = _shade(_ground_albedo(ground), np.tile([0.0, 0.0, 1.0], (len(ground), 1)))
    dome = rng.normal(size=(on_dome, 3))
    dome[:, 2] = np.abs(dome[:, 2])  # the upper half; the ground hides most of the lower one
    dome *= DOME_RADIUS / np.linalg.norm(dome, axis=1, keepdims=True)
    points = np.concatenate([sphere_points, ground, dome])
    points = points + rng.normal(scale=0.005, size=points.shape)
    return points, np.concatenate([sphere_colours, ground_colours, _sky(dome)])


def _write_ply(path: Path, points: np.ndarray, colours: np.ndarray) -> None:
    rgb = np.clip(np.round(colours * 255), 0, 255).astype(np.uint8)
    header = (
        "ply\nformat ascii 1.0\n"
        f"element vertex {len(points)}\n"
        "property float x\nproperty float y\nproperty float z\n"
        "property uchar red\nproperty uchar green\nproperty uchar blue\nend_header\n"
    )
    rows = "".join(f"{p[0]:.6f} {p[1]:.6f} {p[2]:.6f} {c[0]} {c[1]} {c[2]}\n" for p, c in zip(points, rgb))
    path.write_text(header + rows)


def make_scene(out: Path, views: int = 12, size: int = 64, seed: int = 0, points: int = 3000) -> Path:
    """Write the scene into ``out`` and return ``out``."""
    if views < 2 or size < 8:
        raise ValueError(f"need at least 2 views of at least 8 px (got {views} views of {size} px)")
    rng = np.random.default_rng(seed)
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    focal = 0.5 * size / math.tan(math.radians(50) / 2)
    frames = []
    for index, c2w in enumerate(_camera_poses(views, rng)):
        name = f"images/frame_{index:05d}.png"
        Image.fromarray(np.round(_render(c2w, size, focal) * 255).astype(np.uint8)).save(out / name)
        frames.append({"file_path": name, "transform_matrix": c2w.tolist()})
    _write_ply(out / "sparse_pc.ply", *_surface_points(points, rng))
    transforms = {
        "camera_model": "OPENCV",
        "w": size,
        "h": size,
        "fl_x": focal,
        "fl_y": focal,
        "cx": size / 2,
        "cy": size / 2,
        "k1": 0.0,
        "k2": 0.0,
        "p1": 0.0,
        "p2": 0.0,
        "ply_file_path": "sparse_pc.ply",
        "frames": frames,
    }
    (out / "transforms.json").write_text(json.dumps(transforms, indent=2))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--views", type=int, default=12)
    parser.add_argument("--size", type=int, default=64, help="image width and height in pixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--points", type=int, default=3000, help="points in sparse_pc.ply")
    args = parser.parse_args()
    print(make_scene(args.out, args.views, args.size, args.seed, args.points))


if __name__ == "__main__":
    main()
