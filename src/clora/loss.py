"""The contrastive (InfoNCE / NT-Xent) loss over cross-attention maps, as pure tensor functions.

Every function takes maps with any leading dimensions (several images at once: one loss per image)
and decides nothing from device values, so the denoising loop never waits for the device here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Union

import torch
import torch.nn.functional as F


def minmax_normalize(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Scale each row of ``x`` to [0, 1]. ``eps=0`` divides by (max - min) alone, as the authors do
    (a constant map then gives NaN)."""
    lo = x.amin(dim=-1, keepdim=True)
    hi = x.amax(dim=-1, keepdim=True)
    return (x - lo) / (hi - lo + eps)


def nt_xent_loss(vectors: torch.Tensor, labels: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """NT-Xent with cosine similarity, averaged over all ordered positive pairs.

    For an anchor a and positive p (same label, a != p):
    ``-log(exp(s_ap/t) / (exp(s_ap/t) + sum_n exp(s_an/t)))`` where n runs over the vectors with
    another label. Matches ``pytorch_metric_learning.losses.NTXentLoss(temperature)``; 0 (still
    attached to the graph) when there is no positive pair or no negative. ``vectors`` is
    (..., V, D), ``labels`` (V,); the result has the leading shape of ``vectors``.
    """
    unit = F.normalize(vectors, dim=-1)
    sim = unit @ unit.transpose(-1, -2) / temperature
    same = labels[:, None] == labels[None, :]
    positive = same & ~torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    # log(exp(s_ap) + sum_n exp(s_an)) = logaddexp(s_ap, logsumexp_n s_an), computed stably; the
    # masked entries get the dtype's lowest finite value rather than -inf, so a row without any
    # negative contributes 0 with a zero (not NaN) gradient
    neg_lse = torch.logsumexp(sim.masked_fill(same, torch.finfo(sim.dtype).min), dim=-1, keepdim=True)
    per_pair = torch.logaddexp(sim, neg_lse) - sim
    has_negative = (~same).any(dim=-1, keepdim=True)
    weights = (positive & has_negative).to(sim.dtype)  # pairs whose anchor has no negative count as 0
    pairs = positive.sum().clamp_min(1).to(sim.dtype)  # pml averages over every positive pair
    return (per_pair * weights).sum(dim=(-1, -2)) / pairs


@dataclass(frozen=True)
class ConceptIndex:
    """Which token maps the loss compares: one entry per (concept, prompt, token position), as
    device tensors built once per composition, so a loss does not copy them to the device."""

    prompts: torch.Tensor  # (V,) prompt index of each vector
    tokens: torch.Tensor  # (V,) token position
    labels: torch.Tensor  # (V,) concept

    @classmethod
    def build(cls, concept_tokens: Sequence[Sequence[Sequence[int]]], device: torch.device | str) -> ConceptIndex:
        """``concept_tokens[c][i]`` are concept c's positions in prompt i."""
        rows = [(i, k, c) for c, per_prompt in enumerate(concept_tokens) for i, ks in enumerate(per_prompt) for k in ks]
        prompts, tokens, labels = (torch.tensor(column, dtype=torch.long, device=device) for column in zip(*rows))
        return cls(prompts, tokens, labels)


ConceptTokens = Union[ConceptIndex, Sequence[Sequence[Sequence[int]]]]


def concept_vectors(
    maps: torch.Tensor, concept_tokens: ConceptTokens, eps: float = 1e-8
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flattened, min-max normalised token maps with their concept labels.

    ``maps`` is (..., prompts, h, w, tokens); ``concept_tokens`` a ``ConceptIndex`` or the nested
    positions ``concept_tokens[c][i]`` (concept c's positions in prompt i). One vector per
    (concept, prompt, position), labelled c: (..., V, h*w) and (V,).
    """
    index = (
        concept_tokens if isinstance(concept_tokens, ConceptIndex) else ConceptIndex.build(concept_tokens, maps.device)
    )
    per_token = maps.flatten(-3, -2).transpose(-1, -2)  # (..., prompts, tokens, h*w)
    vectors = per_token[..., index.prompts, index.tokens, :]
    return minmax_normalize(vectors, eps), index.labels


def contrastive_loss(
    maps: torch.Tensor, concept_tokens: ConceptTokens, temperature: float = 0.5, eps: float = 1e-8
) -> torch.Tensor:
    """CLoRA's loss: each concept's maps across all prompts attract, other concepts' maps repel.
    One value per image: ``maps`` (prompts, h, w, tokens) gives a scalar, (images, prompts, ...) a
    vector of one loss per image, each from that image's maps alone."""
    vectors, labels = concept_vectors(maps.float(), concept_tokens, eps)
    return nt_xent_loss(vectors, labels, temperature)
