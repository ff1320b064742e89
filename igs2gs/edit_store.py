"""Edits and sweep progress on disk, written atomically, so that no edit is ever lost.

Layout inside a run directory (``<run>/igs2gs/``)::

    edits/view_00012.png   the latest edit of each training view (lossless 8-bit PNG)
    state.json             sweep progress and the edit settings in force
    sheets/sweep_00.png    before/after sheets

Every file is written to a temporary name in the same folder and renamed over the target, so a
kill -9 leaves either the old or the new version, never half a file.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import BinaryIO, Callable, Dict, List, Optional, Sequence, Union

import numpy as np
from PIL import Image

STORE_DIRNAME = "igs2gs"


def write_atomically(path: Path, data: Union[bytes, Callable[[BinaryIO], None]]) -> None:
    """Write ``data`` (bytes, or a function that writes into the open file) to ``path`` via a synced temporary file
    and a rename; a failed write leaves the old file, if any, and no temporary one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            if callable(data):
                data(file)
            else:
                file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def png_bytes(image: np.ndarray) -> bytes:
    """Lossless PNG encoding of a uint8 [H, W, 3] array."""
    import io

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


@dataclass
class SweepState:
    """Where the edit stands; enough to resume it exactly."""

    edit_start_step: int
    """The loaded splatfacto step the edit started from (sweeps and the run length count from it)."""
    image_names: List[str]
    """Training image names in view-id order: a resume on other data is refused."""
    sweeps_completed: int = 0
    sweep_in_progress: Optional[int] = None
    """Index of a sweep that started and has not finished (a kill mid-sweep)."""
    views_done: List[int] = field(default_factory=list)
    """Views of the sweep in progress whose edits are already stored."""
    settings: Dict[str, object] = field(default_factory=dict)
    """Prompt and guidance in force (the latest, if changed while running)."""
    command_settings: Dict[str, object] = field(default_factory=dict)
    """Prompt and guidance given on the command line when the edit last started: on resume, a value changed on the
    command line since then wins over the one in force; an unchanged one keeps what was set in the viewer."""
    last_sweep_step: int = -1
    """Training step at which the latest sweep started (a scheduled sweep runs once per step even across resumes)."""
    edit_end_step: Optional[int] = None
    """Step the edit ends at: a checkpoint from it or later is a finished edit, which a new one starts from."""

    def snapshot(self) -> "SweepState":
        """A copy to hand to the writer thread while this one keeps changing."""
        return replace(self, views_done=list(self.views_done), settings=dict(self.settings), command_settings=dict(self.command_settings))


class EditStore:
    """The edit folder of one run."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.edits_dir = self.folder / "edits"
        self.sheets_dir = self.folder / "sheets"
        self.state_path = self.folder / "state.json"

    @classmethod
    def beside_checkpoints(cls, checkpoint_dir: Path) -> "EditStore":
        """The store of the run whose checkpoints are in ``checkpoint_dir``."""
        return cls(Path(checkpoint_dir).parent / STORE_DIRNAME)

    def edit_path(self, view_id: int) -> Path:
        return self.edits_dir / f"view_{view_id:05d}.png"

    def save_edit(self, view_id: int, image: np.ndarray) -> None:
        write_atomically(self.edit_path(view_id), png_bytes(image))

    def save_edits(self, view_ids: Sequence[int], images: np.ndarray, state: SweepState) -> None:
        """Store a batch of edits, then the progress that counts them as done."""
        for view_id, image in zip(view_ids, images):
            self.save_edit(view_id, image)
        self.save_state(state)

    def load_edits(self) -> Dict[int, np.ndarray]:
        """All stored edits by view id, as uint8 [H, W, 3]."""
        edits = {}
        for path in sorted(self.edits_dir.glob("view_*.png")):
            edits[int(path.stem.split("_")[1])] = np.array(Image.open(path).convert("RGB"))
        return edits

    def save_state(self, state: SweepState) -> None:
        write_atomically(self.state_path, json.dumps(asdict(state), indent=2).encode())

    def load_state(self) -> Optional[SweepState]:
        if not self.state_path.is_file():
            return None
        return SweepState(**json.loads(self.state_path.read_text()))

    def save_sheet(self, sweep: int, image: np.ndarray) -> Path:
        path = self.sheets_dir / f"sweep_{sweep:02d}.png"
        write_atomically(path, png_bytes(image))
        return path

    def adopt(self, previous: "EditStore") -> None:
        """Copy a previous run's edits and state in (resuming keeps both runs' folders whole)."""
        if previous.folder.resolve() == self.folder.resolve():
            return
        for path in sorted(previous.edits_dir.glob("view_*.png")):
            write_atomically(self.edits_dir / path.name, path.read_bytes())
        if previous.state_path.is_file():
            write_atomically(self.state_path, previous.state_path.read_bytes())
        if previous.sheets_dir.is_dir():
            shutil.copytree(previous.sheets_dir, self.sheets_dir, dirs_exist_ok=True)
