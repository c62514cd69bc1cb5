"""Real FLUX.1 LoRA files on disk for the tiny Flux of ``tiny_flux``, in the formats diffusers' Flux loader reads.

Every writer starts from the same neutral :data:`~lora_files.LoraWeights`, so files of different formats made
from one :func:`make_flux_lora_weights` call must give the same image once loaded.

Neutral keys are ``"<component>.<module path>"`` with the module path as in the live diffusers model, e.g.
``"transformer.transformer_blocks.0.attn.to_q"``, ``"transformer.single_transformer_blocks.1.proj_out"``
and ``"text_encoder.encoder.layers.0.self_attn.q_proj"`` (CLIP-L; transformers 5's flattened
``CLIPTextModel``, the writers add the ``text_model.`` level).

The original (BFL) Flux fuses some of diffusers' linears: a double block's ``img_attn.qkv`` is diffusers'
``attn.to_q/to_k/to_v``, ``txt_attn.qkv`` is ``attn.add_{q,k,v}_proj``, a single block's ``linear1`` is
``attn.to_q/to_k/to_v`` + ``proj_mlp``. A LoRA trained on a fused linear (kohya, ComfyUI, XLabs) has one
``down`` ``[rank, in]`` and one ``up`` ``[sum of outs, rank]``; the same update in diffusers' layout is one
LoRA per part sharing ``down`` with ``up`` split into chunks. :func:`make_flux_lora_weights` therefore gives
the parts of a fused linear one shared ``down`` (see :data:`FUSED_GROUPS`), and the fused writers check it.

What diffusers 0.42.1 reads (``FluxLoraLoaderMixin.lora_state_dict``; the first test that matches wins):

- any key with ``.lora_down.weight``: kohya (:func:`write_flux_kohya_lora`), ComfyUI
  (``diffusion_model.`` + ``lora_down``, :func:`write_flux_bfl_lora`) and kohya with diffusers module names
  (:func:`write_flux_kohya_diffusers_names_lora`), all via ``_convert_kohya_flux_lora_to_diffusers``;
- any key with ``processor``: XLabs (:func:`write_flux_xlabs_lora`);
- any key with ``query_norm.scale``: BFL Control LoRAs (full FLUX.1 sizes only: 19/38 blocks, 3072 wide);
- any key with ``base_model``: fal Kontext LoRAs (full FLUX.1 sizes only);
- otherwise keys are taken as they are: diffusers/peft (:func:`write_flux_diffusers_lora`) and ai-toolkit
  (:func:`write_flux_ai_toolkit_lora`).

Limits of diffusers 0.42.1 for a model narrower than FLUX.1: kohya/ComfyUI ``single_blocks.N.linear1``
LoRAs are split with hard-coded sizes ``[3072, 3072, 3072, 12288]`` (an ``AssertionError`` otherwise), so
on the tiny model single-block q/k/v/mlp LoRAs load only from the diffusers, ai-toolkit and XLabs files.
A BFL-named ``lora_A``/``lora_B`` file (``diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight``,
``write_flux_bfl_lora(..., peft_names=True)``) matches no converter: its keys reach the transformer without
the ``transformer.`` prefix and nothing is loaded.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from diffusers import FluxPipeline, FluxTransformer2DModel
from lora_files import LoraLayer, LoraWeights
from safetensors.torch import save_file

FLUX_DOUBLE_BLOCK_TARGETS = tuple(
    f"transformer_blocks.*.attn.{proj}"
    for proj in ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
)
"""Double-stream attention: image q/k/v/out and text (``add_*``) q/k/v/out projections."""

FLUX_SINGLE_BLOCK_TARGETS = (
    "single_transformer_blocks.*.attn.to_q",
    "single_transformer_blocks.*.attn.to_k",
    "single_transformer_blocks.*.attn.to_v",
    "single_transformer_blocks.*.proj_out",
)
"""Single-stream blocks: attention q/k/v and the output projection (BFL ``linear2``)."""

FLUX_TARGETS = FLUX_DOUBLE_BLOCK_TARGETS + FLUX_SINGLE_BLOCK_TARGETS
"""Default transformer targets (fnmatch patterns on diffusers module paths), as ai-toolkit's default."""

FLUX_KOHYA_READABLE_TARGETS = FLUX_DOUBLE_BLOCK_TARGETS + ("single_transformer_blocks.*.proj_out",)
"""Targets whose kohya/ComfyUI files diffusers 0.42.1 reads on a model narrower than FLUX.1 (no ``linear1``)."""

CLIP_ATTENTION_TARGETS = tuple(f"self_attn.{proj}" for proj in ("q_proj", "k_proj", "v_proj", "out_proj"))
"""Module-name suffixes of the CLIP text encoder's attention projections."""

DOUBLE_BLOCK_MODULES = {
    "attn.to_q": ("img_attn.qkv", 0),
    "attn.to_k": ("img_attn.qkv", 1),
    "attn.to_v": ("img_attn.qkv", 2),
    "attn.add_q_proj": ("txt_attn.qkv", 0),
    "attn.add_k_proj": ("txt_attn.qkv", 1),
    "attn.add_v_proj": ("txt_attn.qkv", 2),
    "attn.to_out.0": ("img_attn.proj", 0),
    "attn.to_add_out": ("txt_attn.proj", 0),
    "ff.net.0.proj": ("img_mlp.0", 0),
    "ff.net.2": ("img_mlp.2", 0),
    "ff_context.net.0.proj": ("txt_mlp.0", 0),
    "ff_context.net.2": ("txt_mlp.2", 0),
    "norm1.linear": ("img_mod.lin", 0),
    "norm1_context.linear": ("txt_mod.lin", 0),
}
"""Double block: diffusers module -> (BFL module, index of the part in a fused linear)."""

SINGLE_BLOCK_MODULES = {
    "attn.to_q": ("linear1", 0),
    "attn.to_k": ("linear1", 1),
    "attn.to_v": ("linear1", 2),
    "proj_mlp": ("linear1", 3),
    "proj_out": ("linear2", 0),
    "norm.linear": ("modulation.lin", 0),
}
"""Single block: diffusers module -> (BFL module, index of the part in a fused linear)."""

FUSED_GROUPS = {
    ("transformer_blocks", "img_attn.qkv"): ("attn.to_q", "attn.to_k", "attn.to_v"),
    ("transformer_blocks", "txt_attn.qkv"): ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    ("single_transformer_blocks", "linear1"): ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
}
"""BFL's fused linears and their diffusers parts, in the order of the fused output rows."""

XLABS_MODULES = {
    ("transformer_blocks", "attn.to_q"): "processor.qkv_lora1",
    ("transformer_blocks", "attn.to_k"): "processor.qkv_lora1",
    ("transformer_blocks", "attn.to_v"): "processor.qkv_lora1",
    ("transformer_blocks", "attn.add_q_proj"): "processor.qkv_lora2",
    ("transformer_blocks", "attn.add_k_proj"): "processor.qkv_lora2",
    ("transformer_blocks", "attn.add_v_proj"): "processor.qkv_lora2",
    ("transformer_blocks", "attn.to_out.0"): "processor.proj_lora1",
    ("transformer_blocks", "attn.to_add_out"): "processor.proj_lora2",
    ("single_transformer_blocks", "attn.to_q"): "processor.qkv_lora",
    ("single_transformer_blocks", "attn.to_k"): "processor.qkv_lora",
    ("single_transformer_blocks", "attn.to_v"): "processor.qkv_lora",
    ("single_transformer_blocks", "proj_out"): "processor.proj_lora",
}
"""XLabs' attention-processor LoRAs (``double_blocks.N.processor.qkv_lora1`` is the image qkv, ``..2`` the
text's; single blocks have q/k/v without the MLP and ``proj_lora`` on ``linear2``) -> diffusers modules."""

_BLOCK = re.compile(r"^(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)$")
_BFL_BLOCK = {"transformer_blocks": "double_blocks", "single_transformer_blocks": "single_blocks"}


def _split(key: str) -> tuple[str, str]:
    component, path = key.split(".", 1)
    return component, path.removeprefix("text_model.")


def _block(module: str) -> tuple[str, int, str]:
    """``"transformer_blocks.3.attn.to_q"`` -> ``("transformer_blocks", 3, "attn.to_q")``."""
    match = _BLOCK.match(module)
    if match is None:
        raise ValueError(f"{module!r} is not in a transformer block")
    return match.group(1), int(match.group(2)), match.group(3)


def _bfl_module(module: str) -> tuple[str, int]:
    """A transformer module's BFL name and its part index in a fused linear:
    ``"transformer_blocks.0.attn.add_k_proj"`` -> ``("double_blocks.0.txt_attn.qkv", 1)``."""
    kind, index, rest = _block(module)
    table = DOUBLE_BLOCK_MODULES if kind == "transformer_blocks" else SINGLE_BLOCK_MODULES
    if rest not in table:
        raise ValueError(f"no BFL name for {module!r}")
    bfl, part = table[rest]
    return f"{_BFL_BLOCK[kind]}.{index}.{bfl}", part


def _fused_group(module: str) -> tuple[str, tuple[str, ...]] | None:
    """The fused group (shared ``down``) of a transformer module: (group id, diffusers parts), or None."""
    match = _BLOCK.match(module)
    if match is None:
        return None
    kind, index, rest = match.groups()
    for (group_kind, bfl), parts in FUSED_GROUPS.items():
        if group_kind == kind and rest in parts:
            return f"{kind}.{index}.{bfl}", parts
    return None


def make_flux_lora_weights(
    pipe_or_transformer: FluxPipeline | FluxTransformer2DModel | Mapping[str, torch.nn.Module],
    rank: int = 4,
    seed: int = 0,
    targets: Sequence[str] = FLUX_TARGETS,
    alpha: float = 2.0,
    text_encoder: bool = True,
) -> LoraWeights:
    """Seeded random LoRA weights for the transformer linears whose module path matches one of ``targets``
    (fnmatch patterns such as ``"transformer_blocks.*.attn.to_q"``), plus, with ``text_encoder`` and a
    pipeline, CLIP-L's attention projections.

    Parts of one BFL fused linear (:data:`FUSED_GROUPS`) get equal ``down`` tensors (copies, so that
    safetensors can save them), so every format can express the weights. ``alpha`` != ``rank`` by default
    so that a format that mishandles alpha shows up. Shapes come from the live modules (loaded adapters do
    not matter).
    """
    if isinstance(pipe_or_transformer, FluxTransformer2DModel):
        components: Mapping[str, torch.nn.Module] = {"transformer": pipe_or_transformer}
    elif isinstance(pipe_or_transformer, Mapping):
        components = pipe_or_transformer
    else:
        components = pipe_or_transformer.components
    generator = torch.Generator().manual_seed(seed)
    weights: LoraWeights = {}
    shared_down: dict[str, torch.Tensor] = {}
    for name, module in components["transformer"].named_modules():
        path = name.removesuffix(".base_layer")  # peft wraps adapted layers
        if not isinstance(module, torch.nn.Linear) or not any(fnmatch.fnmatchcase(path, t) for t in targets):
            continue
        group = _fused_group(path)
        down = shared_down.get(group[0]) if group else None
        if down is None:
            # Entries of up @ down have std about 1/sqrt(in_features), the size of the layer's own weights.
            down = torch.randn(rank, module.in_features, generator=generator) / module.in_features**0.5
            if group:
                shared_down[group[0]] = down
        up = torch.randn(module.out_features, rank, generator=generator) / rank**0.5
        weights[f"transformer.{path}"] = LoraLayer(down=down.clone(), up=up, alpha=alpha)  # equal, not shared
    if not weights:
        raise ValueError(f"no transformer module matches {targets}")
    if text_encoder and components.get("text_encoder") is not None:
        for name, module in components["text_encoder"].named_modules():
            path = name.removesuffix(".base_layer").removeprefix("text_model.")
            if isinstance(module, torch.nn.Linear) and path.endswith(tuple(f".{s}" for s in CLIP_ATTENTION_TARGETS)):
                weights[f"text_encoder.{path}"] = LoraLayer(
                    down=torch.randn(rank, module.in_features, generator=generator) / module.in_features**0.5,
                    up=torch.randn(module.out_features, rank, generator=generator) / rank**0.5,
                    alpha=alpha,
                )
    return weights


def _transformer_and_text(weights: LoraWeights) -> tuple[dict[str, LoraLayer], dict[str, LoraLayer]]:
    transformer, text = {}, {}
    for key, layer in weights.items():
        component, module = _split(key)
        if component == "transformer":
            transformer[module] = layer
        elif component == "text_encoder":
            text[module] = layer
        else:
            raise ValueError(f"FLUX.1 LoRAs hold the transformer and CLIP-L only, not {key!r}")
    return transformer, text


def fuse_flux_lora(
    transformer: Mapping[str, LoraLayer], shapes: Mapping[str, int] | None = None
) -> dict[str, LoraLayer]:
    """The transformer layers of ``weights`` as LoRAs on BFL's modules (``"double_blocks.0.img_attn.qkv"``).

    Parts of a fused linear must share ``down`` and ``alpha``; their ``up`` are stacked in BFL's order. A part
    absent from the weights gets zero rows in ``up`` (no update), which needs its width in ``shapes``
    (diffusers module path -> out_features); without it a partial group is an error.
    """
    groups: dict[str, dict[int, tuple[str, LoraLayer]]] = {}
    for module, layer in transformer.items():
        bfl, part = _bfl_module(module)
        groups.setdefault(bfl, {})[part] = (module, layer)
    fused: dict[str, LoraLayer] = {}
    for bfl, parts in groups.items():
        if len(parts) == 1 and 0 in parts and _fused_group(parts[0][0]) is None:
            fused[bfl] = parts[0][1]
            continue
        modules = [module for module, _ in parts.values()]
        kind, index, _ = _block(modules[0])
        names = FUSED_GROUPS[(kind, bfl.split(".", 2)[2])]
        first = next(iter(parts.values()))[1]
        for module, layer in parts.values():
            if not torch.equal(layer.down, first.down) or layer.alpha != first.alpha:
                raise ValueError(f"{modules} are one fused linear {bfl!r} here: they need one shared down and alpha")
        ups = []
        for part, name in enumerate(names):
            if part in parts:
                ups.append(parts[part][1].up)
            elif shapes is not None and f"{kind}.{index}.{name}" in shapes:
                ups.append(torch.zeros(shapes[f"{kind}.{index}.{name}"], first.rank))
            else:
                raise ValueError(f"{bfl!r} needs all of {names} (or their widths), got {sorted(modules)}")
        fused[bfl] = LoraLayer(down=first.down, up=torch.cat(ups, dim=0), alpha=first.alpha)
    return fused


def write_flux_diffusers_lora(weights: LoraWeights, path: Path, alpha_in_metadata: bool = False) -> Path:
    """Write ``weights`` as a diffusers/peft Flux LoRA (``pytorch_lora_weights.safetensors`` of diffusers'
    ``train_dreambooth_lora_flux.py``) with diffusers' own ``FluxPipeline.save_lora_weights``; return ``path``.

    Keys are ``transformer.transformer_blocks.0.attn.to_q.lora_A.weight`` / ``.lora_B.weight`` and
    ``text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight``. The format has no per-layer
    alpha, so ``alpha / rank`` is folded into ``lora_B``; with ``alpha_in_metadata`` the weights stay raw and
    ``r``/``lora_alpha``/``target_modules`` go into the file's ``lora_adapter_metadata`` instead (one rank
    and alpha throughout).
    """
    path = Path(path)
    transformer, text = _transformer_and_text(weights)
    layers: dict[str, dict[str, torch.Tensor]] = {"transformer": {}, "text_encoder": {}}
    for component, modules in (("transformer", transformer), ("text_encoder", text)):
        for module, layer in modules.items():
            name = f"text_model.{module}" if component == "text_encoder" else module
            up = layer.up if alpha_in_metadata else layer.up * layer.scale
            layers[component][f"{name}.lora_A.weight"] = layer.down.contiguous()
            layers[component][f"{name}.lora_B.weight"] = up.contiguous()
    metadata: dict[str, dict | None] = {"transformer": None, "text_encoder": None}
    if alpha_in_metadata:
        ranks_alphas = {(layer.rank, layer.alpha) for layer in weights.values()}
        if len(ranks_alphas) != 1:
            raise ValueError(f"alpha_in_metadata needs one (rank, alpha) for all layers, got {sorted(ranks_alphas)}")
        ((rank, alpha),) = ranks_alphas
        for component, modules in (("transformer", transformer), ("text_encoder", text)):
            if modules:
                metadata[component] = {"r": rank, "lora_alpha": alpha, "target_modules": sorted(modules)}
    path.parent.mkdir(parents=True, exist_ok=True)
    FluxPipeline.save_lora_weights(
        path.parent,
        transformer_lora_layers=layers["transformer"] or None,
        text_encoder_lora_layers=layers["text_encoder"] or None,
        weight_name=path.name,
        transformer_lora_adapter_metadata=metadata["transformer"],
        text_encoder_lora_adapter_metadata=metadata["text_encoder"],
    )
    return path


def write_flux_ai_toolkit_lora(weights: LoraWeights, path: Path) -> Path:
    """Write ``weights`` as ostris' ai-toolkit saves Flux LoRAs and return ``path``: diffusers module names
    with the ``transformer.`` prefix, ``lora_A``/``lora_B`` (no alpha; ``alpha / rank`` folded into
    ``lora_B``), transformer only (ai-toolkit does not train CLIP for Flux), written with plain
    ``safetensors`` and ai-toolkit's ``{"format": "pt", "software": ...}`` metadata instead of diffusers'."""
    path = Path(path)
    transformer, text = _transformer_and_text(weights)
    if text:
        raise ValueError("ai-toolkit Flux LoRAs have no text encoder layers")
    tensors: dict[str, torch.Tensor] = {}
    for module, layer in transformer.items():
        tensors[f"transformer.{module}.lora_A.weight"] = layer.down.contiguous()
        tensors[f"transformer.{module}.lora_B.weight"] = (layer.up * layer.scale).contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path, metadata={"format": "pt", "software": '{"name": "ai-toolkit", "repo": "ostris"}'})
    return path


def _kohya_tensors(name: str, layer: LoraLayer) -> dict[str, torch.Tensor]:
    return {
        f"{name}.lora_down.weight": layer.down.contiguous(),
        f"{name}.lora_up.weight": layer.up.contiguous(),
        f"{name}.alpha": torch.tensor(float(layer.alpha)),
    }


def _kohya_metadata(weights: LoraWeights, module: str) -> dict[str, str]:
    first = next(iter(weights.values()))
    return {
        "ss_network_module": module,
        "ss_network_dim": str(first.rank),
        "ss_network_alpha": str(first.alpha),
        "ss_base_model_version": "flux1",
    }


def write_flux_kohya_lora(weights: LoraWeights, path: Path, shapes: Mapping[str, int] | None = None) -> Path:
    """Write ``weights`` as kohya-ss sd-scripts' ``networks.lora_flux`` saves a FLUX.1 LoRA; return ``path``.

    Transformer keys use BFL's module names with ``_``: ``lora_unet_double_blocks_0_img_attn_qkv`` (one LoRA on
    the fused q/k/v: ``lora_down`` ``[rank, in]``, ``lora_up`` ``[3 * out, rank]``),
    ``lora_unet_double_blocks_0_txt_attn_proj``, ``lora_unet_single_blocks_0_linear1`` (fused q/k/v/mlp),
    ``lora_unet_single_blocks_0_linear2``, each with ``.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``
    (0-dim; scale ``alpha / rank``). CLIP-L is ``lora_te1_text_model_encoder_layers_0_self_attn_q_proj``.
    ``shapes`` is for partial fused groups (see :func:`fuse_flux_lora`).
    """
    path = Path(path)
    transformer, text = _transformer_and_text(weights)
    tensors: dict[str, torch.Tensor] = {}
    for bfl, layer in fuse_flux_lora(transformer, shapes).items():
        tensors.update(_kohya_tensors("lora_unet_" + bfl.replace(".", "_"), layer))
    for module, layer in text.items():
        tensors.update(_kohya_tensors("lora_te1_" + f"text_model.{module}".replace(".", "_"), layer))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path, metadata=_kohya_metadata(weights, "networks.lora_flux"))
    return path


def write_flux_kohya_diffusers_names_lora(weights: LoraWeights, path: Path) -> Path:
    """Write ``weights`` as a kohya-style LoRA on diffusers module names (what diffusers calls the "mixture"
    layout, e.g. from trainers that wrap diffusers' Flux with sd-scripts' LoRA network); return ``path``.

    Keys are ``lora_transformer_transformer_blocks_0_attn_to_q.lora_down.weight`` / ``.lora_up.weight`` /
    ``.alpha`` (no fusing) and ``lora_te1_text_model_encoder_layers_0_self_attn_q_proj...``. diffusers 0.42.1
    maps only block modules under ``attn`` (``to_q``, ``add_k_proj``, ``to_out.0``, ...) and the top-level
    linears; a block's ``proj_out``/``proj_mlp``/``ff`` lose their module name there.
    """
    path = Path(path)
    transformer, text = _transformer_and_text(weights)
    tensors: dict[str, torch.Tensor] = {}
    for module, layer in transformer.items():
        tensors.update(_kohya_tensors("lora_transformer_" + module.replace(".", "_"), layer))
    for module, layer in text.items():
        tensors.update(_kohya_tensors("lora_te1_" + f"text_model.{module}".replace(".", "_"), layer))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path, metadata=_kohya_metadata(weights, "networks.lora"))
    return path


def write_flux_bfl_lora(
    weights: LoraWeights, path: Path, peft_names: bool = False, shapes: Mapping[str, int] | None = None
) -> Path:
    """Write ``weights`` on BFL's module names with the ``diffusion_model.`` prefix; return ``path``.

    By default as ComfyUI saves LoRAs (its ``LoraSave`` node / ``comfy.lora`` key map):
    ``diffusion_model.double_blocks.0.img_attn.qkv.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``
    (fused linears as in :func:`write_flux_kohya_lora`) and CLIP-L as
    ``text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.lora_down.weight``;
    diffusers reads it through its kohya converter.
    With ``peft_names``: ``lora_A``/``lora_B`` instead of ``lora_down``/``lora_up``, no alpha (folded into
    ``lora_B``), transformer only, as BFL-layout trainers (e.g. ai-toolkit's ``diffusion_model.`` files, fal)
    write; diffusers 0.42.1's Flux loader has no converter for it (see the module docstring).
    """
    path = Path(path)
    transformer, text = _transformer_and_text(weights)
    tensors: dict[str, torch.Tensor] = {}
    for bfl, layer in fuse_flux_lora(transformer, shapes).items():
        name = f"diffusion_model.{bfl}"
        if peft_names:
            tensors[f"{name}.lora_A.weight"] = layer.down.contiguous()
            tensors[f"{name}.lora_B.weight"] = (layer.up * layer.scale).contiguous()
        else:
            tensors.update(_kohya_tensors(name, layer))
    if text and peft_names:
        raise ValueError("the lora_A/lora_B BFL layout carries no text encoder layers")
    for module, layer in text.items():
        tensors.update(_kohya_tensors(f"text_encoders.clip_l.transformer.text_model.{module}", layer))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path)
    return path


def write_flux_xlabs_lora(weights: LoraWeights, path: Path) -> Path:
    """Write ``weights`` as XLabs-AI's x-flux trainer saves LoRAs (attention-processor LoRAs); return ``path``.

    Keys are ``double_blocks.0.processor.qkv_lora1.down.weight`` / ``.up.weight`` (image q/k/v, fused:
    ``up`` ``[3 * out, rank]``), ``qkv_lora2`` (text q/k/v), ``proj_lora1`` / ``proj_lora2`` (image / text
    output projection), ``single_blocks.0.processor.qkv_lora`` (q/k/v, without the MLP) and ``proj_lora``
    (``linear2``). No alpha: ``alpha / rank`` is folded into ``up``. Transformer only; other modules raise.
    """
    path = Path(path)
    transformer, text = _transformer_and_text(weights)
    if text:
        raise ValueError("XLabs Flux LoRAs have no text encoder layers")
    groups: dict[str, list[tuple[str, LoraLayer]]] = {}
    for module, layer in transformer.items():
        kind, index, rest = _block(module)
        if (kind, rest) not in XLABS_MODULES:
            raise ValueError(f"XLabs LoRAs have no layer for {module!r}")
        groups.setdefault(f"{_BFL_BLOCK[kind]}.{index}.{XLABS_MODULES[(kind, rest)]}", []).append((module, layer))
    tensors: dict[str, torch.Tensor] = {}
    for name, parts in groups.items():
        kind, index, _ = _block(parts[0][0])
        order = [rest for (k, rest), xlabs in XLABS_MODULES.items() if k == kind and xlabs == name.split(".", 2)[2]]
        by_rest = {_block(module)[2]: layer for module, layer in parts}
        if set(by_rest) != set(order):
            raise ValueError(f"{name!r} needs all of {order}, got {sorted(by_rest)}")
        layers = [by_rest[rest] for rest in order]
        if any(not torch.equal(layer.down, layers[0].down) or layer.alpha != layers[0].alpha for layer in layers):
            raise ValueError(f"{order} of {name!r} need one shared down and alpha")
        tensors[f"{name}.down.weight"] = layers[0].down.contiguous()
        tensors[f"{name}.up.weight"] = torch.cat([layer.up * layer.scale for layer in layers], dim=0).contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path)
    return path


ATTENTION_ONLY_TARGETS = FLUX_DOUBLE_BLOCK_TARGETS + FLUX_SINGLE_BLOCK_TARGETS[:3]

FLUX_FORMATS = {
    # name: (writer, keyword arguments, transformer targets, with CLIP layers, a key the file must hold)
    "diffusers_alpha_in_metadata": (
        write_flux_diffusers_lora,
        {"alpha_in_metadata": True},
        FLUX_TARGETS,
        True,
        "transformer.transformer_blocks.0.attn.to_q.lora_A.weight",
    ),
    "kohya": (
        write_flux_kohya_lora,
        {},
        FLUX_KOHYA_READABLE_TARGETS,
        True,
        "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight",
    ),
    "comfyui": (
        write_flux_bfl_lora,
        {},
        FLUX_KOHYA_READABLE_TARGETS,
        True,
        "diffusion_model.double_blocks.0.img_attn.qkv.lora_down.weight",
    ),
    "kohya_diffusers_names": (
        write_flux_kohya_diffusers_names_lora,
        {},
        ATTENTION_ONLY_TARGETS,
        True,
        "lora_transformer_single_transformer_blocks_0_attn_to_q.alpha",
    ),
    "xlabs": (write_flux_xlabs_lora, {}, FLUX_TARGETS, False, "double_blocks.0.processor.qkv_lora1.down.weight"),
    "ai_toolkit": (
        write_flux_ai_toolkit_lora,
        {},
        FLUX_TARGETS,
        False,
        "transformer.single_transformer_blocks.1.attn.to_v.lora_B.weight",
    ),
}
"""Per format: (writer, its keyword arguments, transformer targets it can express, with CLIP layers, a key its
files hold)."""
