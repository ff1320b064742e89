"""InstructPix2Pix editor: the Instruct-GS2GS edit step, batched, with cached conditioning.

One edit takes a render of the current splats and the ORIGINAL photo of the same view. The render
is VAE-encoded, noised to a timestep drawn per edit from ``[lower_bound, upper_bound] * 1000`` and
denoised to 0 in ``diffusion_steps`` DDIM steps, guided by the instruction (text) and the original
photo's latent (image), with the classifier-free guidance of InstructPix2Pix. diffusers and
transformers are imported only when a model is loaded, so the plugin's config stays light.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import re
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Dict, Hashable, List, Literal, Optional, Sequence, Set, Tuple, Union, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

from igs2gs.aot_package import padded_rows

if TYPE_CHECKING:
    from diffusers import StableDiffusionInstructPix2PixPipeline

DEFAULT_MODEL = "timbrooks/instruct-pix2pix"
PackageUse = Literal["compile", "cached", "off"]
"""How an editor uses compiled packages (``aot_package``): compile those missing, use only those on disk, or none."""
PACKAGE_USES: Tuple[str, ...] = get_args(PackageUse)
# Peak activation memory of one 512x512 edit (three CFG branches) with SD-1.5 in half precision,
# measured on an H100: 6.70 GB at batch 8 and 11.0 GB at batch 16 over 2.39 GB of weights.
EDIT_BYTES_512 = 0.55e9
GeneratorArg = Optional[Union[torch.Generator, Sequence[torch.Generator]]]

_autotune_lock = threading.Lock()
_autotune_holders = 0
_autotune_saved = False


@contextlib.contextmanager
def cudnn_heuristics():
    """Turn cuDNN's benchmark mode off while inside (the flag is process-wide: the last thread out restores it).

    ``ns-train`` turns benchmark mode on for every method. For the editor it means trying the
    convolution algorithms of the UNet and the VAE for each new batch shape during the first sweep
    (H100, 73 views: 30 s of editing in the first sweep against 15 s in the next ones; 17.6 s
    against 14.7 s with the heuristics), for nothing after (0.210 s per edit autotuned, 0.209 s
    with the heuristics, in one run).
    """
    global _autotune_holders, _autotune_saved
    with _autotune_lock:
        if _autotune_holders == 0:
            _autotune_saved = torch.backends.cudnn.benchmark
            torch.backends.cudnn.benchmark = False
        _autotune_holders += 1
    try:
        yield
    finally:
        with _autotune_lock:
            _autotune_holders -= 1
            if _autotune_holders == 0:
                torch.backends.cudnn.benchmark = _autotune_saved


class IP2PUnavailableError(RuntimeError):
    """The InstructPix2Pix weights could not be found or loaded; the message says how to supply them."""


def edit_bytes(batch: int, height: int, width: int) -> float:
    """Estimated peak activation memory of editing ``batch`` views of this size at once (half precision)."""
    return EDIT_BYTES_512 * batch * max(1.0, height * width / 512**2)


def _is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def _load_pipeline(model: str, dtype: torch.dtype) -> "StableDiffusionInstructPix2PixPipeline":
    """Load from a local directory, else the Hugging Face cache, else the hub; fail with a usable message."""
    from diffusers import StableDiffusionInstructPix2PixPipeline
    from diffusers.pipelines import pipeline_utils

    # diffusers renamed ``torch_dtype`` to ``dtype`` (the old name warns on every load); older releases know only the old
    dtype_argument = "dtype" if hasattr(pipeline_utils, "_resolve_dtype") else "torch_dtype"

    def load(source: str, local_files_only: bool):
        return StableDiffusionInstructPix2PixPipeline.from_pretrained(
            source,
            **{dtype_argument: dtype},
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
            local_files_only=local_files_only,
        )

    how_to_fix = (
        f"Download it where there is network (`huggingface-cli download {DEFAULT_MODEL}` fills the cache; "
        f"`huggingface-cli download {DEFAULT_MODEL} --local-dir DIR` makes a folder) and pass the folder: "
        "--pipeline.ip2p-model DIR for ns-train igs2gs, --ip2p-model DIR for igs2gs-preview."
    )
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise IP2PUnavailableError(
                f"InstructPix2Pix folder {path} has no model_index.json: it is not a diffusers pipeline folder. "
                + how_to_fix
            )
        try:
            return load(str(path), local_files_only=True)
        except (OSError, ValueError, EnvironmentError) as error:
            raise IP2PUnavailableError(f"Could not load InstructPix2Pix from {path}: {error}") from None
    if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", model):
        raise IP2PUnavailableError(f"InstructPix2Pix model {model!r} is neither an existing folder nor a hub id. {how_to_fix}")
    try:
        return load(model, local_files_only=True)
    except (OSError, ValueError, EnvironmentError):
        pass
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    if offline:
        raise IP2PUnavailableError(
            f"InstructPix2Pix model {model!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set. {how_to_fix}"
        )
    try:
        return load(model, local_files_only=False)
    except Exception as error:  # network, auth and missing-file errors all mean "not available here"
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise IP2PUnavailableError(
            f"InstructPix2Pix model {model!r} is not in the local Hugging Face cache and could not be downloaded "
            f"({reason[:200]}). {how_to_fix}"
        ) from None


def _check_images(name: str, images: Tensor) -> None:
    if not isinstance(images, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape [B, 3, H, W], got {type(images).__name__}")
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"{name} must have shape [B, 3, H, W], got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"{name} must be a float tensor with values in [0, 1], got dtype {images.dtype}")
    if images.numel() and images.shape[0] > 0:
        low, high = torch.aminmax(images.detach())
        if low.item() < -1e-3 or high.item() > 1 + 1e-3:
            raise ValueError(f"{name} must hold values in [0, 1], found [{low.item():.3f}, {high.item():.3f}]")


def _content_key(image: Tensor) -> str:
    """Fingerprint of an image's pixels, for callers that give no keys for the condition cache."""
    quantized = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    return hashlib.sha1(quantized.tobytes() + str(quantized.shape).encode()).hexdigest()


def _branch_text(embeddings: Tensor, count: int) -> Tensor:
    """The UNet's text conditioning for ``count`` edits: each of the three guidance branches' embedding
    (``encode_prompt``'s rows) repeated per edit, branch after branch."""
    return torch.cat([embeddings[i : i + 1].expand(count, -1, -1) for i in range(3)])


class InstructPix2Pix:
    """A loaded InstructPix2Pix model and the caches that make repeated sweeps cheap.

    Prompt embeddings are cached per prompt and the original photos' latents per key (the
    originals never change during an edit). Views are edited in batches; an out-of-memory error
    halves the batch and retries.
    """

    def __init__(
        self,
        pipe: "StableDiffusionInstructPix2PixPipeline",
        device: Union[str, torch.device],
        max_batch_size: Optional[int] = None,
        cache_conditioning: bool = True,
        vae_batch_size: int = 4,
        packages: PackageUse = "off",
        cudnn_benchmark: bool = False,
        unet_cuda_graph: bool = False,
    ) -> None:
        from diffusers import DDIMScheduler

        self.device = torch.device(device)
        self.pipe = pipe
        self.unet, self.vae = pipe.unet, pipe.vae
        self.dtype = self.unet.dtype
        self.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        self.vae_scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.latent_scaling = float(self.vae.config.scaling_factor)
        self.max_batch_size = max_batch_size
        self.cache_conditioning = cache_conditioning
        self.vae_batch_size = max(1, vae_batch_size)
        # A compiled editor runs the UNet (>95% of an edit's FLOPs) and the VAE from packages for one batch shape
        # (``aot_package``), made by ``prepare_compiled`` or else at its first batch: ``fixed_batch`` (set by
        # ``prepare_compiled`` or the first batch) pads smaller batches to it.
        self.compiled = packages != "off"
        self.compile_missing = packages == "compile"
        """Compile the packages not yet on disk (minutes); off: use those an earlier run compiled, else edit eagerly."""
        # part name -> its package; the others run eagerly. Packaging is tried once: it either gives the UNet one
        # or turns ``compiled`` off.
        self._packages: Dict[str, Callable[..., Tensor]] = {}
        self.unet_cuda_graph = unet_cuda_graph
        """Replay the UNet's package from a CUDA graph after its first call (``aot_package.Packaged._replay``)."""
        self.cudnn_benchmark = cudnn_benchmark
        """Let cuDNN autotune the editor's convolutions (if the process asks for it); off: its heuristics."""
        self.fixed_batch: Optional[int] = None
        """Edit batches smaller than this are padded up to it (their extra rows discarded)."""
        self.batch_size: Optional[int] = None  # set when an out-of-memory error forced a smaller batch
        self._prompt_embeddings: "OrderedDict[str, Tensor]" = OrderedDict()
        self._condition_latents: Dict[Hashable, Tensor] = {}
        self._schedules: Dict[Tuple[int, int], Tensor] = {}
        self._alphas: Dict[torch.device, Tuple[Tensor, Tensor]] = {}  # on-device copies: no H2D copy per step
        self.prompt_encodings = 0
        self.condition_encodings = 0
        self._warmed: Set[Tuple[int, int, int]] = set()  # (padded batch, UNet height, width) shapes warm_up has edited

    @classmethod
    def from_pretrained(
        cls,
        model: str = DEFAULT_MODEL,
        device: Union[str, torch.device] = "cuda",
        dtype: torch.dtype = torch.float16,
        cpu_offload: bool = False,
        attention_slicing: bool = False,
        max_batch_size: Optional[int] = None,
        cache_conditioning: bool = True,
        vae_batch_size: int = 4,
        packages: PackageUse = "off",
        cudnn_benchmark: bool = False,
        unet_cuda_graph: bool = False,
    ) -> "InstructPix2Pix":
        """Load ``model`` (hub id or local folder) onto ``device``.

        ``cpu_offload`` keeps each sub-model on the CPU until used (for small GPUs);
        ``attention_slicing`` trades speed for memory. Both are off by default: SDPA and a
        resident model are what make batched edits fast. ``vae_batch_size`` caps how many images
        the VAE encodes or decodes at once (its 512² activations, not the UNet's, set the peak);
        ``packages="compile"`` runs the UNet and the VAE from ahead-of-time compiled packages for the first batch
        shape it edits (compiled once in minutes, then loaded from disk in seconds: ``aot_package``; CUDA only,
        not with ``cpu_offload``, which moves the weights those packages read; on CUDA its UNet and VAE weights stay
        allocated until the process ends, even after the editor is gone (``aot_package._bind``): load one compiled
        editor per process and keep it); ``"cached"`` runs them from packages only where an earlier run compiled
        them (never compiles; eager with ``cpu_offload``), else eagerly; ``"off"`` always edits eagerly;
        ``cudnn_benchmark`` keeps cuDNN's benchmark mode (if on) for the editor, which otherwise edits
        with cuDNN's heuristics (``cudnn_heuristics``); ``unet_cuda_graph`` replays the UNet's package from a CUDA
        graph after its first call (packages on CUDA only; the pipeline's default).
        """
        device = torch.device(device)
        if packages not in PACKAGE_USES:
            raise ValueError(f"packages must be one of {PACKAGE_USES}, not {packages!r}")
        if packages == "compile" and cpu_offload:
            raise ValueError(
                "packages='compile' and cpu_offload cannot be combined: the compiled packages read the weights where they "
                "were at load, and offloading moves them (--pipeline.ip2p-compile / --pipeline.ip2p-cpu-offload)"
            )
        if device.type == "cpu" and dtype != torch.float32:
            dtype = torch.float32  # half-precision convolutions are slow or missing on CPU
        pipe = _load_pipeline(str(model), dtype)
        pipe.set_progress_bar_config(disable=True)
        if attention_slicing:
            pipe.enable_attention_slicing()
        if cpu_offload and device.type == "cuda":
            pipe.enable_model_cpu_offload(device=device)
        else:
            pipe.to(device)
        for module in (pipe.unet, pipe.vae, pipe.text_encoder):
            module.requires_grad_(False).eval()
        if device.type != "cuda" or cpu_offload:
            packages = "off"  # packages are compiled for CUDA, against weights that stay where they were loaded
        return cls(pipe, device, max_batch_size, cache_conditioning, vae_batch_size, packages, cudnn_benchmark, unet_cuda_graph)

    # ----------------------------------------------------------------------------------- caches
    @torch.no_grad()
    def encode_prompt(self, prompt: str) -> Tensor:
        """[text, unconditional, unconditional] embeddings, encoded once per prompt."""
        if prompt not in self._prompt_embeddings:
            embeddings = self.pipe._encode_prompt(prompt, self.device, 1, True, "")
            self._prompt_embeddings[prompt] = embeddings.to(self.device, self.dtype)
            self.prompt_encodings += 1
            while len(self._prompt_embeddings) > 8:
                self._prompt_embeddings.popitem(last=False)
        self._prompt_embeddings.move_to_end(prompt)
        return self._prompt_embeddings[prompt]

    @torch.no_grad()
    def _condition(self, originals: Tensor, keys: Sequence[Hashable]) -> Tensor:
        """The originals' VAE latents (distribution mode, unscaled) at the UNet's size, cached per key: only the
        originals not yet cached are resized and encoded."""
        missing = [i for i, key in enumerate(keys) if not self.cache_conditioning or key not in self._condition_latents]
        if missing:
            latents = torch.cat([posterior.mode() for posterior in self._encode(self._at_unet_size(originals[missing]))])
            self.condition_encodings += len(missing)
            if not self.cache_conditioning:
                return latents
            for index, latent in zip(missing, latents):
                self._condition_latents[keys[index]] = latent
        return torch.stack([self._condition_latents[key] for key in keys])

    # The three networks, each from its package if it has one (not stored as bound methods: a cycle through the
    # editor would keep its modules alive after the last reference until the garbage collector runs; what torch's
    # package loader itself keeps is described at ``aot_package._bind``).
    def _unet_call(self, sample: Tensor, timestep: Tensor, text: Tensor) -> Tensor:
        package = self._packages.get("unet")
        if package is not None:
            return package(sample, timestep, text)
        return self.unet(sample, timestep, encoder_hidden_states=text, return_dict=False)[0]

    def _encoder_call(self, images: Tensor) -> Tensor:
        package = self._packages.get("vae-encoder")
        return package(images) if package is not None else self.vae.encode(images).latent_dist.parameters

    def _decoder_call(self, latents: Tensor) -> Tensor:
        package = self._packages.get("vae-decoder")
        return package(latents) if package is not None else self.vae.decode(latents).sample

    def _encode(self, images: Tensor) -> List:
        """VAE posteriors of [0,1] images, ``vae_batch_size`` at a time."""
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        return [
            DiagonalGaussianDistribution(self._encoder_call(images[first : first + self.vae_batch_size].to(self.device, self.dtype) * 2 - 1))
            for first in range(0, images.shape[0], self.vae_batch_size)
        ]

    def _decode(self, latents: Tensor) -> Tensor:
        """[0,1] float images of scaled latents, ``vae_batch_size`` at a time."""
        decoded = [
            self._decoder_call((latents[first : first + self.vae_batch_size] / self.latent_scaling).to(self.dtype)).float()
            for first in range(0, latents.shape[0], self.vae_batch_size)
        ]
        return (torch.cat(decoded) / 2 + 0.5).clamp(0, 1)

    def _timesteps(self, start: int, steps: int) -> Tensor:
        """DDIM timesteps from ``start`` down to 0, spaced as the scheduler spaces them over ``start`` steps."""
        key = (start, steps)
        if key not in self._schedules:
            from diffusers import DDIMScheduler

            schedule = DDIMScheduler.from_config(self.scheduler.config, num_train_timesteps=start)
            schedule.set_timesteps(steps)
            self._schedules[key] = schedule.timesteps.clone()
        return self._schedules[key]

    # ----------------------------------------------------------------------------- the method
    def _ddim_step(self, noise_pred: Tensor, t: Tensor, prev_t: Tensor, latents: Tensor) -> Tensor:
        """DDIM (eta = 0) with a timestep per batch item; equals ``DDIMScheduler.step`` item by item."""
        config = self.scheduler.config
        if latents.device not in self._alphas:
            scheduler = self.scheduler
            self._alphas[latents.device] = (
                scheduler.alphas_cumprod.to(latents.device),
                scheduler.final_alpha_cumprod.to(latents.device),
            )
        alphas, final = self._alphas[latents.device]
        alpha_t = alphas[t].view(-1, 1, 1, 1)
        alpha_prev = torch.where(prev_t >= 0, alphas[prev_t.clamp(min=0)], final).view(-1, 1, 1, 1)
        beta_t = 1 - alpha_t
        if config.prediction_type == "epsilon":
            original = (latents - beta_t.sqrt() * noise_pred) / alpha_t.sqrt()
            epsilon = noise_pred
        elif config.prediction_type == "sample":
            original = noise_pred
            epsilon = (latents - alpha_t.sqrt() * original) / beta_t.sqrt()
        elif config.prediction_type == "v_prediction":
            original = alpha_t.sqrt() * latents - beta_t.sqrt() * noise_pred
            epsilon = alpha_t.sqrt() * noise_pred + beta_t.sqrt() * latents
        else:
            raise ValueError(f"unsupported prediction_type {config.prediction_type!r}")
        if config.thresholding:
            original = self.scheduler._threshold_sample(original)
        elif config.clip_sample:
            original = original.clamp(-config.clip_sample_range, config.clip_sample_range)
        return alpha_prev.sqrt() * original + (1 - alpha_prev).sqrt() * epsilon

    def _draw(self, count: int, latent_shape: Tuple[int, ...], low: int, high: int, generator: GeneratorArg):
        """Per edit, in a fixed order: start timestep, VAE sample noise, diffusion noise.

        Drawing item by item makes a batch with one generator equal to the same edits made one
        at a time with that generator, and a list of generators equal to one per edit.
        """
        generators: List[Optional[torch.Generator]]
        if generator is None or isinstance(generator, torch.Generator):
            generators = [generator] * count
        else:
            generators = list(generator)
            if len(generators) != count:
                raise ValueError(f"got {len(generators)} generators for {count} images")
        starts, vae_noise, noise = [], [], []
        for gen in generators:
            where = gen.device if gen is not None else torch.device("cpu")
            starts.append(torch.randint(low, high + 1, (1,), generator=gen, device=where).item())
            vae_noise.append(torch.randn(latent_shape, generator=gen, device=where))
            noise.append(torch.randn(latent_shape, generator=gen, device=where))
        return starts, torch.stack(vae_noise).to(self.device), torch.stack(noise).to(self.device)

    @torch.no_grad()
    def _edit_batch(
        self,
        renders: Tensor,
        condition: Tensor,
        embeddings: Tensor,
        starts: List[int],
        vae_noise: Tensor,
        noise: Tensor,
        guidance_scale: float,
        image_guidance_scale: float,
        diffusion_steps: int,
    ) -> Tensor:
        count = renders.shape[0]
        if self.compiled and "unet" not in self._packages:
            self._package(count, renders.shape[2], renders.shape[3], embeddings)
        posteriors = self._encode(renders)
        mean = torch.cat([posterior.mean.float() for posterior in posteriors])
        std = torch.cat([posterior.std.float() for posterior in posteriors])
        latents = (mean + std * vae_noise) * self.latent_scaling
        schedules = torch.stack([self._timesteps(start, diffusion_steps) for start in starts]).to(self.device)
        strides = torch.tensor([start // diffusion_steps for start in starts], device=self.device)
        latents = self.scheduler.add_noise(latents, noise, schedules[:, 0])
        image_condition = torch.cat([condition, condition, torch.zeros_like(condition)])
        text = _branch_text(embeddings, count)
        for step in range(diffusion_steps):
            t = schedules[:, step]
            model_input = torch.cat([latents.to(self.dtype)] * 3)
            model_input = torch.cat([model_input, image_condition.to(self.dtype)], dim=1)
            prediction = self._unet_call(model_input, t.repeat(3), text).float()
            text_pred, image_pred, uncond_pred = prediction.chunk(3)
            guided = (
                uncond_pred
                + guidance_scale * (text_pred - image_pred)
                + image_guidance_scale * (image_pred - uncond_pred)
            )
            latents = self._ddim_step(guided, t, t - strides, latents)
        return self._decode(latents)

    def _package(self, count: int, height: int, width: int, embeddings: Tensor) -> None:
        """Switch the UNet and the VAE to their compiled packages for batches of ``count`` views of this (UNet) size,
        loaded (or, with ``compile_missing``, compiled) once and kept. Without the UNet's, edit eagerly from now on,
        unpadded; a VAE part without its package runs eagerly."""
        from igs2gs.aot_package import UNetCall, VAEDecoderCall, VAEEncoderCall, packaged

        inputs = self.package_inputs(count, height, width, embeddings)
        unet = packaged(UNetCall(self.unet), inputs["unet"], compile_missing=self.compile_missing, cuda_graph=self.unet_cuda_graph)
        if unet is None:
            self.compiled, self.fixed_batch = False, None
            return
        self._packages["unet"] = unet
        for call in (VAEEncoderCall(self.vae), VAEDecoderCall(self.vae)):
            package = packaged(call, inputs[call.part], compile_missing=self.compile_missing)
            if package is not None:
                self._packages[call.part] = package

    def package_inputs(self, count: int, height: int, width: int, embeddings: Tensor) -> Dict[str, Tuple[Tensor, ...]]:
        """Zero inputs of each packaged part's shape for batches of ``count`` views of this (UNet) size, by part name
        (what a package is exported and looked up with)."""
        rows, chunk = 3 * count, min(count, self.vae_batch_size)  # three guidance branches; the VAE's batches
        latent_size = (height // self.vae_scale, width // self.vae_scale)
        zeros = functools.partial(torch.zeros, device=self.device, dtype=self.dtype)
        total = int(self.scheduler.config.num_train_timesteps)
        return {
            "unet": (
                zeros(rows, int(self.unet.config.in_channels), *latent_size),
                self._timesteps(total, 1).to(self.device).repeat(rows),
                _branch_text(embeddings, count),
            ),
            "vae-encoder": (zeros(chunk, 3, height, width),),
            "vae-decoder": (zeros(chunk, int(self.vae.config.latent_channels), *latent_size),),
        }

    def _edit_in_batches(self, renders: Tensor, condition: Tensor, starts: List[int], vae_noise: Tensor, noise: Tensor, **shared) -> Tensor:
        """``_edit_batch`` over batches of these rows as large as memory allows (halved on out-of-memory), padded
        to ``fixed_batch``; ``shared`` (prompt embeddings, guidance, steps) goes to every batch."""
        count = renders.shape[0]
        outputs: List[Tensor] = []
        batch = self._first_batch_size(count, renders.shape[2], renders.shape[3])
        if self.compiled and self.fixed_batch is None:
            self.fixed_batch = batch
        done = 0
        while done < count:
            part = slice(done, min(count, done + batch))
            rows = part.stop - part.start
            pad = max(0, (self.fixed_batch or 0) - rows)
            try:
                edited = self._edit_batch(
                    renders=padded_rows(renders[part], pad),
                    condition=padded_rows(condition[part], pad),
                    starts=starts[part] + starts[part][-1:] * pad,
                    vae_noise=padded_rows(vae_noise[part], pad),
                    noise=padded_rows(noise[part], pad),
                    **shared,
                )
                outputs.append(edited[:rows])
            except Exception as error:  # noqa: BLE001 - only out-of-memory is retried
                if not _is_out_of_memory(error) or batch == 1:
                    raise
                batch = self.batch_size = max(1, batch // 2)
                if self.fixed_batch is not None:
                    self.fixed_batch = batch
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            done = part.stop
        return torch.cat(outputs)

    def _first_batch_size(self, count: int, height: int, width: int) -> int:
        """Largest batch allowed by ``max_batch_size``, the free GPU memory and any earlier OOM."""
        limit = self.batch_size or self.max_batch_size or 16
        if self.device.type == "cuda" and self.batch_size is None:
            free, _ = torch.cuda.mem_get_info(self.device)
            limit = min(limit, int(0.8 * free // edit_bytes(1, height, width)))
        return max(1, min(limit, count))

    def _at_unet_size(self, images: Tensor) -> Tensor:
        """[B,3,H,W] images resized (bilinear) to ``_unet_size``, or as they are if already of it."""
        size = self._unet_size(images.shape[2], images.shape[3])
        if size == tuple(images.shape[2:]):
            return images
        return F.interpolate(images.float(), size, mode="bilinear", align_corners=False)

    def _cudnn_mode(self):
        """The editor's convolution algorithm choice: cuDNN's heuristics unless ``cudnn_benchmark``."""
        return contextlib.nullcontext() if self.cudnn_benchmark else cudnn_heuristics()

    @torch.no_grad()
    def encode_conditions(self, originals: Tensor, keys: Sequence[Hashable]) -> None:
        """Encode and cache the condition latents of ``originals`` [B,3,H,W] in [0,1] under ``keys`` before their
        first edit (the latents that edit would encode: the warm-up does this beside set-up, so the first sweep
        does not). Keys already cached are not encoded again; nothing is kept without ``cache_conditioning``."""
        _check_images("originals", originals)
        if len(keys) != originals.shape[0]:
            raise ValueError(f"got {len(keys)} keys for {originals.shape[0]} images")
        if not self.cache_conditioning:
            return
        with self._cudnn_mode():
            self._condition(originals, keys)

    def _unet_size(self, height: int, width: int) -> Tuple[int, int]:
        """The size views of this size are edited at: the nearest multiple of the VAE's downscaling."""
        return tuple(max(self.vae_scale, round(side / self.vae_scale) * self.vae_scale) for side in (height, width))  # type: ignore[return-value]

    @torch.no_grad()
    def prepare_compiled(self, batch: int, height: int, width: int, prompt: str) -> None:
        """Load the packages for batches of ``batch`` views of this size (compiling them the first time), in the
        calling thread: export and compilation are not thread-safe. Smaller batches are padded to it."""
        if not self.compiled or "unet" in self._packages:
            return
        self.fixed_batch = batch
        self._package(batch, *self._unet_size(height, width), self.encode_prompt(prompt))

    def _warm_shape(self, batch: int, height: int, width: int) -> Tuple[int, int, int]:
        """The shape a batch of these views runs at: padded to ``fixed_batch`` if set, at the UNet's size."""
        return (self.fixed_batch or batch, *self._unet_size(height, width))

    def warm_up(self, batch: int, height: int, width: int, prompt: str, diffusion_steps: int = 1) -> float:
        """One throw-away edit of ``batch`` random views of this size; returns its seconds.

        It pays the first-use costs of that batch shape (cuDNN/cuBLAS set-up; with packages,
        loading the compiled packages or compiling them), so that they happen at set-up rather
        than in the first sweep. A compiled editor not yet ``prepare_compiled`` must warm up in the
        main thread (export and compilation are not thread-safe); others may warm up in any. The
        prompt's embedding stays cached; the random views leave no condition latents. A shape this editor
        has edited at before costs nothing (returns 0.0): a compiled editor pads every batch to its
        ``fixed_batch``, so a sweep's batches of 14 and 15 are one shape to it. With ``unet_cuda_graph`` it makes
        at least two diffusion steps: the UNet's package is captured at its second call, here rather than in a sweep.
        """
        if self.unet_cuda_graph and self.compiled:
            diffusion_steps = max(diffusion_steps, 2)
        if self._warm_shape(batch, height, width) in self._warmed:
            self.encode_prompt(prompt)
            return 0.0
        started = time.perf_counter()
        generator = torch.Generator().manual_seed(0)
        images = torch.rand(2, batch, 3, height, width, generator=generator).to(self.device)
        keys = [("warm-up", index) for index in range(batch)]
        encodings = self.condition_encodings
        self.edit(images[0], images[1], prompt, diffusion_steps=diffusion_steps, generator=generator, cond_keys=keys)
        for key in keys:
            self._condition_latents.pop(key, None)
        self.condition_encodings = encodings
        self._warmed.add(self._warm_shape(batch, height, width))  # after the edit: its first batch may have fixed the batch
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - started

    def edit(
        self,
        renders: Tensor,
        originals: Tensor,
        prompt: str,
        guidance_scale: float = 12.5,
        image_guidance_scale: float = 1.5,
        diffusion_steps: int = 20,
        lower_bound: float = 0.70,
        upper_bound: float = 0.98,
        generator: GeneratorArg = None,
        cond_keys: Optional[Sequence[Hashable]] = None,
    ) -> Tensor:
        """Edit ``renders`` [B,3,H,W] in [0,1] towards ``prompt``, conditioned on ``originals``.

        Returns float [B,3,H,W] in [0,1] on the renders' device. ``cond_keys`` name the
        originals for the latent cache (view ids); without them the pixels are fingerprinted.
        """
        _check_images("renders", renders)
        _check_images("originals", originals)
        if renders.shape != originals.shape:
            raise ValueError(f"renders {tuple(renders.shape)} and originals {tuple(originals.shape)} differ in shape")
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError("prompt must be a non-empty instruction, e.g. 'make it look like a marble statue'")
        if not 0.0 <= lower_bound <= upper_bound <= 1.0:
            raise ValueError(f"need 0 <= lower_bound <= upper_bound <= 1, got {lower_bound}, {upper_bound}")
        if diffusion_steps < 1:
            raise ValueError(f"diffusion_steps must be >= 1, got {diffusion_steps}")
        count, _, height, width = renders.shape
        if cond_keys is None:
            cond_keys = [_content_key(image) for image in originals]
        elif len(cond_keys) != count:
            raise ValueError(f"got {len(cond_keys)} cond_keys for {count} images")
        if count == 0:
            return renders.new_zeros(renders.shape, dtype=torch.float32)

        unet_height, unet_width = self._unet_size(height, width)
        resized = (unet_height, unet_width) != (height, width)
        renders_in = self._at_unet_size(renders)

        total = int(self.scheduler.config.num_train_timesteps)
        low, high = int(total * lower_bound), int(total * upper_bound)
        latent_shape = (int(self.unet.config.out_channels), unet_height // self.vae_scale, unet_width // self.vae_scale)
        starts, vae_noise, noise = self._draw(count, latent_shape, low, high, generator)
        embeddings = self.encode_prompt(prompt)
        with self._cudnn_mode():
            condition = self._condition(originals, cond_keys)
            edited = self._edit_in_batches(
                renders_in, condition, starts, vae_noise, noise, embeddings=embeddings, guidance_scale=guidance_scale,
                image_guidance_scale=image_guidance_scale, diffusion_steps=diffusion_steps,
            )
        if resized:
            edited = F.interpolate(edited, (height, width), mode="bilinear", align_corners=False).clamp(0, 1)
        return edited.to(renders.device)

