"""LyCORIS files written by the ``lycoris-lora`` library itself, and that library's own merge as the reference.

:func:`make_network` builds a lycoris-lora network (LoCon, LoHa, LoKr, full; DoRA with ``dora_wd``) on a
pipeline's UNet and text encoders with random weights; :func:`save_kohya` writes it as files from the
wild name their layers (``lora_unet_...``, ``lora_te_text_model_...``; SDXL: ``lora_te1_``/``lora_te2_``
and, with ``sgm``, the UNet in sd-scripts' SGM numbering); :func:`merge` merges it into the weights of
the pipeline it was built on with lycoris-lora's ``merge_to``. :func:`make_lycoris` wraps any module
(lycoris-lora's ``create_lycoris``, as SimpleTuner does for Flux's transformer) and :func:`save_lycoris`
writes that network's own names; :func:`bfl_flux` is a Flux transformer's linears in BFL's layout
(``double_blocks.0.img_attn.qkv``), the model sd-scripts trains Flux LyCORIS files on.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from lora_files import sgm_unet_module

SCALED_FIRST = ("lora_up.weight", "hada_w1_a", "lokr_w1", "lokr_w1_a", "weight")  # "weight": a full diff
"""Per lycoris module, a factor the update is linear in: scaled to set the update's size."""


def _preset(attention_only: bool) -> dict[str, Any]:
    unet_modules = ["Transformer2DModel"] if attention_only else ["Transformer2DModel", "ResnetBlock2D", "Downsample2D"]
    return {
        "enable_conv": not attention_only,
        "unet_target_module": unet_modules,
        "unet_target_name": [] if attention_only else ["conv_in", "time_embedding.linear_1"],
        "text_encoder_target_module": ["CLIPAttention", "CLIPMLP"],
        "text_encoder_target_name": [],
    }


def make_network(pipe: Any, algo: str, seed: int, attention_only: bool = False, relative_size: float = 0.3, **kwargs):
    """A lycoris-lora kohya network for ``pipe`` with seeded random weights: each layer's update has
    ``relative_size`` times the norm of the layer's weight; DoRA magnitudes are the weights' norms
    perturbed by 20%. ``kwargs`` go to ``lycoris.kohya.create_network`` (``dora_wd``, ``use_tucker``,
    ``train_norm``, ``decompose_both`` ...)."""
    from lycoris.config import PRESET
    from lycoris.kohya import create_network
    from lycoris.logging import logger

    logger.setLevel(logging.ERROR)
    PRESET["clora-test"] = _preset(attention_only)
    encoders = [pipe.text_encoder, pipe.text_encoder_2] if getattr(pipe, "text_encoder_2", None) else pipe.text_encoder
    # lycoris-lora 4.1.3's LoHa and LoKr merges multiply by alpha / rank twice (A1111 and ComfyUI once):
    # alpha = rank keeps them comparable; LoCon keeps alpha != rank so that alpha's handling shows
    alpha, conv_alpha = (2.0, 1.0) if algo == "locon" else (4.0, 2.0)
    kwargs = {"algo": algo, "conv_dim": 2, "conv_alpha": conv_alpha, "preset": "clora-test", **kwargs}
    network = create_network(1.0, 4, alpha, None, encoders, pipe.unet, **kwargs)
    randomize(network, seed, relative_size)
    return network


def randomize(network: Any, seed: int, relative_size: float = 0.3) -> None:
    """Seeded random weights for a lycoris-lora network, registered under their layer names (see
    :func:`make_network`)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lora in network.loras:
            network.add_module(lora.lora_name, lora)
            params = dict(lora.named_parameters())
            for name, param in params.items():
                noise = torch.randn(param.shape, generator=generator)
                if name == "dora_scale":
                    param.mul_(1 + 0.2 * noise)
                else:
                    param.copy_(noise * (0.1 if name in ("w_norm", "b_norm", "bias") else 1.0))
            first = next((params[name] for name in SCALED_FIRST if name in params), None)
            if first is not None:
                weight = lora.org_weight if hasattr(lora, "org_weight") else lora.org_module[0].weight
                delta = lora.get_diff_weight(multiplier=1)[0]
                first.mul_(relative_size * weight.norm() / delta.norm())
            if getattr(lora, "is_diff", False):  # a full diff: hold whole weights, as after training (apply_to)
                lora.weight.add_(lora.org_module[0].weight)
                if lora.bias is not None:
                    lora.bias.add_(lora.org_module[0].bias)
                lora.is_diff = False


def make_lycoris(
    module: torch.nn.Module,
    algo: str,
    seed: int,
    prefix: str,
    target_module: list[str],
    target_name: list[str] | None = None,
    **kwargs: Any,
) -> Any:
    """lycoris-lora's ``create_lycoris`` on ``module`` (rank 4, alpha 4: lycoris-lora's LoHa and LoKr
    merges apply alpha / rank twice) for the classes ``target_module`` and the module paths
    ``target_name``, its layers named ``<prefix>_<module path>``, with seeded random weights."""
    from lycoris import create_lycoris
    from lycoris.config import PRESET
    from lycoris.logging import logger

    logger.setLevel(logging.ERROR)
    PRESET["clora-test-wrapper"] = {  # every key: apply_preset leaves the class attributes it is not given
        "enable_conv": False,
        "target_module": target_module,
        "target_name": target_name or [],
        "module_algo_map": {},
        "name_algo_map": {},
        "lora_prefix": prefix,
        "use_fnmatch": False,
        "exclude_name": [],
    }
    network = create_lycoris(module, 1.0, 4, 4, algo=algo, preset="clora-test-wrapper", **kwargs)
    randomize(network, seed)
    return network


def save_lycoris(network: Any, path: Path) -> Path:
    """Write a :func:`make_lycoris` network under its own layer names."""
    from safetensors.torch import save_file

    tensors = {key: tensor.detach().to(torch.float32).contiguous() for key, tensor in network.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path


class DoubleStreamBlock(torch.nn.Module):
    """Named as BFL's class, which lycoris-lora targets."""


class SingleStreamBlock(torch.nn.Module):
    """Named as BFL's class, which lycoris-lora targets."""


def bfl_flux(bfl_state_dict: dict[str, torch.Tensor]) -> torch.nn.Module:
    """The linear layers of a BFL-layout Flux transformer state dict (``tiny_flux.diffusers_to_bfl_transformer``)
    as modules at their BFL paths, blocks as :class:`DoubleStreamBlock` / :class:`SingleStreamBlock`."""
    root = torch.nn.Module()
    for key, weight in bfl_state_dict.items():
        if not key.endswith(".weight") or weight.ndim != 2:
            continue
        path = key.removesuffix(".weight").split(".")
        parent = root
        for depth, part in enumerate(path[:-1]):
            if not hasattr(parent, part):
                block = {"double_blocks": DoubleStreamBlock, "single_blocks": SingleStreamBlock}.get(path[0])
                parent.add_module(part, block() if depth == 1 and block else torch.nn.Module())
            parent = getattr(parent, part)
        bias = bfl_state_dict.get(f"{key.removesuffix('.weight')}.bias")
        linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
        with torch.no_grad():
            linear.weight.copy_(weight)
            if bias is not None:
                linear.bias.copy_(bias)
        parent.add_module(path[-1], linear)
    return root


def save_kohya(network: Any, pipe: Any, path: Path, sgm: bool = False) -> Path:
    """Write the network as sd-scripts names its layers: text-encoder layers under ``text_model_``
    (transformers 5's CLIP has no such level; files from the wild do) and, with ``sgm``, the UNet's
    attention layers in SGM numbering (needs ``attention_only``)."""
    from safetensors.torch import save_file

    unet_paths = {f"lora_unet_{name.replace('.', '_')}": name for name, _ in pipe.unet.named_modules()}
    tensors = {}
    for key, tensor in network.state_dict().items():
        layer, kind = key.split(".", 1)
        if layer.startswith("lora_te"):
            prefix, rest = layer.split("_", 2)[:2], layer.split("_", 2)[2]
            layer = "_".join(prefix) + "_text_model_" + rest
        elif sgm:
            layer = "lora_unet_" + sgm_unet_module(unet_paths[layer]).replace(".", "_")
        tensors[f"{layer}.{kind}"] = tensor.detach().to(torch.float32).contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"ss_network_module": "lycoris.kohya"})
    return path


@torch.no_grad()
def merge(network: Any, multiplier: float = 1.0) -> None:
    """lycoris-lora's own merge of every layer into the weights of the pipeline the network was built on."""
    for lora in network.loras:
        lora.merge_to(multiplier)
