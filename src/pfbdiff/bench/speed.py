"""Speed benchmark: what an edit costs next to plain text-to-image with the same steps (README, "Speed").

Four timed jobs on one model, measured in one run and reported as ratios to (a):

(a) text-to-image with the same number of steps (the floor: 2 U-Net evaluations per step, batched);
(b) a first edit, inversion included (K inversion passes + K batched guided passes);
(c) a second edit of the same inversion (K batched guided passes: the source features are cached; on SD3 and
    Flux, K more source passes, since a transformer's source tokens are recomputed);
(d) the ``paper-object`` preset, which follows the official code's sequential path (K + 3K passes); SD 1.x
    layouts only, since its block numbers are SD 1.x's.

Each job runs once untimed (warm-up), in the order above, and its peak memory is taken then: on a GPU
``torch.cuda.max_memory_allocated``; on a CPU the process's peak resident memory during the job, sampled, weights
included (memory a job frees may stay with the process, so a later job's peak is never understated: the ratios
to (a) are upper bounds). Then the four jobs take turns ``repeats`` times and the median wall time of each is
reported.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from pathlib import Path

import numpy as np
import torch

from pfbdiff.pipeline import PFBDiffPipeline

PROMPT, SOURCE_PROMPT = "a dog on a bench", "a cat on a bench"


def benchmark_pipeline(name: str, device=None, dtype=None) -> PFBDiffPipeline:
    """The pipeline of ``name`` (``sd15-random``, ``sdxl-random``, ``sd3-reduced``, ``flux-reduced``, ``tiny`` or any
    ``--model`` value) on ``device`` in ``dtype`` (default: the best device, fp16 on GPUs)."""
    from pfbdiff.flow_pipeline import flow_pipeline_class
    from pfbdiff.models import full_size, toy_flow_models, toy_models
    from pfbdiff.models.devices import resolve_device, resolve_dtype

    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    random_models = {"sd15-random": full_size.sd15_random_components, "sdxl-random": full_size.sdxl_random_components,
                     "sd3-reduced": lambda: toy_flow_models.reduced_flow_components("sd3"),
                     "flux-reduced": lambda: toy_flow_models.reduced_flow_components("flux"),
                     "tiny": toy_models.tiny_sd_components}
    if name not in random_models:
        return _quiet(PFBDiffPipeline.from_pretrained(name, device=device, torch_dtype=dtype))
    components = random_models[name]()
    for network in components.values():
        if isinstance(network, torch.nn.Module) and (network.dtype != dtype or network.device != device):
            network.to(device=device, dtype=dtype)
    if "transformer" in components:
        return _quiet(flow_pipeline_class(components)(**components))
    return _quiet(PFBDiffPipeline(**components))  # which keeps SDXL's VAE in float32, as the model asks


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _inputs(size: int):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    mask = np.zeros((size, size), np.float32)
    mask[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 1
    return image, mask


def _time_once(pipe, job) -> tuple[float, int, int]:
    calls, rows = pipe.unet_calls, pipe.unet_evaluations
    start = time.perf_counter()
    job()
    return time.perf_counter() - start, pipe.unet_calls - calls, pipe.unet_evaluations - rows


def _resident_bytes() -> int | None:
    """This process's resident memory (Linux), or None where /proc is not there."""
    statm = Path("/proc/self/statm")
    return int(statm.read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") if statm.exists() else None


def _peak_memory(job, device: torch.device) -> int | None:
    """Bytes at the peak of ``job``: allocated on a CUDA device, resident (sampled every 2 ms) on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        job()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    peak, done = [_resident_bytes()], threading.Event()

    def sample():
        while not done.wait(0.002):
            peak.append(_resident_bytes())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        job()
    finally:
        done.set()
        sampler.join()
    return None if peak[0] is None else max(peak)


def _time_in_rounds(pipe, jobs: dict, repeats: int) -> dict:
    """Peak memory of each job in its warm-up run, then the median wall time of each; the jobs take turns in every
    round, so a load that comes and goes on the machine falls on all of them alike and the ratios stay fair."""
    peaks = {name: _peak_memory(job, pipe.denoiser.device) for name, job in jobs.items()}
    samples = {name: [] for name in jobs}
    for _ in range(repeats):
        for name, job in jobs.items():
            samples[name].append(_time_once(pipe, job))
    return {name: (statistics.median(s[0] for s in runs), runs[-1][1], runs[-1][2], peaks[name])
            for name, runs in samples.items()}


@torch.no_grad()
def run_speed_benchmark(model: str, *, size: int = 256, steps: int = 4, repeats: int | None = None, device=None,
                        dtype=None) -> list[dict]:
    pipe = benchmark_pipeline(model, device, dtype)
    repeats = repeats or 5
    image, mask = _inputs(size)
    # crop=False: every job works on the whole image at the size text-to-image makes. The second edit's inversion
    # is made on its first run, so that it does not weigh on the memory of the jobs before it.
    inversions = []

    def second_edit():
        if not inversions:
            inversions.append(pipe.invert(image, SOURCE_PROMPT, steps, crop=False))
        return pipe.edit(inversions[0], mask, PROMPT)

    jobs = {
        "(a) txt2img": lambda: pipe.text_to_image(PROMPT, height=size, width=size, num_inference_steps=steps,
                                                  generator=torch.Generator().manual_seed(0)),
        "(b) first edit incl. inversion": lambda: pipe(image, mask, PROMPT, SOURCE_PROMPT, num_inference_steps=steps,
                                                       crop=False),
        "(c) second edit, same inversion": second_edit,
    }
    if getattr(pipe, "feature_unet", None) is not None and pipe.feature_unet.sd1_layout:  # SD 1.x's block numbers
        jobs["(d) paper preset, sequential"] = lambda: pipe(image, mask, PROMPT, SOURCE_PROMPT, preset="paper-object",
                                                            num_inference_steps=steps, crop=False)
    rows = []
    for job, (seconds, passes, evaluations, peak) in _time_in_rounds(pipe, jobs, repeats).items():
        rows.append(dict(model=model, size=size, steps=steps, job=job, seconds=seconds, unet_passes=passes,
                         device=str(pipe.denoiser.device), dtype=str(pipe.denoiser.dtype).replace("torch.", ""),
                         unet_evaluations=evaluations, peak_memory_gb=None if peak is None else peak / 2**30,
                         memory="allocated" if pipe.denoiser.device.type == "cuda" else "resident"))
    floor, floor_memory = rows[0]["seconds"], rows[0]["peak_memory_gb"]
    for row in rows:
        row["ratio"] = row["seconds"] / floor
        row["memory_ratio"] = row["peak_memory_gb"] / floor_memory if floor_memory else None
    return rows


def format_table(rows: list[dict]) -> str:
    lines = ["| model | size | steps | job | U-Net passes | U-Net evaluations | wall s | ratio to (a) | peak memory GiB "
             "| memory ratio to (a) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        memory = ("n/a | n/a" if r["peak_memory_gb"] is None
                  else f"{r['peak_memory_gb']:.2f} ({r['memory']}) | {r['memory_ratio']:.2f}×")
        lines.append(f"| {r['model']} | {r['size']}² | {r['steps']} | {r['job']} | {r['unet_passes']} | "
                     f"{r['unet_evaluations']} | {r['seconds']:.3f} | {r['ratio']:.2f}× | {memory} |")
    return "\n".join(lines)
