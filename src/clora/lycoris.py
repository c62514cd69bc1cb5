"""LyCORIS layer formats: which keys a layer of a file has, and the weight update they stand for.

A kohya-named file groups its tensors by layer (``lora_unet_<layer>.<kind>``). This module reads one
layer's tensors into a :class:`LayerUpdate` (pure functions over tensors, no model) in the formats
A1111, Forge and ComfyUI apply:

- LoRA / LoCon: ``lora_down``, ``lora_up`` (linear, 1x1 or kxk conv), optional Tucker ``lora_mid``;
- LoHa: ``hada_w1_a/b``, ``hada_w2_a/b``, optional Tucker ``hada_t1/t2`` (Hadamard product of two low-rank pairs);
- LoKr: ``lokr_w1`` or ``lokr_w1_a/b``, ``lokr_w2`` or ``lokr_w2_a/b``, optional ``lokr_t2`` (Kronecker product);
- full: ``diff`` (and ``diff_b`` for the bias); norm layers: ``w_norm`` / ``b_norm``;

with ``alpha`` (scale ``alpha / rank``; none for full and norm diffs) and DoRA's ``dora_scale``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

LOW_RANK_KINDS = ("lora_down.weight", "lora_up.weight", "lora_mid.weight")
LOHA_KINDS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR_KINDS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
FULL_KINDS = ("diff", "diff_b")
NORM_KINDS = ("w_norm", "b_norm")
SHARED_KINDS = ("alpha", "dora_scale")
KNOWN_KINDS = frozenset(LOW_RANK_KINDS + LOHA_KINDS + LOKR_KINDS + FULL_KINDS + NORM_KINDS + SHARED_KINDS)
PLAIN_LORA_KINDS = frozenset(("lora_down.weight", "lora_up.weight", "alpha"))
"""The kinds of a plain kohya LoRA, which diffusers' own loader reads."""


@dataclass(frozen=True)
class LayerUpdate:
    """One layer's update at weight 1, kept as the file's factors: the dense ``delta`` is built when
    it is used (once per composition), not when the file is read."""

    format: str  # "lora" | "loha" | "lokr" | "full" | "norm"
    factors: Mapping[str, torch.Tensor]
    scale: float = 1.0  # alpha / rank

    def delta(self, shape: torch.Size) -> torch.Tensor | None:
        """The weight's update (float32, ``shape``), before DoRA; None for a bias-only update."""
        f = {kind: tensor.float() for kind, tensor in self.factors.items()}
        if self.format == "lora":
            delta = low_rank_delta(f["lora_up.weight"], f["lora_down.weight"], f.get("lora_mid.weight"))
        elif self.format == "loha":
            w1, w2 = (f["hada_w1_a"], f["hada_w1_b"]), (f["hada_w2_a"], f["hada_w2_b"])
            delta = loha_delta(*w1, *w2, f.get("hada_t1"), f.get("hada_t2"))
        elif self.format == "lokr":
            w1 = lokr_half(f.get("lokr_w1"), f.get("lokr_w1_a"), f.get("lokr_w1_b"))
            w2 = lokr_half(f.get("lokr_w2"), f.get("lokr_w2_a"), f.get("lokr_w2_b"), f.get("lokr_t2"))
            delta = lokr_delta(w1, w2)
        else:
            delta = f.get("diff" if self.format == "full" else "w_norm")
        if delta is None:
            return None
        if delta.numel() != shape.numel():
            raise ValueError(
                f"its {self.format} update has shape {tuple(delta.shape)}, the layer's weight {tuple(shape)}"
            )
        return delta.reshape(shape) * self.scale if self.scale != 1 else delta.reshape(shape)

    @property
    def bias_delta(self) -> torch.Tensor | None:
        bias = self.factors.get("diff_b" if self.format == "full" else "b_norm")
        return None if bias is None else bias.float()

    @property
    def dora_scale(self) -> torch.Tensor | None:
        scale = self.factors.get("dora_scale")
        return None if scale is None else scale.float()


def split_key(key: str) -> tuple[str, str]:
    """``"lora_unet_x_y.lora_up.weight"`` -> ``("lora_unet_x_y", "lora_up.weight")`` (kohya layer names have no dots)."""
    layer, _, kind = key.partition(".")
    return layer, kind


def is_lycoris(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """Whether a file needs more than diffusers' kohya LoRA loader: any key kind beyond
    ``lora_down``/``lora_up``/``alpha``, or a LoRA of a convolution (LoCon)."""
    for key, tensor in state_dict.items():
        kind = split_key(key)[1]
        if kind not in PLAIN_LORA_KINDS or (kind == "lora_down.weight" and tensor.ndim == 4):
            return True
    return False


def tucker(core: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """A Tucker-factored kernel: ``core`` (r, r, k, k), ``up`` (r, out), ``down`` (r, in) -> (out, in, k, k)."""
    return torch.einsum("i j ..., j r, i p -> p r ...", core, down, up)


def low_rank_delta(up: torch.Tensor, down: torch.Tensor, mid: torch.Tensor | None = None) -> torch.Tensor:
    """LoRA/LoCon: ``up @ down`` (or through the Tucker ``mid``), flattened to (out, in * k * k)."""
    if mid is not None:
        return tucker(mid, up.flatten(1).T, down.flatten(1)).flatten(1)
    return up.flatten(1) @ down.flatten(1)


def loha_delta(
    w1_a: torch.Tensor,
    w1_b: torch.Tensor,
    w2_a: torch.Tensor,
    w2_b: torch.Tensor,
    t1: torch.Tensor | None = None,
    t2: torch.Tensor | None = None,
) -> torch.Tensor:
    """LoHa: the Hadamard product ``(w1_a @ w1_b) * (w2_a @ w2_b)``; with Tucker cores ``t1``/``t2`` the
    ``_a`` factors are (r, out) and the result keeps the kernel's (k, k)."""
    if t1 is not None and t2 is not None:
        return tucker(t1, w1_a, w1_b) * tucker(t2, w2_a, w2_b)
    return (w1_a @ w1_b) * (w2_a @ w2_b)


def lokr_delta(w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """LoKr: ``kron(w1, w2)``; a 2-D ``w1`` with a conv ``w2`` (c, d, k, k) spreads over the kernel."""
    while w1.ndim < w2.ndim:
        w1 = w1.unsqueeze(-1)
    return torch.kron(w1, w2.contiguous())


def lokr_half(
    full: torch.Tensor | None, a: torch.Tensor | None, b: torch.Tensor | None, core: torch.Tensor | None = None
) -> torch.Tensor:
    """One Kronecker factor: stored whole, as ``a @ b``, or Tucker-factored (``core``, ``a`` (r, out), ``b`` (r, in))."""
    if full is not None:
        return full
    if core is not None:
        return tucker(core, a, b)
    rank, *rest = b.shape
    return (a @ b.reshape(rank, -1)).reshape(a.shape[0], *rest)


def dora_delta(weight: torch.Tensor, delta: torch.Tensor, dora_scale: torch.Tensor) -> torch.Tensor:
    """DoRA as A1111 and ComfyUI merge it: the updated weight ``W + dW`` rescaled to the stored
    magnitude, minus ``W``. The norm runs per output channel when ``dora_scale`` has one entry per
    output channel (lycoris-lora's default), else per input channel (the original DoRA layout)."""
    merged = weight.float() + delta.float()
    scale = dora_scale.float()
    per_output = scale.shape[0] == merged.shape[0] and (scale.ndim == 1 or scale.shape[1] == 1)
    if per_output:  # (out, 1, ...); the input-channel layout is (1, in, ...)
        norm = merged.reshape(merged.shape[0], -1).norm(dim=1).reshape(-1, *[1] * (merged.ndim - 1))
    else:
        norm = merged.transpose(0, 1).reshape(merged.shape[1], -1).norm(dim=1)
        norm = norm.reshape(merged.shape[1], *[1] * (merged.ndim - 1)).transpose(0, 1)
    norm = norm + torch.finfo(torch.float32).eps
    return merged * (scale.reshape(norm.shape) / norm) - weight.float()


def _rank_scale(alpha: torch.Tensor | None, rank: int | None) -> float:
    return 1.0 if alpha is None or rank is None else float(alpha) / rank


FORMAT_KINDS = {
    "lora": (*LOW_RANK_KINDS, *SHARED_KINDS),
    "loha": (*LOHA_KINDS, *SHARED_KINDS),
    "lokr": (*LOKR_KINDS, *SHARED_KINDS),
    "full": FULL_KINDS,
    "norm": NORM_KINDS,
}


def layer_format(kinds: set[str]) -> str | None:
    """The format a layer's key kinds are complete for, or None."""
    if {"lora_down.weight", "lora_up.weight"} <= kinds:
        return "lora"
    if set(LOHA_KINDS[:4]) <= kinds:
        return "loha"
    if kinds & {"lokr_w1", "lokr_w1_a"} and kinds & {"lokr_w2", "lokr_w2_a"}:
        return "lokr"
    if kinds & set(FULL_KINDS):
        return "full"
    if kinds & set(NORM_KINDS):
        return "norm"
    return None


def read_layer(tensors: Mapping[str, torch.Tensor]) -> tuple[LayerUpdate | None, set[str]]:
    """One layer's tensors as an update, and the kinds it reads; kinds left over are keys that this
    layer's format does not read (an incomplete or unknown layer reads none)."""
    fmt = layer_format(set(tensors))
    if fmt is None:
        return None, set()
    used = set(FORMAT_KINDS[fmt]) & set(tensors)
    factors = {kind: tensors[kind] for kind in used if kind != "alpha"}
    if fmt == "lora":
        rank = tensors["lora_down.weight"].shape[0]
    elif fmt == "loha":
        rank = tensors["hada_w1_b"].shape[0]
    elif fmt == "lokr":  # alpha / rank only where a half is factored (A1111: scale 1 for two whole halves)
        factored = tensors.get("lokr_w1_b", tensors.get("lokr_w2_b"))
        rank = None if factored is None else factored.shape[0]
    else:
        rank = None
    return LayerUpdate(fmt, factors, _rank_scale(tensors.get("alpha"), rank)), used
