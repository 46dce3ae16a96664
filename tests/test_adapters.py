"""LoRAs and textual-inversion embeddings through diffusers' loader mixins: the feature walker runs the layers a
LoRA installs, an embedding's token is masked like any word, and both are recorded (with digests) so a replay is
bit-exact; a file that does not fit the model is one line."""

import json

import numpy as np
import pytest
import torch
from helpers import random_lora
from PIL import Image
from safetensors.torch import save_file
from typer.testing import CliRunner

from pfbdiff.apps.cli import app
from pfbdiff.engine.tokens import positions_of
from pfbdiff.pipeline import load_pipeline

runner = CliRunner()


@pytest.fixture(scope="module")
def lora_file(tmp_path_factory):
    from pfbdiff.models.toy_models import tiny_sd_components

    return random_lora(tiny_sd_components(seed=0), tmp_path_factory.mktemp("lora"))


@pytest.fixture(scope="module")
def embedding_files(tmp_path_factory, tiny_pipe):
    folder = tmp_path_factory.mktemp("embeddings")
    width = tiny_pipe.text_encoder.get_input_embeddings().weight.shape[1]
    torch.manual_seed(2)
    save_file({"<my-token>": torch.randn(width) * 5}, str(folder / "learned_embeds.safetensors"))  # diffusers' format
    save_file({"emb_params": torch.randn(3, width) * 5}, str(folder / "three.safetensors"))  # A1111's: token <three>
    return folder / "learned_embeds.safetensors", folder / "three.safetensors"


def _edit(pipe, photo, box_mask, prompt="a dog", **kwargs):
    return np.asarray(pipe(photo, box_mask, prompt, "a cat", num_inference_steps=2, output_type="np",
                           generator=torch.Generator().manual_seed(0), **kwargs).images)


def test_a_lora_changes_the_edit_and_at_scale_zero_is_the_base_model(tiny_model_dir, lora_file, photo, box_mask):
    base = _edit(load_pipeline(str(tiny_model_dir), quiet=True), photo, box_mask)
    with_lora = _edit(load_pipeline(str(tiny_model_dir), quiet=True, loras=[{"path": str(lora_file), "scale": 1.0}]),
                      photo, box_mask)
    at_zero = _edit(load_pipeline(str(tiny_model_dir), quiet=True, loras=[{"path": str(lora_file), "scale": 0.0}]),
                    photo, box_mask)
    assert np.abs(with_lora - base).max() > 0.05  # the walker runs the LoRA layers
    np.testing.assert_array_equal(at_zero, base)


@pytest.mark.parametrize("which, token, pieces", [(0, "<my-token>", 1), (1, "<three>", 3)])
def test_an_embedding_token_is_a_word_masked_like_any_other(tiny_model_dir, embedding_files, photo, box_mask,
                                                            which, token, pieces):
    pipe = load_pipeline(str(tiny_model_dir), quiet=True, embeddings=[{"path": str(embedding_files[which]),
                                                                       "token": None}])
    seen = {}
    prompt = f"a {token} on a bench"
    _edit(pipe, photo, box_mask, prompt, attention_observer=lambda index, p: seen.setdefault(index, p[-1]))
    positions = list(positions_of(pipe.tokenizer, pipe.maybe_convert_prompt(prompt, pipe.tokenizer),
                                  [pipe.maybe_convert_prompt(token, pipe.tokenizer)]))
    assert len(positions) == pieces  # a multi-vector token is all of its vectors
    on_token = [probabilities[..., positions] for probabilities in seen.values()]
    assert seen and all((attention == 0).any() for attention in on_token)  # confined to the mask, automatically
    assert any((attention > 0).any() for attention in on_token)


def test_the_cli_records_loras_and_embeddings_and_replays_them_bit_exactly(files, tiny_model_dir, lora_file,
                                                                           embedding_files):
    folder, image, mask = files
    out = folder / "styled.png"
    result = runner.invoke(app, ["edit", str(image), "-m", str(mask), "-p", "a <my-token> dog", "--steps", "2",
                                 "--model", str(tiny_model_dir), "--lora", f"{lora_file}:0.7",
                                 "--embedding", str(embedding_files[0]), "-o", str(out), "--save-json"])
    assert result.exit_code == 0, result.output
    record = json.loads((folder / "styled.json").read_text())
    assert record["loras"] == [{"path": str(lora_file), "scale": 0.7}]
    assert record["embeddings"] == [{"path": str(embedding_files[0]), "token": None}]
    assert set(record["adapter_sha256"]) == {str(lora_file), str(embedding_files[0])}
    again = folder / "again.png"
    assert runner.invoke(app, ["edit", "--from-json", str(out), "-o", str(again)]).exit_code == 0
    assert np.array_equal(np.asarray(Image.open(again)), np.asarray(Image.open(out)))
    lora_file.write_bytes(lora_file.read_bytes())  # same bytes: still the same LoRA
    assert runner.invoke(app, ["edit", "--from-json", str(out), "-o", str(folder / "third.png")]).exit_code == 0


def test_a_changed_lora_file_stops_a_replay(files, tiny_model_dir, lora_file, tmp_path):
    folder, image, mask = files
    copy = tmp_path / "mine.safetensors"
    copy.write_bytes(lora_file.read_bytes())
    out = folder / "a.png"
    argv = ["edit", str(image), "-m", str(mask), "-p", "a dog", "--steps", "2", "--model", str(tiny_model_dir),
            "--lora", str(copy), "-o", str(out)]
    assert runner.invoke(app, argv).exit_code == 0
    save_file({"x": torch.zeros(1)}, str(copy))
    result = runner.invoke(app, ["edit", "--from-json", str(out), "-o", str(folder / "b.png")])
    assert result.exit_code == 2 and "has changed since the record was written" in result.output


def test_a_lora_for_another_model_is_one_line(files, tiny_model_dir, tmp_path):
    from pfbdiff.models.toy_models import tiny_sd_components

    wider = random_lora(tiny_sd_components(seed=0, cross_attention_dim=64), tmp_path)
    folder, image, mask = files
    result = runner.invoke(app, ["edit", str(image), "-m", str(mask), "-p", "a dog", "--model", str(tiny_model_dir),
                                 "--lora", str(wider), "-o", str(folder / "x.png")])
    assert result.exit_code == 2 and "cannot apply the LoRA" in result.output and "Traceback" not in result.output
    assert not (folder / "x.png").exists()


@pytest.mark.parametrize("argument, fragment", [
    ("missing.safetensors", "LoRA file not found"),
    ("{lora}:abc", "LoRA file not found"),
    ("{lora}:nan", "--lora must be a finite number"),
])
def test_bad_lora_arguments_are_one_line(files, tiny_model_dir, lora_file, argument, fragment):
    folder, image, mask = files
    result = runner.invoke(app, ["edit", str(image), "-m", str(mask), "-p", "a dog", "--model", str(tiny_model_dir),
                                 "--lora", argument.format(lora=lora_file), "-o", str(folder / "x.png")])
    assert result.exit_code == 2 and fragment in result.output, result.output


def test_a_batch_applies_its_lora_to_every_line_and_records_it(files, tiny_model_dir, lora_file):
    folder = files[0]
    (folder / "edits.jsonl").write_text(json.dumps({"image": "photo.png", "mask": "mask.png", "prompt": "a dog",
                                                    "steps": 2, "output": "a.png"}) + "\n")
    result = runner.invoke(app, ["batch", str(folder / "edits.jsonl"), "-o", str(folder / "out"), "--model",
                                 str(tiny_model_dir), "--lora", f"{lora_file}:0.5"])
    assert result.exit_code == 0, result.output
    record = json.loads((folder / "out" / "a.json").read_text())
    assert record["loras"] == [{"path": str(lora_file), "scale": 0.5}] and str(lora_file) in record["adapter_sha256"]


def test_the_web_ui_records_the_loras_it_was_started_with(tiny_model_dir, lora_file, photo, box_mask, tmp_path):
    from pfbdiff.apps.request import adapter_fields
    from pfbdiff.apps.ui import EditSession
    from pfbdiff.io.outputs import read_png_metadata

    adapters = adapter_fields([f"{lora_file}:0.5"])
    session = EditSession(load_pipeline(str(tiny_model_dir), quiet=True, **adapters), str(tiny_model_dir),
                          output_dir=tmp_path, adapters=adapters)
    result = session.run(photo, box_mask, "a dog", steps=1)
    record = read_png_metadata(result.path)
    assert record["loras"] == [{"path": str(lora_file), "scale": 0.5}] and str(lora_file) in record["adapter_sha256"]
