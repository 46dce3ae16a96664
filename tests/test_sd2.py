"""Stable Diffusion 2.x: the same mechanisms on its U-Net (linear projections, a head count per level, attention
scores upcast to float32 as SD 2.1-768-v ships), v-prediction, in float32, float16 and bfloat16, loaded from a diffusers
folder through the real loading code."""

import numpy as np
import pytest
import torch
from helpers import assert_confined_to

from pfbdiff import PFBDiffPipeline
from pfbdiff.engine.attention import AttentionMasking, MaskedCrossAttention, TokenRegion
from pfbdiff.engine.edit_mask import EditMask
from pfbdiff.engine.loop import Prompts, plain_sampling_loop
from pfbdiff.engine.presets import PRESETS
from pfbdiff.engine.tokens import positions_of
from pfbdiff.models.toy_models import save_tiny_model


@pytest.fixture(scope="module")
def sd2_model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny-sd2") / "model", seed=1, family="sd2",
                           prediction_type="v_prediction")


@pytest.fixture(scope="module", params=["float32", "float16", "bfloat16"])
def sd2_pipe(request, sd2_model_dir):
    return PFBDiffPipeline.from_pretrained(str(sd2_model_dir), device="cpu", torch_dtype=request.param)


def test_the_fixture_has_the_sd2_layout(sd2_pipe):
    config = sd2_pipe.unet.config
    assert config.upcast_attention and config.use_linear_projection and len(set(config.attention_head_dim)) > 1
    assert sd2_pipe.scheduler.config.prediction_type == "v_prediction"


#: preset → (prompt, source prompt, the confined words or token positions; none for paper-background's)
CASES = {"object": ("a blue dog", "a red cat", ["blue", "dog"]), "attribute": ("a blue dog", "a red cat", ["blue", "dog"]),
         "multi-object": ("a blue dog", "a red cat", ["blue dog"]),
         "background": ("a red cat in a desert", "a red cat on grass", ["red", "cat"]),
         "paper-object": ("a blue dog", "a red cat", [1, 2]), "paper-background": ("a red cat in a desert", "", [])}


@pytest.mark.parametrize("preset", list(PRESETS))
def test_every_preset_edits_an_sd2_model_with_its_words_masked(sd2_pipe, photo, box_mask, preset):
    """Every cross-attention the preset masks gives the confined words exactly zero attention where they are not
    allowed, and some above zero; the picture comes back whole, at the photo's size."""
    prompt, source_prompt, words = CASES[preset]
    seen = {}

    def observe(index, probabilities):
        seen.setdefault(index, probabilities[-1].float())  # the last row is conditional

    regions = dict(word_masks={"blue dog": box_mask}) if preset == "multi-object" else {}
    result = sd2_pipe(photo, None if regions else 1 - box_mask if "background" in preset else box_mask, prompt,
                      source_prompt, preset=preset, num_inference_steps=2, attention_observer=observe, **regions)
    image = np.asarray(result.images[0])
    assert image.shape == photo.shape and np.isfinite(image).all()
    keep = np.asarray(result.masks[0]) == 0
    assert np.array_equal(image[keep], photo[keep])  # paste-back: bit for bit outside the mask
    if preset in ("object", "attribute"):  # the new words: exactly zero outside the edit mask, in every block
        assert_confined_to(seen, result.latent_masks,
                           list(positions_of(sd2_pipe.tokenizer, prompt, words)))
    if not words:
        return
    assert seen, "no cross-attention was masked"
    on_words = {index: probabilities[..., list(positions_of(sd2_pipe.tokenizer, prompt, words))]
                for index, probabilities in seen.items()}
    assert all((attention == 0).any() for attention in on_words.values())
    assert any((attention > 0).any() for attention in on_words.values())  # a deep 2×2 map may lie all outside


def test_no_op_config_is_exactly_plain_sampling_from_the_inverted_latent(sd2_pipe, photo, box_mask):
    inv = sd2_pipe.invert(photo, "a cat", num_inference_steps=4)
    edited = sd2_pipe.edit(inv, box_mask, "a dog", output_type="latent", blend_blocks=(), attention_masking=False,
                           latent_blend=0.98, start="inverted").images
    prompts = Prompts(None, sd2_pipe.encode_prompt(["a dog"]), sd2_pipe.encode_prompt([""], negative=True))
    assert torch.equal(edited, plain_sampling_loop(sd2_pipe.feature_unet, inv.latents[-1], sd2_pipe.ddim_grid(4),
                                                   prompts, 7.5))


def test_a_mask_the_model_passes_is_merged_with_the_word_mask_not_dropped(sd2_pipe):
    """A text padding mask and the word mask both apply: padded tokens and the masked word outside its region
    get exactly zero attention (before, the word mask stepped aside whenever the model passed a mask)."""
    block = next(b for b in sd2_pipe.feature_unet.blocks if b.cross_attentions and b.attention_level == 2)
    attn = block.cross_attentions[0]
    latent = torch.zeros(1, 1, 16, 16)
    latent[..., :8] = 1.0
    controller = AttentionMasking([TokenRegion((2, 3), EditMask(latent))], (16, 16), {block.index})
    controller.active, controller.unconditional_rows = True, 0
    seen = {}
    controller.observer = lambda index, probabilities: seen.setdefault("probabilities", probabilities)
    dtype = sd2_pipe.unet.dtype
    torch.manual_seed(0)
    hidden = torch.randn(1, 16, attn.to_q.in_features, dtype=dtype)
    context = torch.randn(1, 77, attn.to_k.in_features, dtype=dtype)
    padding = torch.zeros(1, 1, 77, dtype=dtype)
    padding[..., 40:] = -10000.0  # diffusers' additive form of an encoder attention mask
    with torch.no_grad():
        MaskedCrossAttention(controller, block.index, attn.processor)(attn, hidden, context, attention_mask=padding)
    probabilities = seen["probabilities"][0].float()  # heads × pixels × tokens
    outside = ~EditMask(latent).binary_at((4, 4)).reshape(-1)
    assert torch.all(probabilities[..., 40:] == 0)
    assert torch.all(probabilities[:, outside][..., [2, 3]] == 0)
    assert torch.all(probabilities[:, ~outside][..., [2, 3]] > 0)
    torch.testing.assert_close(probabilities.sum(-1), torch.ones(probabilities.shape[:2]), atol=1e-2, rtol=0)


def test_a_single_file_sd2_checkpoint_with_its_openclip_encoder_loads_exactly(sd2_model_dir, tmp_path):
    from ldm_checkpoint import write_ldm_safetensors

    from pfbdiff.models.loading import load_components

    folder = load_components(str(sd2_model_dir), device="cpu")
    path = write_ldm_safetensors(folder, tmp_path / "sd2.safetensors", family="sd2")
    loaded = load_components(path, config=str(sd2_model_dir), device="cpu")
    for name in ("unet", "vae", "text_encoder"):
        reference = folder[name].state_dict()
        assert all(torch.equal(value, reference[key]) for key, value in loaded[name].state_dict().items()), name
    assert loaded["unet"].config.upcast_attention and loaded["scheduler"].config.prediction_type == "v_prediction"
