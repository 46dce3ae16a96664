"""LoRAs and textual-inversion embeddings on a loaded pipeline, through diffusers' own loader mixins.

A LoRA is ``{"path", "scale"}`` and an embedding ``{"path", "token"}`` (``token`` ``None``: the file's own
token, else its file name as ``<name>``, the A1111 convention). An SDXL embedding holds vectors for both text
encoders (``clip_l`` and ``clip_g``, the format SDXL trainers write); each goes into its encoder under the same
token, so the word takes the same token positions in both halves of the conditioning. Several LoRAs are active at once, each with its
scale (``set_adapters``). Safetensors only, unless pickles are allowed. A file that does not fit the model (a
LoRA for another family, an embedding of another width) is one line naming it.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from pfbdiff.errors import PFBDiffError, gist
from pfbdiff.models.diffusers_folders import SAFETENSORS_SUFFIX


def apply(pipe, loras=(), embeddings=(), *, allow_pickle: bool = False) -> None:
    """Load ``loras`` (active together, at their scales) and ``embeddings`` into ``pipe``."""
    if embeddings and getattr(pipe, "transformer", None) is not None:
        raise PFBDiffError("textual-inversion embeddings are not supported on SD3 and Flux models yet; "
                           "leave --embedding out")
    for embedding in embeddings:
        path = _checked_file(embedding["path"], "embedding", allow_pickle)
        token = embedding.get("token") or _token_of(path)
        try:
            if getattr(pipe, "text_encoder_2", None) is None:
                pipe.load_textual_inversion(str(path), token=token)
            else:
                vectors = _sdxl_vectors(path)
                for key, encoder, tokenizer in (("clip_l", pipe.text_encoder, pipe.tokenizer),
                                                ("clip_g", pipe.text_encoder_2, pipe.tokenizer_2)):
                    pipe.load_textual_inversion(vectors[key], token=token, text_encoder=encoder, tokenizer=tokenizer)
        except (ValueError, RuntimeError, OSError, KeyError) as error:
            raise PFBDiffError(f"cannot load the embedding {path} into this model ({gist(error)}); is it made for "
                               "this model's text encoder (SD 1.x: 768 wide, SD 2.x: 1024, SDXL: clip_l and "
                               "clip_g)?") from error
    names = []
    for number, lora in enumerate(loras):
        path = _checked_file(lora["path"], "LoRA", allow_pickle)
        name = f"lora{number}"
        before = _parameter_count(pipe)
        try:
            with _library_notes_off():  # "no LoRA keys for the text encoder … safe to ignore" and the like
                pipe.load_lora_weights(str(path), adapter_name=name)
        except (ValueError, RuntimeError, OSError, KeyError) as error:
            raise PFBDiffError(f"cannot apply the LoRA {path} to this model ({gist(error)}); is it made for this "
                               "model's family (SD 1.x, 2.x, SDXL, SD3 or Flux) and size?") from error
        if _parameter_count(pipe) == before:
            raise PFBDiffError(f"the LoRA {path} changes no layer of this model; is it made for this model's family "
                               "(SD 1.x, 2.x, SDXL, SD3 or Flux)?")
        names.append(name)
    if names:
        pipe.set_adapters(names, adapter_weights=[lora["scale"] for lora in loras])


@contextlib.contextmanager
def _library_notes_off():
    from diffusers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)


def _checked_file(path, kind: str, allow_pickle: bool) -> Path:
    path = Path(path).expanduser()
    if not path.is_file():
        raise PFBDiffError(f"{kind} file not found: {path}")
    if path.suffix.lower() != SAFETENSORS_SUFFIX and not allow_pickle:
        raise PFBDiffError(f"the {kind} {path} is not a .safetensors file; a pickle can run code when loaded: "
                           "convert it, or pass --allow-pickle for a file you trust")
    return path


def _sdxl_vectors(path: Path) -> dict:
    """An SDXL embedding's ``clip_l`` and ``clip_g`` vectors (ValueError naming them when the file lacks them)."""
    if path.suffix.lower() == SAFETENSORS_SUFFIX:
        from safetensors.torch import load_file

        vectors = load_file(str(path))
    else:  # a pickle, allowed by the user (_checked_file)
        import torch

        vectors = torch.load(path, map_location="cpu", weights_only=True)
    missing = {"clip_l", "clip_g"} - set(vectors)
    if missing:
        raise ValueError(f"it has no {' and '.join(sorted(missing))} vectors")
    return vectors


def _token_of(path: Path) -> str | None:
    """The file's own token when it names one (diffusers' format), else ``<file name>`` (A1111's)."""
    if path.suffix.lower() == SAFETENSORS_SUFFIX:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as weights:
            keys = list(weights.keys())
        if len(keys) == 1 and keys[0] not in ("emb_params", "string_to_param"):
            return None
    return f"<{path.stem}>"


def _parameter_count(pipe) -> int:
    """Parameters of every network a LoRA may change (SDXL's second text encoder too)."""
    networks = (pipe.denoiser, pipe.text_encoder, getattr(pipe, "text_encoder_2", None))
    return sum(p.numel() for module in networks if module is not None for p in module.parameters())
