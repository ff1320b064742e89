"""Trainer that edits a loaded splatfacto scene and can resume an interrupted edit.

nerfstudio 1.1.5 builds the optimizers before loading a checkpoint, and splatfacto's
``load_state_dict`` replaces every Gaussian parameter with a new tensor: the optimizers keep
stepping the discarded tensors and the scene never changes. Here the optimizers are rebuilt on
the loaded parameters (then given the checkpoint's Adam state), the learning-rate schedules start
at the loaded step, and the edit store beside the checkpoints is attached (and restored on resume;
a finished edit is the start of a new one). The model follows the loaded run's SH degree, rasterize
and camera-optimizer modes (``adopt_scene_settings``). Checkpoints are written atomically.
"""

from __future__ import annotations

import copy
import json
import math
import re
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Sequence, Tuple, Type

import numpy as np
import torch
import yaml

from igs2gs.datamanager import CachedPhotos, unreadable_data, without_point_cloud
from igs2gs.edit_store import STORE_DIRNAME, EditStore, write_atomically
from igs2gs.optimizer_graph import GraphedOptimizers, graphable_groups, is_adam_on
from igs2gs.pipeline import check_edit_settings, check_prompt
from nerfstudio.engine.trainer import Trainer, TrainerConfig
from nerfstudio.utils import writer
from nerfstudio.utils.decorators import check_viewer_enabled
from nerfstudio.utils.rich_utils import CONSOLE

GAUSSIAN_KEY = "_model.gauss_params.means"


def cpu_snapshot(state: Any) -> Tuple[Any, List["torch.cuda.Event"]]:
    """``state`` with tensors copied to the CPU and numpy scalars turned into Python numbers, and the
    CUDA events that mark the end of the copies (wait for them before reading the copies).

    The copy lets a checkpoint be written while training goes on changing the tensors in place.
    CUDA tensors are copied into pinned memory without waiting: the training steps that follow run
    after the copies on the same stream, so the copies hold the state of this moment, and training
    does not wait for ~340 MB to cross to pageable memory. nerfstudio's exponential LR schedule
    leaves numpy floats in optimizer and scheduler states; torch >= 2.6 then refuses the checkpoint
    in ``ns-viewer``/``ns-render``/``ns-export``, which load with ``weights_only=True``.
    """
    devices = set()

    def copy(value: Any) -> Any:
        if isinstance(value, dict):
            return {key: copy(item) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(copy(item) for item in value)
        if isinstance(value, torch.Tensor):
            if value.is_cuda:
                devices.add(value.device)
                pinned = torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
                return pinned.copy_(value.detach(), non_blocking=True)
            return value.detach().to("cpu", copy=True)
        if isinstance(value, np.generic):
            return value.item()
        return value

    snapshot = copy(state)
    return snapshot, [torch.cuda.current_stream(device).record_event() for device in devices]


def use_fused_adam(
    optimizers: Dict[str, torch.optim.Optimizer], device_types: Sequence[str] = ("cuda",), fused: bool = True
) -> List[str]:
    """Switch Adam optimizers to torch's fused kernel, keeping their state (the same update).

    A splatfacto step runs one Adam per Gaussian attribute; the default multi-tensor Adam launches
    about a dozen kernels for each, the fused one a single kernel. Applied after a checkpoint's
    state is loaded (loading restores the saved ``fused`` flag). ``fused=False`` switches back to
    the multi-tensor Adam nerfstudio makes (the benchmark's reference-style steps). Returns the names switched.
    """
    switched = []
    for name, optimizer in optimizers.items():
        if not is_adam_on(optimizer, device_types):
            continue
        for group in optimizer.param_groups:
            group["fused"], group["foreach"] = fused, not fused
        first = next(p for group in optimizer.param_groups for p in group["params"])
        step_device = first.device if fused else torch.device("cpu")  # the fused kernel counts steps on the device
        for state in optimizer.state.values():
            if "step" in state:
                state["step"] = torch.as_tensor(state["step"], dtype=torch.float32).detach().to(step_device)
        switched.append(name)
    return switched


class CheckpointError(ValueError):
    """The checkpoint to edit is missing, unreadable, of another method or of other data."""


def find_checkpoint(load_dir: Optional[Path], load_step: Optional[int], load_checkpoint: Optional[Path]) -> Path:
    """The checkpoint file that ``--load-dir``/``--load-step`` or ``--load-checkpoint`` name."""
    if load_checkpoint is not None:
        if not Path(load_checkpoint).is_file():
            raise CheckpointError(f"--load-checkpoint {load_checkpoint} does not exist.")
        return Path(load_checkpoint)
    if load_dir is None:
        raise CheckpointError(
            "igs2gs edits a trained scene and needs one to start from. Train it first with "
            "`ns-train splatfacto --data DATA`, then run `ns-train igs2gs --data DATA "
            "--load-dir outputs/<scene>/splatfacto/<timestamp>/nerfstudio_models --pipeline.prompt \"...\"`."
        )
    steps = sorted(int(m.group(1)) for p in Path(load_dir).glob("step-*.ckpt") if (m := re.fullmatch(r"step-(\d+)\.ckpt", p.name)))
    if not steps:
        raise CheckpointError(f"--load-dir {load_dir} holds no step-*.ckpt checkpoint (point it at a run's nerfstudio_models folder).")
    step = steps[-1] if load_step is None else load_step
    if step not in steps:
        raise CheckpointError(f"--load-step {load_step} is not in {load_dir} (it has steps {steps}).")
    return Path(load_dir) / f"step-{step:09d}.ckpt"


class _PlainYamlLoader(yaml.SafeLoader):
    """Reads a run's config.yml as plain dicts and lists, importing none of the classes it names
    (a run of a plugin that is not installed here still reads)."""


def _plain(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> Any:
    """An object as a dict (with its class name under ``_class``), a path as a string, anything else plain."""
    if isinstance(node, yaml.MappingNode):
        value = loader.construct_mapping(node, deep=True)
        if suffix.startswith("object:"):
            value["_class"] = suffix.rsplit(".", 1)[-1]
        return value
    if isinstance(node, yaml.SequenceNode):
        items = loader.construct_sequence(node, deep=True)
        if suffix.endswith("Path"):
            return str(Path(*items)) if items else None
        return items
    return loader.construct_scalar(node)


_PlainYamlLoader.add_multi_constructor("tag:yaml.org,2002:python/", _plain)


def run_config(checkpoint: Path) -> Dict[str, Any]:
    """The config.yml of the run a checkpoint belongs to, as plain values ({} if it has none or it does not parse)."""
    path = checkpoint.parent.parent / "config.yml"
    try:
        loaded = yaml.load(path.read_text(), Loader=_PlainYamlLoader) if path.is_file() else None
    except (yaml.YAMLError, UnicodeDecodeError):
        loaded = None
    return loaded if isinstance(loaded, dict) else {}


def method_of_run(checkpoint: Path) -> Optional[str]:
    """``method_name`` from the config.yml of the run a checkpoint belongs to, if there is one."""
    method = run_config(checkpoint).get("method_name")
    return str(method) if method else None


def sh_degree_of(pipeline_state: Dict[str, Any]) -> Optional[int]:
    """The spherical-harmonics degree of a checkpoint's colours ((degree + 1)² coefficients per channel)."""
    rest = pipeline_state.get("_model.gauss_params.features_rest")
    if rest is None or rest.dim() != 3:
        return None
    coefficients = rest.shape[1] + 1
    degree = math.isqrt(coefficients) - 1
    if (degree + 1) ** 2 != coefficients:
        raise CheckpointError(f"The checkpoint's features_rest has {rest.shape[1]} SH coefficients per colour: not (degree + 1)² - 1.")
    return degree


def adopt_scene_settings(model: Any, checkpoint: Path, state: Dict[str, Any]) -> List[str]:
    """Make the edit's model render the loaded scene as its own run did; returns the changes made.

    The SH degree follows the checkpoint's colour tensors (another one cannot load them). The
    rasterize mode, the background colour (a scene trained against white shows white where it is
    clear: sweeps must render it so, or IP2P is shown another background than the photos') and the
    camera-optimizer mode (whose pose corrections the checkpoint holds) follow the run's config.yml
    where this run leaves them at their defaults: a value given on the command line wins.
    """
    changes = []
    degree = sh_degree_of(state["pipeline"])
    if degree is not None and degree != model.sh_degree:
        changes.append(f"sh_degree {model.sh_degree} -> {degree} (the degree of the checkpoint's colours)")
        model.sh_degree = degree
    source = run_config(checkpoint).get("pipeline", {}).get("model", {})
    source = source if isinstance(source, dict) else {}
    defaults = type(model)()
    for name, known in (("rasterize_mode", ("classic", "antialiased")), ("background_color", ("random", "black", "white"))):
        value = source.get(name)
        if value in known and getattr(model, name) == getattr(defaults, name) != value:
            changes.append(f"{name} {getattr(model, name)} -> {value} (as the scene was trained)")
            setattr(model, name, value)
    camera = source.get("camera_optimizer")
    mode = camera.get("mode") if isinstance(camera, dict) else None
    if mode in ("off", "SO3xR3", "SE3") and model.camera_optimizer.mode == defaults.camera_optimizer.mode != mode:
        changes.append(f"camera_optimizer.mode {model.camera_optimizer.mode} -> {mode} (the checkpoint's pose corrections)")
        model.camera_optimizer.mode = mode
    return changes


def load_checkpoint_state(checkpoint: Path) -> Dict[str, Any]:
    """Read a checkpoint and check that it holds a Gaussian-splatting scene."""
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    except Exception as error:  # truncated or foreign files
        raise CheckpointError(f"Could not read checkpoint {checkpoint}: {type(error).__name__}: {error}") from None
    if not isinstance(state, dict) or "pipeline" not in state or "step" not in state:
        raise CheckpointError(f"{checkpoint} is not a nerfstudio checkpoint (no 'pipeline'/'step' entries).")
    if GAUSSIAN_KEY not in state["pipeline"]:
        method = method_of_run(checkpoint) or "another method"
        raise CheckpointError(
            f"{checkpoint} is a checkpoint of {method}, not of a Gaussian-splatting scene (it has no "
            f"{GAUSSIAN_KEY}). igs2gs edits splatfacto scenes: train one with `ns-train splatfacto --data DATA`."
        )
    return state


def dataparser_differences(checkpoint: Path, datamanager: Any) -> List[str]:
    """How this edit's --data and dataparser differ from those in the config.yml of the scene's run."""
    source = run_config(checkpoint).get("pipeline", {}).get("datamanager", {})
    source = source if isinstance(source, dict) else {}
    differences = []
    trained_on = source.get("data")
    if isinstance(trained_on, str) and datamanager.data is not None and Path(trained_on).resolve() != Path(datamanager.data).resolve():
        differences.append(f"the scene was trained on --data {trained_on}")
    parser, ours = source.get("dataparser"), datamanager.dataparser
    if not isinstance(parser, dict):
        return differences
    if parser.get("_class", type(ours).__name__) != type(ours).__name__:
        from nerfstudio.configs.dataparser_configs import all_dataparsers

        names = [name for name, config in all_dataparsers.items() if type(config).__name__ == parser["_class"]]
        how = f" (add `{names[0]}` and its options at the end of the command)" if names else ""
        differences.append(f"its data was parsed with {parser['_class']}{how}, this edit's with {type(ours).__name__}")
        return differences
    for key, value in sorted(parser.items()):
        if key.startswith("_") or key in ("data", "load_3D_points") or not hasattr(ours, key):  # the cloud moves no camera
            continue
        mine = getattr(ours, key)
        if isinstance(mine, (str, int, float, bool, type(None))) and mine != value:
            differences.append(f"its dataparser had {key.replace('_', '-')} {value!r}, this edit's has {mine!r}")
    return differences


def check_same_scene(checkpoint: Path, dataparser_outputs, datamanager: Any) -> None:
    """Refuse data whose scene normalisation differs from the one the checkpoint was trained in.

    The splats live in the dataparser's normalised frame; other data (or other dataparser
    settings) would put the cameras somewhere else and the sweep would edit garbage.
    """
    saved = checkpoint.parent.parent / "dataparser_transforms.json"
    if not saved.is_file():
        CONSOLE.print(f"[yellow]No dataparser_transforms.json beside {checkpoint.parent}: cannot check that --data matches it.")
        return
    recorded = json.loads(saved.read_text())
    transform = torch.tensor(recorded["transform"], dtype=torch.float32)
    ours = dataparser_outputs.dataparser_transform.float()
    scale_ratio = float(dataparser_outputs.dataparser_scale) / float(recorded["scale"])
    if not torch.allclose(transform, ours, atol=1e-4) or abs(scale_ratio - 1) > 1e-4:
        known = dataparser_differences(checkpoint, datamanager)
        raise CheckpointError(
            f"--data does not match the checkpoint's training data: its scene normalisation ({saved}) differs from "
            "the one computed now (other images, poses or dataparser settings)"
            + (": " + "; ".join(known) if known else "")
            + ". Pass the --data and dataparser options the scene was trained with."
        )


@dataclass
class IGS2GSTrainerConfig(TrainerConfig):
    """Trainer for an edit of a loaded splatfacto scene."""

    _target: Type = field(default_factory=lambda: IGS2GSTrainer)
    restart_schedules: bool = True
    """Start the learning-rate schedules afresh at the loaded step (a finished splatfacto run has decayed the position LR to its floor, which would freeze the geometry)."""
    fused_adam: bool = True
    """Step the splats' Adam optimizers with torch's fused kernel on CUDA (one kernel per attribute instead of about a dozen; the same update). A run resumed from a fused checkpoint stays fused."""
    adam_cuda_graph: bool = True
    """With fused Adam on CUDA and no densification, replay the splats' Adam updates from one CUDA graph (the same updates, ~1 ms less host time per step)."""
    read_ahead_cuda_libraries: bool = False
    """On CUDA, ask the operating system at set-up's start to read torch's CUDA libraries (cuDNN, cuBLAS, ...) into its page cache, so that the editor's first calls do not wait for the disk (experimental: off until measured)."""


class IGS2GSTrainer(Trainer):
    """Loads a splatfacto (or igs2gs) checkpoint so that training really moves the loaded splats."""

    config: IGS2GSTrainerConfig

    _checkpoint_writer: Optional[ThreadPoolExecutor] = None
    _pending_checkpoint: Optional[Future] = None

    def setup(self, test_mode: Literal["test", "val", "inference"] = "val") -> None:
        if self.config.read_ahead_cuda_libraries and torch.device(self.device).type == "cuda":
            from igs2gs.cuda_libraries import start_read_ahead

            start_read_ahead()
        # Fail before datasets and the editor load: a missing or foreign checkpoint is the commonest mistake.
        pipeline = self.config.pipeline
        check_prompt(pipeline.model.prompt or pipeline.prompt)
        check_edit_settings(pipeline, str(self.device))
        self.checkpoint_path = find_checkpoint(self.config.load_dir, self.config.load_step, self.config.load_checkpoint)
        self.loaded_state: Optional[Dict[str, Any]] = load_checkpoint_state(self.checkpoint_path)
        check_same_scene(self.checkpoint_path, self._train_dataparser_outputs(), pipeline.datamanager)
        changes = adopt_scene_settings(pipeline.model, self.checkpoint_path, self.loaded_state)
        if changes:
            CONSOLE.print("Following the loaded scene: " + "; ".join(changes) + ".")
            # ns-export, ns-render and a resume rebuild the model from the run's config.yml.
            write_atomically(self.config.get_base_dir() / "config.yml", yaml.dump(self.config).encode("utf8"))
        if self.config.is_viewer_enabled():
            from igs2gs.viewer_controls import index_viser_icons

            index_viser_icons()  # before nerfstudio's viewer builds its GUI
        super().setup(test_mode)
        if self.viewer_state is not None:
            from igs2gs.threads_at_exit import finish_at_exit_those_of
            from igs2gs.viewer_controls import render_threads_of

            finish_at_exit_those_of(render_threads_of(self.viewer_state))
        # nerfstudio's console counts "% Done" and the ETA up to max_num_iterations as an absolute step;
        # an edit starts at the loaded step (e.g. 30000), so count up to the step the edit ends at.
        writer.GLOBAL_BUFFER["max_iter"] = self.pipeline.edit_end_step
        self.pipeline.model.training_metrics_every = self.config.logging.steps_per_log

    @check_viewer_enabled
    def _init_viewer_state(self) -> None:
        """nerfstudio's, with the cameras' thumbnails drawn from the photos the datamanager holds (``CachedPhotos``)."""
        assert self.viewer_state is not None
        datamanager = self.pipeline.datamanager
        self.viewer_state.init_scene(
            train_dataset=CachedPhotos(datamanager), train_state=self.training_state, eval_dataset=datamanager.eval_dataset
        )

    def _train_dataparser_outputs(self):
        """The training split as the datamanager will parse it (poses and normalisation only, no images).

        Data the dataparser cannot read (most often: a COLMAP folder without the ``colmap`` subcommand)
        is refused here, with what the scene's run used, instead of with a traceback from the dataparser.
        """
        datamanager = self.config.pipeline.datamanager
        dataparser = without_point_cloud(copy.deepcopy(datamanager.dataparser))  # the check compares poses only
        if datamanager.data is not None:
            dataparser.data = Path(datamanager.data)
        try:
            return dataparser.setup().get_dataparser_outputs(split="train")
        except Exception as error:  # each dataparser fails in its own way on data it cannot read
            known = dataparser_differences(self.checkpoint_path, datamanager)
            raise CheckpointError(
                unreadable_data(dataparser.data, dataparser, error) + ("; " + "; ".join(known) if known else "")
                + ". Pass the --data and dataparser (subcommand at the end) the scene was trained with."
            ) from None

    def _load_checkpoint(self) -> None:
        state, path = self.loaded_state, self.checkpoint_path
        assert state is not None
        self.loaded_state = None  # free the CPU copy once loaded
        previous = EditStore(path.parent.parent / STORE_DIRNAME)
        previous_state = previous.load_state()
        loaded_step = int(state["step"])
        resuming = previous_state is not None
        if previous_state is not None and previous_state.edit_end_step is not None and loaded_step >= previous_state.edit_end_step:
            CONSOLE.print(
                f"The edit in {path.parent.parent} finished at step {previous_state.edit_end_step}: starting a new edit "
                "from its splats (the photos stay the image conditioning)."
            )
            resuming = False
        self._start_step = loaded_step + 1
        self.pipeline.load_pipeline(state["pipeline"], loaded_step)
        # The stale-optimizer fix: build the optimizers on the parameters that now exist.
        self.optimizers = self.setup_optimizers()
        left = sorted(set(state["optimizers"]) - set(self.optimizers.optimizers))
        if left:
            CONSOLE.print(f"The edit does not train {', '.join(left)} of the loaded scene: their optimizer states are left.")
        self.optimizers.load_optimizers(self._own_groups(state["optimizers"]))
        if self.config.fused_adam:
            use_fused_adam(self.optimizers.optimizers)
        if "schedulers" in state and (resuming or not self.config.restart_schedules):
            self.optimizers.load_schedulers(self._own_groups(state["schedulers"]))
        self.grad_scaler.load_state_dict(state["scalers"])
        store = EditStore(self.base_dir / STORE_DIRNAME)
        # The edit ends max_num_iterations after the step it started from, also across resumes.
        self.pipeline.start_editing(store, loaded_step, self.config.max_num_iterations, previous if resuming else None)
        self.pipeline.model.start_edit_at(self.pipeline.sweep_state.edit_start_step)
        self._graph_adam_steps()
        end_step = self.pipeline.edit_end_step
        self.config.max_num_iterations = max(0, end_step - loaded_step)
        if not resuming:  # makes the run resumable from its first sweep on (also after a kill -9 in it)
            self.save_checkpoint(loaded_step)
            # Written beside the rest of set-up and the first sweep (waiting for it took 5.7 s of a profiled set-up, H100);
            # no edit, nor the progress that counts it, reaches the disk before it: a resume finds the scene edits belong to.
            assert self._pending_checkpoint is not None
            self.pipeline.store_after(self._pending_checkpoint)
        CONSOLE.print(
            f"Loaded {path} (step {loaded_step}, {self.pipeline.model.num_points} Gaussians); "
            f"{'resuming the edit' if resuming else 'editing'} until step {end_step}."
        )

    def _graph_adam_steps(self) -> None:
        """Step the Gaussians' optimizers from a CUDA graph where that is the eager update (``optimizer_graph``)."""
        model = self.pipeline.model
        if not (self.config.fused_adam and self.config.adam_cuda_graph) or model.refine_origin is not None:
            return  # densification replaces the parameters
        if self.grad_scaler.is_enabled() or self.config.log_gradients:
            return
        graphed = graphable_groups(self.optimizers, list(model.gauss_params.keys()), self.gradient_accumulation_steps)
        if graphed:
            self.optimizers = GraphedOptimizers.adopt(self.optimizers, graphed)

    def _own_groups(self, states: Dict[str, Any]) -> Dict[str, Any]:
        """The checkpoint's optimizer or scheduler states for the parameter groups this edit trains.

        A scene trained with a bilateral grid has states for it; the edit trains none unless asked
        (a per-image colour correction would absorb the edit instead of the splats), so they are left.
        """
        return {name: value for name, value in states.items() if name in self.optimizers.optimizers}

    def save_checkpoint(self, step: int) -> None:
        """Like nerfstudio's, but loadable with ``weights_only=True``, written to a temporary file,
        synced, then renamed (neither a kill nor a crash of the machine leaves half a checkpoint, and the older one is
        deleted only once the new one is on disk), and written in the background:
        training waits only for the copy of the state to pinned memory to be queued (a 474k-splat
        checkpoint with its Adam state is ~340 MB, about a second to write). ``wait_for_checkpoint``
        waits for the file."""
        self.wait_for_checkpoint()  # one write at a time, in step order; also re-raises a failed one
        state = {
            "step": step,
            "pipeline": self.pipeline.state_dict(),
            "optimizers": {k: v.state_dict() for (k, v) in self.optimizers.optimizers.items()},
            "schedulers": {k: v.state_dict() for (k, v) in self.optimizers.schedulers.items()},
            "scalers": self.grad_scaler.state_dict(),
        }
        if self._checkpoint_writer is None:
            self._checkpoint_writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="igs2gs-checkpoint")
        self._pending_checkpoint = self._checkpoint_writer.submit(self._write_checkpoint, step, *cpu_snapshot(state))

    def wait_for_checkpoint(self) -> None:
        """Return once the latest checkpoint is on disk."""
        pending, self._pending_checkpoint = self._pending_checkpoint, None
        if pending is not None:
            pending.result()

    def _write_checkpoint(self, step: int, state: Dict[str, Any], copied: Sequence["torch.cuda.Event"]) -> None:
        for event in copied:
            event.synchronize()
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        path = self.checkpoint_dir / f"step-{step:09d}.ckpt"
        write_atomically(path, lambda file: torch.save(state, file))  # synced before the older checkpoints go
        if self.config.save_only_latest_checkpoint:
            for old in self.checkpoint_dir.glob("step-*.ckpt"):
                if old != path:
                    old.unlink()

    def _after_train(self) -> None:
        super()._after_train()  # saves the last checkpoint
        self.wait_for_checkpoint()
        self.pipeline.raise_failed_writes(wait=True)  # the last sweep's edits, state and sheet are on disk
