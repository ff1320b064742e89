"""The igs2gs panel of the Nerfstudio (viser) viewer: steer an edit while it trains.

The panel only records what the user asked for (new instruction or guidance, a sweep now, pause);
the training thread applies it at the next edit (see ``IGS2GSPipeline.apply_viewer_requests``),
so no callback ever waits for a sweep. A daemon thread refreshes the status line and the
training-image preview a few times a second.
"""

from __future__ import annotations

import base64
import functools
import io
import tarfile
import threading
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from PIL import Image

from igs2gs.threads_at_exit import Stoppable, finish_at_exit
from nerfstudio.viewer.viewer import VISER_NERFSTUDIO_SCALE_RATIO
from nerfstudio.viewer.viewer_elements import ViewerControl

if TYPE_CHECKING:
    from igs2gs.pipeline import IGS2GSPipeline

VISER_ICON_USERS = ("viser._icons", "viser._gui_api", "viser._gui_handles")  # the modules that hold svg_from_icon


@functools.lru_cache(maxsize=None)
def _icon_offsets(tarball: Path) -> Dict[str, Tuple[int, int]]:
    """Where each member's bytes lie in a tarball: one pass over its headers."""
    with tarfile.open(tarball) as tar:
        return {member.name: (member.offset_data, member.size) for member in tar if member.isfile()}


def _icon_tarball() -> Path:
    import viser._icons

    return Path(viser._icons.ICONS_DIR) / "tabler-icons.tar"


def indexed_svg_from_icon(icon_name: str) -> str:
    """viser's ``svg_from_icon``, reading the icon's bytes at their offset in the tarball."""
    tarball = _icon_tarball()
    offset, size = _icon_offsets(tarball)[f"{icon_name}.svg"]
    with open(tarball, "rb") as file:
        file.seek(offset)
        return file.read(size).decode("utf-8")


def index_viser_icons() -> bool:
    """Make viser find its GUI icons through an index of its icon tarball, read once per process.

    viser 0.2.7's ``svg_from_icon`` opens its 5.4 MB tarball of 4,285 icons and parses every header for each
    icon a GUI element shows: nerfstudio's viewer and the igs2gs panel show 16, which cost 1.45 s of an 11.7 s
    set-up on the 2-core CPU machine. Returns whether the index was installed (False: a viser laid out
    otherwise, left as it is).
    """
    import importlib

    try:
        modules = [importlib.import_module(name) for name in VISER_ICON_USERS]
        tarball = _icon_tarball()
    except (ImportError, AttributeError):
        return False
    if not tarball.is_file() or not all(hasattr(module, "svg_from_icon") for module in modules):
        return False
    for module in modules:
        module.svg_from_icon = indexed_svg_from_icon
    return True


PREVIEW_MODES = ("hidden", "original photo", "edited image")
PREVIEW_WIDTH = 320


def preview_markdown(image: torch.Tensor, caption: str) -> str:
    """Markdown showing a [H, W, 3] image (uint8 or float) as an inline JPEG with a caption."""
    pixels = image.detach().cpu()
    if pixels.dtype != torch.uint8:
        pixels = (pixels.float().clamp(0, 1) * 255).round().to(torch.uint8)
    picture = Image.fromarray(np.ascontiguousarray(pixels.numpy()))
    if picture.width > PREVIEW_WIDTH:
        picture = picture.resize((PREVIEW_WIDTH, max(1, round(picture.height * PREVIEW_WIDTH / picture.width))))
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=85)
    return f"{caption}\n\n![training image](data:image/jpeg;base64,{base64.b64encode(buffer.getvalue()).decode()})"


def render_threads_of(viewer) -> Callable[[], List[Stoppable]]:
    """nerfstudio's viewer renders with torch in one thread per client, which end when told to stop ``running``: what
    lists them at exit (``threads_at_exit``), holding the viewer weakly."""
    viewer_ref = weakref.ref(viewer)

    def threads() -> List[Stoppable]:
        viewer = viewer_ref()
        machines = list(viewer.render_statemachines.values()) if viewer is not None else []
        return [(machine, functools.partial(setattr, machine, "running", False)) for machine in machines]

    return threads


class EditControls(ViewerControl):
    """Instruction, guidance, re-edit now, pause editing, training-image preview and status."""

    def __init__(self, pipeline: "IGS2GSPipeline") -> None:
        self.pipeline = pipeline
        self.handles: Dict[str, object] = {}
        self._shown: Tuple[object, ...] = ()  # (mode, view, image tensor) now in the panel

    def _setup(self, viewer) -> None:
        super()._setup(viewer)
        pipeline, gui = self.pipeline, self.viser_server.gui
        pipeline.train_lock = getattr(viewer, "train_lock", None)
        settings = pipeline.edit_settings()
        with gui.add_folder("igs2gs edit"):
            prompt = gui.add_text("Instruction", str(settings["prompt"]), hint="Used from the next edit on")
            guidance = gui.add_number("Guidance scale", float(settings["guidance_scale"]), min=0.0, step=0.5)
            image_guidance = gui.add_number("Image guidance", float(settings["image_guidance_scale"]), min=0.0, step=0.05)
            sweep_now = gui.add_button("Re-edit all views now")
            pause = gui.add_checkbox("Pause editing", False, hint="Sweeps wait (a running one stops after its batch)")
            preview_mode = gui.add_dropdown("Training image", PREVIEW_MODES, initial_value=PREVIEW_MODES[0])
            status = gui.add_text("Status", pipeline.status, disabled=True)
            preview = gui.add_markdown("")

        def settings_changed(_) -> None:
            pipeline.request_settings(prompt.value, float(guidance.value), float(image_guidance.value))

        prompt.on_update(settings_changed)
        guidance.on_update(settings_changed)
        image_guidance.on_update(settings_changed)
        sweep_now.on_click(lambda _: pipeline.request_sweep())
        pause.on_update(lambda _: pipeline.set_editing_paused(bool(pause.value)))
        self.handles = dict(prompt=prompt, guidance=guidance, image_guidance=image_guidance, sweep_now=sweep_now,
                            pause=pause, preview_mode=preview_mode, status=status, preview=preview)
        self._stopping = threading.Event()
        self._refresher = threading.Thread(target=self._refresh_forever, name="igs2gs-viewer-panel", daemon=True)
        self._refresher.start()
        finish_at_exit(self._refresher, self._stopping.set)  # a preview is made with torch: not left in it at exit

    # ------------------------------------------------------------------------ refreshing
    def _refresh_forever(self) -> None:
        while not self._stopping.wait(0.25):
            try:
                self.refresh()
            except Exception:  # noqa: BLE001 - a closed viewer or a dropped client must not end training
                continue

    def refresh(self) -> None:
        """Push the status line and the preview to the viewer when they changed."""
        status = self.handles["status"]
        if status.value != self.pipeline.status:
            status.value = self.pipeline.status
        mode = self.handles["preview_mode"].value
        view = self.nearest_view() if mode != PREVIEW_MODES[0] else None
        datamanager = self.pipeline.datamanager
        image = None
        if view is not None:
            image = datamanager.original_images[view] if mode == PREVIEW_MODES[1] else datamanager.working_image(view)
        if self._shown and self._shown[:2] == (mode, view) and self._shown[2] is image:
            return
        self._shown = (mode, view, image)
        if image is None:
            self.handles["preview"].content = ""
            return
        name = datamanager.image_names[view]
        self.handles["preview"].content = preview_markdown(datamanager.over_background(image), f"**{mode}** of training view {view} ({name}), nearest to the viewer camera")

    def nearest_view(self) -> Optional[int]:
        """Training view whose camera is nearest to the first connected client's camera."""
        clients = list(self.viser_server.get_clients().values())
        if not clients:
            return None
        position = torch.tensor(np.asarray(clients[0].camera.position), dtype=torch.float32) / VISER_NERFSTUDIO_SCALE_RATIO
        centres = self.pipeline.datamanager.train_dataset.cameras.camera_to_worlds[:, :3, 3].float().cpu()
        return int(torch.linalg.norm(centres - position, dim=1).argmin())

