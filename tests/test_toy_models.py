"""Tests of the code-built models: the CLIP-style tokenizer, the tiny SD components and the SD 1.5-size UNet."""

import time

import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from pfbdiff.models.full_size import random_unet, sd15_unet_config, sdxl_unet_config
from pfbdiff.models.toy_models import (
    TINY_WORDS,
    build_clip_tokenizer,
    bytes_to_unicode,
    make_sd_scheduler,
    sd_scheduler_config,
    tiny_sd_components,
)

UNLISTED_WORDS = ("giraffe", "giraffes", "zebra", "zebras", "tiger", "elephant", "sunglasses")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_clip_tokenizer(TINY_WORDS, tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def components():
    return tiny_sd_components(seed=0)


def word_pieces(tokenizer, word):
    return tokenizer.convert_ids_to_tokens(tokenizer(word, add_special_tokens=False).input_ids)


# ------------------------------------------------------------------------------------------------ tokenizer


def test_every_listed_word_is_one_token(tokenizer):
    for word in TINY_WORDS:
        assert word_pieces(tokenizer, word) == [word + "</w>"], word


@pytest.mark.parametrize("word", UNLISTED_WORDS)
def test_unlisted_words_split_into_several_pieces(tokenizer, word):
    assert word not in TINY_WORDS
    pieces = word_pieces(tokenizer, word)
    assert len(pieces) >= 2
    assert "".join(pieces).replace("</w>", "") == word
    assert pieces[-1].endswith("</w>")


def test_vocab_follows_clip_conventions(tokenizer):
    vocab = tokenizer.get_vocab()
    for char in bytes_to_unicode().values():
        assert char in vocab and char + "</w>" in vocab
    assert tokenizer.bos_token == "<|startoftext|>"
    assert tokenizer.eos_token == tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    assert tokenizer.model_max_length == 77


def test_encode_pad_and_decode_round_trip(tokenizer):
    prompt = "a photo of a giraffe sitting on a red bench"
    encoded = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True)
    ids = encoded.input_ids
    assert len(ids) == 77
    assert ids[0] == tokenizer.bos_token_id
    content = ids[1 : ids.index(tokenizer.eos_token_id)]
    assert all(i == tokenizer.pad_token_id for i in ids[len(content) + 1 :])
    assert tokenizer.decode(ids, skip_special_tokens=True) == prompt
    assert tokenizer.decode(content) == prompt


def test_long_prompts_truncate_to_77(tokenizer):
    ids = tokenizer(" ".join(["cat"] * 200), truncation=True, max_length=77).input_ids
    assert len(ids) == 77 and ids[-1] == tokenizer.eos_token_id


def test_tokenizer_reloads_from_its_directory(tmp_path):
    built = build_clip_tokenizer(["cat", "hat"], tmp_path)
    reloaded = CLIPTokenizer.from_pretrained(tmp_path)
    for prompt in ("a cat in a hat", "giraffe"):
        assert reloaded(prompt).input_ids == built(prompt).input_ids
    assert reloaded.model_max_length == 77
    assert word_pieces(reloaded, "cat") == ["cat</w>"]
    assert len(word_pieces(reloaded, "the")) == 3  # "the" is not in this small list


def test_fast_tokenizer_class_loads_it_too(tmp_path):
    transformers = pytest.importorskip("transformers")
    fast_class = getattr(transformers, "CLIPTokenizerFast", None)
    if fast_class is None:
        pytest.skip("this transformers has no CLIPTokenizerFast")
    built = build_clip_tokenizer(TINY_WORDS, tmp_path)
    fast = fast_class.from_pretrained(tmp_path)
    assert fast("a zebra on the grass").input_ids == built("a zebra on the grass").input_ids


def test_tokenizer_without_directory_uses_a_temporary_one():
    assert word_pieces(build_clip_tokenizer(["rabbit"]), "rabbit") == ["rabbit</w>"]


# ------------------------------------------------------------------------------------------------ scheduler


def test_scheduler_has_stable_diffusion_v1_settings():
    scheduler = make_sd_scheduler()
    assert isinstance(scheduler, DDIMScheduler)
    for key, value in sd_scheduler_config().items():
        assert scheduler.config[key] == value, key
    assert scheduler.config.beta_schedule == "scaled_linear"
    assert scheduler.config.steps_offset == 1 and scheduler.config.set_alpha_to_one is False
    scheduler.set_timesteps(50)
    assert scheduler.timesteps[0].item() == 981 and scheduler.timesteps[-1].item() == 1
    assert make_sd_scheduler("v_prediction").config.prediction_type == "v_prediction"


# ------------------------------------------------------------------------------------------------ tiny model


def test_tiny_components_types_and_modes(components):
    assert set(components) == {"vae", "text_encoder", "tokenizer", "unet", "scheduler"}
    assert isinstance(components["unet"], UNet2DConditionModel)
    assert isinstance(components["vae"], AutoencoderKL)
    assert isinstance(components["text_encoder"], CLIPTextModel)
    assert isinstance(components["scheduler"], DDIMScheduler)
    for name in ("unet", "vae", "text_encoder"):
        module = components[name]
        assert not module.training
        assert all(p.dtype == torch.float32 and not p.requires_grad for p in module.parameters())


def test_tiny_unet_has_sd1_block_layout(components):
    unet = components["unet"]
    config = unet.config
    assert tuple(config.down_block_types) == ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    assert tuple(config.up_block_types) == ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    assert config.mid_block_type == "UNetMidBlock2DCrossAttn"
    assert config.layers_per_block == 2 and config.cross_attention_dim == 32
    assert [len(block.resnets) for block in unet.down_blocks] == [2, 2, 2, 2]
    assert [len(block.resnets) for block in unet.up_blocks] == [3, 3, 3, 3]
    cross_attentions = [name for name, _ in unet.named_modules() if name.endswith("attn2")]
    assert len(cross_attentions) == 16  # 6 down + 1 mid + 9 up, like SD 1.x


def test_tiny_model_forward_shapes(components):
    unet, vae, text_encoder, tokenizer = (components[k] for k in ("unet", "vae", "text_encoder", "tokenizer"))
    ids = tokenizer(["a cat", "a giraffe"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        context = text_encoder(ids)[0]
        assert context.shape == (2, 77, 32)
        latents = torch.randn(2, 4, 16, 16, generator=generator)
        noise = unet(latents, 500, encoder_hidden_states=context).sample
        assert noise.shape == latents.shape
        assert 0.3 < noise.std().item() < 3  # neither vanishing nor exploding
        image = vae.decode(latents / vae.config.scaling_factor).sample
        assert image.shape == (2, 3, 128, 128)
        encoded = vae.encode(image).latent_dist.mean
        assert encoded.shape == (2, 4, 16, 16)
        assert image.std() > 0.01 and encoded.std() > 0.01
    assert vae.config.scaling_factor == pytest.approx(0.18215)
    assert text_encoder.config.vocab_size == len(tokenizer)
    assert text_encoder.config.eos_token_id == tokenizer.eos_token_id


def test_tiny_unet_forward_is_fast(components):
    unet = components["unet"]
    latents, context = torch.randn(1, 4, 16, 16), torch.randn(1, 77, 32)
    with torch.no_grad():
        unet(latents, 10, encoder_hidden_states=context)  # warm-up
        timings = []
        for _ in range(5):
            start = time.perf_counter()
            unet(latents, 10, encoder_hidden_states=context)
            timings.append(time.perf_counter() - start)
    # typically ~0.03 s on one core; the bound is loose because test machines are shared
    assert sorted(timings)[2] < 0.5


def test_same_seed_same_weights_other_seed_other_weights(components):
    again = tiny_sd_components(seed=0)
    other = tiny_sd_components(seed=1)
    for name in ("unet", "vae", "text_encoder"):
        repeated = again[name].state_dict()
        for key, value in components[name].state_dict().items():
            assert torch.equal(value, repeated[key]), (name, key)
    assert not torch.equal(components["unet"].conv_in.weight, other["unet"].conv_in.weight)


def test_saved_tiny_model_is_a_standard_sd_folder(tiny_model_dir):
    assert (tiny_model_dir / "model_index.json").is_file()
    for component in ("unet", "vae"):
        assert (tiny_model_dir / component / "diffusion_pytorch_model.safetensors").is_file()
    assert (tiny_model_dir / "text_encoder" / "model.safetensors").is_file()
    pipeline = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None)
    assert pipeline.unet.config.cross_attention_dim == 32
    tokenizer = pipeline.tokenizer
    words = tokenizer.convert_tokens_to_ids(["a</w>", "cat</w>"])
    assert tokenizer("a cat").input_ids == [tokenizer.bos_token_id, *words, tokenizer.eos_token_id]


# ------------------------------------------------------------------------------------------------ SD 1.5 size


def test_sd15_unet_config_matches_published_numbers():
    config = sd15_unet_config()
    assert tuple(config["block_out_channels"]) == (320, 640, 1280, 1280)
    assert config["cross_attention_dim"] == 768 and config["attention_head_dim"] == 8
    assert config["layers_per_block"] == 2 and config["sample_size"] == 64
    assert config["in_channels"] == config["out_channels"] == 4


def test_sd15_random_unet_structure_on_meta_device():
    unet = random_unet(sd15_unet_config(), device="meta")
    assert next(unet.parameters()).device.type == "meta"
    assert sum(p.numel() for p in unet.parameters()) == pytest.approx(859.52e6, rel=1e-3)
    assert len(unet.down_blocks) == 4 and len(unet.up_blocks) == 4
    # The 25 blocks of the original layout: 12 input blocks (conv_in, 8 resnets, 3 downsamplers),
    # the middle block and 12 output blocks (4 levels of 3).
    input_blocks = 1 + sum(len(b.resnets) + (b.downsamplers is not None) for b in unet.down_blocks)
    output_blocks = sum(len(b.resnets) for b in unet.up_blocks)
    assert (input_blocks, 1, output_blocks) == (12, 1, 12)
    attn2 = [m for name, m in unet.named_modules() if name.endswith("attn2")]
    assert len(attn2) == 16 and all(m.heads == 8 for m in attn2)


def test_sdxl_random_unet_structure_on_meta_device():
    unet = random_unet(sdxl_unet_config(), device="meta")
    assert sum(p.numel() for p in unet.parameters()) == 2_567_463_684  # SDXL 1.0 base's published U-Net
    attn2 = [m for name, m in unet.named_modules() if name.endswith("attn2")]
    assert len(attn2) == 2 * 2 + 2 * 10 + 10 + 3 * 2 + 3 * 10  # down 1 and 2, mid, up 0 and 1 (3 resnets each)
    assert {m.heads for m in attn2} == {10, 20}  # 64-wide heads at 640 and 1280 channels

