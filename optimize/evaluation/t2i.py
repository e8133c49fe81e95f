"""Text-to-image peers and scoring, shared by ``scripts/results_t2i_solvers.py`` and ``scripts/results_t2i.py``.

Peers run inside the stock diffusers pipeline from given unit latents: the stock scheduler configurations a user
picks for few steps (``stock_schedulers``), and Align Your Steps (``ays_timesteps``: NVIDIA's SD 1.5 noise levels,
log-linearly interpolated to other step counts as ComfyUI's node does, as DPMSolverMultistep's ``timesteps``).
Every pipeline run counts its denoiser-net calls, so a peer's NFE is measured, not assumed. Scoring of decoded
images in [-1, 1]: distance to a reference (``metrics.distance``: RMSE, PSNR) and prompt adherence read by the judge. The 50-step
reference images are cached on disk (``reference_images``). diffusers is imported inside the functions that need it.
"""

from __future__ import annotations

import contextlib
import zlib
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from samplers.schedule_config import alphas_cumprod_of

from optimize.evaluation.classifier import predict_heads

REFERENCE_STEPS = 50
# Align Your Steps' 11 noise levels for SD 1.x (ComfyUI comfy_extras/nodes_align_your_steps.py, "SD1"): the same
# schedule as diffusers' AysSchedules["StableDiffusionTimesteps"] (999, 850, ..., 24) on SD's betas
AYS_SD1 = (14.6146412293, 6.4745760956, 3.8636745985, 2.6946151520, 1.8841921177, 1.3943805092, 0.9642583904,
           0.6523686016, 0.3977456272, 0.1515232662, 0.0291671582)


def pipeline(folder: str | Path) -> Any:
    """The stock pipeline of a saved text-to-image folder (safetensors only), progress bar off."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(folder), use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def denoiser_net(pipe: Any) -> torch.nn.Module:
    """The pipeline's noise-prediction network (``unet`` or ``transformer``)."""
    return pipe.unet if getattr(pipe, "unet", None) is not None else pipe.transformer


def latent_shape(pipe: Any) -> tuple[int, int, int]:
    """(channels, height, width) of the pipeline's latents at its default resolution."""
    return (int(pipe.vae.config.latent_channels), *([int(denoiser_net(pipe).config.sample_size)] * 2))


def loglinear_interp(levels: Any, n: int) -> np.ndarray:
    """ComfyUI's ``loglinear_interp``: ``n`` decreasing values, log-linear in position between the given ones."""
    levels = np.asarray(levels, dtype=np.float64)
    xs = np.linspace(0, 1, len(levels))
    return np.exp(np.interp(np.linspace(0, 1, n), xs, np.log(levels[::-1])))[::-1]


def ays_sigmas(nfe: int, levels: Any = AYS_SD1) -> np.ndarray:
    """Align Your Steps at ``nfe`` steps as ComfyUI's node makes them: the levels interpolated to nfe + 1 values when
    their count differs, the last set to 0."""
    sig = np.asarray(levels, dtype=np.float64) if nfe + 1 == len(levels) else loglinear_interp(levels, nfe + 1)
    sig = sig.copy()
    sig[-1] = 0.0
    return sig


def ays_timesteps(nfe: int, scheduler_config: Any, levels: Any = AYS_SD1) -> list[int]:
    """The ``timesteps=`` list for DPMSolverMultistep: each of AYS's first ``nfe`` sigmas mapped to the training
    timestep of that sigma (log-sigma interpolation over SD's betas), rounded; at 10 steps on SD's betas this is
    diffusers' ``StableDiffusionTimesteps``."""
    abar = alphas_cumprod_of(dict(scheduler_config))
    log_s = (((1 - abar) / abar).sqrt()).log().numpy()
    t = np.interp(np.log(ays_sigmas(nfe, levels)[:-1]), log_s, np.arange(len(log_s)))
    steps = [int(v) for v in np.round(t)]
    if len(set(steps)) != len(steps):
        raise ValueError(f"AYS at {nfe} steps maps two levels to one timestep: {steps}.")
    return steps


def stock_schedulers(pipe: Any) -> dict[str, Callable[[int], tuple[Any, dict[str, Any]]]]:
    """Stock few-step scheduler configurations for the pipeline: label -> ``make(nfe) -> (scheduler, call kwargs)``
    whose pipeline call spends ``nfe`` net calls (PNDM spends one more than its steps, so it gets nfe - 1)."""
    import diffusers as d

    config = pipe.scheduler.config
    if getattr(pipe, "unet", None) is not None:  # epsilon U-Net on DDPM betas (Stable Diffusion 1.x/2.x/XL)
        def plain(cls: Any, **kw: Any) -> Callable[[int], tuple[Any, dict[str, Any]]]:
            return lambda nfe: (cls.from_config(config, **kw), {"num_inference_steps": nfe})

        # DDIM's own default clip_sample=True clips the predicted x0 to [-1, 1], which on latents ruins the sample;
        # SD 1.5's scheduler_config.json sets clip_sample false, so a user's DDIM does not clip (a config that omits
        # the key, as the tiny teacher's PNDM config does, must not change that)
        return {
            "DPM++2M": plain(d.DPMSolverMultistepScheduler),
            "DPM++2M Karras": plain(d.DPMSolverMultistepScheduler, use_karras_sigmas=True),
            "UniPC": plain(d.UniPCMultistepScheduler),
            "Euler": plain(d.EulerDiscreteScheduler),
            "DDIM": plain(d.DDIMScheduler, clip_sample=False),
            "DDIM trailing": plain(d.DDIMScheduler, clip_sample=False, timestep_spacing="trailing"),  # from t = 999 (Lin et al.)
            "PNDM": lambda nfe: (d.PNDMScheduler.from_config(config, skip_prk_steps=True), {"num_inference_steps": nfe - 1}),
            "AYS (DPM++2M)": lambda nfe: (d.DPMSolverMultistepScheduler.from_config(config),
                                          {"timesteps": ays_timesteps(nfe, config)}),
        }
    flow = {"prediction_type": "flow_prediction", "use_flow_sigmas": True, "flow_shift": float(config.get("shift", 1.0))}

    def flow_multistep(cls: Any) -> Callable[[int], tuple[Any, dict[str, Any]]]:
        return lambda nfe: (cls.from_config(config, **flow), {"num_inference_steps": nfe})

    return {
        "FlowMatchEuler": lambda nfe: (d.FlowMatchEulerDiscreteScheduler.from_config(config), {"num_inference_steps": nfe}),
        "DPM++2M (flow)": flow_multistep(d.DPMSolverMultistepScheduler),
        "UniPC (flow)": flow_multistep(d.UniPCMultistepScheduler),
    }


@contextlib.contextmanager
def counting_calls(net: torch.nn.Module) -> Iterator[list[int]]:
    """Counts the net's forward calls while active (a guided pipeline batches both halves in one call)."""
    calls = [0]
    handle = net.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    try:
        yield calls
    finally:
        handle.remove()


def pipeline_images(pipe: Any, scheduler: Any, prompts: list[str], latents: torch.Tensor, guidance: float,
                    batch: int, **call: Any) -> tuple[torch.Tensor, int]:
    """(decoded images in [-1, 1], net calls per batch) of the stock pipeline with ``scheduler`` from unit
    ``latents`` (the pipeline's own draw, before any init_noise_sigma scaling)."""
    pipe.scheduler = scheduler
    out, per_batch = [], set()
    with torch.no_grad():
        for i in range(0, len(prompts), batch):
            with counting_calls(denoiser_net(pipe)) as calls:
                img = pipe(prompts[i:i + batch], guidance_scale=guidance, latents=latents[i:i + batch],
                           output_type="pt", **call).images
            per_batch.add(calls[0])
            out.append(img * 2 - 1)
    if len(per_batch) != 1:
        raise RuntimeError(f"the pipeline's net calls differ between batches: {sorted(per_batch)}")
    return torch.cat(out).clamp(-1, 1), per_batch.pop()


def prompt_hash(prompt: str) -> int:
    """A stable 31-bit number per prompt (zlib.crc32), to check a cached reference's prompts."""
    return zlib.crc32(prompt.encode()) & 0x7FFFFFFF


def prefix_cached(path: Path, files: Iterable[Path], n: int, usable: Callable[[dict[str, torch.Tensor]], int],
                  compute: Callable[[int], torch.Tensor], extra: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """The ``images`` of samples 0..n-1 kept in cache ``files``: ``usable(file)`` says how many leading samples of a
    file are those of this run (0: none). A file with all n serves them; else the longest usable start is extended,
    ``compute(lo)`` giving samples lo..n-1 only, and the n images are saved at ``path`` (with ``extra`` tensors beside
    them)."""
    head = torch.zeros(0)
    for found in sorted(files):
        got = load_file(str(found))
        m = min(usable(got), n)
        if m == n:
            return got["images"][:n]
        if m > len(head):
            head = got["images"][:m]
    lo = len(head)
    images = compute(lo)
    images = torch.cat([head.to(images), images]) if lo else images
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"images": images.contiguous(), **(extra or {})}, str(path))
    return images


def reference_images(pipe: Any, name: str, prompts: list[str], latents: torch.Tensor, guidance: float, batch: int,
                     cache: Path) -> torch.Tensor:
    """The stock pipeline's ``REFERENCE_STEPS``-step decoded images (its own scheduler) of these latents and prompts,
    read from ``cache`` when a run with the same teacher and guidance wrote them for these latents and prompts or for
    a longer list that starts with them (n = 1,000 reuses the first half of n = 2,000); a shorter list that starts
    them is extended, only the missing samples run (n = 2,000 after n = 500 runs 1,500). A file counts as far as its
    latents and prompt hashes agree with these."""
    n = len(prompts)
    hashes = torch.tensor([prompt_hash(p) for p in prompts])

    def usable(got: dict[str, torch.Tensor]) -> int:
        m = min(len(got["latents"]), n)
        return m if torch.equal(got["latents"][:m], latents[:m]) and torch.equal(got["prompts"][:m], hashes[:m]) else 0

    def compute(lo: int) -> torch.Tensor:
        return pipeline_images(pipe, type(pipe.scheduler).from_config(pipe.scheduler.config), prompts[lo:], latents[lo:],
                               guidance, batch, num_inference_steps=REFERENCE_STEPS)[0]

    stem = f"{name}-w{guidance:g}"
    return prefix_cached(Path(cache) / f"{stem}-n{n}-steps{REFERENCE_STEPS}.safetensors",
                         Path(cache).glob(f"{stem}-n*-steps{REFERENCE_STEPS}.safetensors"), n, usable, compute,
                         {"latents": latents.contiguous(), "prompts": hashes})


def adherence(judge_net: torch.nn.Module, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """1.0 where the judge reads the prompt's digit, colour and background all right, else 0.0."""
    return (predict_heads(judge_net, x) == labels).all(1).double()
