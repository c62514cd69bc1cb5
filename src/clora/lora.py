"""LoRA files: safe reading, loading, and per-branch activation.

LoRA files in diffusers/peft and plain kohya/A1111/Civitai form (with or without text-encoder layers)
go through ``pipe.load_lora_weights``, whose converters know the key layouts; this module reads the
file safely, turns failures into one-line errors, and checks that every layer of the file landed in
the model (a file whose keys match no layer loads "successfully" otherwise). kohya-named files that
diffusers does not read whole (LyCORIS: LoCon, LoHa, LoKr, full and norm diffs, DoRA) go to
``lycoris_adapters`` instead, which applies every key or refuses the file.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from .errors import CLoRAError, one_line
from .families import family_of_lora, lora_family_error
from .kohya_names import split_prefix
from .lycoris import is_lycoris, split_key
from .lycoris_adapters import adapters_of, load_lycoris

SAFE_SUFFIXES = (".safetensors",)
_NO_MATCH = "no layer of this model matches the file's LoRA keys; is it a LoRA for this base model family?"
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
LORA_COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2")  # those a pipeline has


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_lora_state_dict(path: str | os.PathLike, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Tensors of a LoRA file. Pickled files (.ckpt/.pt/.bin) only with ``allow_pickle``."""
    path = Path(path)
    if not path.is_file():
        raise CLoRAError(f"{path}: LoRA file not found")
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise CLoRAError(
                f"{path}: pickled weights can run code when loaded; convert to .safetensors or pass --allow-pickle"
            )
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - torch raises many types for corrupt pickles
            raise CLoRAError(f"{path}: cannot read the pickled LoRA ({one_line(exc)})") from None
        data = data.get("state_dict", data) if isinstance(data, dict) else data
        if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
            raise CLoRAError(f"{path}: expected a mapping of tensor names to tensors")
        return data
    if suffix not in SAFE_SUFFIXES:
        raise CLoRAError(f"{path}: unsupported LoRA file type {suffix!r}; expected .safetensors")
    from safetensors.torch import load_file

    try:
        state_dict = load_file(str(path), device="cpu")
    except Exception as exc:  # noqa: BLE001 - SafetensorsError, OSError, ...
        raise CLoRAError(f"{path}: not a valid .safetensors file ({one_line(exc)})") from None
    if not state_dict:
        raise CLoRAError(f"{path}: the file holds no tensors")
    return state_dict


def check_lora_files(spec: Any, allow_pickle: bool = False) -> None:
    """Fail with one line on a spec's missing or unreadable LoRA file, before any model is loaded."""
    for item in (*spec.concepts, *spec.styles):
        read_lora_state_dict(item.lora, allow_pickle=allow_pickle)


def read_lora_metadata(path: str | os.PathLike) -> dict[str, str]:
    """A .safetensors file's metadata header (kohya's ``ss_*`` keys, modelspec); empty for other files."""
    if Path(path).suffix.lower() not in SAFE_SUFFIXES:
        return {}
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return handle.metadata() or {}


def adapter_layer_counts(pipe: Any, adapter_name: str) -> dict[str, int]:
    """How many layers of each component carry ``adapter_name``."""
    lycoris = adapters_of(pipe).counts.get(adapter_name)
    if lycoris is not None:
        return {component: lycoris.get(component, 0) for component in LORA_COMPONENTS}
    counts = {}
    for component in LORA_COMPONENTS:
        model = getattr(pipe, component, None)
        counts[component] = (
            0
            if model is None
            else sum(1 for module in model.modules() if adapter_name in getattr(module, "lora_A", {}))
        )
    return counts


def load_adapter(pipe: Any, path: str | os.PathLike, adapter_name: str, allow_pickle: bool = False) -> dict[str, int]:
    """Load one LoRA file as a named adapter; returns its layer count per component.

    A file whose metadata or key names say it was made for another model family than the
    pipeline's (``families.family_of_lora``) is refused before anything loads. Loading a LyCORIS
    adapter that is already loaded does nothing."""
    if adapter_name in adapters_of(pipe).counts:
        return adapter_layer_counts(pipe, adapter_name)
    state_dict = read_lora_state_dict(path, allow_pickle)
    family = getattr(pipe, "family", None)
    made_for = family_of_lora(state_dict, read_lora_metadata(path))
    if family is not None and made_for is not None and made_for is not family:
        raise lora_family_error(path, made_for, family)
    kohya = [split_prefix(split_key(key)[0]) is not None for key in state_dict]
    # lycoris-lora's own "lycoris_" names are unknown to diffusers' loader even for a plain LoRA
    if any(kohya) and (is_lycoris(state_dict) or any(key.startswith("lycoris_") for key in state_dict)):
        return load_lycoris(pipe, state_dict, path, adapter_name)
    try:
        with _quiet_loaders():
            pipe.load_lora_weights(state_dict, adapter_name=adapter_name)
    except Exception as exc:  # noqa: BLE001 - reported as one line below
        _discard(pipe, adapter_name)
        message, full = one_line(exc), str(exc)
        if "size mismatch" in full or "ignore_mismatched_sizes" in full:
            raise CLoRAError(
                f"{path}: the LoRA's layer shapes do not fit this model; was it trained for another base model?"
            ) from None
        if "not found in the base model" in full or isinstance(exc, IndexError):
            raise CLoRAError(f"{path}: {_NO_MATCH}") from None
        raise CLoRAError(f"{path}: diffusers could not load this LoRA ({message})") from None
    counts = adapter_layer_counts(pipe, adapter_name)
    if not any(counts.values()):
        _discard(pipe, adapter_name)
        raise CLoRAError(f"{path}: {_NO_MATCH}")
    if all(kohya):  # one layer per lora_down key; diffusers' converter skips the keys it cannot place
        layers = sum(split_key(key)[1] == "lora_down.weight" for key in state_dict)
        if sum(counts.values()) < layers:
            _discard(pipe, adapter_name)
            raise CLoRAError(
                f"{path}: {layers - sum(counts.values())} of the file's {layers} LoRA layers match no layer of "
                "this model; clora applies a LoRA file whole or not at all"
            )
    for component in LORA_COMPONENTS:
        model = getattr(pipe, component, None)
        if model is not None:
            model.requires_grad_(False)
    return counts


def _drop_failed_load_report(record: logging.LogRecord) -> bool:
    """diffusers logs a failed adapter load (every "size mismatch" line of it) at error level and
    then raises the same error, which ``load_adapter`` reports as one line; drop the log record."""
    return "was unsuccessful with the following error" not in str(record.msg)


@contextlib.contextmanager
def _quiet_loaders() -> Iterator[None]:
    """Silence diffusers' "no text-encoder keys" and transformers' load-report warnings, which fire
    for healthy files (``load_adapter`` checks what really landed instead), and diffusers' log of a
    failed load (``load_adapter`` reports the error)."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    previous = diffusers_logging.get_verbosity(), transformers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()
    peft_logger = logging.getLogger("diffusers.loaders.peft")
    peft_logger.addFilter(_drop_failed_load_report)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        peft_logger.removeFilter(_drop_failed_load_report)
        diffusers_logging.set_verbosity(previous[0])
        transformers_logging.set_verbosity(previous[1])


def _discard(pipe: Any, adapter_name: str) -> None:
    """Remove whatever part of a failed adapter made it into the model."""
    try:
        if any(adapter_layer_counts(pipe, adapter_name).values()):
            pipe.delete_adapters(adapter_name)
    except Exception:  # noqa: BLE001, S110 - best effort: the original error is the one worth reporting
        pass


def activate_adapters(pipe: Any, names: Sequence[str], weights: Sequence[float]) -> None:
    """Make exactly ``names`` active with ``weights``; no names means the bare base model.

    LyCORIS adapters are switched on their layers' shared active set, the others through diffusers.
    diffusers' enable/disable walk every module, so they run only when the state flips; set
    ``pipe._clora_lora_disabled = None`` when the state is unknown.
    """
    lycoris = adapters_of(pipe)
    lycoris.active.clear()
    peft_names, peft_weights = [], []
    for name, weight in zip(names, weights, strict=True):
        if name in lycoris.counts:
            lycoris.active[name] = weight
        else:
            peft_names.append(name)
            peft_weights.append(weight)
    names, weights = peft_names, peft_weights
    disabled = getattr(pipe, "_clora_lora_disabled", None)
    if not names:
        if pipe.get_list_adapters() and disabled is not True:
            pipe.disable_lora()
            pipe._clora_lora_disabled = True
        return
    if disabled is not False:
        pipe.enable_lora()
        pipe._clora_lora_disabled = False
    pipe.set_adapters(list(names), adapter_weights=list(weights))
