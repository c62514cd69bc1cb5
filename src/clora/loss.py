"""The contrastive (InfoNCE / NT-Xent) loss over cross-attention maps, as pure tensor functions."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def minmax_normalize(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Scale each row of ``x`` to [0, 1]. ``eps=0`` divides by (max - min) alone, as the authors do
    (a constant map then gives NaN)."""
    lo = x.min(dim=-1, keepdim=True).values
    hi = x.max(dim=-1, keepdim=True).values
    return (x - lo) / (hi - lo + eps)


def nt_xent_loss(vectors: torch.Tensor, labels: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """NT-Xent with cosine similarity, averaged over all ordered positive pairs.

    For an anchor a and positive p (same label, a != p):
    ``-log(exp(s_ap/t) / (exp(s_ap/t) + sum_n exp(s_an/t)))`` where n runs over the vectors with
    another label. Matches ``pytorch_metric_learning.losses.NTXentLoss(temperature)``; returns 0
    (still attached to the graph) when there is no positive pair or no negative.
    """
    sim = F.normalize(vectors, dim=-1) @ F.normalize(vectors, dim=-1).T / temperature
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=vectors.device)
    positive = same & ~eye
    negative = ~same
    if not positive.any() or not negative.any():
        return vectors.sum() * 0.0
    # log(exp(s_ap) + sum_n exp(s_an)) = logaddexp(s_ap, logsumexp_n s_an), computed stably
    neg_lse = torch.logsumexp(sim.masked_fill(~negative, float("-inf")), dim=1, keepdim=True)
    per_pair = torch.logaddexp(sim, neg_lse) - sim
    return per_pair[positive].mean()


def concept_vectors(
    maps: torch.Tensor,
    concept_tokens: Sequence[Sequence[Sequence[int]]],
    eps: float = 1e-8,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flattened, min-max normalised token maps with their concept labels.

    ``maps`` is (prompts, h, w, tokens); ``concept_tokens[c][i]`` are concept c's positions in
    prompt i. One vector per (concept, prompt, position), labelled c.
    """
    vectors, labels = [], []
    flat = maps.flatten(1, 2)  # (prompts, h*w, tokens)
    for c, per_prompt in enumerate(concept_tokens):
        for i, positions in enumerate(per_prompt):
            for k in positions:
                vectors.append(flat[i, :, k])
                labels.append(c)
    stacked = torch.stack(vectors)
    return minmax_normalize(stacked, eps), torch.tensor(labels, device=maps.device)


def contrastive_loss(
    maps: torch.Tensor,
    concept_tokens: Sequence[Sequence[Sequence[int]]],
    temperature: float = 0.5,
    eps: float = 1e-8,
) -> torch.Tensor:
    """CLoRA's loss: each concept's maps across all prompts attract, other concepts' maps repel."""
    vectors, labels = concept_vectors(maps.float(), concept_tokens, eps)
    return nt_xent_loss(vectors, labels, temperature)
