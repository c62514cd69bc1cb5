"""Recording the image-to-text attention of a diffusion transformer with joint attention (FLUX.1).

Flux has no cross-attention: in every block the image tokens' queries attend to the text tokens'
and the image tokens' keys at once (double-stream blocks project the two streams separately, then
attend jointly; single-stream blocks run one sequence, text first). CLoRA's maps are the image-query x
text-key part of that attention in the recorded blocks, averaged over heads, on the image token grid
(H/16), pooled 2x2 to H/32 (32x32 at 1024 px, the grid SD's maps have at its own size).

``softmax`` says how the probabilities are normalised: ``"text"`` over the text keys alone (each image
token's distribution over the words, as SD's cross-attention gives; needs only image x text logits),
``"joint"`` over all keys as the model computes them (each word's share of the token's whole
attention; needs the image x image logits too). Only the recorded blocks compute these explicitly;
their output, and every other block, keep the fused attention kernel.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F

from .attention import AttentionRecorder

SOFTMAX_MODES = ("text", "joint")


def _heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    return x.unflatten(-1, (-1, head_dim))  # (batch, sequence, heads, head_dim)


def image_text_probabilities(
    query: torch.Tensor, key: torch.Tensor, text_tokens: int, softmax: str = "text"
) -> torch.Tensor:
    """(batch, heads, image tokens, text tokens) attention probabilities of the image queries on the
    text keys, from a joint sequence [text, image] of ``query`` and ``key`` (batch, sequence, heads,
    head_dim), in float32."""
    scale = 1.0 / math.sqrt(query.shape[-1])
    image_queries = query[:, text_tokens:].float()
    logits = torch.einsum("bnhd,bthd->bhnt", image_queries, key[:, :text_tokens].float()) * scale
    if softmax == "text":
        return logits.softmax(dim=-1)
    image_logits = torch.einsum("bnhd,bmhd->bhnm", image_queries, key[:, text_tokens:].float()) * scale
    total = torch.logsumexp(torch.cat([logits, image_logits], dim=-1), dim=-1, keepdim=True)
    return (logits - total).exp()


class JointRecordingProcessor:
    """Flux attention as diffusers' ``FluxAttnProcessor`` computes it (projections with any LoRA
    layers inside them, RMS norms, rotary embeddings, fused scaled-dot-product attention), handing the
    image-query x text-key probabilities to a recorder on the way. ``text_tokens`` is the text
    sequence's length, which single-stream blocks cannot see."""

    def __init__(self, recorder: AttentionRecorder, text_tokens: int, softmax: str = "text") -> None:
        if softmax not in SOFTMAX_MODES:
            raise ValueError(f"softmax: expected one of {SOFTMAX_MODES}, got {softmax!r}")
        self.recorder, self.text_tokens, self.softmax = recorder, text_tokens, softmax

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        from diffusers.models.embeddings import apply_rotary_emb

        head_dim = attn.head_dim
        query = attn.norm_q(_heads(attn.to_q(hidden_states), head_dim))
        key = attn.norm_k(_heads(attn.to_k(hidden_states), head_dim))
        value = _heads(attn.to_v(hidden_states), head_dim)
        two_streams = encoder_hidden_states is not None and attn.added_kv_proj_dim is not None
        if two_streams:
            text_query = attn.norm_added_q(_heads(attn.add_q_proj(encoder_hidden_states), head_dim))
            text_key = attn.norm_added_k(_heads(attn.add_k_proj(encoder_hidden_states), head_dim))
            text_value = _heads(attn.add_v_proj(encoder_hidden_states), head_dim)
            query, key = torch.cat([text_query, query], dim=1), torch.cat([text_key, key], dim=1)
            value = torch.cat([text_value, value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        text_tokens = encoder_hidden_states.shape[1] if two_streams else self.text_tokens
        # recorded before the attention output: the last recorded block may stop the forward here
        self.recorder.record(image_text_probabilities(query, key, text_tokens, self.softmax))

        out = F.scaled_dot_product_attention(
            query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attn_mask=attention_mask
        )
        out = out.transpose(1, 2).flatten(2, 3).to(query.dtype)
        if not two_streams:
            return out
        text_out, image_out = out.split_with_sizes([text_tokens, out.shape[1] - text_tokens], dim=1)
        image_out = attn.to_out[1](attn.to_out[0](image_out.contiguous()))
        return image_out, attn.to_add_out(text_out.contiguous())


def attention_blocks(transformer: torch.nn.Module, names: Sequence[str]) -> list[torch.nn.Module]:
    """The attention modules of the named blocks (``transformer_blocks.18``, ``single_transformer_blocks.0``)."""
    modules = dict(transformer.named_modules())
    missing = [name for name in names if f"{name}.attn" not in modules]
    if missing:
        raise ValueError(f"this transformer has no block {missing[0]!r}")
    return [modules[f"{name}.attn"] for name in names]


@contextlib.contextmanager
def recording_joint_attention(
    transformer: torch.nn.Module,
    blocks: Sequence[str],
    text_tokens: int,
    token_grid: tuple[int, int],
    pool: int = 1,
    softmax: str = "text",
) -> Iterator[AttentionRecorder]:
    """Record the named blocks' image-to-text attention for the duration of the block; maps come out
    on ``token_grid`` (the packed latent's height and width) averaged over ``pool`` x ``pool`` tokens."""
    modules = attention_blocks(transformer, blocks)
    recorder = AttentionRecorder(len(modules), pool=(*token_grid, pool))
    original = [module.processor for module in modules]
    for module in modules:
        module.set_processor(JointRecordingProcessor(recorder, text_tokens, softmax))
    try:
        yield recorder
    finally:
        for module, processor in zip(modules, original):
            module.set_processor(processor)
