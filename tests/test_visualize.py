"""The maps picture: masks on a fixed 0..1 scale, attention maps labelled with their scale."""

import numpy as np
import torch
from PIL import Image

from clora import plan_tokens, spec_from_dict
from clora.output import CLoRAOutput
from clora.visualize import GAP, LABEL_HEIGHT, attention_label, render_maps

TILE = 96


def _output(sd15_tokenizer, attention_scale=1.0, masks=None):
    """A two-concept result on a 64x64 image: 2x2 attention maps, 8x8 masks."""
    spec = spec_from_dict(
        {
            "prompt": "a cat and a dog",
            "concepts": [{"lora": "cat.safetensors", "phrase": "cat"}, {"lora": "dog.safetensors", "phrase": "dog"}],
        }
    )
    plan = plan_tokens(sd15_tokenizer, spec)
    attention = torch.zeros(3, 2, 2, 77)
    attention[1, :, :, 2] = torch.tensor([[0.1, 0.2], [0.3, 0.4]]) * attention_scale  # "cat" in prompt 1
    attention[2, :, :, 5] = torch.tensor([[0.4, 0.3], [0.2, 0.1]]) * attention_scale  # "dog" in prompt 2
    if masks is None:
        masks = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(0)).round()
    image = Image.new("RGB", (64, 64), (120, 80, 40))
    return CLoRAOutput(images=[image], spec=spec, plan=plan, attention_maps=[[attention]], masks=[[masks]])


def _tile(picture, column, row, label=False):
    """The pixels of one tile (its label strip or its picture) of ``render_maps``' grid."""
    x, y = column * (TILE + GAP), row * (TILE + LABEL_HEIGHT)
    box = (x, y, x + TILE, y + LABEL_HEIGHT) if label else (x, y + LABEL_HEIGHT, x + TILE, y + LABEL_HEIGHT + TILE)
    return np.asarray(picture.crop(box))


def test_a_full_mask_and_an_empty_mask_look_different(sd15_tokenizer):
    masks = torch.stack([torch.zeros(8, 8), torch.ones(8, 8), torch.zeros(8, 8)])  # cat: everywhere, dog: nowhere
    picture = render_maps(_output(sd15_tokenizer, masks=masks), tile=TILE)
    full, empty, background = _tile(picture, 1, 1), _tile(picture, 2, 1), _tile(picture, 0, 1)
    assert not np.array_equal(full, empty)
    assert np.array_equal(empty, background)  # both all zero: the same colour
    # on a fixed scale the full mask is the warm end of the colour map, the empty one the cold end
    assert full[..., 0].mean() > 200 and empty[..., 0].mean() < 50 and empty[..., 2].mean() > full[..., 2].mean()


def test_an_attention_tile_shows_its_scale(sd15_tokenizer):
    weak = render_maps(_output(sd15_tokenizer, attention_scale=0.5), tile=TILE)
    strong = render_maps(_output(sd15_tokenizer, attention_scale=1.0), tile=TILE)
    # the colours run from 0 to each map's own maximum, so the two maps' pictures look alike ...
    assert np.array_equal(_tile(weak, 1, 0), _tile(strong, 1, 0))
    # ... and the label says which scale they are on
    assert not np.array_equal(_tile(weak, 1, 0, label=True), _tile(strong, 1, 0, label=True))
    assert attention_label("cat", 0.2) == "cat: attention 0..0.2"
    assert "0.000123" in attention_label("dog", 0.000123)
