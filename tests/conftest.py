"""Shared test setup: no network, few threads, and one tiny Stable Diffusion model per test session.

Fixtures:

* ``tiny_model_dir``: a diffusers Stable Diffusion folder (safetensors) of the random tiny model from
  :func:`pfbdiff.models.toy_models.save_tiny_model`, written once per session.
* ``tiny_components``: that folder loaded on the CPU in fp32 with :func:`pfbdiff.models.loading.load_components`.
  It is shared by the whole session: do not modify the modules in place (copy them first).
"""

import os

# Before anything imports huggingface_hub: tests must never reach for the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# The test machines are shared; respect OMP_NUM_THREADS if set, otherwise use at most two threads.
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from pfbdiff.models.toy_models import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny-sd") / "model", seed=0)


@pytest.fixture(scope="session")
def tiny_components(tiny_model_dir):
    from pfbdiff.models.loading import load_components

    return load_components(tiny_model_dir, device="cpu", torch_dtype="float32")


@pytest.fixture(scope="session")
def tiny_pipe(tiny_components):
    """A PFB-Diff pipeline on the tiny model, progress bars off."""
    from pfbdiff import PFBDiffPipeline

    pipe = PFBDiffPipeline(**tiny_components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def photo():
    """A 128×96 (non-square) RGB test image with some structure."""
    import numpy as np

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:96, 0:128]
    base = np.stack([xx * 2, yy * 2, (xx + yy)], -1).astype(np.float64)
    return np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope="session")
def box_mask():
    """White box (edit) on black (keep), same size as ``photo``."""
    import numpy as np

    mask = np.zeros((96, 128), np.float32)
    mask[24:72, 32:96] = 1.0
    return mask


@pytest.fixture()
def files(tmp_path, photo, box_mask):
    """``photo`` and ``box_mask`` written as PNG files: (folder, image path, mask path)."""
    import numpy as np
    from PIL import Image

    image, mask = tmp_path / "photo.png", tmp_path / "mask.png"
    Image.fromarray(photo).save(image)
    Image.fromarray((box_mask * 255).astype(np.uint8)).save(mask)
    return tmp_path, image, mask


@pytest.fixture(scope="session")
def shapes_pipe():
    """The bundled ShapesWorld model (``pfbdiff.shapes``), for properties that need a model which draws."""
    from pfbdiff.pipeline import load_pipeline

    return load_pipeline("shapes", quiet=True)
