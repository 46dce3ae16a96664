"""Seam study: how much each compositing step (``pfbdiff.photo.compositing``) lowers the seam at the mask edge.

A developer tool, run as ``python -m pfbdiff.bench.seams`` (argparse, outside the
``pfbdiff`` command): it serves the people who build the bundled model and its benchmarks, not users editing photos.

A seam has two ingredients: the decoder's output differs from the photo everywhere (colour, sharpness), and
the paste-back switches from one to the other at the mask edge. To look at the compositing alone, each
ShapesBench case (``bench.cases``) is given the *best possible* generation: its ideal result (the right
answer) passed through a trained VAE (encode → posterior mean → decode), i.e. exactly the right content with
the decoder's real error. That generation is put back into the source with every variant below and scored
with ShapesBench's :func:`~pfbdiff.bench.metrics.seam_score` against the ideal result:

* ``seam_ring``: mean |output − source| (0–255) 1–3 px outside the mask edge (drift / colour step outside);
* ``seam_grad``: mean |∇output − ∇ideal| from 1 px outside to 2 px inside the edge (an edge the ideal
  result does not have).

Variants: the raw decode (no paste-back); a hard paste-back; + feather (auto width, band outside / centred /
inside, and 0.5× / 2× the auto width); + colour match (mean, local). With ``--e2e``, the same is measured on
real PFB-Diff edits of the tiny random model with feature blending on and off (numbers of a random model:
only the direction of each difference means something).

    python -m pfbdiff.bench.seams --vae runs/shapes/vae_checkpoint.pt --count 12 --size 128 [--e2e]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from pfbdiff.bench.cases import make_cases, render_case
from pfbdiff.bench.metrics import seam_score
from pfbdiff.photo import compositing
from pfbdiff.photo.regions import CropBox

TASKS = ("object", "attribute")  # background edits also change pixels outside the coarse mask (see bench.cases)


def load_vae(path: str | Path):
    """A trained ShapesWorld VAE: a diffusers folder, or the training checkpoint (``vae_checkpoint.pt``)."""
    from diffusers import AutoencoderKL

    path = Path(path)
    if path.is_dir():
        return AutoencoderKL.from_pretrained(path).eval()
    from pfbdiff.shapes.training_setup import vae_config

    vae = AutoencoderKL(**vae_config())
    vae.load_state_dict(torch.load(path, map_location="cpu", weights_only=False)["vae"])
    return vae.eval()


@torch.no_grad()
def round_trip(vae, image: np.ndarray) -> np.ndarray:
    """Encode (posterior mean) and decode an H×W×3 uint8 image."""
    x = torch.from_numpy(image.astype(np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]
    y = vae.decode(vae.encode(x).latent_dist.mean).sample
    return ((y[0].permute(1, 2, 0).clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()


def variants(mask: np.ndarray) -> dict[str, dict]:
    """The compositing settings compared, by name (``None`` = no paste-back)."""
    auto = compositing.auto_feather(mask)
    return {
        "raw decode (no paste-back)": None,
        "paste-back, hard edge": dict(feather=0, placement="outside", colour="none"),
        "+ feather auto, centre": dict(feather=auto, placement="center", colour="none"),
        "+ feather auto, inside": dict(feather=auto, placement="inside", colour="none"),
        "+ feather auto, outside": dict(feather=auto, placement="outside", colour="none"),
        "+ feather 0.5x, outside": dict(feather=max(1, auto // 2), placement="outside", colour="none"),
        "+ feather 2x, outside": dict(feather=2 * auto, placement="outside", colour="none"),
        "hard edge + colour match local": dict(feather=0, placement="outside", colour="local"),
        "+ feather outside + colour mean": dict(feather=auto, placement="outside", colour="mean"),
        "+ feather outside + colour local": dict(feather=auto, placement="outside", colour="local"),
        "+ feather centre + colour local": dict(feather=auto, placement="center", colour="local"),
        "+ feather 0.5x, inside": dict(feather=max(1, auto // 2), placement="inside", colour="none"),
        "+ feather 2x, inside": dict(feather=2 * auto, placement="inside", colour="none"),
        "+ feather 4x, inside": dict(feather=4 * auto, placement="inside", colour="none"),
        "+ feather inside + colour mean": dict(feather=auto, placement="inside", colour="mean"),
        "+ feather inside + colour local": dict(feather=auto, placement="inside", colour="local"),
        "+ feather 2x inside + colour local": dict(feather=2 * auto, placement="inside", colour="local"),
    }


def apply(source: np.ndarray, generated: np.ndarray, mask: np.ndarray, setting: dict | None) -> np.ndarray:
    if setting is None:
        return generated
    alpha = compositing.feather_alpha(mask, setting["feather"], setting["placement"])
    box = CropBox.full((source.shape[1], source.shape[0]))
    return compositing.composite(source, generated, box, mask, alpha, setting["colour"],
                                 ring_width=max(4, setting["feather"]))[0]


def study(vae, count: int, size: int, tasks=TASKS) -> dict[str, dict[str, float]]:
    """Mean seam scores of every variant over ``count`` cases of each task."""
    totals: dict[str, list[dict]] = {}
    for task in tasks:
        for case in make_cases(task, count):
            images = render_case(case, size)
            mask = images.mask.astype(np.float32)
            generated = round_trip(vae, images.ideal)
            for name, setting in variants(mask).items():
                output = apply(images.source, generated, mask, setting)
                totals.setdefault(name, []).append(seam_score(output, images.source, images.mask, images.ideal))
    return {name: _mean(rows) for name, rows in totals.items()}


def end_to_end(count: int, size: int, steps: int = 10, tasks=("object", "attribute")) -> dict[str, dict[str, float]]:
    """Seams of real PFB-Diff edits (tiny random model), feature blending on / off × compositing steps."""
    from pfbdiff.models.toy_models import tiny_sd_components
    from pfbdiff.pipeline import PFBDiffPipeline
    from pfbdiff.shapes.world import caption

    pipe = PFBDiffPipeline(**tiny_sd_components(seed=0))
    pipe.set_progress_bar_config(disable=True)
    settings = {
        "feature blending, raw decode (no paste-back)": (dict(), dict(paste_back=False)),
        "no feature blending, raw decode": (dict(blend_blocks=()), dict(paste_back=False)),
        "no feature blending, hard paste": (dict(blend_blocks=()), dict(feather=0, colour_match="none")),
        "feature blending, hard paste": (dict(), dict(feather=0, colour_match="none")),
        "feature blending, feather (auto, inside)": (dict(), dict(colour_match="none")),
        "feature blending, feather + colour local (default)": (dict(), dict()),
        "no feature blending, feather + colour local": (dict(blend_blocks=()), dict()),
    }
    totals: dict[str, list[dict]] = {}
    for task in tasks:
        for case in make_cases(task, count):
            images = render_case(case, size)
            inversion = pipe.invert(images.source, caption(case.source), steps)
            for name, (config, finish) in settings.items():
                out = pipe.edit(inversion, images.mask.astype(np.float32), caption(case.target),
                                inside=case.new_phrases[0].split(), **config, **finish).images[0]
                totals.setdefault(name, []).append(seam_score(np.asarray(out), images.source, images.mask, images.ideal))
    return {name: _mean(rows) for name, rows in totals.items()}


def _mean(rows: list[dict]) -> dict[str, float]:
    return {key: float(np.nanmean([row[key] for row in rows])) for key in rows[0]}


def format_table(results: dict[str, dict[str, float]]) -> str:
    lines = ["| variant | seam_ring ↓ | seam_grad ↓ |", "|---|---|---|"]
    lines += [f"| {name} | {r['seam_ring']:.2f} | {r['seam_grad']:.2f} |" for name, r in results.items()]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pfbdiff.bench.seams", description=__doc__.split("\n\n")[0])
    parser.add_argument("--vae", default="runs/shapes/vae_checkpoint.pt", help="trained VAE folder or checkpoint")
    parser.add_argument("--count", type=int, default=12, help="cases per task")
    parser.add_argument("--size", type=int, default=128, help="image side in pixels")
    parser.add_argument("--e2e", action="store_true", help="also measure real edits of the tiny model")
    parser.add_argument("--json", type=Path, help="write the numbers here too")
    args = parser.parse_args(argv)
    results = {"compositing": study(load_vae(args.vae), args.count, args.size)}
    print(f"compositing study, {args.count} cases × {len(TASKS)} tasks at {args.size} px\n")
    print(format_table(results["compositing"]))
    if args.e2e:
        results["end_to_end"] = end_to_end(max(1, args.count // 3), args.size)
        print("\nend to end (tiny random model)\n")
        print(format_table(results["end_to_end"]))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
