"""README command 1 runs to completion on the CPU with the tiny editor."""

from __future__ import annotations

import os
import subprocess

import numpy as np
from PIL import Image

from conftest import ROOT, offline_env


def test_demo_script_writes_a_before_after_sheet(tmp_path):
    env = offline_env(PATH=os.path.dirname(os.sys.executable) + os.pathsep + os.environ["PATH"])
    result = subprocess.run(
        ["bash", str(ROOT / "scripts" / "demo.sh"), "--device", "cpu", "--tiny", "--skip-install", "--output-dir", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "igs2gs sweep 3:" in result.stdout
    sheet = np.asarray(Image.open(tmp_path / "before_after.png"))
    assert sheet.shape == (4 * 48, 3 * 48, 3)
