"""Speed benchmark: what an edit costs next to plain text-to-image with the same steps (README, "Speed").

Four timed jobs on one model, measured in one run and reported as ratios to (a):

(a) text-to-image with the same number of steps (the floor: 2 U-Net evaluations per step, batched);
(b) a first edit, inversion included (K inversion passes + K batched guided passes);
(c) a second edit of the same inversion (K batched guided passes: the source features are cached);
(d) the ``paper-object`` preset, which follows the official code's sequential path (K + 3K passes).

Each job runs once untimed (warm-up); then the four jobs take turns ``repeats`` times and the median wall time of
each is reported.
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import torch

from pfbdiff.pipeline import PFBDiffPipeline

PROMPT, SOURCE_PROMPT = "a dog on a bench", "a cat on a bench"


def benchmark_pipeline(name: str) -> PFBDiffPipeline:
    from pfbdiff.models import toy_models

    if name == "sd15-random":
        components = toy_models.sd15_random_components()
    elif name == "tiny":
        components = toy_models.tiny_sd_components()
    else:
        return _quiet(PFBDiffPipeline.from_pretrained(name))
    return _quiet(PFBDiffPipeline(**components))


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
    calls, rows = pipe.feature_unet.calls, pipe.feature_unet.evaluations
    start = time.perf_counter()
    job()
    return time.perf_counter() - start, pipe.feature_unet.calls - calls, pipe.feature_unet.evaluations - rows


def _time_in_rounds(pipe, jobs: dict, repeats: int) -> dict:
    """Median wall time of each job; the jobs take turns in every round, so a load that comes and goes on
    the machine falls on all of them alike and the ratios stay fair."""
    for job in jobs.values():
        job()  # warm-up
    samples = {name: [] for name in jobs}
    for _ in range(repeats):
        for name, job in jobs.items():
            samples[name].append(_time_once(pipe, job))
    return {name: (statistics.median(s[0] for s in runs), runs[-1][1], runs[-1][2]) for name, runs in samples.items()}


@torch.no_grad()
def run_speed_benchmark(model: str, *, size: int = 256, steps: int = 4, repeats: int | None = None) -> list[dict]:
    pipe = benchmark_pipeline(model)
    repeats = repeats or 5
    image, mask = _inputs(size)
    # crop=False: every job works on the whole image at the size text-to-image makes
    inversion = pipe.invert(image, SOURCE_PROMPT, steps, crop=False)
    jobs = {
        "(a) txt2img": lambda: pipe.text_to_image(PROMPT, height=size, width=size, num_inference_steps=steps,
                                                  generator=torch.Generator().manual_seed(0)),
        "(b) first edit incl. inversion": lambda: pipe(image, mask, PROMPT, SOURCE_PROMPT, num_inference_steps=steps,
                                                       crop=False),
        "(c) second edit, same inversion": lambda: pipe.edit(inversion, mask, PROMPT),
        "(d) paper preset, sequential": lambda: pipe(image, mask, PROMPT, SOURCE_PROMPT, preset="paper-object",
                                                     num_inference_steps=steps, crop=False),
    }
    rows = []
    for job, (seconds, passes, evaluations) in _time_in_rounds(pipe, jobs, repeats).items():
        rows.append(dict(model=model, size=size, steps=steps, job=job, seconds=seconds, unet_passes=passes,
                         unet_evaluations=evaluations))
    floor = rows[0]["seconds"]
    for row in rows:
        row["ratio"] = row["seconds"] / floor
    return rows


def format_table(rows: list[dict]) -> str:
    lines = ["| model | size | steps | job | U-Net passes | U-Net evaluations | wall s | ratio to (a) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['size']}² | {r['steps']} | {r['job']} | {r['unet_passes']} | "
                     f"{r['unet_evaluations']} | {r['seconds']:.3f} | {r['ratio']:.2f}× |")
    return "\n".join(lines)
