"""Where and how a model runs: device and dtype choice, and loading a model named in a spec."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch

from .errors import CLoRAError, one_line
from .spec import looks_like_local_path

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def pick_device(requested: str = "auto") -> torch.device:
    """``auto``: CUDA, then Apple MPS, then CPU."""
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise CLoRAError(f"--device: unknown device {requested!r}; expected auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLoRAError("--device: CUDA was asked for but torch sees no CUDA GPU; use --device cpu")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise CLoRAError("--device: MPS was asked for but is not available; use --device cpu")
    return device


def pick_dtype(requested: str | None, device: torch.device) -> torch.dtype:
    """fp16 on GPUs, fp32 on the CPU, unless asked otherwise."""
    if requested is None:
        return torch.float16 if device.type in ("cuda", "mps") else torch.float32
    if requested not in DTYPES:
        raise CLoRAError(f"--dtype: unknown dtype {requested!r}; expected one of {', '.join(DTYPES)}")
    return DTYPES[requested]


def _local_model(model: str) -> Path | None:
    path = Path(os.path.expanduser(model))
    return path if path.exists() or looks_like_local_path(model) else None


def load_tokenizer(model: str, config: str | None = None) -> Any:
    """Only the tokenizer of a model (for ``--dry-run``), without loading any weights.

    For a single-file checkpoint it comes from ``config`` (the diffusers folder or hub id with its
    configs), or from SD 1.5's hub repository when none is given.
    """
    from transformers import CLIPTokenizer

    if model.lower().endswith(".safetensors"):
        model = config or "stable-diffusion-v1-5/stable-diffusion-v1-5"
    local = _local_model(model)
    if local is not None:
        folder = local / "tokenizer"
        if not folder.is_dir():
            raise CLoRAError(f"model: {local} has no tokenizer/ folder (expected a diffusers model folder)")
        return CLIPTokenizer.from_pretrained(str(folder))
    try:
        return CLIPTokenizer.from_pretrained(model, subfolder="tokenizer")
    except Exception as exc:  # hub errors come in many types
        raise CLoRAError(f"model: cannot get the tokenizer of {model!r} from the hub ({one_line(exc)})") from None


def quiet_libraries() -> None:
    """Keep the terminal for our own progress bar and errors: no loading bars or library warnings."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for logging in (diffusers_logging, transformers_logging):
        logging.set_verbosity_error()
        logging.disable_progress_bar()


def load_pipeline(model: str, device: torch.device, dtype: torch.dtype, config: str | None = None) -> Any:
    """A ``CLoRAPipeline`` from a local diffusers folder, a single checkpoint file, or a hub id.

    ``config`` (single files only) names the diffusers folder or hub id whose component configs
    describe the checkpoint; without it diffusers infers the model family and asks the hub.
    """
    from .pipeline import CLoRAPipeline

    local = _local_model(model)
    try:
        with warnings.catch_warnings():
            # newer diffusers renamed torch_dtype to dtype and warn; older releases know only torch_dtype
            warnings.simplefilter("ignore", FutureWarning)
            pipe = _load(CLoRAPipeline, model, local, dtype, config)
    except CLoRAError:
        raise
    except Exception as exc:
        raise CLoRAError(f"model: cannot load {model!r} ({one_line(exc)})") from None
    return pipe.to(device)


def _load(pipeline_class: Any, model: str, local: Path | None, dtype: torch.dtype, config: str | None) -> Any:
    if local is None:
        return pipeline_class.from_pretrained(model, torch_dtype=dtype)
    if not local.exists():
        raise CLoRAError(f"model: {local} not found (expected a diffusers folder or a .safetensors checkpoint)")
    if local.is_file():
        if local.suffix.lower() != ".safetensors":
            raise CLoRAError(f"model: {local} is not a .safetensors checkpoint")
        extra = {} if config is None else {"config": config}
        return pipeline_class.from_single_file(str(local), torch_dtype=dtype, **extra)
    if not (local / "model_index.json").is_file():
        raise CLoRAError(f"model: {local} is not a diffusers model folder (no model_index.json)")
    return pipeline_class.from_pretrained(str(local), torch_dtype=dtype)
