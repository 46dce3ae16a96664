"""Tests of model loading (pfbdiff.models.loading, .diffusers_folders, .hub, .devices): folders, single files, hub ids,
pickle refusal, dtype and device options, the diffusers arguments passed on (variant, use_safetensors, revision,
cache_dir, local_files_only) and load_pipeline."""

import json
import shutil
import time

import pytest
import torch
from ldm_checkpoint import components_to_ldm, write_ldm_pickle, write_ldm_safetensors
from safetensors.torch import load_file

from pfbdiff.errors import PFBDiffError
from pfbdiff.models import devices, hub, loading
from pfbdiff.models.devices import resolve_device, resolve_dtype
from pfbdiff.models.loading import MODEL_ALIASES, load_components
from pfbdiff.models.toy_models import tiny_sd_components
from pfbdiff.pipeline import load_pipeline

NETWORKS = ("unet", "vae", "text_encoder")


@pytest.fixture(scope="module")
def reference():
    """The components the session's tiny folder was saved from (same seed)."""
    return tiny_sd_components(seed=0)


@pytest.fixture(scope="module")
def ldm_safetensors(reference, tmp_path_factory):
    return write_ldm_safetensors(reference, tmp_path_factory.mktemp("ldm") / "tiny-sd.safetensors")


@pytest.fixture(scope="module")
def pickle_only_dir(tiny_model_dir, tmp_path_factory):
    """The tiny folder with every ``.safetensors`` weight file replaced by its pickle ``.bin`` equivalent."""
    folder = shutil.copytree(tiny_model_dir, tmp_path_factory.mktemp("pickle") / "model")
    for weights in folder.glob("*/*.safetensors"):
        pickle_name = "pytorch_model.bin" if weights.name == "model.safetensors" else "diffusion_pytorch_model.bin"
        torch.save(load_file(weights), weights.with_name(pickle_name))
        weights.unlink()
    return folder


@pytest.fixture(scope="module")
def fp16_variant_dir(reference, tmp_path_factory):
    """The tiny model saved as diffusers does with ``variant="fp16"`` (fp32 weights under ``*.fp16.*`` names)."""
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline(
        **reference, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    folder = tmp_path_factory.mktemp("variant") / "model"
    pipeline.save_pretrained(folder, safe_serialization=True, variant="fp16")
    return folder


def assert_one_line_error(excinfo, *fragments):
    message = str(excinfo.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message


def network_outputs(components, latents, ids):
    """Text embeddings, UNet noise prediction and VAE decoding for fixed inputs."""
    with torch.no_grad():
        context = components["text_encoder"](ids)[0]
        noise = components["unet"](latents, 500, encoder_hidden_states=context).sample
        image = components["vae"].decode(latents).sample
    return context, noise, image


def assert_same_outputs(loaded, reference):
    """Equal weights, equal tokenization and equal outputs of all three networks."""
    for name in NETWORKS:
        expected = reference[name].state_dict()
        actual = loaded[name].state_dict()
        assert set(actual) == set(expected), name
        for key in expected:
            assert torch.equal(actual[key].cpu(), expected[key]), (name, key)
    prompt = "a giraffe on a bench"
    assert loaded["tokenizer"](prompt).input_ids == reference["tokenizer"](prompt).input_ids
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    ids = reference["tokenizer"](prompt, padding="max_length", max_length=77, return_tensors="pt").input_ids
    # Weights are bit-identical, but weights memory-mapped from a file can sit at unaligned addresses, which
    # makes the CPU BLAS pick other kernels: outputs then differ in the last float bits (a few 1e-6).
    for got, want in zip(network_outputs(loaded, latents, ids), network_outputs(reference, latents, ids)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------ folders


def test_folder_loads_the_saved_components(tiny_components, reference):
    assert set(tiny_components) == {"vae", "text_encoder", "tokenizer", "unet", "scheduler"}
    for name in NETWORKS:
        module = tiny_components[name]
        assert not module.training
        assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in module.parameters())
        assert not any(p.requires_grad for p in module.parameters())
    assert type(tiny_components["scheduler"]) is type(reference["scheduler"])
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    assert public(tiny_components["scheduler"].config) == public(reference["scheduler"].config)
    assert_same_outputs(tiny_components, reference)


def test_folder_loads_in_a_requested_dtype(tiny_model_dir):
    components = load_components(str(tiny_model_dir), device="cpu", torch_dtype="bf16")
    for name in NETWORKS:
        assert all(p.dtype == torch.bfloat16 for p in components[name].parameters()), name


def test_folder_with_only_a_weight_variant_loads(tiny_model_dir, tmp_path, reference):
    folder = shutil.copytree(tiny_model_dir, tmp_path / "model")
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights.rename(weights.with_name("diffusion_pytorch_model.fp16.safetensors"))
    components = load_components(folder, device="cpu")
    assert torch.equal(components["unet"].conv_in.weight, reference["unet"].conv_in.weight)


def test_folder_without_model_index_is_refused(tiny_model_dir, tmp_path):
    shutil.copytree(tiny_model_dir / "unet", tmp_path / "unet")
    with pytest.raises(PFBDiffError) as excinfo:
        load_components(tmp_path, device="cpu")
    assert_one_line_error(excinfo, str(tmp_path), "model_index.json")


def test_folder_without_unet_is_refused(tiny_model_dir, tmp_path):
    folder = shutil.copytree(tiny_model_dir, tmp_path / "model")
    shutil.rmtree(folder / "unet")
    with pytest.raises(PFBDiffError) as excinfo:
        load_components(folder, device="cpu")
    assert_one_line_error(excinfo, "unet")


def test_folder_with_only_pickle_weights_is_refused(pickle_only_dir):
    assert not list(pickle_only_dir.glob("*/*.safetensors"))
    with pytest.raises(PFBDiffError) as excinfo:
        load_components(pickle_only_dir, device="cpu")
    assert_one_line_error(excinfo, "pickle", "--allow-pickle")


def test_allow_pickle_loads_a_pickle_only_folder(pickle_only_dir, reference):
    components = load_components(pickle_only_dir, device="cpu", allow_pickle=True)
    assert_same_outputs(components, reference)


def test_nonexistent_path_is_named(tmp_path):
    missing = tmp_path / "nowhere" / "model.safetensors"
    with pytest.raises(PFBDiffError) as excinfo:
        load_components(missing, device="cpu")
    assert_one_line_error(excinfo, str(missing), "--model")


def test_registered_alias_is_used_first(monkeypatch, tiny_model_dir):
    monkeypatch.setitem(MODEL_ALIASES, "tiny", lambda: tiny_model_dir)
    components = load_components("tiny", device="cpu")
    assert components["unet"].config.cross_attention_dim == 32


# ------------------------------------------------------------------------------------------------ single files


def test_ldm_checkpoint_uses_original_key_names(reference):
    keys = set(components_to_ldm(reference))
    assert "model.diffusion_model.output_blocks.11.0.skip_connection.weight" in keys
    assert "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight" in keys
    assert "model.diffusion_model.middle_block.1.proj_in.weight" in keys
    assert "first_stage_model.decoder.up.0.block.0.conv1.weight" in keys
    assert "first_stage_model.encoder.mid.attn_1.q.weight" in keys
    assert "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight" in keys
    assert not any(k.startswith(("down_blocks", "up_blocks", "mid_block")) for k in keys)


def test_single_safetensors_with_config_reproduces_the_model(ldm_safetensors, tiny_model_dir, reference):
    components = load_components(ldm_safetensors, config=tiny_model_dir, device="cpu")
    assert set(components) == {"vae", "text_encoder", "tokenizer", "unet", "scheduler"}
    assert_same_outputs(components, reference)


def test_single_file_without_config_says_to_pass_one(ldm_safetensors, monkeypatch):
    monkeypatch.setattr(hub, "cached_snapshot", lambda *args, **kwargs: None)
    with pytest.raises(PFBDiffError) as excinfo:
        load_components(ldm_safetensors, device="cpu")
    assert_one_line_error(excinfo, "--config")


def test_single_file_config_must_be_a_diffusers_folder(ldm_safetensors, tmp_path):
    with pytest.raises(PFBDiffError) as excinfo:
        load_components(ldm_safetensors, config=tmp_path, device="cpu")
    assert_one_line_error(excinfo, "model_index.json")


def test_unreadable_single_file_gives_a_one_line_error(tiny_model_dir, tmp_path):
    path = tmp_path / "broken.safetensors"
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(PFBDiffError) as excinfo:
        load_components(path, config=tiny_model_dir, device="cpu")
    assert_one_line_error(excinfo, str(path), "--config")


@pytest.mark.parametrize("suffix", [".ckpt", ".bin", ".pt", ".pth"])
def test_pickle_single_files_are_refused(tmp_path, suffix):
    path = tmp_path / f"model{suffix}"
    path.write_bytes(b"not even read")
    with pytest.raises(PFBDiffError) as excinfo:
        load_components(path, device="cpu")
    assert_one_line_error(excinfo, str(path), "pickle", "arbitrary code", ".safetensors", "--allow-pickle")


def test_allow_pickle_loads_a_ckpt(reference, tiny_model_dir, tmp_path):
    path = write_ldm_pickle(reference, tmp_path / "tiny-sd.ckpt")
    components = load_components(path, config=tiny_model_dir, device="cpu", allow_pickle=True)
    assert_same_outputs(components, reference)


def test_unknown_file_type_is_refused(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"")
    with pytest.raises(PFBDiffError) as excinfo:
        load_components(path, device="cpu")
    assert_one_line_error(excinfo, str(path))


# ------------------------------------------------------------------------------------------------ hub ids


def test_uncached_hub_id_fails_fast_when_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(PFBDiffError) as excinfo:
        load_components("pfbdiff-tests/no-such-model-7c1e", device="cpu")
    assert time.perf_counter() - start < 5
    assert_one_line_error(
        excinfo, "'pfbdiff-tests/no-such-model-7c1e'", "not in the local Hugging Face cache", "--model"
    )


def test_unreachable_hub_gives_the_same_error(monkeypatch):
    calls = []

    def fake_snapshot_download(repo_id, patterns, local_files_only, **where):
        calls.append(local_files_only)
        raise OSError("Network is unreachable")

    monkeypatch.setattr(hub, "_snapshot_download", fake_snapshot_download)
    monkeypatch.setattr(hub, "hub_is_offline", lambda: False)
    with pytest.raises(PFBDiffError) as excinfo:
        load_components("owner/name", device="cpu")
    assert calls == [True, False]  # the cache is asked first, the network only after
    assert_one_line_error(excinfo, "'owner/name'", "hub cannot be reached")


def test_cached_hub_id_loads_without_network(monkeypatch, tiny_model_dir):
    def fake_snapshot_download(repo_id, patterns, local_files_only, **where):
        assert local_files_only, "the network must not be tried when the model is cached"
        assert "unet/diffusion_pytorch_model.safetensors" in patterns
        assert not any(p.endswith(".bin") for p in patterns)
        return tiny_model_dir

    monkeypatch.setattr(hub, "_snapshot_download", fake_snapshot_download)
    components = load_components("owner/tiny", device="cpu")
    assert components["unet"].config.cross_attention_dim == 32


def test_local_files_only_never_downloads(monkeypatch, tmp_path):
    from huggingface_hub import constants

    for variable in ("HF_HOME", "HF_HUB_CACHE"):
        monkeypatch.setenv(variable, str(tmp_path / "hf"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))  # read at import, so patch it too
    monkeypatch.setattr(hub, "hub_is_offline", lambda: False)  # only local_files_only may keep the network away
    calls = []
    real_snapshot_download = hub._snapshot_download

    def recording_snapshot_download(repo_id, patterns, local_files_only, **where):
        calls.append(local_files_only)
        return real_snapshot_download(repo_id, patterns, local_files_only, **where)

    monkeypatch.setattr(hub, "_snapshot_download", recording_snapshot_download)
    with pytest.raises(PFBDiffError) as excinfo:
        load_components("pfbdiff-tests/no-such-model-7c1e", device="cpu", local_files_only=True)
    assert calls == [True]
    assert_one_line_error(
        excinfo, "'pfbdiff-tests/no-such-model-7c1e'", "not in the local Hugging Face cache", "local_files_only"
    )


def test_revision_and_cache_dir_reach_snapshot_download(monkeypatch, tiny_model_dir, tmp_path):
    import huggingface_hub

    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append(kwargs)
        return str(tiny_model_dir)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    components = load_components("owner/tiny", device="cpu", revision="v1.0", cache_dir=tmp_path)
    assert components["unet"].config.cross_attention_dim == 32
    assert [(c["revision"], c["cache_dir"], c["local_files_only"]) for c in calls] == [("v1.0", tmp_path, True)]


def test_hub_variant_fetches_the_variant_files(monkeypatch, fp16_variant_dir, reference):
    def fake_snapshot_download(repo_id, patterns, local_files_only, **where):
        assert "unet/diffusion_pytorch_model.fp16.safetensors" in patterns
        assert "text_encoder/model.fp16-*.safetensors" in patterns  # shards
        assert "unet/diffusion_pytorch_model.safetensors" not in patterns  # not the fp32 weights as well
        return fp16_variant_dir

    monkeypatch.setattr(hub, "_snapshot_download", fake_snapshot_download)
    components = load_components("owner/tiny", device="cpu", variant="fp16")
    assert torch.equal(components["unet"].conv_in.weight, reference["unet"].conv_in.weight)


# ------------------------------------------------------------------------------------------------ arguments


def test_unknown_argument_is_refused(tiny_model_dir):
    with pytest.raises(PFBDiffError) as excinfo:
        load_components(tiny_model_dir, device="cpu", low_cpu_mem_usage=False, safety_checker=None)
    assert_one_line_error(excinfo, "'low_cpu_mem_usage'", "'safety_checker'", "variant", "local_files_only")


def test_variant_loads_the_variant_weights(fp16_variant_dir, reference):
    assert list(fp16_variant_dir.glob("unet/*.fp16.safetensors"))
    components = load_components(fp16_variant_dir, device="cpu", variant="fp16")
    assert_same_outputs(components, reference)


def test_missing_variant_names_the_component_and_variant(tiny_model_dir):
    with pytest.raises(PFBDiffError) as excinfo:
        load_components(tiny_model_dir, device="cpu", variant="fp16")
    assert_one_line_error(excinfo, str(tiny_model_dir / "unet"), "'fp16'")


def test_use_safetensors_refuses_pickle_even_when_allowed(pickle_only_dir):
    with pytest.raises(PFBDiffError) as excinfo:
        load_components(pickle_only_dir, device="cpu", allow_pickle=True, use_safetensors=True)
    assert_one_line_error(excinfo, "pickle", "use_safetensors")


def test_use_safetensors_refuses_a_pickle_checkpoint(tmp_path):
    path = tmp_path / "model.ckpt"
    path.write_bytes(b"not even read")
    with pytest.raises(PFBDiffError) as excinfo:
        load_components(path, device="cpu", allow_pickle=True, use_safetensors=True)
    assert_one_line_error(excinfo, str(path), "pickle", "use_safetensors")


def test_quiet_load_pipeline_disables_progress_bars(monkeypatch, tiny_model_dir):
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    from pfbdiff import load_pipeline as public_load_pipeline

    seen = []
    real_load_components = loading.load_components

    def recording_load_components(*args, **kwargs):
        seen.append((diffusers_logging.is_progress_bar_enabled(), transformers_logging.is_progress_bar_enabled()))
        return real_load_components(*args, **kwargs)

    monkeypatch.setattr(loading, "load_components", recording_load_components)
    before = (diffusers_logging.is_progress_bar_enabled(), transformers_logging.is_progress_bar_enabled())
    pipe = public_load_pipeline(tiny_model_dir, quiet=True, device="cpu")
    assert seen == [(False, False)]
    assert pipe._progress_bar_config.get("disable") is True
    assert (diffusers_logging.is_progress_bar_enabled(), transformers_logging.is_progress_bar_enabled()) == before
    loud = load_pipeline(tiny_model_dir, device="cpu")
    assert not getattr(loud, "_progress_bar_config", {}).get("disable", False)


# ------------------------------------------------------------------------------------------------ dtype, device


@pytest.mark.parametrize(
    ("name", "expected"),
    [("float32", torch.float32), ("fp32", torch.float32), ("float16", torch.float16), ("FP16", torch.float16),
     ("bfloat16", torch.bfloat16), ("bf16", torch.bfloat16), (torch.float16, torch.float16)],
)
def test_dtype_names(name, expected):
    assert resolve_dtype(name, "cpu") is expected


def test_auto_dtype_is_fp32_on_cpu():
    assert resolve_dtype(None, "cpu") is torch.float32
    assert resolve_dtype("auto", "cpu") is torch.float32


def test_unknown_dtype_is_refused(tiny_model_dir):
    with pytest.raises(PFBDiffError) as excinfo:
        load_components(tiny_model_dir, device="cpu", torch_dtype="float8")
    assert_one_line_error(excinfo, "float8", "float16")


def test_devices():
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available() and not devices._mps_available():
        assert devices.best_device() == torch.device("cpu")


@pytest.mark.parametrize("device", ["gpu", "tpu:0", "cuda:banana"])
def test_unknown_device_is_refused(device):
    with pytest.raises(PFBDiffError) as excinfo:
        resolve_device(device)
    assert_one_line_error(excinfo, repr(device))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_refused(tiny_model_dir):
    for device in ("cuda", "cuda:1"):
        with pytest.raises(PFBDiffError) as excinfo:
            load_components(tiny_model_dir, device=device)
        assert_one_line_error(excinfo, "CUDA", "--device cpu")


def test_missing_cuda_index_is_refused():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    with pytest.raises(PFBDiffError) as excinfo:
        resolve_device(f"cuda:{torch.cuda.device_count()}")
    assert_one_line_error(excinfo, "cuda:0")


def test_model_index_is_read_from_the_saved_folder(tiny_model_dir):
    index = json.loads((tiny_model_dir / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
