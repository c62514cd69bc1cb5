"""Architecture of the embedded demo model, and an attention recorder used by training and
by the localisation metric.

Base model (a standard diffusers StableDiffusionPipeline folder):

* ``vae``: AutoencoderKL, 2x down-sampling, 4 latent channels (32x32 image -> 16x16 latent).
* ``text_encoder``: CLIPTextModel, 1 layer, 64 wide, 77 positions, small BPE vocabulary.
* ``unet``: UNet2DConditionModel, 2 levels (32, 64 channels) at 16x16 and 8x8, one layer per
  block, cross-attention dim 64.  The 8x8 level (down_blocks.1, up_blocks.0) is the coarsest
  down/up level with cross-attention, hence the level CLoRA records; the localisation loss of
  training acts there (and, weaker, at 16x16).
"""

from __future__ import annotations

import torch

LATENT_SCALE = 2  # image side / latent side


def make_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=32,
        mid_block_add_attention=False,
    )


def make_text_encoder(vocab_size: int, bos: int, eos: int, layers: int = 1):
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=layers,
        num_attention_heads=2,
        max_position_embeddings=77,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=eos,
        hidden_act="quick_gelu",
        projection_dim=64,
    )
    return CLIPTextModel(cfg)


def make_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        cross_attention_dim=64,
        attention_head_dim=2,
        norm_num_groups=8,
    )


def make_scheduler_config():
    return {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "clip_sample": False,
        "set_alpha_to_one": False,
        "steps_offset": 1,
        "prediction_type": "epsilon",
    }


# ----------------------------------------------------------------------------- attention

RECORDED_PREFIXES = ("down_blocks.1.", "up_blocks.0.")  # the 8x8 level
FINE_PREFIXES = ("down_blocks.0.", "up_blocks.1.")  # the 16x16 level


class AttnStore:
    """Collects cross-attention probabilities (batch*heads, HW, tokens) per layer name."""

    def __init__(self):
        self.active = True
        self.maps: dict[str, list[torch.Tensor]] = {}
        self.heads: dict[str, int] = {}

    def reset(self):
        self.maps = {}

    def add(self, name, probs, heads):
        self.maps.setdefault(name, []).append(probs)
        self.heads[name] = heads

    def level(self, prefixes, index: int = -1) -> torch.Tensor | None:
        """Mean over the layers whose name starts with one of ``prefixes`` and over heads:
        (batch, HW, tokens). ``index`` picks which call of each layer (last by default)."""
        out = []
        for name, lst in self.maps.items():
            if name.startswith(prefixes):
                p = lst[index]
                h = self.heads[name]
                out.append(p.reshape(-1, h, p.shape[1], p.shape[2]).mean(1))
        if not out:
            return None
        return torch.stack(out).mean(0)


class RecordAttnProcessor:
    """Plain (explicit softmax) attention that hands its probabilities to an AttnStore."""

    def __init__(self, store: AttnStore, name: str):
        self.store = store
        self.name = name

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs
    ):
        residual = hidden_states
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        q = attn.to_q(hidden_states)
        ehs = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        k = attn.to_k(ehs)
        v = attn.to_v(ehs)
        q = attn.head_to_batch_dim(q)
        k = attn.head_to_batch_dim(k)
        v = attn.head_to_batch_dim(v)
        probs = attn.get_attention_scores(q, k, attention_mask)
        if self.store.active:
            self.store.add(self.name, probs, attn.heads)
        out = torch.bmm(probs, v)
        out = attn.batch_to_head_dim(out)
        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def install_recorder(unet, store: AttnStore, prefixes=RECORDED_PREFIXES + FINE_PREFIXES):
    """Record the cross-attention (attn2) layers under ``prefixes``; others keep their processor."""
    procs = {}
    for name, proc in unet.attn_processors.items():
        layer = name[: -len(".processor")]
        if layer.endswith("attn2") and layer.startswith(prefixes):
            procs[name] = RecordAttnProcessor(store, layer)
        else:
            procs[name] = proc
    unet.set_attn_processor(procs)
    return store


def localisation_loss(
    A: torch.Tensor, masks: torch.Tensor, tok: torch.Tensor, valid: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """Cross-entropy between each object token's attention map (normalised over pixels) and its
    object's mask (normalised to sum 1): -sum_p m_p log q_p.  Minimal when the token's attention
    is spread evenly over its own object and is zero elsewhere, so the map both stays on the
    object (localisation) and covers all of it (CLoRA cuts its masks from these maps).

    A: (B, HW, T) attention probabilities; masks: (B, K, HW) soft object masks at that
    resolution; tok: (B, K, J) token positions per object (J words), valid: (B, K, J) bool.
    Returns per-sample loss (B,) (mean over valid tokens; 0 where none)."""
    B, HW, _T = A.shape
    K, J = tok.shape[1], tok.shape[2]
    idx = tok.clamp(min=0).reshape(B, 1, K * J).expand(B, HW, K * J)
    a = torch.gather(A, 2, idx).reshape(B, HW, K, J).permute(0, 2, 3, 1)  # B,K,J,HW
    q = a / (a.sum(-1, keepdim=True) + eps)
    m = masks / masks.sum(-1, keepdim=True).clamp(min=eps)
    ce = -(m[:, :, None, :] * torch.log(q + 1e-6)).sum(-1)  # B,K,J
    v = valid.float()
    return (ce * v).sum((1, 2)) / v.sum((1, 2)).clamp(min=1)
