import torch

from clora.masks import concept_masks, dilate, erode, fuse_noise, fusion_weights, threshold_mask


def _maps_with_blobs(h=6, w=8):
    maps = torch.zeros(3, h, w, 77)
    maps[1, 1:3, 1:3, 4] = 1.0  # prompt 1, token 4: top-left blob
    maps[1, 0, 0, 4] = 0.2  # below threshold
    maps[2, 3:5, 5:7, 7] = 0.5  # prompt 2, token 7: bottom-right blob
    maps[2, 0, 7, 8] = 0.9  # prompt 2, token 8: a single pixel
    return maps


def test_threshold_is_relative_to_each_maps_maximum_and_tokens_union():
    maps = _maps_with_blobs()
    single = threshold_mask(maps[2].permute(2, 0, 1)[[7]], 0.3)
    assert single.sum() == 4
    union = threshold_mask(maps[2].permute(2, 0, 1)[[7, 8]], 0.3)
    assert union.sum() == 5 and union[0, 7] == 1


def test_background_fills_what_no_concept_covers_and_weights_sum_to_one():
    masks = concept_masks(_maps_with_blobs(), [[], [4], [7, 8]], alpha=0.3)
    assert masks.shape == (3, 6, 8)
    assert masks[1].sum() == 4 and masks[1, 0, 0] == 0
    covered = masks[1:].amax(0)
    assert torch.equal(masks[0], 1 - covered)
    weights = fusion_weights(masks)
    assert torch.allclose(weights.sum(0), torch.ones(6, 8))


def test_overlapping_masks_share_the_pixel():
    maps = torch.zeros(3, 2, 2, 77)
    maps[1, :, :, 1] = 1
    maps[2, :, :, 1] = 1
    weights = fusion_weights(concept_masks(maps, [[], [1], [1]], 0.5))
    assert torch.allclose(weights[1:], torch.full((2, 2, 2), 0.5))
    assert weights[0].sum() == 0


def test_morphology_with_a_3x3_kernel():
    mask = torch.zeros(5, 5)
    mask[2, 2] = 1
    assert dilate(mask).sum() == 9
    assert erode(dilate(mask)).sum() == 1
    square = torch.zeros(6, 6)
    square[1:5, 1:5] = 1
    square[0, 0] = 1  # speck: removed by open
    maps = torch.zeros(2, 6, 6, 77)
    maps[1, :, :, 3] = square
    opened = concept_masks(maps, [[], [3]], 0.5, ["open"])
    assert opened[1, 0, 0] == 0 and opened[1, 1:5, 1:5].all()
    holey = square.clone()
    holey[2, 2] = 0
    maps[1, :, :, 3] = holey
    closed = concept_masks(maps, [[], [3]], 0.5, ["close"])
    assert closed[1, 2, 2] == 1


def test_masks_resize_nearest_to_the_latent_without_transposing():
    maps = torch.zeros(2, 2, 4, 77)  # h=2, w=4
    maps[1, 0, 3, 5] = 1  # top-right
    masks = concept_masks(maps, [[], [5]], 0.5, size=(8, 16))
    assert masks.shape == (2, 8, 16)
    assert masks[1, :4, 12:].all() and masks[1].sum() == 4 * 4


def test_fusion_is_the_masked_average_then_guidance():
    uncond = torch.stack([torch.full((4, 2, 2), v) for v in (0.0, 1.0, 2.0)])
    text = uncond + 1.0
    masks = torch.zeros(3, 2, 2)
    masks[0, 0, 0] = 1
    masks[1, 0, 1] = 1
    masks[2, 1] = 1
    fused = fuse_noise(uncond, text, masks, guidance=3.0)
    expected_uncond = torch.tensor([[0.0, 1.0], [2.0, 2.0]])
    assert fused.shape == (4, 2, 2)
    assert torch.allclose(fused[0], expected_uncond + 3.0)
    all_on = fuse_noise(uncond, text, torch.ones(3, 2, 2), guidance=1.0)
    assert torch.allclose(all_on, torch.full((4, 2, 2), 2.0))
    # several images: each fused with its own masks
    batched = fuse_noise(
        torch.stack([uncond, uncond]), torch.stack([text, text]), torch.stack([masks, torch.ones(3, 2, 2)]), 3.0
    )
    assert batched.shape == (2, 4, 2, 2)
    assert torch.allclose(batched[0], fused) and torch.allclose(
        batched[1], fuse_noise(uncond, text, torch.ones(3, 2, 2), 3.0)
    )


def test_guidance_rescale_pulls_the_std_towards_the_text_prediction():
    g = torch.Generator().manual_seed(0)
    uncond, text = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    ones = torch.ones(2, 8, 8)
    plain = fuse_noise(uncond, text, ones, 7.5)
    rescaled = fuse_noise(uncond, text, ones, 7.5, guidance_rescale=1.0)
    fused_text = text.mean(0)
    assert torch.allclose(rescaled.std(), fused_text.std(), rtol=1e-4)
    assert plain.std() > rescaled.std()


def test_masks_of_several_images_are_each_images_own():
    maps = _maps_with_blobs()
    other = torch.zeros_like(maps)
    other[1, 4:6, 0:2, 4] = 1.0
    other[2, :, :, 7] = 1.0
    batched = concept_masks(
        torch.stack([maps, other]), [[], [4], [7, 8]], alpha=0.3, morphology=["dilate"], size=(12, 16)
    )
    assert batched.shape == (2, 3, 12, 16)
    for k, single in enumerate((maps, other)):
        assert torch.equal(batched[k], concept_masks(single, [[], [4], [7, 8]], 0.3, ["dilate"], (12, 16)))
    assert not torch.equal(batched[0], batched[1])
