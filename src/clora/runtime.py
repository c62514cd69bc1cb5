"""Where and how a model runs: device and dtype choice, and loading a model named in a spec."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from .errors import CLoRAError, one_line
from .families import FLUX as FLUX_FAMILY
from .families import SD as SD_FAMILY
from .families import ModelFamily, family_of_checkpoint, family_of_folder, family_of_index
from .spec import looks_like_local_path

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
SINGLE_FILE_SUFFIXES = (".safetensors", ".gguf")
"""Single-file models: a checkpoint of any family, or a GGUF-quantized FLUX.1 transformer."""
_STORED_DTYPES = {str(dtype).removeprefix("torch."): name for name, dtype in DTYPES.items()}  # float16 -> fp16


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


def runtime_like(
    stored: dict[str, Any], device_flag: str | None, dtype_flag: str | None
) -> tuple[torch.device, torch.dtype, str | None]:
    """Device and dtype for redoing an image whose PNG recorded ``stored`` (``{"device": "cuda:0",
    "dtype": "float16"}``): the same device kind and dtype, except where a flag says otherwise.

    When the recorded device kind is not available here the automatic device is used, and the
    third value is a warning saying what differs (the pixels may then differ too).
    """
    made_on, made_in = str(stored.get("device") or ""), _STORED_DTYPES.get(str(stored.get("dtype")))
    warning = None
    if device_flag is not None or not made_on:
        device = pick_device(device_flag or "auto")
    else:
        kind = made_on.split(":")[0]
        try:
            device = pick_device(kind) if kind in ("cpu", "cuda", "mps") else None
        except CLoRAError:
            device = None
        if device is None:
            device = pick_device("auto")
            dtype_name = dtype_flag or made_in or "the default dtype"
            warning = (
                f"the image was made on {made_on}, which is not available here; running on {device} "
                f"in {dtype_name} instead, so the pixels may differ (--device and --dtype choose)"
            )
    dtype = pick_dtype(dtype_flag or made_in, device)
    return device, dtype, warning


def _local_model(model: str) -> Path | None:
    path = Path(os.path.expanduser(model))
    return path if path.exists() or looks_like_local_path(model) else None


def load_tokenizer(model: str, config: str | None = None) -> Any:
    """Only the tokenizer whose positions CLoRA's maps use (``--dry-run``), without loading any weights:
    CLIP's for SD 1.x/2.x and SDXL (both SDXL tokenizers split text the same way), T5's for Flux.

    For a single-file checkpoint it comes from ``config`` (the diffusers folder or hub id with its
    configs), or from the hub repository of the checkpoint's family (SD 1.5, SDXL, FLUX.1-dev) when
    none is given.
    """
    field, family = "model", None
    if model.lower().endswith(SINGLE_FILE_SUFFIXES):
        checkpoint = Path(os.path.expanduser(model))
        field = "model_config"
        if checkpoint.suffix.lower() == ".gguf":
            family = FLUX_FAMILY  # a quantized FLUX.1 transformer
        else:
            family = family_of_checkpoint(checkpoint) if checkpoint.is_file() else SD_FAMILY
        model = config or family.default_config
        family = None if config else family
    local = _local_model(model)
    if family is None and local is not None and not (local / "model_index.json").is_file():
        family = SD_FAMILY  # a bare tokenizer folder: CLIP's
    family = family or model_family(model, field=field)
    subfolder = "tokenizer_2" if family.name == "flux" else "tokenizer"
    if local is None:
        try:  # fetch (or find in the cache) the tokenizer files first: a tokenizer built without them is empty
            from huggingface_hub import snapshot_download

            local = Path(snapshot_download(model, allow_patterns=[f"{subfolder}/*"]))
        except Exception as exc:  # noqa: BLE001 - hub errors come in many types
            raise hub_error(field, model, exc) or CLoRAError(
                f"{field}: cannot get the tokenizer of {model!r} from the hub ({one_line(exc)})"
            ) from None
    folder = local / subfolder
    if not folder.is_dir():
        raise CLoRAError(f"{field}: {local} has no {subfolder}/ folder (expected a diffusers model folder)")
    if subfolder == "tokenizer_2":
        from transformers import AutoTokenizer

        if not any((folder / name).is_file() for name in ("spiece.model", "tokenizer.json")):
            raise CLoRAError(f"{field}: {folder} holds no T5 tokenizer files (tokenizer.json or spiece.model)")
        return AutoTokenizer.from_pretrained(str(folder))
    from transformers import CLIPTokenizer

    if not any((folder / name).is_file() for name in ("vocab.json", "tokenizer.json")):
        raise CLoRAError(f"{field}: {folder} holds no tokenizer files (vocab.json and merges.txt)")
    return CLIPTokenizer.from_pretrained(str(folder))


def check_lora_families(spec: Any) -> None:
    """Refuse, before the model loads, a LoRA file that says (metadata or key names) it was made for
    another model family than the spec's model. Quiet when the model's family cannot be told without
    loading it (loading then reports what is wrong)."""
    from safetensors import safe_open

    from .families import family_of_lora, lora_family_error

    try:
        family = model_family(spec.model, spec.model_config)
    except CLoRAError:
        return
    for item in (*spec.concepts, *spec.styles):
        if not str(item.lora).lower().endswith(".safetensors"):
            continue
        try:
            with safe_open(str(item.lora), framework="pt") as handle:
                keys, metadata = list(handle.keys()), handle.metadata() or {}
        except Exception:  # noqa: BLE001, S112 - reading the file reports it in full
            continue
        made_for = family_of_lora(keys, metadata)
        if made_for is not None and made_for is not family:
            raise lora_family_error(item.lora, made_for, family)


_UNREACHABLE = (
    "LocalEntryNotFoundError",
    "OfflineModeIsEnabled",
    "ConnectError",
    "ConnectTimeout",
    "ConnectionError",
    "NameResolutionError",
    "MaxRetryError",
    "TimeoutException",
    "TimeoutError",
    "ReadTimeout",
)
_UNREACHABLE_TEXT = ("offline mode", "hf_hub_offline", "couldn't connect", "cannot reach", "not cached locally")
_NOT_ON_HUB = ("RepositoryNotFoundError", "GatedRepoError", "RevisionNotFoundError")


def _causes(exc: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in chain and len(chain) < 32:
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def offline_mode() -> bool:
    return any(
        os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")
        for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def hub_problem(exc: BaseException) -> str | None:
    """Why the hub could not serve a model, in words, when ``exc`` (or its cause) says so:
    not cached with no connection or offline mode, or no such repository. ``None`` otherwise."""
    chain = _causes(exc)
    names = {cls.__name__ for e in chain for cls in type(e).__mro__}
    text = " ".join(str(e) for e in chain).lower()
    if names & set(_NOT_ON_HUB):
        return "is not a model on the Hugging Face hub (or it is private or gated)"
    if names & set(_UNREACHABLE) or any(words in text for words in _UNREACHABLE_TEXT):
        why = "offline mode is on (HF_HUB_OFFLINE)" if offline_mode() else "the hub could not be reached"
        return f"is not in the local Hugging Face cache and {why}"
    return None


def hub_error(field: str, name: str, exc: BaseException) -> CLoRAError | None:
    """The one-line error for a hub id the hub could not serve, with what to do instead."""
    problem = hub_problem(exc)
    if problem is None:
        return None
    advice = "download it once while online, or " if "cache" in problem else ""
    return CLoRAError(
        f"{field}: {name!r} {problem}; {advice}point {field}: at a local diffusers folder"
        + (" or a .safetensors checkpoint file" if field == "model" else "")
    )


def quiet_libraries() -> None:
    """Keep the terminal for our own progress bar and errors: no loading bars or library warnings."""
    from diffusers.utils import logging as diffusers_logging
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as transformers_logging

    for logging in (diffusers_logging, transformers_logging):
        logging.set_verbosity_error()
        logging.disable_progress_bar()
    disable_progress_bars()  # the hub's "Fetching N files" bars


def model_family(model: str, config: str | None = None, field: str = "model") -> ModelFamily:
    """The family (SD 1.x/2.x, SDXL or FLUX.1) of a diffusers folder, hub id or single checkpoint: from its
    ``model_index.json`` (a checkpoint's ``config`` folder or hub id when given), else its key names."""
    local = _local_model(model)
    if local is not None and local.suffix.lower() == ".gguf":
        return _gguf_family(config)
    if local is not None and local.is_file():
        return family_of_checkpoint(local) if config is None else model_family(config, field="model_config")
    if local is not None:
        if not (local / "model_index.json").is_file():
            raise CLoRAError(f"{field}: {local} is not a diffusers model folder (no model_index.json)")
        return family_of_folder(local)
    try:
        from huggingface_hub import hf_hub_download

        index = Path(hf_hub_download(model, "model_index.json"))
    except Exception as exc:  # noqa: BLE001 - hub errors come in many types
        raise hub_error(field, model, exc) or CLoRAError(
            f"{field}: cannot read {model!r}'s model_index.json from the hub ({one_line(exc)})"
        ) from None
    return family_of_index(json.loads(index.read_text(encoding="utf-8")))


def load_pipeline(
    model: str, device: torch.device, dtype: torch.dtype, config: str | None = None, quantize: str | None = None
) -> Any:
    """A CLoRA pipeline from a local diffusers folder, a single checkpoint file, or a hub id: a
    ``CLoRAPipeline`` for SD 1.x/2.x, a ``CLoRAXLPipeline`` for SDXL, a ``CLoRAFluxPipeline`` for
    FLUX.1 (``model_family`` tells).

    ``config`` (single files only) names the diffusers folder or hub id whose component configs
    describe the checkpoint; without it diffusers infers them and asks the hub. A ``.gguf`` file is a
    quantized FLUX.1 transformer and needs ``config``. ``quantize="nf4"`` loads a FLUX.1 transformer
    in bitsandbytes' 4-bit NF4 (diffusers does so on a GPU only).
    """
    from . import family_pipelines as pipelines

    local = _local_model(model)
    if local is not None and not local.exists():
        raise CLoRAError(f"model: {local} not found (expected a diffusers folder or a .safetensors checkpoint)")
    if local is not None and local.is_file() and local.suffix.lower() not in SINGLE_FILE_SUFFIXES:
        raise CLoRAError(f"model: {local} is not a .safetensors checkpoint (or a .gguf FLUX.1 transformer)")
    family = model_family(model, config)
    pipeline_class = getattr(pipelines, family.pipeline_class)
    quantization = _quantization(quantize, family, device, dtype, local)
    try:
        with warnings.catch_warnings():
            # newer diffusers renamed torch_dtype to dtype and warn; older releases know only torch_dtype
            warnings.simplefilter("ignore", FutureWarning)
            pipe = _load(pipeline_class, model, local, dtype, config, quantization)
    except CLoRAError:
        raise
    except Exception as exc:  # noqa: BLE001 - any loading failure becomes one line
        hub = hub_error("model", model, exc) if local is None else _single_file_hub_error(local, config, exc)
        raise hub or CLoRAError(f"model: cannot load {model!r} ({one_line(exc)})") from None
    return pipe.to(device)


def _single_file_hub_error(local: Path, config: str | None, exc: BaseException) -> CLoRAError | None:
    """A single checkpoint file needs its component configs from ``config`` or, without it, the hub."""
    if not local.is_file():
        return None
    if config is not None:
        return hub_error("model_config", config, exc)
    problem = hub_problem(exc)
    if problem is None:
        return None
    problem = problem.replace("is not in", "are not in").replace("is not a", "are not a")
    return CLoRAError(
        f"model: the configs diffusers needs for {local.name} {problem}; "
        "set model_config: to a local diffusers folder of the same model family"
    )


def _gguf_family(config: str | None) -> ModelFamily:
    """A ``.gguf`` checkpoint is a FLUX.1 transformer; the rest of the model comes from ``config``."""
    if config is None:
        raise CLoRAError(
            "model_config: a .gguf file holds only a quantized FLUX.1 transformer; set model_config: to a "
            "diffusers Flux folder or hub id (black-forest-labs/FLUX.1-dev) for the text encoders and VAE"
        )
    family = model_family(config, field="model_config")
    if family is not FLUX_FAMILY:
        raise CLoRAError(f"model: a .gguf file loads as a FLUX.1 transformer only; model_config: is {family.title}")
    return family


def _quantization(
    quantize: str | None, family: ModelFamily, device: torch.device, dtype: torch.dtype, local: Path | None
) -> Any:
    """diffusers' ``BitsAndBytesConfig`` for ``--quantize nf4`` (the FLUX.1 transformer only), or None."""
    if quantize is None:
        return None
    if quantize != "nf4":
        raise CLoRAError(f"--quantize: unknown quantization {quantize!r}; expected nf4")
    if family.name != "flux":
        raise CLoRAError(f"--quantize nf4: only a FLUX.1 transformer is quantized; this model is {family.title}")
    if local is not None and local.suffix.lower() == ".gguf":
        raise CLoRAError("--quantize nf4: the .gguf transformer is quantized already; drop --quantize")
    if device.type == "cpu":
        raise CLoRAError(
            "--quantize nf4: diffusers quantizes with bitsandbytes on a GPU only (it says: No GPU found); on the "
            "CPU use a .gguf FLUX.1 transformer as model: (with model_config:)"
        )
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        raise CLoRAError("--quantize nf4: needs the bitsandbytes package: pip install bitsandbytes")
    from diffusers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)


def _load(
    pipeline_class: Any,
    model: str,
    local: Path | None,
    dtype: torch.dtype,
    config: str | None,
    quantization: Any = None,
) -> Any:
    if local is not None and local.is_file():
        extra = {} if config is None else {"config": config}
        if quantization is not None:
            extra["quantization_config"] = quantization
        return pipeline_class.from_single_file(str(local), torch_dtype=dtype, **extra)
    extra = {}
    if quantization is not None:
        from diffusers import PipelineQuantizationConfig

        extra["quantization_config"] = PipelineQuantizationConfig(quant_mapping={"transformer": quantization})
    return pipeline_class.from_pretrained(model if local is None else str(local), torch_dtype=dtype, **extra)
