"""The bundled ShapesWorld model (``src/pfbdiff/shapes/model``): it loads as Stable Diffusion components and,
once trained well enough, draws a held-out caption that the oracles read back correctly.

These tests skip (with the reason) while the model folder has not been shipped yet, and the generation test
skips while the recorded evaluation of the shipped weights is below the quality bar.
"""

import json
from pathlib import Path

import pytest

MODEL_DIR = Path(__file__).resolve().parents[1] / "src" / "pfbdiff" / "shapes" / "model"
from pfbdiff.shapes.export import QUALITY_BAR

# The generation test runs once the full evaluation recorded in training.json reaches the single-object bar.
SINGLE_OBJECT_BAR = QUALITY_BAR["single_full"]

# A held-out combination (purple circles never appear in training) with a fixed noise seed.
HELD_OUT_CAPTION = "a purple circle on a plain yellow background"
SEED = 1234
DDIM_STEPS = 20


def _shipped() -> bool:
    return (MODEL_DIR / "model_index.json").is_file()


needs_model = pytest.mark.skipif(not _shipped(), reason=f"the ShapesWorld model is not shipped yet ({MODEL_DIR})")


@pytest.fixture(scope="module")
def shapes_components():
    from pfbdiff.loading import load_components

    return load_components(MODEL_DIR, device="cpu", torch_dtype="float32")


@needs_model
def test_shipped_model_loads_with_sd_component_types(shapes_components):
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    c = shapes_components
    assert isinstance(c["vae"], AutoencoderKL)
    assert isinstance(c["unet"], UNet2DConditionModel)
    assert isinstance(c["text_encoder"], CLIPTextModel)
    assert isinstance(c["tokenizer"], CLIPTokenizer)
    assert isinstance(c["scheduler"], DDIMScheduler)
    # 64 x 64 images <-> 16 x 16 x 4 latents (downscale factor 4).
    assert 2 ** (len(c["vae"].config.block_out_channels) - 1) == 4
    assert c["unet"].config.sample_size == 16 and c["unet"].config.in_channels == 4
    assert c["unet"].config.cross_attention_dim == c["text_encoder"].config.hidden_size
    assert c["scheduler"].config.prediction_type == "v_prediction"
    assert c["scheduler"].config.rescale_betas_zero_snr
    assert c["tokenizer"].model_max_length == 77
    # Every ShapesWorld word is a single token.
    ids = c["tokenizer"](HELD_OUT_CAPTION, add_special_tokens=False).input_ids
    assert len(ids) == len(HELD_OUT_CAPTION.split())


@needs_model
def test_shipped_model_loads_offline_by_name_and_is_the_default(shapes_components):
    import torch

    from pfbdiff.loading import default_model, load_components

    assert default_model() == ("shapes", None)
    by_name = load_components("shapes", device="cpu", torch_dtype="float32")
    for name in ("unet", "vae", "text_encoder"):
        by_path = shapes_components[name].state_dict()
        assert all(torch.equal(by_path[k], v) for k, v in by_name[name].state_dict().items())


@needs_model
def test_shipped_model_is_small():
    size = sum(f.stat().st_size for f in MODEL_DIR.rglob("*") if f.is_file())
    assert size <= 30 * 1024 * 1024


@needs_model
def test_held_out_caption_generation_passes_the_oracle(shapes_components):
    info_path = MODEL_DIR / "training.json"
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    score = info.get("evaluation", {}).get("single_full")
    if score is None or score < SINGLE_OBJECT_BAR:
        pytest.skip(f"the shipped model's recorded single-object accuracy ({score}) is below {SINGLE_OBJECT_BAR}; "
                    "run `python -m pfbdiff.shapes.evaluate --card` after training")

    from pfbdiff.shapes.evaluate import generate, score_image
    from pfbdiff.shapes.world import parse_caption, is_held_out_object

    objects, _ = parse_caption(HELD_OUT_CAPTION)
    assert is_held_out_object(*objects[0])
    image = generate(shapes_components, [HELD_OUT_CAPTION], [SEED], steps=DDIM_STEPS)[0]
    assert image.shape == (64, 64, 3)
    score = score_image(image, HELD_OUT_CAPTION)
    assert score["full"], score
