"""Real LoRA files on disk for the tiny SD 1.5 of ``tiny_sd``, in the formats users meet in the wild.

Every writer starts from the same neutral :data:`LoraWeights`, so files of different formats made from one
:func:`make_lora_weights` call must give identical results once loaded.

Neutral keys are ``"<component>.<module path>"`` with the module path as in the live model, e.g.
``"unet.down_blocks.2.attentions.1.transformer_blocks.0.attn2.to_q"`` and
``"text_encoder.encoder.layers.0.self_attn.q_proj"`` (transformers 5's flattened ``CLIPTextModel``; the
writers add the ``text_model.`` level that files from the wild carry).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import save_file

UNET_ATTENTION_TARGETS = tuple(
    f"{attn}.{proj}" for attn in ("attn1", "attn2") for proj in ("to_q", "to_k", "to_v", "to_out.0")
)
"""Module-name suffixes of the UNet's self- and cross-attention projections."""

TEXT_ENCODER_ATTENTION_TARGETS = tuple(f"self_attn.{proj}" for proj in ("q_proj", "k_proj", "v_proj", "out_proj"))
"""Module-name suffixes of the CLIP text encoder's attention projections."""

COMPONENTS = ("unet", "text_encoder")


@dataclass(frozen=True)
class LoraLayer:
    """One low-rank update of a linear layer: ``W += (alpha / rank) * up @ down``."""

    down: torch.Tensor
    """``[rank, in_features]``."""
    up: torch.Tensor
    """``[out_features, rank]``."""
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta(self) -> torch.Tensor:
        """The update of the layer's weight, ``[out_features, in_features]``."""
        return self.scale * self.up @ self.down


LoraWeights = dict[str, LoraLayer]
"""``"<component>.<module path>"`` -> layer; see the module docstring."""


def _split(key: str) -> tuple[str, str]:
    component, path = key.split(".", 1)
    return component, path.removeprefix("text_model.")


def _random_layer(module: torch.nn.Linear, rank: int, alpha: float, generator: torch.Generator) -> LoraLayer:
    # Entries of up @ down have std 1/sqrt(in_features), about the size of the layer's own weights.
    down = torch.randn(rank, module.in_features, generator=generator) / module.in_features**0.5
    up = torch.randn(module.out_features, rank, generator=generator) / rank**0.5
    return LoraLayer(down=down, up=up, alpha=alpha)


def make_lora_weights(
    pipe_or_components: StableDiffusionPipeline | Mapping[str, torch.nn.Module],
    targets: Sequence[str] = UNET_ATTENTION_TARGETS,
    rank: int = 4,
    alpha: float = 2.0,
    seed: int = 0,
    text_encoder: bool = True,
) -> LoraWeights:
    """Seeded random LoRA weights for the UNet linear layers whose names end with one of ``targets``.

    With ``text_encoder``, the text encoder's attention projections get layers too. The default
    ``alpha`` != ``rank`` so that a format that mishandles alpha shows up. Shapes come from the live
    modules (adapters already loaded do not matter), so any SD 1.5-shaped pipeline works.
    """
    components = pipe_or_components if isinstance(pipe_or_components, Mapping) else pipe_or_components.components
    wanted = {"unet": tuple(targets)}
    if text_encoder:  # SDXL: both text encoders
        for component in ("text_encoder", "text_encoder_2"):
            if components.get(component) is not None:
                wanted[component] = TEXT_ENCODER_ATTENTION_TARGETS
    generator = torch.Generator().manual_seed(seed)
    weights: LoraWeights = {}
    for component, suffixes in wanted.items():
        for name, module in components[component].named_modules():
            path = name.removesuffix(".base_layer").removeprefix("text_model.")  # peft wraps adapted layers
            if isinstance(module, torch.nn.Linear) and path.endswith(tuple(f".{s}" for s in suffixes)):
                weights[f"{component}.{path}"] = _random_layer(module, rank, alpha, generator)
    if not weights:
        raise ValueError(f"no module matches {targets}")
    return weights


def with_wrong_shapes(
    weights: LoraWeights, in_features: int = 768, components: Sequence[str] = COMPONENTS, seed: int = 0
) -> LoraWeights:
    """A copy as if trained on a base model whose text embeddings have ``in_features`` channels.

    That is how an SD 2.x LoRA (1024) looks to SD 1.5 (768): in the chosen ``components``, the UNet's
    cross-attention ``attn2.to_k``/``attn2.to_v`` get ``down`` of ``[rank, in_features]`` and the
    text encoder's projections get ``[rank, in_features]`` / ``[in_features, rank]``; other layers keep
    their shapes.
    """
    generator = torch.Generator().manual_seed(seed)
    out: LoraWeights = {}
    for key, layer in weights.items():
        component, path = _split(key)
        reads_text = component == "text_encoder" or path.endswith(("attn2.to_k", "attn2.to_v"))
        if component not in components or not reads_text:
            out[key] = layer
            continue
        out_features = in_features if component == "text_encoder" else layer.up.shape[0]
        out[key] = LoraLayer(
            down=torch.randn(layer.rank, in_features, generator=generator) / in_features**0.5,
            up=torch.randn(out_features, layer.rank, generator=generator) / layer.rank**0.5,
            alpha=layer.alpha,
        )
    if all(out[key] is weights[key] for key in weights):
        raise ValueError(f"no layer of {components} reads text embeddings")
    return out


def write_diffusers_lora(weights: LoraWeights, path: Path, alpha_in_metadata: bool = False) -> Path:
    """Write ``weights`` as a diffusers/peft LoRA (like ``pytorch_lora_weights.safetensors``); return ``path``.

    Keys are ``unet.<module>.lora_A.weight`` / ``.lora_B.weight`` and
    ``text_encoder.text_model.<module>.lora_A.weight``, written by diffusers' own
    ``StableDiffusionPipeline.save_lora_weights``. The format has no per-layer alpha: diffusers 0.42.1
    takes ``lora_alpha = r`` (scale 1) unless the file's ``lora_adapter_metadata`` holds a ``LoraConfig``.
    So by default ``alpha / rank`` is folded into ``lora_B`` (a file without that metadata, like most on
    the hub, means scale 1); with
    ``alpha_in_metadata`` the weights stay raw and ``r``/``lora_alpha``/``target_modules`` go into
    that metadata, as newer diffusers training scripts write it (needs one rank and alpha throughout).
    """
    path = Path(path)
    if any(key.startswith("text_encoder_2.") for key in weights):
        return _write_diffusers_sdxl_lora(weights, path)
    layers: dict[str, dict[str, torch.Tensor]] = {component: {} for component in COMPONENTS}
    for key, layer in weights.items():
        component, module = _split(key)
        name = f"text_model.{module}" if component == "text_encoder" else module
        up = layer.up if alpha_in_metadata else layer.up * layer.scale
        layers[component][f"{name}.lora_A.weight"] = layer.down.contiguous()
        layers[component][f"{name}.lora_B.weight"] = up.contiguous()
    metadata: dict[str, dict | None] = {component: None for component in COMPONENTS}
    if alpha_in_metadata:
        ranks_alphas = {(layer.rank, layer.alpha) for layer in weights.values()}
        if len(ranks_alphas) != 1:
            raise ValueError(f"alpha_in_metadata needs one (rank, alpha) for all layers, got {sorted(ranks_alphas)}")
        ((rank, alpha),) = ranks_alphas
        for component in COMPONENTS:
            modules = sorted(_split(key)[1] for key in weights if key.startswith(f"{component}."))
            if modules:
                metadata[component] = {"r": rank, "lora_alpha": alpha, "target_modules": modules}
    StableDiffusionPipeline.save_lora_weights(
        path.parent,
        unet_lora_layers=layers["unet"] or None,
        text_encoder_lora_layers=layers["text_encoder"] or None,
        weight_name=path.name,
        unet_lora_adapter_metadata=metadata["unet"],
        text_encoder_lora_adapter_metadata=metadata["text_encoder"],
    )
    return path


def _write_diffusers_sdxl_lora(weights: LoraWeights, path: Path) -> Path:
    """An SDXL LoRA as diffusers' ``StableDiffusionXLPipeline.save_lora_weights`` writes it (``unet.``,
    ``text_encoder.``, ``text_encoder_2.`` keys; ``alpha / rank`` folded into ``lora_B``)."""
    from diffusers import StableDiffusionXLPipeline

    layers: dict[str, dict[str, torch.Tensor]] = {"unet": {}, "text_encoder": {}, "text_encoder_2": {}}
    for key, layer in weights.items():
        component, module = _split(key)
        name = module if component == "unet" else f"text_model.{module}"
        layers[component][f"{name}.lora_A.weight"] = layer.down.contiguous()
        layers[component][f"{name}.lora_B.weight"] = (layer.up * layer.scale).contiguous()
    StableDiffusionXLPipeline.save_lora_weights(
        path.parent,
        unet_lora_layers=layers["unet"] or None,
        text_encoder_lora_layers=layers["text_encoder"] or None,
        text_encoder_2_lora_layers=layers["text_encoder_2"] or None,
        weight_name=path.name,
    )
    return path


def sgm_unet_module(module: str, layers_per_block: int = 2) -> str:
    """An SDXL UNet attention module's diffusers path as kohya's sd-scripts name SDXL layers (the
    original SGM block numbering): ``down_blocks.2.attentions.1.x`` -> ``input_blocks.8.1.x``,
    ``mid_block.attentions.0.x`` -> ``middle_block.1.x``, ``up_blocks.0.attentions.2.x`` -> ``output_blocks.2.1.x``."""
    parts = module.split(".")
    if parts[0] == "mid_block":
        return ".".join(["middle_block", "1", *parts[3:]])
    level, attention = int(parts[1]), int(parts[3])
    if parts[0] == "down_blocks":
        return ".".join(["input_blocks", str((layers_per_block + 1) * level + attention + 1), "1", *parts[4:]])
    return ".".join(["output_blocks", str((layers_per_block + 1) * level + attention), "1", *parts[4:]])


def write_kohya_lora(weights: LoraWeights, path: Path, sdxl: bool = False) -> Path:
    """Write ``weights`` as a kohya-ss / A1111 (Civitai) LoRA and return ``path``.

    Keys are ``lora_unet_<module with _>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha`` (0-dim;
    effective scale ``alpha / rank``) and ``lora_te_text_model_encoder_layers_0_self_attn_q_proj...``
    for the text encoder, with ``ss_*`` metadata as sd-scripts writes it for SD 1.x. With ``sdxl``, as
    sd-scripts writes SDXL LoRAs: UNet modules in SGM numbering (``sgm_unet_module``) and the two text
    encoders as ``lora_te1_...`` and ``lora_te2_...``.
    """
    path = Path(path)
    prefixes = {
        "unet": "lora_unet_",
        "text_encoder": "lora_te1_" if sdxl else "lora_te_",
        "text_encoder_2": "lora_te2_",
    }
    tensors: dict[str, torch.Tensor] = {}
    for key, layer in weights.items():
        component, module = _split(key)
        if component == "unet" and sdxl:
            module = sgm_unet_module(module)
        elif component != "unet":
            module = f"text_model.{module}"
        name = prefixes[component] + module.replace(".", "_")
        tensors[f"{name}.lora_down.weight"] = layer.down.contiguous()
        tensors[f"{name}.lora_up.weight"] = layer.up.contiguous()
        tensors[f"{name}.alpha"] = torch.tensor(float(layer.alpha))
    first = next(iter(weights.values()))
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(first.rank),
        "ss_network_alpha": str(first.alpha),
        "ss_base_model_version": "sdxl_base_v1-0" if sdxl else "sd_v1",
        "ss_v2": "False",
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path, metadata=metadata)
    return path


def write_legacy_diffusers_lora(weights: LoraWeights, path: Path) -> Path:
    """Write ``weights`` in the pre-peft diffusers layout (attention-processor LoRA, 2023 training
    scripts): ``unet.<block>.attn1.processor.to_q_lora.down.weight`` / ``.up.weight`` and
    ``text_encoder.text_model.<layer>.self_attn.q_proj.lora_linear_layer.down.weight``.
    The format has no alpha, so ``alpha / rank`` is folded into ``up``."""
    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    for key, layer in weights.items():
        component, module = _split(key)
        if component == "unet":
            block, proj = module.rsplit(".to_", 1)
            name = f"unet.{block}.processor.to_{proj.removesuffix('.0')}_lora"
        else:
            name = f"text_encoder.text_model.{module}.lora_linear_layer"
        tensors[f"{name}.down.weight"] = layer.down.contiguous()
        tensors[f"{name}.up.weight"] = (layer.up * layer.scale).contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path)
    return path
