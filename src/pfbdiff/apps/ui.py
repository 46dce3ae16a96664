"""``pfbdiff ui``: a local web page (gradio) to paint a mask on a photo and edit it with PFB-Diff.

The page: upload a photo and paint the region to change with a white brush (or upload a mask), say what the
photo shows and what the region should show, pick a preset and press Run. The result appears beside the
source, with a progress bar while it works and a download of the PNG, which carries every setting.

Re-running on the same photo with the same source prompt, steps and strength reuses the cached DDIM inversion
(:class:`~pfbdiff.apps.request.InversionCache`), so only the edit's U-Net passes are paid again; the page says so.
Every run goes through the same request path as ``pfbdiff edit`` and ``pfbdiff batch``, and its PNG carries the
same record, so it replays with ``pfbdiff edit --from-json``.

Offline by design: gradio's analytics and version check are off (``GRADIO_ANALYTICS_ENABLED=False``), no share
link is made, server-side rendering is off and the default theme uses local fonts, so the page loads with no
internet. It binds 127.0.0.1 unless ``--host`` says otherwise. One model serves everyone: requests wait in
gradio's queue and run one at a time.

:class:`EditSession` is the part without gradio (the model, the inversion cache, one edit); :func:`build_app`
lays out the page around it; :func:`launch` serves it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import socket
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from pfbdiff.engine.presets import PRESET_HELP, PRESETS
from pfbdiff.errors import EmptyMaskError, PFBDiffError

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
#: Small images (ShapesWorld is 64×64) are shown enlarged with sharp pixels.
PAGE_CSS = "#source-view img, #result img { width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated; }"
#: How many inverted photos the page keeps (each holds K latents and the recorded source features).
INVERSION_CACHE_SIZE = 4


def _offline_gradio():
    """Import gradio with its telemetry and version check switched off."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ.setdefault("GRADIO_SSR_MODE", "False")
    import gradio

    return gradio


# ----------------------------------------------------------------------------------------------- the engine


@dataclass
class EditResult:
    source: Image.Image
    image: Image.Image
    path: Path
    message: str
    reused_inversion: bool
    unet_calls: int
    seconds: float
    region: Image.Image | None = None  # the pixels the edit changed (white), when they reach past the mask


class EditSession:
    """One loaded model, a small cache of inversions, and :meth:`run` for one edit. Thread-safe (one at a time).

    An edit from the page is an ordinary :class:`~pfbdiff.apps.request.EditRequest`: the photo and the mask are
    first saved as PNG files in the session's folder (named by their content), so the result's record names them
    and ``pfbdiff edit --from-json RESULT.png`` makes the same pixels again.
    """

    def __init__(self, pipe, model_name: str, output_dir: str | os.PathLike | None = None,
                 cache_size: int = INVERSION_CACHE_SIZE, adapters: dict | None = None):
        from pfbdiff.apps.request import InversionCache

        self.pipe = pipe
        self.model_name = model_name
        self.adapters = adapters or {}  # the LoRAs and embeddings loaded into pipe, for the records
        self.output_dir = Path(output_dir or tempfile.mkdtemp(prefix="pfbdiff-ui-"))
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.inversions = InversionCache(cache_size)
        self.lock = threading.Lock()
        self.runs = 0

    def remove_folder_if_empty(self) -> None:
        """Remove the session's folder when nothing was saved in it (a session that made no edit)."""
        with contextlib.suppress(OSError):
            self.output_dir.rmdir()  # only succeeds when empty

    def run(self, image, mask, prompt: str, *, source_prompt: str = "", preset: str = "object",
            inside: str = "", outside: str = "", steps: int | None = None, guidance: float | None = None, seed: int = 0,
            strength: float | None = None, grow: int | None = None, feather: int | None = None,
            paste_back: bool = True, settings: dict | None = None,
            progress: Callable[[str, int, int], None] | None = None) -> EditResult:
        """Edit ``image`` inside ``mask`` to show ``prompt``; raise :class:`PFBDiffError` on a user mistake.

        ``grow`` (photo pixels, − shrinks), ``feather`` (pixels; ``None``: from the mask's size) and ``paste_back``
        are those of ``pfbdiff edit``; ``settings`` any other :class:`EditConfig` field; ``steps`` and ``guidance``
        default to the model's recommended ones.
        """
        from pfbdiff.apps.request import EditRequest, load_inputs, region_notes, run_request
        from pfbdiff.io.outputs import save_png

        if image is None:
            raise PFBDiffError("upload a photo first")
        if mask is None:
            raise PFBDiffError("no mask: paint the region to change on the photo with the brush, or upload a mask")
        overrides = dict(settings or {})
        if strength is not None:
            overrides["strength"] = strength
        if grow is not None:
            overrides["grow"] = grow
        with self.lock:
            request = EditRequest.checked(
                image=self._saved_input(image, "photo"), mask=self._saved_input(mask, "mask"), prompt=prompt or "",
                source_prompt=source_prompt or "", preset=preset, inside=inside, outside=outside, steps=steps,
                guidance_scale=guidance, seed=seed, model=self.model_name, settings=overrides, paste_back=paste_back,
                feather=feather, **self.adapters,
            )
            k = request.edit_steps()
            started = time.perf_counter()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    inputs = load_inputs(request)
                except EmptyMaskError:
                    raise PFBDiffError("the mask is empty: paint the region to change on the photo with the brush "
                                       "(any colour), or upload a mask with white where the photo should change") from None
                outcome = run_request(
                    request, self.pipe, inputs, inversions=self.inversions,
                    on_invert_step=lambda i: progress and progress("inverting the photo", i + 1, k),
                    on_edit_step=lambda i: progress and progress("editing", i, k),
                )
            seconds = time.perf_counter() - started
            self.runs += 1
            path = save_png(outcome.result.images[0], self.output_dir / f"pfbdiff-edit-{self.runs:04d}.png",
                            outcome.record)
        calls = outcome.record["unet_calls"]
        if outcome.shared_inversion:
            message = (f"Reused the cached inversion of this photo: {calls} U-Net passes instead of {calls + k} "
                       f"({seconds:.1f} s).")
        else:
            message = (f"Inverted the photo ({k} U-Net passes) and edited it ({calls - k}): {calls} passes in "
                       f"{seconds:.1f} s. Another prompt on the same photo reuses the inversion.")
        notes = [str(w.message) for w in caught]
        about_region = region_notes(outcome.record)
        region = outcome.result.masks[0] if about_region else None
        if about_region:
            text = "; ".join(about_region)
            notes.append(f"{text[0].upper()}{text[1:]}. 'Edited region' shows every pixel it changed.")
        if notes:
            message += " Note: " + " ".join(notes)
        return EditResult(inputs.source, outcome.result.images[0], path, message, outcome.shared_inversion, calls,
                          seconds, region)

    def _saved_input(self, picture, kind: str) -> str:
        """``picture`` (a PIL image, an array or a path) as a PNG file in the session's folder, named by its pixels."""
        from pfbdiff.io.outputs import save_png

        if isinstance(picture, (str, os.PathLike)):
            return str(Path(picture).resolve())
        if not isinstance(picture, Image.Image):
            picture = Image.fromarray(np.asarray(picture))
        digest = hashlib.sha256(f"{picture.mode}{picture.size}".encode())
        digest.update(np.asarray(picture).tobytes())
        path = self.output_dir / "inputs" / f"{kind}-{digest.hexdigest()[:16]}.png"
        if not path.exists():
            path.parent.mkdir(exist_ok=True)
            save_png(picture, path, {})
        return str(path)


def painted_mask(editor_value) -> Image.Image | None:
    """The mask painted in gradio's ImageEditor: every pixel any brush stroke covered (layer alpha), or None."""
    if not editor_value:
        return None
    layers = [layer for layer in (editor_value.get("layers") or []) if layer is not None]
    alphas = []
    for layer in layers:
        layer = layer if isinstance(layer, Image.Image) else Image.open(layer)
        if "A" in layer.getbands():
            alphas.append(np.asarray(layer.getchannel("A"), np.float32) / 255.0)
    if not alphas:
        return None
    alpha = np.max(np.stack(alphas), axis=0)
    if float(alpha.max()) <= 0.0:
        return None
    return Image.fromarray(np.clip(alpha * 255, 0, 255).astype(np.uint8), "L")


def example_scene(size: int = 64) -> tuple[Image.Image, Image.Image, str, str]:
    """A ShapesWorld photo, the mask of its object, its caption and an edit prompt: the page's example."""
    from PIL import ImageFilter

    from pfbdiff.shapes.world import caption, make_scene, render

    scene = make_scene(("yellow", "plain"), [("red", "circle", 0.5, 0.5, 0.4)])
    rendered = render(scene, size)
    mask = Image.fromarray(rendered.object_masks[0].astype(np.uint8) * 255).filter(ImageFilter.MaxFilter(5))
    return Image.fromarray(rendered.image), mask, caption(scene), "a blue square on a plain yellow background"


# ----------------------------------------------------------------------------------------------- the page


def build_app(session: EditSession, *, model_note: str | None = None):
    """The gradio Blocks page around ``session``."""
    gr = _offline_gradio()

    model_line = f"Model: **{_display_name(session.model_name)}**"
    recommended = session.pipe.recommended_settings  # the model's steps and guidance, read when it loaded
    if model_note:
        model_line += f" — ⚠️ {model_note}"
    presets = [(f"{name} — {PRESET_HELP[name]}", name) for name in PRESETS]

    with gr.Blocks(title="pfbdiff — local image editing", analytics_enabled=False) as demo:
        gr.Markdown(
            "## pfbdiff — change part of a photo from a text prompt\n"
            "Upload a photo, **paint the region to change** with the brush (or upload a mask: white = change), "
            "say what the region should show, and press **Run**. Everything outside the mask is kept.\n\n"
            f"{model_line}",
            elem_id="header",
        )
        with gr.Row():
            with gr.Column(scale=1):
                editor = gr.ImageEditor(
                    label="Photo — paint the region to change", type="pil", image_mode="RGBA",
                    sources=["upload", "clipboard"], transforms=(), layers=False, format="png",
                    brush=gr.Brush(colors=["#ffffff", "#ff3366"], color_mode="defaults"), height=420,
                    elem_id="photo",
                )
                mask_upload = gr.Image(label="…or upload a mask (white = change; used instead of the painting)",
                                       type="pil", image_mode="L", sources=["upload"], height=160, format="png",
                                       elem_id="mask-upload")
                source_prompt = gr.Textbox(label="What the photo shows now (source prompt, optional)",
                                           placeholder="a red circle on a plain yellow background",
                                           elem_id="source-prompt")
                prompt = gr.Textbox(label="What the edited region should show (prompt)",
                                    placeholder="a blue square on a plain yellow background", elem_id="prompt")
                preset = gr.Dropdown(choices=presets, value="object", label="Preset", elem_id="preset")
                with gr.Row():
                    inside = gr.Textbox(label="Words only inside the mask", placeholder="blue, square",
                                        elem_id="inside")
                    outside = gr.Textbox(label="Words only outside the mask", placeholder="yellow",
                                         elem_id="outside")
                with gr.Accordion("Settings", open=False):
                    with gr.Row():
                        steps = gr.Slider(1, 100, value=recommended["num_inference_steps"], step=1, label="Steps",
                                          elem_id="steps")
                        guidance = gr.Slider(1.0, 15.0, value=recommended["guidance_scale"], step=0.5,
                                             label="Guidance", elem_id="guidance")
                    with gr.Row():
                        seed = gr.Number(value=0, precision=0, label="Seed", elem_id="seed")
                        strength = gr.Slider(0.05, 1.0, value=PRESETS["object"].strength, step=0.05,
                                             label="Strength (share of the steps redone)", elem_id="strength")
                    with gr.Row():
                        grow = gr.Slider(-64, 64, value=0, step=1, elem_id="grow",
                                         label="Grow (+) or shrink (−) the mask, photo pixels")
                        feather = gr.Slider(-1, 64, value=-1, step=1, elem_id="feather",
                                            label="Feather the edge, pixels (−1: from the mask's size)")
                    paste_back = gr.Checkbox(value=True, elem_id="paste-back",
                                             label="Paste back: keep every pixel outside the mask exactly as in the photo")
                with gr.Row():
                    example = gr.Button("Load an example", elem_id="example")
                    run = gr.Button("Run", variant="primary", elem_id="run")
            with gr.Column(scale=1):
                with gr.Row():
                    source_view = gr.Image(label="Source", interactive=False, format="png", height=360,
                                           elem_id="source-view")
                    result_view = gr.Image(label="Result", interactive=False, format="png", height=360,
                                           elem_id="result")
                region_view = gr.Image(label="Edited region (white: pixels the edit changed; shown when it reaches "
                                       "past your mask)", interactive=False, format="png", height=180,
                                       elem_id="region")
                status = gr.Markdown("Ready.", elem_id="status")
                download = gr.File(label="Download the PNG (carries every setting)", interactive=False,
                                   elem_id="download")

        def on_run(editor_value, mask_value, source_text, prompt_text, preset_name, inside_text, outside_text,
                   steps_value, guidance_value, seed_value, strength_value, grow_value, feather_value,
                   paste_back_value, progress=gr.Progress()):
            image = (editor_value or {}).get("background") if isinstance(editor_value, dict) else editor_value
            mask = mask_value if mask_value is not None else painted_mask(editor_value)
            try:
                result = session.run(
                    image, mask, prompt_text, source_prompt=source_text, preset=preset_name, inside=inside_text,
                    outside=outside_text, steps=int(steps_value), guidance=float(guidance_value),
                    seed=int(seed_value or 0), strength=float(strength_value), grow=int(grow_value or 0),
                    feather=None if feather_value is None or feather_value < 0 else int(feather_value),
                    paste_back=bool(paste_back_value),
                    progress=lambda desc, i, n: progress((i, n), desc=desc),
                )
            except PFBDiffError as error:
                raise gr.Error(error.naming(_form_label), duration=None, title="Cannot edit",
                               print_exception=False) from None
            except Exception as error:  # noqa: BLE001 - the page shows one line, the log keeps the traceback
                import traceback

                traceback.print_exc()
                raise gr.Error(f"internal error ({type(error).__name__}: {error}); please report it",
                               duration=None, print_exception=False) from None
            return result.source, result.image, result.region, str(result.path), result.message

        run.click(
            on_run,
            inputs=[editor, mask_upload, source_prompt, prompt, preset, inside, outside, steps, guidance, seed,
                    strength, grow, feather, paste_back],
            outputs=[source_view, result_view, region_view, download, status],
            concurrency_limit=1, concurrency_id="model", show_progress="full",
        )
        preset.change(lambda name: PRESETS[name].strength, inputs=preset, outputs=strength, queue=False)

        def load_example():
            photo, mask, source_text, prompt_text = example_scene()
            return ({"background": photo, "layers": [], "composite": photo}, mask, source_text, prompt_text,
                    "blue, square")

        example.click(load_example, outputs=[editor, mask_upload, source_prompt, prompt, inside], queue=False)
    demo.queue(default_concurrency_limit=1, max_size=64)
    return demo


#: The page's names for request fields that errors name (the rest read well as they are).
FORM_LABELS = {"prompt": "Prompt", "source_prompt": "Source prompt", "inside": "Words only inside the mask",
               "outside": "Words only outside the mask", "steps": "Steps", "guidance_scale": "Guidance",
               "seed": "Seed", "feather": "Feather"}


def _form_label(field: str) -> str:
    return f"“{FORM_LABELS.get(field, field)}”"


def _display_name(model: str) -> str:
    from pfbdiff.models.catalog import BUNDLED_SHAPES_MODEL

    if model == "shapes" or Path(model) == BUNDLED_SHAPES_MODEL:
        return "shapes (the bundled ShapesWorld model)"
    if model == "tiny":
        return "tiny (random weights, for testing)"
    return model


def launch(model: str | None = None, *, host: str = "127.0.0.1", port: int = 7860, device=None, dtype=None,
           allow_pickle: bool = False, config: str | None = None, loras=(), embeddings=(), block: bool = True,
           echo: Callable[[str], None] = print):
    """Load the model (with ``loras`` and ``embeddings``, as ``pfbdiff edit`` takes them), build the page and serve
    it; returns ``(demo, url)`` when ``block`` is False."""
    from pfbdiff.models.catalog import default_model

    note = None
    if model is None:
        model, note = default_model()
    elif model == "tiny":
        note = "random weights: the pictures show the pipeline works, not meaningful edits"
    if host not in LOCAL_HOSTS:
        echo(f"warning: --host {host} makes the page reachable from other machines, with no login; anyone who "
             f"can reach port {port} can run edits on this computer. Use --host 127.0.0.1 to keep it local.")
    from pfbdiff.apps.provenance import model_reference
    from pfbdiff.apps.request import adapter_fields
    from pfbdiff.pipeline import load_pipeline

    check_port_free(host, port)  # before the model loads, not after
    adapters = adapter_fields(loras, embeddings)
    pipe = load_pipeline(model, torch_dtype=dtype, device=device, allow_pickle=allow_pickle, config=config, quiet=True,
                         **adapters)
    session = EditSession(pipe, model_reference(model), adapters=adapters)  # records name the model as edit's do
    demo = build_app(session, model_note=note)
    try:
        demo.launch(
            server_name=host, server_port=port, share=False, inbrowser=False, prevent_thread_lock=not block,
            show_error=True, ssr_mode=False, pwa=False, mcp_server=False, enable_monitoring=False,
            allowed_paths=[str(session.output_dir)], quiet=False, css=PAGE_CSS,
        )
    except OSError as error:  # the port was taken between the check and the launch
        session.remove_folder_if_empty()
        raise _port_in_use(host, port) from error
    if block:  # the server stopped (Ctrl-C)
        session.remove_folder_if_empty()
        if session.output_dir.exists():
            echo(f"this session's edits and their inputs are in {session.output_dir}")
    return demo, f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}/"


def check_port_free(host: str, port: int) -> None:
    """Refuse a port another program listens on, in one line (gradio's own error is a traceback)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a port in TIME_WAIT is free to serve on
        try:
            probe.bind((host, port))
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                raise _port_in_use(host, port) from error
            if error.errno == errno.EACCES:
                raise PFBDiffError.about("port", f"{port} needs administrator rights on this machine; pass a port "
                                                 "above 1023, e.g. --port 7860") from error
            raise PFBDiffError.about("host", f"{host} is not an address of this machine ({error.strerror or error}); "
                                             "pass 127.0.0.1 (this computer) or 0.0.0.0 (every network)") from error


def _port_in_use(host: str, port: int) -> PFBDiffError:
    return PFBDiffError.about("port", f"{port} on {host} is in use by another program; pass another, e.g. "
                                      f"--port {port + 1 if port < 65535 else 7860}")
