"""The editor's UNet compiled ahead of time (AOTInductor) for one input shape, kept on disk between runs.

``torch.compile`` traces the UNet again in every process (15-31 s on an H100 with a warm cache),
which a 73-view edit never earns back. A package is compiled once per shape, model architecture,
dtype, GPU type and library versions (minutes), then loads in about a second. It holds kernels,
not weights: at load its constants are bound to the tensors of the UNet already in memory, so one
package serves every checkpoint of an architecture and no second copy of the weights is made.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import torch
from nerfstudio.utils.rich_utils import CONSOLE
from torch import Tensor, nn

PACKAGE_FORMAT = 1  # bump when what goes into a package changes
PACKAGE_OPTIONS = {
    "aot_inductor.package_constants_in_so": False,  # weights are bound at load
    "always_keep_tensor_constants": True,  # else inductor inlines small ones (conv_out's 4-channel bias) as literals
}


def package_folder() -> Path:
    """Where packages are kept: ``$IGS2GS_PACKAGE_DIR``, else ``~/.cache/igs2gs/unet-packages``."""
    chosen = os.environ.get("IGS2GS_PACKAGE_DIR")
    if chosen:
        return Path(chosen)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "igs2gs" / "unet-packages"


class _UNetCall(nn.Module):
    """The UNet as the editor calls it, with positional tensors only (what export and the package take)."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, sample: Tensor, timestep: Tensor, encoder_hidden_states: Tensor) -> Tensor:
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]


def package_key(unet: nn.Module, sample: Tensor, timestep: Tensor, encoder_hidden_states: Tensor) -> str:
    """What a package depends on, hashed: the architecture (not the weights), the inputs' shapes and dtypes,
    the device type, the attention implementation and the library versions."""
    import diffusers

    device = sample.device
    facts = {
        "format": PACKAGE_FORMAT,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "class": type(unet).__qualname__,
        "config": {key: value for key, value in dict(unet.config).items() if not key.startswith("_")},
        "dtype": str(next(unet.parameters()).dtype),
        "attention": sorted({type(processor).__name__ for processor in unet.attn_processors.values()}),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
        "capability": torch.cuda.get_device_capability(device) if device.type == "cuda" else None,
        "inputs": [(tuple(t.shape), str(t.dtype)) for t in (sample, timestep, encoder_hidden_states)],
    }
    return hashlib.sha256(json.dumps(facts, sort_keys=True, default=str).encode()).hexdigest()[:24]


class PackagedUNet:
    """Calls a package for the inputs it was compiled for and the eager UNet for any other shape."""

    def __init__(self, unet: nn.Module, runner: Callable, shape: torch.Size, constants: Dict[str, Tensor]) -> None:
        self.unet, self.runner, self.shape = unet, runner, shape
        self._constants = constants  # the package reads these tensors directly: they must stay alive

    def __call__(self, sample: Tensor, timestep: Tensor, encoder_hidden_states: Tensor, return_dict: bool = False) -> Tuple[Tensor]:
        if sample.shape != self.shape:
            return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False)
        return (self.runner(sample, timestep, encoder_hidden_states),)


def _load(path: Path, device_index: int) -> Callable:
    """The package's runner, from its own loader. ``torch._inductor.aoti_load_package`` first describes this
    machine for a mismatch warning, building and running a test program per CPU vector instruction set: 49-56 s
    of a fresh process on the H100 machine, against under a second for the load itself."""
    try:
        from torch._C._aoti import AOTIModelPackageLoader
        from torch._inductor.package.package import AOTICompiledModel

        return AOTICompiledModel(AOTIModelPackageLoader(str(path), "model", False, 1, device_index))
    except (ImportError, TypeError):  # another torch's private API: take the public, slower way
        return torch._inductor.aoti_load_package(str(path), device_index=device_index)


def _bind(path: Path, unet: nn.Module, sample: Tensor) -> PackagedUNet:
    """Load the package at ``path`` (made for inputs like ``sample``) and point its constants at ``unet``'s tensors."""
    device = sample.device
    runner = _load(path, device.index if device.type == "cuda" and device.index is not None else -1)
    weights = _UNetCall(unet).state_dict()
    needed = list(runner.get_constant_fqns())
    unknown = [name for name in needed if name not in weights]
    if unknown:  # a constant export could not name: running it unbound would read unset memory
        raise ValueError(f"the package needs constants the UNet does not have: {unknown[:3]}")
    baked = [name for name in weights if name not in needed]
    if baked:  # compiled in with the values of the UNet it was made from, not this one's
        raise ValueError(f"the package has weights built in: {baked[:3]}")
    constants = {name: weights[name] for name in needed}
    runner.load_constants(constants, check_full_update=True, user_managed=True)
    return PackagedUNet(unet, runner, sample.shape, constants)


def _compile(unet: nn.Module, inputs: Tuple[Tensor, Tensor, Tensor], path: Path) -> None:
    """Export the UNet for these inputs and write its package to ``path`` (atomically: a partial file never
    has the final name)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.stem}.{uuid.uuid4().hex[:8]}.partial.pt2")
    try:
        with torch.no_grad():
            exported = torch.export.export(_UNetCall(unet), inputs, strict=False)
        torch._inductor.aoti_compile_and_package(
            exported, package_path=str(partial), inductor_configs=PACKAGE_OPTIONS
        )
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def packaged_unet(
    unet: nn.Module, sample: Tensor, timestep: Tensor, encoder_hidden_states: Tensor, folder: Optional[Path] = None
) -> Optional[PackagedUNet]:
    """The UNet's package for these inputs, loaded from ``folder`` (default ``package_folder()``) or compiled
    into it first. ``None`` (logged) if it can be neither: the editor then stays eager."""
    inputs = (sample, timestep, encoder_hidden_states)
    path = (folder or package_folder()) / f"unet-{package_key(unet, *inputs)}.pt2"
    started = time.perf_counter()
    if path.exists():
        try:
            packaged = _bind(path, unet, sample)
            CONSOLE.log(f"Loaded the compiled UNet from {path} in {time.perf_counter() - started:.1f} s")
            return packaged
        except Exception as error:  # noqa: BLE001 - a damaged or foreign file is replaced, not fatal
            CONSOLE.log(f"[yellow]igs2gs: the compiled UNet in {path} could not be loaded ({error}); compiling it again")
    CONSOLE.log(f"Compiling the UNet for inputs of {tuple(sample.shape)}: once, a few minutes (171 s on an H100); kept in {path.parent}")
    try:
        _compile(unet, inputs, path)
        packaged = _bind(path, unet, sample)
    except Exception as error:  # noqa: BLE001 - no compiler, an unsupported op...: edit eagerly instead
        CONSOLE.log(f"[yellow]igs2gs: compiling or loading the UNet's package failed ({type(error).__name__}: {error}); editing without it")
        return None
    CONSOLE.log(f"Compiled the UNet in {time.perf_counter() - started:.1f} s")
    return packaged
