"""The web UI's engine and page without a browser: inversion reuse, user errors, the painted mask, the queue."""

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from pfbdiff.apps.cli import app
from pfbdiff.errors import PFBDiffError
from pfbdiff.io.outputs import read_png_metadata

gradio = pytest.importorskip("gradio", reason="SKIPPED: the web UI needs gradio (pip install -e '.[ui,test]')")

from pfbdiff.apps import ui  # noqa: E402

STEPS = 3


@pytest.fixture()
def session(tiny_pipe, tmp_path):
    return ui.EditSession(tiny_pipe, "tiny-test", output_dir=tmp_path)


def test_a_second_prompt_on_the_same_photo_reuses_the_inversion(session, photo, box_mask):
    events = []
    first = session.run(photo, box_mask, "a dog", source_prompt="a cat", steps=STEPS,
                        progress=lambda desc, i, n: events.append((desc, i, n)))
    assert not first.reused_inversion and first.unet_calls == 2 * STEPS
    assert "Inverted the photo (3 U-Net passes)" in first.message
    assert ("inverting the photo", STEPS, STEPS) in events and ("editing", STEPS, STEPS) in events
    second = session.run(Image.fromarray(photo), box_mask, "a fox", source_prompt="a cat", steps=STEPS)
    assert second.reused_inversion and second.unet_calls == STEPS
    assert "Reused the cached inversion of this photo: 3 U-Net passes instead of 6" in second.message
    third = session.run(photo, box_mask, "a fox", source_prompt="a dog", steps=STEPS)  # another source prompt
    assert not third.reused_inversion
    meta = read_png_metadata(second.path)
    assert meta["prompt"] == "a fox" and meta["shared_inversion"] is True and meta["model"] == "tiny-test"
    assert second.image.size == (128, 96) and second.path.parent == session.output_dir


def test_paste_back_keeps_the_photo_outside_the_mask_and_grow_is_recorded(session, photo, box_mask):
    kept = session.run(photo, box_mask, "a dog", steps=2, grow=4, feather=0, settings={"outgrow": 0})
    changed = np.abs(np.asarray(kept.image, np.int32) - photo.astype(np.int32)).sum(-1)
    outside = np.ones(box_mask.shape, bool)
    outside[20:76, 28:100] = False  # the box grown by 4 px
    assert changed[outside].max() == 0 and changed[box_mask > 0].mean() > 5
    meta = read_png_metadata(kept.path)
    assert meta["grow"] == 4 and meta["feather"] == 0 and meta["paste_back"] is True
    region = np.asarray(kept.region) > 0  # the grown box, shown as the region the edit changed
    assert meta["changed_outside_mask"] == np.count_nonzero(region & (box_mask == 0)) == 56 * 72 - 48 * 64
    assert "changed 960 pixels outside your mask" in kept.message and np.array_equal(region, ~outside)
    within = session.run(photo, box_mask, "a dog", steps=2, settings={"outgrow": 0})
    assert within.region is None  # within the mask: nothing to show
    loose = session.run(photo, box_mask, "a dog", steps=2, paste_back=False)
    changed = np.abs(np.asarray(loose.image, np.int32) - photo.astype(np.int32)).sum(-1)
    assert changed[outside].max() > 0  # without paste-back the VAE round trip shows outside the mask


def test_a_large_photo_is_cropped_around_the_mask_and_the_cache_knows_the_box(session):
    big = np.asarray(Image.fromarray(np.random.default_rng(1).integers(0, 255, (60, 80, 3), np.uint8)).resize((400, 300)))
    left, right = np.zeros((300, 400), np.float32), np.zeros((300, 400), np.float32)
    left[100:160, 40:120] = 1.0
    right[100:160, 260:340] = 1.0
    first = session.run(big, left, "a dog", steps=2)
    assert first.image.size == (400, 300) and not first.reused_inversion
    assert read_png_metadata(first.path)["crop_box"] != [0, 0, 400, 300]  # only a box around the mask was edited
    assert session.run(big, left, "a fox", steps=2).reused_inversion  # same box
    assert not session.run(big, right, "a fox", steps=2).reused_inversion  # another box: inverted again


def test_the_cache_keeps_a_few_photos(session, photo, box_mask):
    session.inversions.size = 2
    for shift in range(3):
        session.run(np.roll(photo, shift, axis=1), box_mask, "a dog", steps=1)
    assert len(session.inversions._items) == 2


@pytest.mark.parametrize("change, fragment", [
    (dict(image=None), "upload a photo first"),
    (dict(mask=None), "no mask: paint the region"),
    (dict(mask=np.zeros((96, 128), np.float32)), "the mask is empty"),
    (dict(prompt="  "), "prompt is empty"),
    (dict(inside="zebra"), "zebra"),
    (dict(preset="nope"), "unknown preset"),
    (dict(strength=1.5), "strength must be in (0, 1]"),
    (dict(feather=-1), "feather must be 0 or more"),
    (dict(guidance=float("nan")), "guidance_scale must be a finite number"),
    (dict(seed=2**64), "seed must be between 0 and 2**64 - 1"),
    (dict(steps=100000), "steps must be at most 1000"),
])
def test_user_mistakes_are_one_line_errors(session, photo, box_mask, change, fragment):
    args = dict(image=photo, mask=box_mask, prompt="a dog", inside="", steps=1)
    args.update(change)
    with pytest.raises(PFBDiffError) as error:
        session.run(args.pop("image"), args.pop("mask"), args.pop("prompt"), **args)
    assert fragment in str(error.value) and "\n" not in str(error.value)


def test_the_painted_mask_is_the_alpha_of_the_brush_strokes():
    layer = np.zeros((20, 30, 4), np.uint8)
    layer[5:10, 10:20] = (255, 255, 255, 255)
    other = np.zeros((20, 30, 4), np.uint8)
    other[0:2, 0:2] = (255, 51, 102, 128)
    mask = ui.painted_mask({"background": None, "layers": [Image.fromarray(layer), Image.fromarray(other)]})
    values = np.asarray(mask)
    assert mask.size == (30, 20) and values[7, 15] == 255 and values[0, 0] == 128 and values[15, 5] == 0
    assert ui.painted_mask({"layers": [Image.fromarray(np.zeros((4, 4, 4), np.uint8))]}) is None
    assert ui.painted_mask({"layers": []}) is None and ui.painted_mask(None) is None


def test_a_mask_painted_at_canvas_size_is_resized_as_the_cli_resizes_it(session, photo):
    canvas = np.zeros((192, 256), np.uint8)  # twice the photo's size, as the editor's canvas may return it
    canvas[:, 128:] = 255
    result = session.run(photo, Image.fromarray(canvas), "a dog", steps=1)
    assert "resized" in result.message  # the CLI's warning, shown on the page
    record = read_png_metadata(result.path)
    assert Image.open(record["mask"]).size == (256, 192)  # the record names the mask as painted: it replays


def test_the_page_queues_requests_one_at_a_time_and_names_the_model(session):
    demo = ui.build_app(session, model_note="a note about the model")
    config = demo.get_config_file()
    run = [fn for fn in demo.fns.values() if fn.api_name == "on_run"]
    assert len(run) == 1 and run[0].concurrency_limit == 1 and run[0].queue is not False
    assert demo._queue.default_concurrency_limit == 1
    assert demo.analytics_enabled is False
    texts = " ".join(str(c.get("props", {}).get("value")) for c in config["components"])
    assert "tiny-test" in texts and "a note about the model" in texts
    ids = {c.get("props", {}).get("elem_id") for c in config["components"]}
    assert {"photo", "mask-upload", "prompt", "source-prompt", "preset", "inside", "outside", "steps", "guidance",
            "seed", "strength", "grow", "feather", "paste-back", "run", "result", "source-view", "download",
            "status"} <= ids


def test_the_example_is_a_shapes_scene_with_its_mask():
    photo, mask, source, prompt = ui.example_scene()
    assert photo.size == mask.size == (64, 64)
    assert source == "a red circle on a plain yellow background" and "blue square" in prompt
    assert 0.05 < (np.asarray(mask) > 127).mean() < 0.5


def test_launch_warns_when_exposed_beyond_localhost(tiny_pipe, monkeypatch):
    launched, said = {}, []
    monkeypatch.setattr(gradio.Blocks, "launch", lambda self, **kwargs: launched.update(kwargs))
    monkeypatch.setattr("pfbdiff.pipeline.load_pipeline", lambda *args, **kwargs: tiny_pipe)
    ui.launch("tiny-test", host="0.0.0.0", port=7999, echo=said.append, block=False)
    assert launched["server_name"] == "0.0.0.0" and launched["server_port"] == 7999
    assert launched["share"] is False and launched["ssr_mode"] is False
    assert len(said) == 1 and "reachable from other machines" in said[0]
    said.clear()
    ui.launch("tiny-test", echo=said.append, block=False)
    assert launched["server_name"] == "127.0.0.1" and said == []


def test_ui_command_help_and_bad_port():
    result = CliRunner().invoke(app, ["ui", "--help"])
    assert result.exit_code == 0 and "--host" in result.output and "--port" in result.output
    result = CliRunner().invoke(app, ["ui", "--port", "70000"])
    assert result.exit_code == 2 and "--port must be between" in result.output
