"""Score the bundled ShapesWorld text-to-image model with the exact oracles of :mod:`pfbdiff.shapes.oracles`.

A developer tool, run as ``python -m pfbdiff.shapes.evaluate`` (argparse, outside the
``pfbdiff`` command): it serves the people who build the bundled model and its benchmarks, not users editing photos.

Two measurements:

* **Generation accuracy.** Captions of fresh scenes (random seeds disjoint from the training stream; half of
  them use a held-out colour/shape or colour/pattern combination the model never saw) are generated with
  classifier-free guidance and DDIM, then read back by the oracles. A single-object caption is *fully right*
  when the background colour, the pattern and the one object (colour and shape) all match and no other
  object is found; a two-object caption when the background matches and the two objects found are exactly
  the two named ones (in any order).
* **VAE reconstruction PSNR** on rendered scenes.

Run it as ``python -m pfbdiff.shapes.evaluate --model src/pfbdiff/shapes/model`` (``--help`` for options); it
prints a table and a JSON line, and :func:`evaluate` returns the same numbers as a dict.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from pfbdiff.engine.conditioning import Conditioning
from pfbdiff.shapes.oracles import analyse
from pfbdiff.shapes.training_loop import hardware
from pfbdiff.shapes.training_setup import caption_conditioning
from pfbdiff.shapes.world import caption, parse_caption, render, sample_scene

# Seeds of evaluation scenes and of their initial noise. Training draws its scenes from
# ``np.random.default_rng([seed, stage, step])`` (three-word entropy); these two-word entropies and the
# large noise offset never coincide with it.
EVAL_SCENE_TAG = 777_001
EVAL_NOISE_OFFSET = 50_000_000
PSNR_SCENE_TAG = 777_002

DEFAULT_GUIDANCE = 4.0
DEFAULT_MODEL = Path(__file__).resolve().parent / "model"


# --------------------------------------------------------------------------------------------- captions


def evaluation_captions(count: int, tag: int = EVAL_SCENE_TAG) -> list[dict]:
    """``count`` evaluation cases, alternating one and two objects, and held-out / train-split combinations.

    Each case is a dict with ``caption``, ``objects`` (1 or 2), ``held_out`` (whether the scene uses a
    held-out combination) and ``seed`` (for the initial noise).
    """
    cases = []
    for index in range(count):
        rng = np.random.default_rng([tag, index])
        n_objects = 1 + index % 2
        held_out = (index // 2) % 2 == 0
        scene = sample_scene(rng, n_objects, split="heldout" if held_out else "train")
        cases.append({"caption": caption(scene), "objects": n_objects, "held_out": held_out,
                      "seed": EVAL_NOISE_OFFSET + index})
    return cases


# --------------------------------------------------------------------------------------------- generation


def initial_latents(seeds: Sequence[int], unet, device=None, dtype=torch.float32) -> torch.Tensor:
    """Unit Gaussian latents, one per seed, drawn on the CPU so results do not depend on the device."""
    size = unet.config.sample_size
    shape = (unet.config.in_channels, size, size)
    latents = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])
    return latents.to(device or unet.device, dtype)


@torch.no_grad()
def generate(components: dict, captions: Sequence[str], seeds: Sequence[int], *, steps: int = 50,
             guidance: float = DEFAULT_GUIDANCE, batch_size: int = 32, guidance_rescale: float = 0.0) -> np.ndarray:
    """Images (N x H x W x 3 uint8) for ``captions`` with classifier-free guidance and DDIM (eta 0).

    ``components`` holds ``vae``, ``text_encoder``, ``tokenizer``, ``unet`` and ``scheduler`` (any diffusers
    scheduler config; sampling always uses a ``DDIMScheduler`` built from it). ``guidance_rescale`` is the
    "rescaled CFG" of Lin et al. (2023), useful with zero terminal SNR.
    """
    from diffusers import DDIMScheduler

    if len(captions) != len(seeds):
        raise ValueError(f"{len(captions)} captions but {len(seeds)} seeds")
    if "transformer" in components:
        return _generate_flow(components, captions, seeds, steps=steps, guidance=guidance, batch_size=batch_size)
    vae, unet = components["vae"], components["unet"]
    scheduler = DDIMScheduler.from_config(components["scheduler"].config)
    dtype = unet.dtype
    uncond = caption_conditioning(components, [""])
    images = []
    for start in range(0, len(captions), batch_size):
        chunk = list(captions[start:start + batch_size])
        context = Conditioning.cat([uncond.repeat_interleave(len(chunk)), caption_conditioning(components, chunk)])
        latents = initial_latents(seeds[start:start + batch_size], unet, dtype=dtype) * scheduler.init_noise_sigma
        scheduler.set_timesteps(steps, device=unet.device)
        for t in scheduler.timesteps:
            model_input = scheduler.scale_model_input(torch.cat([latents, latents]), t)
            out = unet(model_input, t, encoder_hidden_states=context.tokens,
                       added_cond_kwargs=context.added_cond_kwargs()).sample
            out_uncond, out_cond = out.chunk(2)
            prediction = out_uncond + guidance * (out_cond - out_uncond)
            if guidance_rescale > 0:
                dims = list(range(1, prediction.ndim))
                rescaled = prediction * (out_cond.std(dim=dims, keepdim=True) /
                                         prediction.std(dim=dims, keepdim=True).clamp_min(1e-6))
                prediction = guidance_rescale * rescaled + (1 - guidance_rescale) * prediction
            latents = scheduler.step(prediction, t, latents).prev_sample
        decoded = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample
        images.append(to_uint8(decoded))
    return np.concatenate(images)


def _generate_flow(components: dict, captions, seeds, *, steps: int, guidance: float, batch_size: int) -> np.ndarray:
    """:func:`generate` for the SD3-layout flow model: Euler steps of the flow, classifier-free guidance."""
    from pfbdiff.flow_pipeline import PFBDiffSD3Pipeline

    pipe = PFBDiffSD3Pipeline(**{k: v for k, v in components.items() if k in PIPELINE_PARTS})
    pipe.set_progress_bar_config(disable=True)
    side = components["vae"].config.sample_size
    images = []
    for start in range(0, len(captions), batch_size):
        latents = initial_latents(seeds[start:start + batch_size], pipe.transformer, dtype=pipe.transformer.dtype)
        out = pipe.text_to_image(list(captions[start:start + batch_size]), height=side, width=side,
                                 num_inference_steps=steps, guidance_scale=guidance, latents=latents,
                                 output_type="latent")
        images.append(to_uint8(pipe.decode_latents(out.latents)))
    return np.concatenate(images)


#: What diffusers' SD3 pipeline is built from.
PIPELINE_PARTS = ("vae", "transformer", "scheduler", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2",
                  "text_encoder_3", "tokenizer_3")


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """N x 3 x H x W tensors in [-1, 1] to N x H x W x 3 uint8."""
    array = ((images.float().clamp(-1, 1) + 1) * 127.5).round().byte()
    return array.permute(0, 2, 3, 1).cpu().numpy()


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """N x H x W x 3 uint8 to N x 3 x H x W float in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


# --------------------------------------------------------------------------------------------- scoring


def score_image(image: np.ndarray, text: str) -> dict[str, bool]:
    """How a generated image matches its caption, read by the oracles.

    ``background``/``pattern``: background colour / pattern right. ``count``: as many objects as named.
    ``objects``: the objects found are exactly the named (colour, shape) pairs, in any order.
    ``colours``/``shapes``: the same for colours alone / shapes alone. ``full``: background, pattern and
    objects all right.
    """
    objects, (bg_colour, pattern) = parse_caption(text)
    analysis = analyse(image)
    found = sorted((o.colour or "?", o.shape or "?") for o in analysis.objects)
    expected = sorted(objects)
    result = {
        "background": analysis.background == bg_colour,
        "pattern": analysis.pattern == pattern,
        "count": len(found) == len(expected),
        "colours": sorted(c for c, _ in found) == sorted(c for c, _ in expected),
        "shapes": sorted(s for _, s in found) == sorted(s for _, s in expected),
        "objects": found == expected,
    }
    result["full"] = result["background"] and result["pattern"] and result["objects"]
    return result


def summarise(cases: Sequence[dict], scores: Sequence[dict[str, bool]]) -> dict[str, float]:
    """Mean of every score per group: ``single``/``two`` (object count) and ``*_heldout``/``*_train``."""
    groups: dict[str, list[dict[str, bool]]] = {}
    for case, score in zip(cases, scores):
        base = "single" if case["objects"] == 1 else "two"
        for group in (base, f"{base}_{'heldout' if case['held_out'] else 'train'}", "all"):
            groups.setdefault(group, []).append(score)
    summary: dict[str, float] = {}
    for group, items in groups.items():
        summary[f"{group}_n"] = len(items)
        for key in items[0]:
            summary[f"{group}_{key}"] = float(np.mean([s[key] for s in items]))
    return summary


def generation_accuracy(components: dict, count: int = 200, *, steps: int = 50, guidance: float = DEFAULT_GUIDANCE,
                        batch_size: int = 32, guidance_rescale: float = 0.0,
                        return_images: bool = False) -> dict:
    """Generate ``count`` evaluation captions and score them (see :func:`summarise` for the keys)."""
    cases = evaluation_captions(count)
    images = generate(components, [c["caption"] for c in cases], [c["seed"] for c in cases], steps=steps,
                      guidance=guidance, batch_size=batch_size, guidance_rescale=guidance_rescale)
    scores = [score_image(image, case["caption"]) for image, case in zip(images, cases)]
    summary = summarise(cases, scores)
    if return_images:
        summary["images"] = images
        summary["cases"] = cases
        summary["scores"] = scores
    return summary


@torch.no_grad()
def reconstruction_psnr(vae, count: int = 256, batch_size: int = 64, tag: int = PSNR_SCENE_TAG) -> dict[str, float]:
    """PSNR (dB, 8-bit images) of VAE encode (posterior mean) -> decode on ``count`` rendered scenes."""
    per_image = []
    for start in range(0, count, batch_size):
        rendered = np.stack([render(sample_scene(np.random.default_rng([tag, i]), split="any")).image
                             for i in range(start, min(count, start + batch_size))])
        x = to_tensor(rendered).to(vae.device, vae.dtype)
        recon = to_uint8(vae.decode(vae.encode(x).latent_dist.mean).sample).astype(np.float64)
        mse = ((recon - rendered.astype(np.float64)) ** 2).mean(axis=(1, 2, 3))
        per_image.extend(10 * np.log10(255.0 ** 2 / np.maximum(mse, 1e-10)))
    per_image = np.asarray(per_image)
    return {"psnr_mean": float(per_image.mean()), "psnr_min": float(per_image.min()),
            "psnr_median": float(np.median(per_image))}


# --------------------------------------------------------------------------------------------- entry points


def evaluate(model: str | Path | dict = DEFAULT_MODEL, count: int = 200, *, steps: int = 50,
             guidance: float = DEFAULT_GUIDANCE, guidance_rescale: float = 0.0, psnr_count: int = 256,
             batch_size: int = 32, verbose: bool = True) -> dict:
    """Generation accuracy and VAE PSNR of a model folder (or loaded components); prints and returns a dict."""
    components = model if isinstance(model, dict) else _load(model)
    started = time.time()
    result = {"captions": count, "steps": steps, "guidance": guidance, "guidance_rescale": guidance_rescale}
    result.update(generation_accuracy(components, count, steps=steps, guidance=guidance, batch_size=batch_size,
                                      guidance_rescale=guidance_rescale))
    if psnr_count:
        result.update({f"vae_{k}": v for k, v in reconstruction_psnr(components["vae"], psnr_count).items()})
    result["seconds"] = round(time.time() - started, 1)
    if verbose:
        print(format_summary(result))
    return result


def _load(model: str | Path, device: str = "cpu") -> dict:
    from pfbdiff.models.loading import load_components

    return load_components(model, device=device, torch_dtype="float32")


def format_summary(result: dict) -> str:
    """A small human-readable table of an :func:`evaluate` result."""
    lines = [f"{result.get('captions')} captions, {result.get('steps')} DDIM steps, guidance {result.get('guidance')}"]
    keys = ("full", "background", "pattern", "count", "colours", "shapes", "objects")
    lines.append(f"{'group':<16}{'n':>5}" + "".join(f"{k:>11}" for k in keys))
    for group in ("single", "single_train", "single_heldout", "two", "two_train", "two_heldout"):
        if f"{group}_n" in result:
            lines.append(f"{group:<16}{result[f'{group}_n']:>5}" +
                         "".join(f"{100 * result[f'{group}_{k}']:>10.1f}%" for k in keys))
    if "vae_psnr_mean" in result:
        lines.append(f"VAE PSNR: mean {result['vae_psnr_mean']:.2f} dB, median {result['vae_psnr_median']:.2f}, "
                     f"min {result['vae_psnr_min']:.2f}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m pfbdiff.shapes.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(DEFAULT_MODEL), help="diffusers folder (default: the bundled model)")
    parser.add_argument("--captions", type=int, default=200, help="number of evaluation captions (default 200)")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps (default 50)")
    parser.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE, help="CFG scale")
    parser.add_argument("--guidance-rescale", type=float, default=0.0)
    parser.add_argument("--psnr-images", type=int, default=256, help="rendered scenes for VAE PSNR (0: skip)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, ...; the initial noise is drawn on "
                                                        "the CPU, so devices differ only by their arithmetic")
    parser.add_argument("--json", help="also write the result to this JSON file")
    parser.add_argument("--save-grid", help="write a PNG grid of the first 32 generations here")
    parser.add_argument("--card", action="store_true",
                        help="record the result in <model>/training.json and rewrite the model card")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    components = _load(args.model, args.device)
    if args.save_grid:
        cases = evaluation_captions(min(32, args.captions))
        images = generate(components, [c["caption"] for c in cases], [c["seed"] for c in cases],
                          steps=args.steps, guidance=args.guidance, guidance_rescale=args.guidance_rescale)
        save_grid(images, args.save_grid)
    result = evaluate(components, args.captions, steps=args.steps, guidance=args.guidance,
                      guidance_rescale=args.guidance_rescale, psnr_count=args.psnr_images,
                      batch_size=args.batch_size)
    result["hardware"] = hardware(args.device)
    print(json.dumps(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    if args.card:
        record_evaluation(args.model, result)
    return result


def record_evaluation(model_dir: str | Path, result: dict) -> None:
    """Store ``result`` as the ``evaluation`` of ``<model_dir>/training.json`` and rewrite the model card."""
    from pfbdiff.shapes.export import write_model_card

    info_path = Path(model_dir) / "training.json"
    info = json.loads(info_path.read_text())
    info["evaluation"] = result
    info_path.write_text(json.dumps(info, indent=2) + "\n")
    write_model_card(Path(model_dir))


def save_grid(images: np.ndarray, path: str | Path, columns: int = 8) -> None:
    """Write N x H x W x 3 uint8 images as one PNG grid."""
    from PIL import Image

    n, h, w, _ = images.shape
    rows = math.ceil(n / columns)
    grid = np.full((rows * (h + 2), columns * (w + 2), 3), 255, np.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        grid[r * (h + 2):r * (h + 2) + h, c * (w + 2):c * (w + 2) + w] = image
    Image.fromarray(grid).save(path)


if __name__ == "__main__":
    main(sys.argv[1:])
