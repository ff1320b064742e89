"""The editor's networks compiled ahead of time (AOTInductor) for one input shape, kept on disk between runs.

``torch.compile`` traces again in every process (15-31 s for the UNet on an H100 with a warm cache),
which a 73-view edit never earns back. A package is compiled once per part (UNet, VAE encoder, VAE
decoder), input shape, model architecture, dtype, GPU type and library versions (minutes), then loads
in about a second. It holds kernels, not weights: at load its constants are bound to the tensors of
the model already in memory, so one package serves every checkpoint of an architecture and no second
copy of the weights is made.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from pathlib import Path
from typing import Any, Callable, ClassVar, Dict, Optional, Tuple

import torch
from nerfstudio.utils.rich_utils import CONSOLE
from torch import Tensor, nn

PACKAGE_FORMAT = 1  # bump when what goes into a package changes
PACKAGE_OPTIONS = {
    "aot_inductor.package_constants_in_so": False,  # weights are bound at load
    "always_keep_tensor_constants": True,  # else inductor inlines small ones (conv_out's 4-channel bias) as literals
}


def package_folder() -> Path:
    """Where packages are kept: ``$IGS2GS_PACKAGE_DIR``, else ``~/.cache/igs2gs/packages``."""
    chosen = os.environ.get("IGS2GS_PACKAGE_DIR")
    if chosen:
        return Path(chosen)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "igs2gs" / "packages"


def _model_facts(model: nn.Module) -> Dict[str, Any]:
    """What of a diffusers model a package depends on: its class, configuration, dtype and attention, not its weights."""
    processors = getattr(model, "attn_processors", {})
    return {
        "class": type(model).__qualname__,
        "config": {key: value for key, value in dict(model.config).items() if not key.startswith("_")},
        "dtype": str(next(model.parameters()).dtype),
        "attention": sorted({type(processor).__name__ for processor in processors.values()}),
    }


class PackagePart(nn.Module):
    """One network as the editor calls it, with positional tensors in and one tensor out (what export and a
    package take); it holds only the modules it runs, so its state dict is exactly the package's constants."""

    part: ClassVar[str]
    """The package file's prefix, and what the log calls it."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.facts = _model_facts(model)


class UNetCall(PackagePart):
    part = "unet"

    def __init__(self, unet: nn.Module) -> None:
        super().__init__(unet)
        self.unet = unet

    def forward(self, sample: Tensor, timestep: Tensor, encoder_hidden_states: Tensor) -> Tensor:
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]


class VAEEncoderCall(PackagePart):
    """Images in [-1, 1] to the latent distribution's parameters (``AutoencoderKL.encode`` without tiling)."""

    part = "vae-encoder"

    def __init__(self, vae: nn.Module) -> None:
        super().__init__(vae)
        self.encoder, self.quant_conv = vae.encoder, vae.quant_conv

    def forward(self, images: Tensor) -> Tensor:
        moments = self.encoder(images)
        return moments if self.quant_conv is None else self.quant_conv(moments)


class VAEDecoderCall(PackagePart):
    """Unscaled latents to images in [-1, 1] (``AutoencoderKL.decode`` without tiling)."""

    part = "vae-decoder"

    def __init__(self, vae: nn.Module) -> None:
        super().__init__(vae)
        self.post_quant_conv, self.decoder = vae.post_quant_conv, vae.decoder

    def forward(self, latents: Tensor) -> Tensor:
        return self.decoder(latents if self.post_quant_conv is None else self.post_quant_conv(latents))


def package_key(call: PackagePart, inputs: Tuple[Tensor, ...]) -> str:
    """What a package depends on, hashed: the model's architecture (not its weights), the inputs' shapes and
    dtypes, the device type and the library versions."""
    import diffusers

    device = inputs[0].device
    facts = {
        "format": PACKAGE_FORMAT,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        **call.facts,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
        "capability": torch.cuda.get_device_capability(device) if device.type == "cuda" else None,
        "inputs": [(tuple(t.shape), str(t.dtype)) for t in inputs],
    }
    return hashlib.sha256(json.dumps(facts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def padded_rows(rows: Tensor, count: int) -> Tensor:
    """``rows`` with its last row repeated ``count`` more times (a batch padded to a package's or editor's size)."""
    return torch.cat([rows, rows[-1:].expand(count, *rows.shape[1:])]) if count else rows


class Packaged:
    """Runs a package for inputs of the shape it was compiled for, and the eager part for any other - but a
    one-input part (the VAE's halves) given more than half of its batch runs packaged, padded with copies of its
    last row: a sweep's batch of 15 reaches the VAE in chunks of 4, 4, 4 and 3, and 4 rows packaged cost less than
    3 eager (on an H100, 3 rows decoded in 37 ms padded against 53 ms eager, encoded in 18.5 vs 23.5 ms). Rows are
    independent in the VAE.

    A package call holds Python's GIL while it launches its kernels, and a launch blocks while the GPU's queue is
    full. torch's runner in its default mode waited for its previous call to finish on the GPU (one model instance,
    reclaimed by a CUDA event synchronisation) with the GIL held, so every other thread - training beside
    overlapped edits, the viewer - stood still for each UNet call's GPU time. Here, on CUDA, each call waits for the
    previous one with the GIL released (the queue then has room); the GPU is as busy as before."""

    def __init__(
        self, call: PackagePart, runner: Callable, shape: torch.Size, constants: Dict[str, Tensor], device: torch.device,
        cuda_graph: bool = False,
    ) -> None:
        self.call, self.runner, self.shape = call, runner, shape
        self._constants = constants  # the package reads these tensors directly: they must stay alive
        self._previous = torch.cuda.Event() if device.type == "cuda" else None  # recorded after each call
        self.cuda_graph = cuda_graph and device.type == "cuda"
        """After its first call, replay the package from a CUDA graph (``_replay``)."""
        self.graph_failed: Optional[str] = None  # why the capture failed: calls then stay direct
        self._called = False  # the first call is direct: it loads the kernels a capture must not load
        self._graph: Any = None  # the captured graph (``capture_graph``), its input buffers and the output it writes
        self._static_inputs: Tuple[Tensor, ...] = ()
        self._static_output: Optional[Tensor] = None

    @property
    def replaying(self) -> bool:
        """Whether calls are replayed from a captured CUDA graph."""
        return self._graph is not None

    def __call__(self, *inputs: Tensor) -> Tensor:
        rows, batch = inputs[0].shape[0], self.shape[0]
        if len(inputs) == 1 and inputs[0].shape[1:] == self.shape[1:] and batch / 2 < rows < batch:
            return self(padded_rows(inputs[0], batch - rows))[:rows]
        if inputs[0].shape != self.shape:
            return self.call(*inputs)
        if self.cuda_graph and self.graph_failed is None and self._called:
            return self._replay(inputs)
        self._called = True
        if self._previous is not None:
            self._previous.synchronize()  # releases the GIL; returns at once before the first call
        output = self.runner(*(tensor.contiguous() for tensor in inputs))  # it reads them with contiguous strides
        if self._previous is not None:
            self._previous.record(torch.cuda.current_stream(inputs[0].device))  # the stream the runner launched on
        return output

    def _replay(self, inputs: Tuple[Tensor, ...]) -> Tensor:
        """The package's call as one CUDA graph launch, captured at the first call made here (the one before loaded
        its kernels and made cuDNN's plans, which a capture must not do). A graph launch is one host call, made with
        the GIL released, where a direct call launches each of its kernels (the UNet: hundreds) holding it. Inputs
        are copied into the graph's own; the output is a copy (the next replay overwrites the graph's)."""
        if self._graph is None:
            self._capture(inputs)
            if self._graph is None:
                return self(*inputs)
        if any(static.shape != given.shape or static.dtype != given.dtype for static, given in zip(self._static_inputs, inputs)):
            return self.call(*inputs)  # what the package was not compiled for runs eagerly, as in ``__call__``
        for static, given in zip(self._static_inputs, inputs):
            static.copy_(given)
        self._graph.replay()
        assert self._static_output is not None
        return self._static_output.clone()

    def _capture(self, inputs: Tuple[Tensor, ...]) -> None:
        self._static_inputs = tuple(tensor.clone(memory_format=torch.contiguous_format) for tensor in inputs)
        try:
            self._graph, self._static_output = capture_graph(lambda: self.runner(*self._static_inputs), inputs[0].device)
        except RuntimeError as error:  # e.g. a library call that may not be captured: call the package directly
            self.graph_failed = f"{type(error).__name__}: {error}"
            self._graph, self._static_inputs, self._static_output = None, (), None
            CONSOLE.log(f"[yellow]igs2gs: capturing the {self.call.part}'s package in a CUDA graph failed ({error}); calling it directly")


def capture_graph(run: Callable[[], Tensor], device: torch.device) -> Tuple[Any, Tensor]:
    """``run``'s GPU work captured in a CUDA graph, and the tensor each replay writes its output to. ``run`` is first
    run once on the capture's own stream: this thread's cuDNN and cuBLAS handles and that stream's workspaces must
    exist before a capture, which may not make them. Only this thread's calls are checked during the capture: other
    threads (training beside the edits, the viewer) may use the GPU meanwhile."""
    with torch.cuda.device(device):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            run()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local"):
            output = run()
    return graph, output


def _load(path: Path, device_index: int) -> Callable:
    """The package's runner, from its own loader. ``torch._inductor.aoti_load_package`` first describes this
    machine for a mismatch warning, building and running a test program per CPU vector instruction set: 49-56 s
    of a fresh process on the H100 machine, against under a second for the load itself.

    Single-threaded: in its default mode the runner waits for its previous call with the GIL held (see ``Packaged``,
    which does that wait without it); an editor's packages are called from one thread at a time (the warm-up, then
    the sweeps), which is what that mode asks."""
    try:
        from torch._C._aoti import AOTIModelPackageLoader
        from torch._inductor.package.package import AOTICompiledModel

        return AOTICompiledModel(AOTIModelPackageLoader(str(path), "model", True, 1, device_index))
    except (ImportError, TypeError):  # another torch's private API: take the public, slower way
        return torch._inductor.aoti_load_package(str(path), run_single_threaded=True, device_index=device_index)


def _bind(path: Path, call: PackagePart, inputs: Tuple[Tensor, ...], cuda_graph: bool = False) -> Packaged:
    """Load the package at ``path`` (made for inputs like these) and point its constants at ``call``'s tensors
    (``cuda_graph``: see ``Packaged``).

    On CUDA, torch 2.11's loader keeps the tensors bound here allocated for the rest of the process, even after
    the runner and the model are gone (H100: 1.94 GB of UNet and VAE weights left by a deleted editor; 0.04 GB
    after an eager one): bind the weights of an editor that lives as long as the process."""
    device = inputs[0].device
    runner = _load(path, device.index if device.type == "cuda" and device.index is not None else -1)
    weights = call.state_dict()
    needed = list(runner.get_constant_fqns())
    unknown = [name for name in needed if name not in weights]
    if unknown:  # a constant export could not name: running it unbound would read unset memory
        raise ValueError(f"the package needs constants the model does not have: {unknown[:3]}")
    baked = [name for name in weights if name not in needed]
    if baked:  # compiled in with the values of the model it was made from, not this one's
        raise ValueError(f"the package has weights built in: {baked[:3]}")
    constants = {name: weights[name] for name in needed}
    runner.load_constants(constants, check_full_update=True, user_managed=True)
    return Packaged(call, runner, inputs[0].shape, constants, device, cuda_graph)


def _compile(call: PackagePart, inputs: Tuple[Tensor, ...], path: Path) -> None:
    """Export ``call`` for these inputs and write its package to ``path`` (atomically: a partial file never
    has the final name)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.stem}.{uuid.uuid4().hex[:8]}.partial.pt2")
    try:
        with torch.no_grad():  # compiled for contiguous inputs: ``Packaged`` hands it those
            exported = torch.export.export(call, tuple(tensor.contiguous() for tensor in inputs), strict=False)
        torch._inductor.aoti_compile_and_package(
            exported, package_path=str(partial), inductor_configs=PACKAGE_OPTIONS
        )
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def _is_file(path: Path) -> bool:
    """Whether a package file is there; a folder that cannot be read counts as holding none (a cache must not stop
    an edit)."""
    try:
        return path.is_file()
    except OSError:
        return False


def packaged(
    call: PackagePart, inputs: Tuple[Tensor, ...], folder: Optional[Path] = None, compile_missing: bool = True,
    cuda_graph: bool = False,
) -> Optional[Packaged]:
    """``call``'s package for these inputs, loaded from ``folder`` (default ``package_folder()``) or, with
    ``compile_missing``, compiled into it first (``cuda_graph``: replayed from a CUDA graph after its first call).
    ``None`` (logged) if it can be neither: the editor then runs that part eagerly."""
    path = (folder or package_folder()) / f"{call.part}-{package_key(call, inputs)}.pt2"
    started = time.perf_counter()
    found = _is_file(path)
    if found:
        try:
            loaded = _bind(path, call, inputs, cuda_graph)
            CONSOLE.log(f"Loaded the compiled {call.part} from {path} in {time.perf_counter() - started:.1f} s")
            return loaded
        except Exception as error:  # noqa: BLE001 - a damaged or foreign file is replaced, not fatal
            again = "compiling it again" if compile_missing else "running it eagerly"
            CONSOLE.log(f"[yellow]igs2gs: the compiled {call.part} in {path} could not be loaded ({error}); {again}")
    if not compile_missing:
        if not found:
            CONSOLE.log(f"No compiled {call.part} for inputs of {tuple(inputs[0].shape)} in {path.parent}: running it eagerly")
        return None
    CONSOLE.log(
        f"Compiling the {call.part} for inputs of {tuple(inputs[0].shape)}: once, up to a few minutes (on an H100: "
        f"the UNet 148-196 s, each VAE half 27-107 s); kept in {path.parent}"
    )
    try:
        _compile(call, inputs, path)
        loaded = _bind(path, call, inputs, cuda_graph)
    except Exception as error:  # noqa: BLE001 - no compiler, an unsupported op...: run eagerly instead
        CONSOLE.log(f"[yellow]igs2gs: compiling or loading the {call.part}'s package failed ({type(error).__name__}: {error}); running it eagerly")
        return None
    CONSOLE.log(f"Compiled the {call.part} in {time.perf_counter() - started:.1f} s")
    return loaded
