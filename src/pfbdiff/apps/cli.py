"""The ``pfbdiff`` command line (typer): ``edit`` one image, ``bench speed`` the engine, list ``presets``.

User mistakes (a missing file, an unknown preset, a word not in the prompt, an output path that would
overwrite the input) print one line ``error: ...`` and exit with code 2, before any model is loaded where
possible, and never leave a partial output file.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Optional

import typer
import typer.core
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

# transformers warns at import time about optional image backends that pfbdiff never uses.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from pfbdiff import __version__  # noqa: E402
from pfbdiff.engine.presets import FAMILY_NAMES, FAMILY_PRESETS, PRESET_HELP, PRESETS, EditConfig  # noqa: E402
from pfbdiff.errors import EmptyMaskError, PFBDiffError  # noqa: E402
from pfbdiff.io import images as imgs  # noqa: E402
from pfbdiff.io import outputs  # noqa: E402

console = Console(stderr=True)


def print_error(message: str) -> None:
    """The one line a user mistake ends with (the message is text, not rich markup: ``pfbdiff[ui]`` stays)."""
    console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)


def _print_warning(message, category, filename, lineno, file=None, line=None) -> None:
    console.print(f"[yellow]warning:[/] {escape(str(message))}", highlight=False, soft_wrap=True)


class OneLineErrors(typer.core.TyperGroup):
    """The command group, with command-line mistakes (an unknown option, ``--steps abc``) reported like every other
    user error: one ``error:`` line naming the fix, exit code 2, instead of click's usage box; warnings (a resized
    mask, a prompt cut at the token limit) are one ``warning:`` line each."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            with warnings.catch_warnings():
                warnings.showwarning = _print_warning
                code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except typer.Abort:
            console.print("aborted", highlight=False)
            code = 130
        except typer.TyperException as error:  # click's exceptions, as typer bundles them
            if type(error).__name__ != "NoArgsIsHelpError":  # that one's help is already printed
                context = getattr(error, "ctx", None)
                hint = f" (see `{context.command_path} --help`)" if context is not None else ""
                print_error(error.format_message() + hint)
            code = error.exit_code
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    cls=OneLineErrors,
    help="PFB-Diff: edit part of a photo from a text prompt and a mask, with any Stable Diffusion 1.x, 2.x or SDXL model.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

PRESET_LIST = ", ".join(PRESET_HELP) + " (see `pfbdiff presets`)"


#: Request fields whose command-line flag is not ``--`` + the field name with dashes.
FLAGS = {"guidance_scale": "--guidance", "settings": "--set", "image": "IMAGE", "loras": "--lora",
         "embeddings": "--embedding"}


#: Method settings with a flag of their own; the others are given as ``--set NAME=VALUE``.
SETTING_FLAGS = ("strength", "start", "grow")


# Options of every command that loads a model, declared once (edit, batch, ui).
ALLOW_PICKLE = typer.Option(False, "--allow-pickle", help="Allow .ckpt/.bin pickle checkpoints (they can run code: only for trusted files).")
CONFIG = typer.Option(None, "--config", help="Diffusers folder or hub id with the configs for a single .safetensors file.")
LORAS = typer.Option(None, "--lora", help="A LoRA .safetensors file, FILE or FILE:SCALE (default scale 1); repeat for several.")
EMBEDDINGS = typer.Option(None, "--embedding", help="A textual-inversion embedding, FILE or FILE:TOKEN (default: the file's token, else <file name>); repeat for several.")


def flag(parameter: str) -> str:
    """The command-line spelling of a library parameter: ``crop_padding`` → ``--crop-padding``, ``halo`` →
    ``--set halo``."""
    if parameter in EditConfig.__dataclass_fields__ and parameter not in SETTING_FLAGS:
        return f"--set {parameter}"
    return FLAGS.get(parameter, "--" + parameter.replace("_", "-"))


@contextlib.contextmanager
def user_errors():
    """Turn a PFBDiffError into one line on stderr (parameters named as flags) and exit code 2."""
    try:
        yield
    except PFBDiffError as error:
        print_error(error.naming(flag))
        raise typer.Exit(2) from None


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=True,
    )


@app.command()
def edit(
    ctx: typer.Context,
    image: Optional[Path] = typer.Argument(None, help="The photo to edit (PNG, JPEG, WebP, ...). Not needed with --from-json."),
    mask: Optional[Path] = typer.Option(None, "--mask", "-m", help="Mask image: white = region to change, black = keep. Grey is soft. Optional with --auto-mask (then it bounds the found region)."),
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="What the edited region should show, e.g. 'a dog'."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Where to write the result (.png; the folder must exist). Required."),
    source_prompt: str = typer.Option("", "--source-prompt", "-s", help="What the photo shows now, e.g. 'a cat on a bench'."),
    preset: str = typer.Option("object", "--preset", help=f"Task preset: {PRESET_LIST}."),
    inside: Optional[list[str]] = typer.Option(None, "--inside", help="Words of the prompt allowed only inside the mask (repeat or comma-separate)."),
    outside: Optional[list[str]] = typer.Option(None, "--outside", help="Words of the prompt allowed only outside the mask."),
    steps: Optional[int] = typer.Option(None, "--steps", help="DDIM steps. Default: the model's recommended steps (its folder's pfbdiff.json; 20 for the bundled model), else 50."),
    strength: Optional[float] = typer.Option(None, "--strength", help="Share of the steps that are inverted and regenerated, in (0, 1]. Default: the preset's."),
    guidance: Optional[float] = typer.Option(None, "--guidance", "-g", help="Classifier-free guidance scale. Default: the model's recommended scale (pfbdiff.json; 4 for the bundled model), else 7.5."),
    negative_prompt: str = typer.Option("", "--negative-prompt", "-n", help="Negative prompt for guidance."),
    seed: int = typer.Option(0, "--seed", help="Seed of the noise an edit starts from (--start noise-in-mask or noise); each seed draws a new object."),
    start: Optional[str] = typer.Option(None, "--start", help="'inverted' (the DDIM-inverted photo), 'noise' (seeded) or 'noise-in-mask' (seeded inside the mask, the inverted photo outside). Default: the preset's (`pfbdiff presets` lists them)."),
    model: Optional[str] = typer.Option(None, "--model", help="Hub id, diffusers folder, or .safetensors file (default: 'shapes', the bundled ShapesWorld model; 'tiny' is a random test model)."),
    config: Optional[str] = CONFIG,
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:1, mps (default: best available)."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="float32, float16 or bfloat16 (default: fp16 on GPU, fp32 on CPU)."),
    allow_pickle: bool = ALLOW_PICKLE,
    settings: Optional[list[str]] = typer.Option(None, "--set", help="Any method setting as KEY=VALUE, e.g. --set t_combine=200 --set blend_levels=-1,-2 (see `pfbdiff presets`)."),
    grow: Optional[int] = typer.Option(None, "--grow", help="Grow (+) or shrink (-) the mask by this many pixels of the photo. Default: the preset's (0)."),
    feather: Optional[int] = typer.Option(None, "--feather", help="Soften the pasted-back edge over this many pixels, inside the mask. Default: from the mask's size (0 for a grey, soft mask)."),
    paste_back: bool = typer.Option(True, "--paste-back/--no-paste-back", help="Keep every pixel outside the (feathered) mask exactly as in the photo."),
    crop: Optional[bool] = typer.Option(None, "--crop/--no-crop", help="Edit only a crop around the mask at the model's native size. Default: only for photos larger than that size."),
    crop_padding: Optional[int] = typer.Option(None, "--crop-padding", help="Context pixels around the mask in the crop. Default: a quarter of the mask box's longer side, at least 32."),
    auto_mask: bool = typer.Option(False, "--auto-mask", help="Find the region to change from the two prompts (DiffEdit-style), within --mask if given; saved as OUTPUT.mask.png."),
    auto_mask_threshold: float = typer.Option(0.5, "--auto-mask-threshold", help="Threshold of the automatic mask in [0, 1): lower finds a larger region."),
    save_json: bool = typer.Option(False, "--save-json", help="Also write the edit's record (the PNG's metadata) as OUTPUT.json."),
    from_json: Optional[Path] = typer.Option(None, "--from-json", help="Re-run the edit recorded in a --save-json file or a pfbdiff PNG; options given here override the record."),
    copy_if_empty: bool = typer.Option(False, "--copy-if-empty", help="With an all-black mask, write a copy of the photo instead of failing."),
    loras: Optional[list[str]] = LORAS,
    embeddings: Optional[list[str]] = EMBEDDINGS,
):
    """Edit the masked region of IMAGE to show PROMPT, keeping the rest."""
    from pfbdiff.apps import provenance
    from pfbdiff.apps import request as requests

    given = dict(image=image, mask=mask, prompt=prompt, source_prompt=source_prompt, preset=preset, inside=inside,
                 outside=outside, steps=steps, guidance_scale=guidance, negative_prompt=negative_prompt, seed=seed,
                 model=model, config=config, device=device, dtype=dtype, paste_back=paste_back, feather=feather,
                 crop=crop, crop_padding=crop_padding, auto_mask=auto_mask, auto_mask_threshold=auto_mask_threshold,
                 loras=loras or [], embeddings=embeddings or [])
    settings = dict(strength=strength, start=start, grow=grow, settings=settings)
    with user_errors():
        request, record = _edit_request(ctx, given, settings, from_json, output)
        side_files = _check_outputs(request, output, save_json)
        if record is not None:
            same_adapters = (request.loras, request.embeddings) == (record.get("loras", []), record.get("embeddings", []))
            provenance.check_inputs({**record, "image": request.image, "mask": request.mask,
                                     "image_sha256": record.get("image_sha256") if request.image == record.get("image") else None,
                                     "mask_sha256": record.get("mask_sha256") if request.mask == record.get("mask") else None,
                                     "adapter_sha256": record.get("adapter_sha256") if same_adapters else None})
        protect = {"input image": request.image, "mask": request.mask}
        try:
            inputs = requests.load_inputs(request)
        except EmptyMaskError as error:
            if not copy_if_empty:
                raise PFBDiffError(f"{error} (or pass --copy-if-empty to write the photo unchanged)") from None
            source = imgs.load_image(request.image)
            note = dict(request.to_dict(), note="the mask is all black: nothing was edited, the photo was copied")
            written = outputs.save_png(source, output, note, protect=protect)
            console.print(f"[yellow]note:[/] the mask is all black; copied the photo unchanged to {written}", highlight=False)
            return
        pipe = _load(request.model, request.device, request.dtype, allow_pickle, request.config, request.loras,
                     request.embeddings)
        with _progress() as progress:
            k = request.edit_steps()
            inverting = progress.add_task("inverting", total=k)
            editing = progress.add_task("editing", total=k)
            outcome = requests.run_request(
                request, pipe, inputs, on_invert_step=lambda _: progress.advance(inverting),
                on_edit_step=lambda _: progress.advance(editing),
            )
        result, metadata = outcome.result, outcome.record
        if result.auto_masks:
            metadata["auto_mask_file"] = str(side_files["mask"])
        region_notes = requests.region_notes(metadata, flag)
        if region_notes:  # the edit region is not the user's mask (grow, a halo, a new object followed): show it
            metadata["edit_region_file"] = str(side_files["region"])
        written = outputs.save_png(result.images[0], output, metadata, protect=protect)
        notes = []
        if result.auto_masks:
            notes.append(str(outputs.save_png(result.auto_masks[0], side_files["mask"], metadata, protect=protect)))
        if region_notes:
            region = outputs.save_png(result.masks[0], side_files["region"], metadata, protect=protect)
            console.print(f"[yellow]note:[/] {'; '.join(region_notes)}; the region it changed is {region}",
                          highlight=False)
            notes.append(str(region))
        if save_json:
            outputs.write_json(side_files["json"], metadata)
            notes.append(str(side_files["json"]))
    also = f"; also {', '.join(notes)}" if notes else ""
    console.print(f"[green]wrote[/] {written}  ({outcome.record['unet_calls']} U-Net calls){also}", highlight=False)


def _edit_request(ctx, given: dict, settings: dict, from_json, output):
    """The request from the command line, or from a record with the options given on the command line on top."""
    from pfbdiff.apps import provenance
    from pfbdiff.apps.request import EditRequest

    def explicit(name):  # typer may bundle its own click, so compare the source by name
        option = {"guidance_scale": "guidance"}.get(name, name)
        return getattr(ctx.get_parameter_source(option), "name", None) == "COMMANDLINE"

    def convert(name, value):
        if name in ("image", "mask"):
            return str(Path(value).expanduser().resolve()) if value is not None else None
        if name == "crop":
            return "auto" if value is None else value
        if name == "model":
            from pfbdiff.models.catalog import default_model

            return provenance.model_reference(value if value is not None else default_model()[0])
        return value

    overrides = _setting_overrides(**{name: value if from_json is None or explicit(name) else None
                                      for name, value in settings.items()})
    missing = [label for name, label in (("image", "IMAGE"), ("mask", "--mask"), ("prompt", "--prompt"))
               if from_json is None and given[name] is None and not (name == "mask" and given["auto_mask"])]
    missing += ["-o/--output"] if output is None else []
    if missing:
        raise PFBDiffError(f"missing {', '.join(missing)}: pfbdiff edit IMAGE --mask MASK --prompt TEXT -o OUT "
                           "(--mask may be left out with --auto-mask; or --from-json RECORD -o OUT)")
    if from_json is None:
        return EditRequest.checked(settings=overrides, **{name: convert(name, value) for name, value in given.items()}), None
    record = provenance.load_record(from_json)
    request = EditRequest.from_record(record)
    changes = {name: convert(name, value) for name, value in given.items() if explicit(name)}
    values = {**request.to_dict(), **changes, "settings": {**request.settings, **overrides}}
    return EditRequest.checked(**values), record


def _setting_overrides(strength, start, grow, settings) -> dict:
    """``--set KEY=VALUE`` items and the setting shortcuts (``--strength``, ``--start``, ``--grow``)."""
    from pfbdiff.apps.request import setting_value

    overrides = {}
    for item in settings or []:
        key, sep, text = item.partition("=")
        if not sep:
            raise PFBDiffError(f"--set takes KEY=VALUE (see `pfbdiff presets` for the keys), got {item!r}")
        key = key.strip().replace("-", "_")
        overrides[key] = setting_value(key, text)
    for key, value in (("strength", strength), ("start", start), ("grow", grow)):
        if value is not None:
            overrides[key] = value
    return overrides


def _check_outputs(request, output, save_json) -> dict:
    """The output paths must not overwrite an input; returns the side files: ``mask`` (the auto-mask PNG),
    ``region`` (the region the edit changed, when it reaches past the mask) and ``json`` (the record)."""
    protect = {"input image": request.image, "mask": request.mask}
    target = Path(output).expanduser()
    outputs.check_output_path(target, protect)
    side = {"mask": target.with_name(f"{target.stem}.mask.png"), "region": outputs.region_path(target),
            "json": target.with_suffix(".json")}
    outputs.check_output_path(side["region"], protect)
    if request.auto_mask:
        outputs.check_output_path(side["mask"], protect)
    if save_json:
        for label, protected in protect.items():
            if protected is not None and side["json"].resolve() == Path(protected).resolve():
                raise PFBDiffError(f"refusing to overwrite the {label} {protected} with the JSON record; choose another -o path")
    return side


def _load(model, device, dtype, allow_pickle, config, loras=(), embeddings=()):
    from pfbdiff.pipeline import load_pipeline

    if model == "tiny":
        console.print("[yellow]note:[/] using 'tiny', a random-weight test model: the result shows the pipeline "
                      "works, not a meaningful picture. Pass --model for a real one.", highlight=False)
    with console.status(f"loading {model}"):
        return load_pipeline(model, torch_dtype=dtype, device=device, allow_pickle=allow_pickle, config=config,
                             loras=loras, embeddings=embeddings, quiet=True)


bench_app = typer.Typer(help="Benchmarks that print numbers.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")


@bench_app.command("speed")
def bench_speed(
    models: list[str] = typer.Option(["tiny", "sd15-random"], "--model", help="Models to time: tiny, sd15-random, sdxl-random (full-size random-weight architectures), sd3-reduced, flux-reduced (SD3 / Flux blocks, fewer and narrower), or any --model value."),
    size: int = typer.Option(256, "--size", help="Image side in pixels."),
    steps: int = typer.Option(4, "--steps", help="DDIM steps (2–5 keeps the full-size model quick on a CPU)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the numbers as JSON here."),
    repeats: Optional[int] = typer.Option(None, "--repeats", help="Timed rounds per job (default 5)."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:1, mps (default: best available)."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="float32, float16 or bfloat16 (default: fp16 on GPU, fp32 on CPU)."),
):
    """Time txt2img, a first edit, a second edit of the same inversion and the paper path; print ratios."""
    from pfbdiff.bench.speed import format_table, run_speed_benchmark

    with user_errors():
        rows = [row for name in models
                for row in run_speed_benchmark(name, size=size, steps=steps, repeats=repeats, device=device, dtype=dtype)]
    print(format_table(rows))
    if json_out is not None:
        json_out.write_text(json.dumps(rows, indent=2))


@bench_app.command("shapes")
def bench_shapes(
    model: Optional[str] = typer.Option(None, "--model", help="Diffusers folder or hub id (default: the bundled ShapesWorld model; 'tiny' = random test model)."),
    out: Path = typer.Option(Path("results/shapesbench"), "--out", "-o", help="Folder for shapesbench.json, shapesbench.md and shapesbench_grid.png."),
    quick: bool = typer.Option(False, "--quick", help="20 cases per task instead of 200."),
    cases: Optional[int] = typer.Option(None, "--cases", help="Cases per task (overrides --quick)."),
    first_case: int = typer.Option(0, "--first-case", help="Index of each task's first case: the bench's own are 0-199; later ones serve for tuning."),
    box_margin: int = typer.Option(2, "--box-margin", help="How far the object edits' box masks reach past the object, in pixels of a 64-px image (0: a tight box)."),
    steps: int = typer.Option(50, "--steps", help="DDIM steps, the same for every method."),
    methods: Optional[list[str]] = typer.Option(None, "--methods", help="Methods to run (repeat or comma-separate; default: all that apply to the model): pfb, pfb-paper, pfb-no-attn, pfb-latent-only, pfb-deep, pfb-deep-mid, pfb-depth-0.25, pfb-depth-0.75, pfb-depth-1.0, pfb-text-queries, pfb-fireflow, pfb-pooled-target, pfb-pooled-source, pfb-attn-no-top, pfb-region-prompts, bld-inverted, bld, flow-bld, kv-edit-like, sdedit-0.5, sdedit-0.7, sdedit-0.9, diffedit."),
    tasks: Optional[list[str]] = typer.Option(None, "--tasks", help="Tasks (default all): object, attribute, background, multi-object."),
    guidance: float = typer.Option(4.0, "--guidance", "-g", help="Classifier-free guidance scale for every method and for text-to-image."),
    grid_cases: int = typer.Option(4, "--grid-cases", help="Cases per task shown in the image grid."),
    paste_back: bool = typer.Option(True, "--paste-back/--no-paste-back", help="Let the pipeline paste its result into the source (PFB-Diff runs, DiffEdit); fidelity is always measured before it."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, mps (default: best available)."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="float32, float16 or bfloat16."),
):
    """ShapesBench: PFB-Diff, ablations and baselines on rendered ShapesWorld edits, scored by exact oracles.

    The results are saved after every case: run the same command again to go on after an interruption. Split a
    long run with --tasks (side by side, or on several machines) and join the parts with `bench shapes-merge`.
    """
    from pfbdiff.bench import shapes as shapesbench
    from pfbdiff.bench.report import success_section

    with user_errors():
        count = cases if cases is not None else (shapesbench.QUICK_CASES if quick else shapesbench.FULL_CASES)
        chosen_tasks = shapesbench.select(tasks, shapesbench.TASKS, "task")
        # no --methods: run_shapesbench runs every method that applies to the model (U-Net or flow transformer)
        chosen_methods = shapesbench.select(methods, tuple(shapesbench.METHODS), "method") if methods else None
        if count < 1 or steps < 1 or first_case < 0 or box_margin < 0:
            raise PFBDiffError(f"--cases and --steps must be at least 1, --first-case and --box-margin at least 0, got "
                               f"{count}, {steps}, {first_case} and {box_margin}")
        name = shapesbench.resolve_model(model)
        pipe = _load(name, device, dtype, False, None)
        with _progress() as progress:
            task_bar = progress.add_task("ShapesBench cases", total=count * len(chosen_tasks))
            result = shapesbench.run_shapesbench(
                pipe, tasks=chosen_tasks, methods=chosen_methods, cases=count, steps=steps, guidance=guidance,
                out_dir=out, grid_cases=grid_cases, model_name=name, paste_back=paste_back, first_case=first_case,
                box_margin=box_margin, on_case=lambda done, total, case_id: progress.update(task_bar, completed=done, description=case_id),
            )
    print(success_section(result))
    console.print(f"[green]wrote[/] {out}/shapesbench.json, shapesbench.md, shapesbench_grid.png", highlight=False)


@bench_app.command("shapes-merge")
def bench_shapes_merge(
    parts: list[Path] = typer.Argument(..., help="Result folders of `pfbdiff bench shapes` runs on different --tasks."),
    out: Path = typer.Option(Path("results/shapesbench"), "--out", "-o", help="Folder for the merged shapesbench.json, shapesbench.md and shapesbench_grid.png."),
):
    """Merge ShapesBench parts run side by side (same settings, different --tasks) into one report."""
    from pfbdiff.bench.report import merge_folders, success_section

    with user_errors():
        result = merge_folders(parts, out)
    print(success_section(result))
    console.print(f"[green]wrote[/] {out}/shapesbench.json, shapesbench.md, shapesbench_grid.png", highlight=False)


@app.command()
def demo(
    out: Path = typer.Option(Path("pfbdiff-demo"), "--out", "-o", help="Folder for the demo's PNGs (created if missing)."),
    model: Optional[str] = typer.Option(None, "--model", help="A ShapesWorld-trained model (default: the bundled 'shapes'; 'tiny' runs the random test model)."),
    steps: int = typer.Option(50, "--steps", help="DDIM steps."),
    seed: int = typer.Option(0, "--seed", help="Noise seed of the edits."),
):
    """Offline demo: render a ShapesWorld picture, replace its object and its background, write the PNGs."""
    from pfbdiff.apps import demo as demo_module
    from pfbdiff.bench.shapes import resolve_model

    with user_errors():
        if steps < 1:
            raise PFBDiffError(f"--steps must be at least 1, got {steps}")
        demo_module.check_demo_folder(out)
        name = resolve_model(model)
        pipe = _load(name, None, None, False, None)
        with console.status("inverting once, then two edits"):
            edits = demo_module.run_demo(pipe, steps=steps, seed=seed)
        written = demo_module.write_demo(edits, out, {"model": name, "steps": steps, "seed": seed,
                                                      "source_prompt": demo_module.SOURCE_CAPTION})
    for edit in edits:
        console.print(edit.summary, highlight=False)
    console.print(f"[green]wrote[/] {', '.join(p.name for p in written)} in {out}  ({pipe.unet_calls} U-Net calls)",
                  highlight=False)


@app.command()
def presets():
    """List the task presets and the settings each one changes (give any setting as --set KEY=VALUE)."""
    from pfbdiff.apps.request import setting_text

    base = PRESETS["object"]
    for name, config in PRESETS.items():
        shown = {key: value for key, value in vars(config).items() if config is base or value != getattr(base, key)}
        print(f"{name}: {PRESET_HELP[name]}")
        print(f"    {' '.join(f'{key}={setting_text(value)}' for key, value in shown.items())}")
        for family, changes in FAMILY_PRESETS.items():
            if name in changes:
                print(f"    on {FAMILY_NAMES[family]}: "
                      f"{' '.join(f'{key}={setting_text(value)}' for key, value in changes[name].items())}")
    print("\nEach preset lists the settings it changes from `object`, which lists them all. Block numbers "
          "(blend_blocks, attention_blocks) count an SD 1.x U-Net's blocks in the order they run (docs/method.md §3): "
          "the paper-* presets reproduce the official SD 1.x code only.")


def version_callback(value: bool):
    if value:
        print(f"pfbdiff {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=version_callback, is_eager=True, help="Print the version.")):
    """PFB-Diff: text-driven local image editing."""


@app.command()
def batch(
    manifest: Path = typer.Argument(..., help="JSONL file, one edit per line: {\"image\", \"mask\", \"prompt\", \"source_prompt\", \"output\", ...}."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for the results (created if missing): one PNG + one JSON record per line."),
    model: Optional[str] = typer.Option(None, "--model", help="Hub id, diffusers folder or .safetensors file (default: the bundled shapes model, else 'tiny')."),
    steps: Optional[int] = typer.Option(None, "--steps", help="DDIM steps for lines that do not set \"steps\". Default: the model's recommended steps, else 50."),
    guidance: Optional[float] = typer.Option(None, "--guidance", "-g", help="Guidance scale for lines that do not set \"guidance\". Default: the model's recommended scale, else 7.5."),
    num_processes: int = typer.Option(1, "--num-processes", "-j", help="Processes to run side by side on this machine (one per GPU; on a CPU they share its cores). Uses accelerate launch."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, mps (default: best available; one GPU per process when launched by accelerate)."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="float32, float16 or bfloat16 (default: fp16 on GPU, fp32 on CPU)."),
    allow_pickle: bool = ALLOW_PICKLE,
    config: Optional[str] = CONFIG,
    loras: Optional[list[str]] = LORAS,
    embeddings: Optional[list[str]] = EMBEDDINGS,
):
    """Run every edit of a MANIFEST; rerun to resume (lines already done with the same parameters are skipped).

    Exit code 0 when every line is done, 1 when some lines failed (listed in DIR/batch-summary.json), 2 for a
    mistake in the command itself.
    """
    from pfbdiff.apps import batch as batch_module
    from pfbdiff.apps.manifest import read_manifest

    launched = batch_module.launched_by_accelerate()
    with user_errors():
        if num_processes < 1:
            raise PFBDiffError(f"--num-processes must be at least 1, got {num_processes}")
        if num_processes > 1 and not launched:
            read_manifest(manifest, steps=steps, guidance=guidance)  # report mistakes before spawning
            args = [str(manifest), "--out", str(out)]
            for option, value in (("--model", model), ("--device", device), ("--dtype", dtype), ("--config", config),
                                  ("--steps", steps), ("--guidance", guidance)):
                if value is not None:
                    args += [option, str(value)]
            if allow_pickle:
                args.append("--allow-pickle")
            args += [arg for lora in loras or [] for arg in ("--lora", lora)]
            args += [arg for embedding in embeddings or [] for arg in ("--embedding", embedding)]
            console.print(f"launching {num_processes} processes with accelerate", highlight=False)
            code, errors = batch_module.launch_processes(num_processes, args)
            for error in errors:
                print_error(error)
            raise typer.Exit(2 if errors else code)
    with user_errors():
        try:
            code = batch_module.run_batch_command(
                manifest, out, model=model, steps=steps, guidance=guidance, device=device, dtype=dtype,
                allow_pickle=allow_pickle, config=config, console=console, loras=loras or [],
                embeddings=embeddings or [],
            )
        except PFBDiffError as error:
            if launched:  # the launching process prints it, once for all processes
                batch_module.end_launched_process(2, error.naming(flag))
            raise
    if launched:
        batch_module.end_launched_process(code)
    raise typer.Exit(code)


@app.command()
def ui(
    model: Optional[str] = typer.Option(None, "--model", help="Hub id, diffusers folder or .safetensors file (default: the bundled shapes model, else 'tiny')."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on. The default keeps the page on this computer; 0.0.0.0 exposes it to the network (no login)."),
    port: int = typer.Option(7860, "--port", help="Port to listen on."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:1, mps (default: best available)."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="float32, float16 or bfloat16 (default: fp16 on GPU, fp32 on CPU)."),
    allow_pickle: bool = ALLOW_PICKLE,
    config: Optional[str] = CONFIG,
    loras: Optional[list[str]] = LORAS,
    embeddings: Optional[list[str]] = EMBEDDINGS,
):
    """Open the web page: upload a photo, paint the mask, type a prompt, press Run (needs pip install 'pfbdiff\\[ui]')."""
    with user_errors():
        if not 0 < port < 65536:
            raise PFBDiffError(f"--port must be between 1 and 65535, got {port}")
        from pfbdiff.apps.ui import check_port_free, launch

        check_port_free(host, port)
        try:
            import gradio  # noqa: F401
        except ImportError:
            raise PFBDiffError("the web UI needs gradio: pip install 'pfbdiff[ui]'") from None

        launch(model, host=host, port=port, device=device, dtype=dtype, allow_pickle=allow_pickle, config=config,
               loras=loras or [], embeddings=embeddings or [], echo=lambda text: console.print(f"[yellow]{text}[/]", highlight=False, soft_wrap=True))


def main():
    app()
