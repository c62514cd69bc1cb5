"""A tiny random FLUX.1-dev look-alike, saved in the hub's diffusers folder layout, and its BFL single file.

The transformer keeps Flux's layout (double-stream ``transformer_blocks``, single-stream
``single_transformer_blocks``, guidance embedding, 3-axis RoPE, 2x2 latent packing), so module names such
as ``transformer_blocks.0.attn.to_q`` or ``single_transformer_blocks.1.proj_mlp`` exist as in the real
model; only the widths and depths are tiny (:data:`TINY_TRANSFORMER_CONFIG`). The VAE has four levels like
Flux's (``vae_scale_factor`` 8) and Flux's ``scaling_factor``/``shift_factor`` but 4 latent channels
instead of 16, so the transformer's packed input has 4 x 2 x 2 = 16 channels (FLUX.1: 64).

Image size -> VAE latent -> packed token grid: 64 px -> 8 x 8 -> 4 x 4 = 16 image tokens;
128 px -> 16 x 16 -> 8 x 8 = 64 tokens. Height and width must be multiples of 16.

Text: CLIP-L's slot holds a tiny ``CLIPTextModel`` with the real SD 1.5 / FLUX CLIP tokenizer (77 tokens,
its pooled output feeds ``pooled_projection_dim``); T5-XXL's slot holds a tiny ``T5EncoderModel`` (v1.1
layout: gated-GELU, relative attention) with a sentencepiece-style ``T5TokenizerFast`` built offline by
:func:`build_t5_tokenizer`, whose hidden states feed ``joint_attention_dim``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from safetensors.torch import load_file, save_file
from tiny_sd import _tiny_clip_config
from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

from clora.demo.flux_model import FLUX_DEV_SCHEDULER_CONFIG, t5_encoder_config

CLIP_TOKENIZER_DIR = Path(__file__).parent / "fixtures" / "sd15_tokenizer"
"""The real CLIP ViT-L/14 tokenizer files (SD 1.5's; FLUX.1's ``tokenizer/`` is the same)."""

CLIP_HIDDEN_SIZE = 32
"""Hidden size of the tiny CLIP text encoder, so the transformer's ``pooled_projection_dim`` (FLUX.1: 768)."""

T5_D_MODEL = 48
"""``d_model`` of the tiny T5 encoder, so the transformer's ``joint_attention_dim`` (FLUX.1: 4096). It differs
from the CLIP width so that mixing up the two encoders' outputs fails with a shape error."""

T5_MAX_LENGTH = 512
"""The T5 tokenizer's ``model_max_length``: FluxPipeline's ``max_sequence_length`` is at most 512."""

FLUX_DEV_TRANSFORMER_CONFIG = {
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": True,
    "axes_dims_rope": (16, 56, 56),
}
"""FLUX.1-dev's ``transformer/config.json`` (``FluxTransformer2DModel(**FLUX_DEV_TRANSFORMER_CONFIG)`` builds the
12B model: 3072 wide; FLUX.1-schnell is the same with ``guidance_embeds`` False)."""

FLUX_VAE_SCALING_FACTOR = 0.3611
FLUX_VAE_SHIFT_FACTOR = 0.1159
"""FLUX.1's ``vae/config.json``: latents are ``(z - shift_factor) * scaling_factor``."""

TINY_TRANSFORMER_CONFIG = {
    "patch_size": 1,
    "in_channels": 16,  # 4 latent channels x 2 x 2 packing
    "num_layers": 2,
    "num_single_layers": 2,
    "attention_head_dim": 8,
    "num_attention_heads": 2,
    "joint_attention_dim": T5_D_MODEL,
    "pooled_projection_dim": CLIP_HIDDEN_SIZE,
    "guidance_embeds": True,
    "axes_dims_rope": (2, 2, 4),  # sums to attention_head_dim, all even
}
"""The tiny transformer: inner width 2 x 8 = 16, single-block MLP 64 (``mlp_ratio`` 4 as in FLUX.1)."""

VAE_BLOCK_OUT_CHANNELS = (8, 8, 8, 8)
"""Four levels as in FLUX.1's VAE (128, 256, 512, 512), so ``vae_scale_factor`` = 2 ** 3 = 8."""

_T5_COMMON_WORDS_TEXT = """
a an the of and or with in on at to from by for under over near behind beside next is are photo
photograph picture painting drawing portrait image style art sketch render illustration cat cats
dog dogs man woman person child girl boy people bird horse car house tree trees flower flowers
garden park street city beach forest mountain mountains river lake sea ocean sky sun moon cloud
clouds room table chair window door field grass snow rain water night day light red blue green
yellow black white orange purple pink brown gray grey golden big small little tall old young happy
cute beautiful dark bright soft sitting standing running wearing hat shirt dress toy ball sks zwx
ohwx
"""
T5_COMMON_WORDS = tuple(_T5_COMMON_WORDS_TEXT.split())
"""Words that the tiny T5 tokenizer keeps whole (one piece ``"▁word"`` each), like frequent words in T5's
real sentencepiece model. ``sks``/``zwx``/``ohwx`` are the usual LoRA trigger words."""

_T5_SUBWORD_PIECES_TEXT = (
    "er ing ed es re in an on at en or ar al le st th ch sh ly ion ous ness ▁c ▁co ▁cl ▁st ▁pr ▁re ▁un ▁de"
)
T5_SUBWORD_PIECES = tuple(_T5_SUBWORD_PIECES_TEXT.split())
"""A few sub-word pieces: words outside :data:`T5_COMMON_WORDS` split into several of these and letters."""


def _t5_vocab() -> list[tuple[str, float]]:
    """``(piece, log-probability)`` pairs in T5's order: ``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2, then pieces."""
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0)]
    seen = {piece for piece, _ in vocab}

    def add(piece: str, score: float) -> None:
        if piece not in seen:
            seen.add(piece)
            vocab.append((piece, score))

    for index, word in enumerate(T5_COMMON_WORDS):  # earlier words are more frequent
        add(f"▁{word}", -4.0 - index / 100)
    for piece in T5_SUBWORD_PIECES:
        add(piece, -7.0)
    letters = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    for char in letters + ".,;:!?'\"-()/&+":
        add(char, -10.0)
        add(f"▁{char}", -10.5)
    return vocab


def build_t5_tokenizer(max_length: int = T5_MAX_LENGTH) -> T5TokenizerFast:
    """A sentencepiece-style (Unigram, ``▁`` metaspace) T5 tokenizer built offline.

    Common prompt words (:data:`T5_COMMON_WORDS`) are one piece each; any other word splits into sub-word
    pieces and single characters (``"clora"`` -> ``▁cl``, ``o``, ``r``, ``a``). Like the real T5 tokenizer it
    appends ``</s>`` and pads with ``<pad>`` (id 0); it has no sentinel ``<extra_id_*>`` tokens. It saves as
    ``tokenizer.json`` + ``tokenizer_config.json`` and loads with ``T5TokenizerFast`` or ``AutoTokenizer``
    (transformers 5's ``T5TokenizerFast`` is ``T5Tokenizer``, the name ``model_index.json`` records).
    """
    return T5TokenizerFast(vocab=_t5_vocab(), extra_ids=0, model_max_length=max_length)


def _tiny_t5_encoder(vocab_size: int) -> T5EncoderModel:
    return T5EncoderModel(
        t5_encoder_config(vocab_size, d_model=T5_D_MODEL, d_kv=12, d_ff=64, num_layers=2, num_heads=4)
    )


def _tiny_vae() -> AutoencoderKL:
    """FLUX.1's VAE layout (four levels, no quant convs, mid-block attention) with tiny widths."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=VAE_BLOCK_OUT_CHANNELS,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=64,
        scaling_factor=FLUX_VAE_SCALING_FACTOR,
        shift_factor=FLUX_VAE_SHIFT_FACTOR,
        use_quant_conv=False,
        use_post_quant_conv=False,
        mid_block_add_attention=True,
        force_upcast=True,
    )


def build_tiny_flux(folder: Path, seed: int = 0, guidance_embeds: bool = True) -> Path:
    """Write a seeded random tiny FLUX.1 pipeline (diffusers folder layout) to ``folder``; return ``folder``.

    ``FluxPipeline.from_pretrained(folder)`` loads it offline. ``guidance_embeds`` True is FLUX.1-dev's
    layout (a guidance embedder, ``guidance_scale`` is an input of the transformer); False is
    FLUX.1-schnell's. Weights are PyTorch's default random init (Flux has no zero-initialised layers in
    diffusers, so the output depends on the text, the timestep and the guidance); the global torch RNG is
    left untouched.
    """
    folder = Path(folder)
    tokenizer_2 = build_t5_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = FluxTransformer2DModel(**{**TINY_TRANSFORMER_CONFIG, "guidance_embeds": guidance_embeds})
        text_encoder = CLIPTextModel(_tiny_clip_config(CLIP_HIDDEN_SIZE, layers=2, act="quick_gelu"))
        text_encoder_2 = _tiny_t5_encoder(len(tokenizer_2))
        vae = _tiny_vae()
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_DEV_SCHEDULER_CONFIG),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=CLIPTokenizer.from_pretrained(CLIP_TOKENIZER_DIR),
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
    pipe.save_pretrained(folder)
    return folder


# -- the original (BFL) single-file layout ---------------------------------------------------------------


def _swap_halves(weight: torch.Tensor) -> torch.Tensor:
    """BFL's final ``adaLN_modulation`` emits (shift, scale), diffusers' ``norm_out`` (scale, shift)."""
    first, second = weight.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def diffusers_to_bfl_transformer(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of diffusers' ``convert_flux_transformer_checkpoint_to_diffusers``: diffusers
    ``FluxTransformer2DModel`` keys to the original black-forest-labs ``flux1-dev.safetensors`` keys.

    Double blocks fuse ``to_q/to_k/to_v`` into ``img_attn.qkv`` and ``add_{q,k,v}_proj`` into
    ``txt_attn.qkv``; single blocks fuse ``to_q/to_k/to_v`` and ``proj_mlp`` into ``linear1``;
    ``norm_out.linear`` becomes ``final_layer.adaLN_modulation.1`` with its halves swapped.
    """
    sd = dict(state_dict)
    out: dict[str, torch.Tensor] = {}

    def move(bfl: str, diffusers: str) -> None:
        for kind in ("weight", "bias"):
            out[f"{bfl}.{kind}"] = sd.pop(f"{diffusers}.{kind}")

    def fuse(bfl: str, parts: list[str]) -> None:
        for kind in ("weight", "bias"):
            out[f"{bfl}.{kind}"] = torch.cat([sd.pop(f"{part}.{kind}") for part in parts], dim=0)

    for bfl, name in (
        ("time_in", "timestep_embedder"),
        ("vector_in", "text_embedder"),
        ("guidance_in", "guidance_embedder"),
    ):
        if f"time_text_embed.{name}.linear_1.weight" in sd:
            move(f"{bfl}.in_layer", f"time_text_embed.{name}.linear_1")
            move(f"{bfl}.out_layer", f"time_text_embed.{name}.linear_2")
    move("txt_in", "context_embedder")
    move("img_in", "x_embedder")
    double = sorted({int(key.split(".")[1]) for key in sd if key.startswith("transformer_blocks.")})
    for i in double:
        d, b = f"transformer_blocks.{i}", f"double_blocks.{i}"
        move(f"{b}.img_mod.lin", f"{d}.norm1.linear")
        move(f"{b}.txt_mod.lin", f"{d}.norm1_context.linear")
        fuse(f"{b}.img_attn.qkv", [f"{d}.attn.to_{x}" for x in "qkv"])
        fuse(f"{b}.txt_attn.qkv", [f"{d}.attn.add_{x}_proj" for x in "qkv"])
        out[f"{b}.img_attn.norm.query_norm.scale"] = sd.pop(f"{d}.attn.norm_q.weight")
        out[f"{b}.img_attn.norm.key_norm.scale"] = sd.pop(f"{d}.attn.norm_k.weight")
        out[f"{b}.txt_attn.norm.query_norm.scale"] = sd.pop(f"{d}.attn.norm_added_q.weight")
        out[f"{b}.txt_attn.norm.key_norm.scale"] = sd.pop(f"{d}.attn.norm_added_k.weight")
        move(f"{b}.img_mlp.0", f"{d}.ff.net.0.proj")
        move(f"{b}.img_mlp.2", f"{d}.ff.net.2")
        move(f"{b}.txt_mlp.0", f"{d}.ff_context.net.0.proj")
        move(f"{b}.txt_mlp.2", f"{d}.ff_context.net.2")
        move(f"{b}.img_attn.proj", f"{d}.attn.to_out.0")
        move(f"{b}.txt_attn.proj", f"{d}.attn.to_add_out")
    single = sorted({int(key.split(".")[1]) for key in sd if key.startswith("single_transformer_blocks.")})
    for i in single:
        s, b = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
        move(f"{b}.modulation.lin", f"{s}.norm.linear")
        fuse(f"{b}.linear1", [f"{s}.attn.to_q", f"{s}.attn.to_k", f"{s}.attn.to_v", f"{s}.proj_mlp"])
        out[f"{b}.norm.query_norm.scale"] = sd.pop(f"{s}.attn.norm_q.weight")
        out[f"{b}.norm.key_norm.scale"] = sd.pop(f"{s}.attn.norm_k.weight")
        move(f"{b}.linear2", f"{s}.proj_out")
    move("final_layer.linear", "proj_out")
    for kind in ("weight", "bias"):
        out[f"final_layer.adaLN_modulation.1.{kind}"] = _swap_halves(sd.pop(f"norm_out.linear.{kind}"))
    if sd:
        raise ValueError(f"no BFL name for {sorted(sd)}")
    return out


def write_bfl_single_file(folder: Path, path: Path) -> Path:
    """Write the transformer of the diffusers folder ``folder`` as ONE ``.safetensors`` with the original BFL
    key names (as ``flux1-dev.safetensors``: ``double_blocks.0.img_attn.qkv.weight``,
    ``single_blocks.0.linear1.weight``, ``img_in``, ``txt_in``, ``time_in.in_layer``, ``vector_in``,
    ``guidance_in``, ``final_layer.adaLN_modulation.1``, ...); return ``path``.

    ``FluxTransformer2DModel.from_single_file(path, config=str(folder), subfolder="transformer")`` reads this
    layout, but diffusers 0.42.1's converter splits ``single_blocks.N.linear1`` with FLUX.1's widths
    hard-coded (3 x 3072 + 12288 rows): for the tiny model it raises unless that split is given the tiny
    widths (``test_flux_fixtures`` does so); a 3072-wide transformer loads as it is.
    """
    path = Path(path)
    state_dict = load_file(Path(folder) / "transformer" / "diffusion_pytorch_model.safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in diffusers_to_bfl_transformer(state_dict).items()}, path)
    return path


class TorchWithFluxWidth:
    """``torch`` for diffusers' single-file module, except that ``torch.split`` with FLUX.1's hard-coded
    ``single_blocks.N.linear1`` sizes (3 x 3072 + 12288) splits by ``inner`` instead."""

    def __init__(self, inner: int) -> None:
        self._sizes = {(3072, 3072, 3072, 12288): (inner, inner, inner, 4 * inner)}

    def __getattr__(self, name: str):
        return getattr(torch, name)

    def split(self, tensor, sizes, dim=0):
        if isinstance(sizes, (tuple, list)):
            sizes = self._sizes.get(tuple(sizes), sizes)
        return torch.split(tensor, sizes, dim=dim)
