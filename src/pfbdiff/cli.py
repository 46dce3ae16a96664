"""The ``pfbdiff`` command line (typer): ``edit`` one image, ``bench-speed`` the engine.

User mistakes (a missing file, an unknown preset, a word not in the prompt, an output path that would
overwrite the input) print one line ``error: ...`` and exit with code 2, before any model is loaded where
possible, and never leave a partial output file.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

# transformers warns at import time about optional image backends that pfbdiff never uses.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from . import __version__  # noqa: E402
from . import images as imgs  # noqa: E402
from . import outputs  # noqa: E402
from .errors import PFBDiffError  # noqa: E402
from .presets import PRESET_HELP, PRESETS, get_preset  # noqa: E402

app = typer.Typer(
    help="PFB-Diff: edit part of a photo from a text prompt and a mask, with any Stable Diffusion 1.x/2.x model.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)

PRESET_LIST = ", ".join(PRESET_HELP) + " (see `pfbdiff presets`)"
DEFAULT_MODEL = "tiny"


@contextlib.contextmanager
def user_errors():
    """Turn a PFBDiffError into one line on stderr and exit code 2."""
    try:
        yield
    except PFBDiffError as error:
        console.print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None


def _words(values: list[str] | None) -> tuple[str, ...]:
    """Words from repeated options or comma-separated lists: --inside "red hat" --inside cat, or "hat,cat"."""
    return tuple(w.strip() for value in values or [] for w in value.split(",") if w.strip())


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=True,
    )


@app.command()
def edit(
    image: Path = typer.Argument(..., help="The photo to edit (PNG, JPEG, WebP, ...)."),
    mask: Path = typer.Option(..., "--mask", "-m", help="Mask image: white = region to change, black = keep. Grey is soft."),
    prompt: str = typer.Option(..., "--prompt", "-p", help="What the edited region should show, e.g. 'a dog'."),
    output: Path = typer.Option(..., "--output", "-o", help="Where to write the result (.png; the folder must exist)."),
    source_prompt: str = typer.Option("", "--source-prompt", "-s", help="What the photo shows now, e.g. 'a cat on a bench'."),
    preset: str = typer.Option("object", "--preset", help=f"Task preset: {PRESET_LIST}."),
    inside: Optional[list[str]] = typer.Option(None, "--inside", help="Words of the prompt allowed only inside the mask (repeat or comma-separate)."),
    outside: Optional[list[str]] = typer.Option(None, "--outside", help="Words of the prompt allowed only outside the mask."),
    steps: int = typer.Option(50, "--steps", help="DDIM steps."),
    strength: Optional[float] = typer.Option(None, "--strength", help="Share of the steps that are inverted and regenerated, in (0, 1]. Default: the preset's."),
    guidance: float = typer.Option(7.5, "--guidance", "-g", help="Classifier-free guidance scale."),
    negative_prompt: str = typer.Option("", "--negative-prompt", "-n", help="Negative prompt for guidance."),
    seed: int = typer.Option(0, "--seed", help="Seed for the noise start (--start noise)."),
    start: Optional[str] = typer.Option(None, "--start", help="'inverted' (default: the DDIM-inverted photo) or 'noise' (seeded)."),
    model: str = typer.Option(DEFAULT_MODEL, "--model", help="Hub id, diffusers folder, or .safetensors file. 'tiny' is a random test model."),
    config: Optional[str] = typer.Option(None, "--config", help="Diffusers folder or hub id with the configs for a single .safetensors file."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:1, mps (default: best available)."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="float32, float16 or bfloat16 (default: fp16 on GPU, fp32 on CPU)."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Allow .ckpt/.bin pickle checkpoints (they can run code: only for trusted files)."),
    settings: Optional[list[str]] = typer.Option(None, "--set", help="Any method setting as KEY=VALUE, e.g. --set t_combine=200 --set blend_levels=-1,-2 (see `pfbdiff presets`)."),
):
    """Edit the masked region of IMAGE to show PROMPT, keeping the rest."""
    with user_errors():
        config_overrides = _check_edit_arguments(image, mask, output, preset, steps, strength, start, settings)
        source = imgs.load_image(image)
        mask_array = imgs.load_mask(mask, source.size)
        empty = imgs.describe_empty_or_full(mask_array)
        if empty and "black" in empty:
            raise PFBDiffError(f"{empty}")
        pipe = _load(model, device, dtype, allow_pickle, config)
        import torch

        with _progress() as progress:
            effective = get_preset(preset, **config_overrides)
            k = max(1, int(steps * effective.strength))
            inverting = progress.add_task("inverting", total=k)
            editing = progress.add_task("editing", total=k)

            def step_done(pipeline, i, t, state):
                progress.advance(editing)
                return state

            result = pipe(
                source, mask_array, prompt, source_prompt, preset=preset, num_inference_steps=steps,
                inside=_words(inside) or None, outside=_words(outside) or None, guidance_scale=guidance,
                negative_prompt=negative_prompt or None, generator=torch.Generator().manual_seed(seed),
                callback_on_step_end=step_done, inversion_callback=lambda _: progress.advance(inverting),
                **config_overrides,
            )
        metadata = dict(
            pfbdiff_version=__version__, model=model, preset=preset, prompt=prompt, source_prompt=source_prompt,
            negative_prompt=negative_prompt, inside=list(_words(inside)), outside=list(_words(outside)),
            steps=steps, strength=effective.strength, guidance_scale=guidance, seed=seed, start=effective.start,
            size=list(source.size), unet_calls=pipe.unet_calls, image=str(image), mask=str(mask),
            settings={k: list(v) if isinstance(v, tuple) else v for k, v in config_overrides.items()},
        )
        written = outputs.save_png(result.images[0], output, metadata, protect={"input image": image, "mask": mask})
    console.print(f"[green]wrote[/] {written}  ({pipe.unet_calls} U-Net calls)", highlight=False)


def _check_edit_arguments(image, mask, output, preset, steps, strength, start, settings) -> dict:
    """Every check that needs no model, so mistakes are reported at once and nothing is written."""
    if preset not in PRESETS:
        raise PFBDiffError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")
    if steps < 1:
        raise PFBDiffError(f"--steps must be at least 1, got {steps}")
    overrides = parse_settings(settings or [])
    if strength is not None:
        overrides["strength"] = strength
    if start is not None:
        overrides["start"] = start
    get_preset(preset, **overrides)  # validates strength and start
    outputs.check_output_path(Path(output).expanduser(), {"input image": image, "mask": mask})
    return overrides


def parse_settings(items: list[str]) -> dict:
    """``KEY=VALUE`` strings → EditConfig overrides, each value parsed by the type of the field's default."""
    from .presets import EditConfig

    defaults = {name: field.default for name, field in EditConfig.__dataclass_fields__.items()}
    overrides = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in defaults:
            raise PFBDiffError(f"--set takes KEY=VALUE with KEY one of: {', '.join(defaults)}; got {item!r}")
        overrides[key] = _parse_value(key, text.strip(), defaults[key])
    return overrides


def _parse_value(key, text, default):
    try:
        if isinstance(default, bool):
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return text.lower() in ("true", "1", "yes")
        if isinstance(default, (tuple, type(None))) and key != "auto_words":
            parts = [p for p in text.split(",") if p.strip()]
            return tuple(int(p) if p.strip().lstrip("-").isdigit() else p.strip() for p in parts)
        if isinstance(default, float):
            return float(text)
        if isinstance(default, int):
            return int(text)
        return None if text.lower() in ("none", "") else text
    except ValueError:
        raise PFBDiffError(f"--set {key}={text}: cannot read {text!r} as the type of {key} ({type(default).__name__})") from None


def _load(model, device, dtype, allow_pickle, config):
    from .pipeline import PFBDiffPipeline

    if model == "tiny":
        console.print("[yellow]note:[/] using 'tiny', a random-weight test model: the result shows the pipeline "
                      "works, not a meaningful picture. Pass --model for a real one.", highlight=False)
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    with console.status(f"loading {model}"):
        pipe = PFBDiffPipeline.from_pretrained(model, torch_dtype=dtype, device=device, allow_pickle=allow_pickle, config=config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@app.command("bench-speed")
def bench_speed(
    models: list[str] = typer.Option(["tiny", "sd15-random"], "--model", help="Models to time: tiny, sd15-random, or any --model value."),
    size: int = typer.Option(256, "--size", help="Image side in pixels."),
    steps: int = typer.Option(4, "--steps", help="DDIM steps (2–5 keeps the full-size model quick on a CPU)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the numbers as JSON here."),
):
    """Time txt2img, a first edit, a second edit of the same inversion and the paper path; print ratios."""
    from .bench_speed import format_table, run_speed_benchmark

    with user_errors():
        rows = [row for name in models for row in run_speed_benchmark(name, size=size, steps=steps)]
    print(format_table(rows))
    if json_out is not None:
        json_out.write_text(json.dumps(rows, indent=2))


@app.command()
def presets():
    """List the task presets and their settings."""
    for name, config in PRESETS.items():
        console.print(f"[bold]{name}[/]: {PRESET_HELP[name]}", highlight=False)
        changed = {k: v for k, v in vars(config).items() if v != getattr(PRESETS["object"], k)}
        if changed:
            console.print(f"    {changed}", highlight=False)


def version_callback(value: bool):
    if value:
        print(f"pfbdiff {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=version_callback, is_eager=True, help="Print the version.")):
    """PFB-Diff: text-driven local image editing."""


def main():
    app()
