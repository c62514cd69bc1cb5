import pytest
import torch
from pytorch_metric_learning.losses import NTXentLoss

from clora.loss import concept_vectors, contrastive_loss, minmax_normalize, nt_xent_loss


@pytest.mark.parametrize("n, classes, seed", [(6, 2, 0), (12, 3, 1), (20, 8, 2), (4, 2, 3)])
def test_nt_xent_matches_pytorch_metric_learning(n, classes, seed):
    g = torch.Generator().manual_seed(seed)
    vectors = torch.randn(n, 32, generator=g)
    labels = torch.arange(n) % classes
    expected = NTXentLoss(temperature=0.5)(vectors, labels)
    assert torch.allclose(nt_xent_loss(vectors, labels, 0.5), expected, atol=1e-5)


def test_nt_xent_other_temperature_matches_too():
    g = torch.Generator().manual_seed(7)
    vectors, labels = torch.randn(9, 5, generator=g), torch.tensor([0, 0, 1, 1, 1, 2, 2, 0, 2])
    assert torch.allclose(nt_xent_loss(vectors, labels, 0.1), NTXentLoss(temperature=0.1)(vectors, labels), atol=1e-5)


def test_nt_xent_is_zero_without_negatives_and_keeps_graph():
    vectors = torch.randn(4, 8, requires_grad=True)
    loss = nt_xent_loss(vectors, torch.zeros(4, dtype=torch.long))
    assert loss.item() == 0.0
    loss.backward()
    assert vectors.grad is not None


def test_separated_concepts_score_lower_than_overlapping():
    left = torch.zeros(4, 4)
    left[:, :2] = 1
    right = 1 - left
    maps = torch.stack([left, left, right, right]).flatten(1)
    labels = torch.tensor([0, 0, 1, 1])
    mixed = torch.tensor([0, 1, 0, 1])
    assert nt_xent_loss(maps, labels) < nt_xent_loss(maps, mixed)


def test_minmax_normalize_with_and_without_epsilon():
    x = torch.tensor([[1.0, 3.0, 2.0], [5.0, 5.0, 5.0]])
    normalized = minmax_normalize(x)
    assert torch.allclose(normalized[0], torch.tensor([0.0, 1.0, 0.5]), atol=1e-6)
    assert torch.equal(normalized[1], torch.zeros(3))  # default fixes the constant-map case
    assert torch.isnan(minmax_normalize(x, eps=0.0)[1]).all()  # the authors' version divides by zero


def test_concept_vectors_pick_every_concept_position_of_every_prompt():
    maps = torch.rand(3, 2, 2, 77)
    concept_tokens = [[[2], [2, 3], [2]], [[5], [6], [5, 6]]]
    vectors, labels = concept_vectors(maps, concept_tokens)
    assert labels.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert torch.allclose(vectors[1], minmax_normalize(maps[1, :, :, 2].flatten()[None])[0])
    assert torch.allclose(vectors[7], minmax_normalize(maps[2, :, :, 6].flatten()[None])[0])


def test_gradient_reaches_the_input_of_the_maps():
    latent = torch.randn(1, 4, 4, requires_grad=True)
    weights = torch.randn(3, 77, generator=torch.Generator().manual_seed(0))
    maps = torch.stack([torch.softmax(latent[0, :, :, None] * w, dim=-1) for w in weights])  # (3, 4, 4, 77)
    loss = contrastive_loss(maps, [[[1], [1], [1]], [[2], [2], [2]]])
    (grad,) = torch.autograd.grad(loss, latent)
    assert grad.abs().sum() > 0


def test_several_images_get_one_loss_each_from_their_own_maps():
    g = torch.Generator().manual_seed(3)
    maps = torch.rand(4, 3, 2, 2, 77, generator=g, requires_grad=True)  # 4 images
    concept_tokens = [[[2], [2, 3], [2]], [[5], [6], [5, 6]]]
    losses = contrastive_loss(maps, concept_tokens)
    assert losses.shape == (4,)
    for k in range(4):
        assert torch.allclose(losses[k], contrastive_loss(maps[k], concept_tokens), atol=1e-6)
    (grad,) = torch.autograd.grad(losses[1], maps)
    assert grad[1].abs().sum() > 0 and grad[[0, 2, 3]].abs().sum() == 0  # no image pushes another


def test_a_prebuilt_index_gives_the_same_loss_and_matches_pml_per_image():
    from clora.loss import ConceptIndex

    maps = torch.rand(2, 3, 4, 4, 77, generator=torch.Generator().manual_seed(4))
    concept_tokens = [[[1], [1, 2], [1]], [[4], [4], [5, 6]]]
    index = ConceptIndex.build(concept_tokens, "cpu")
    assert torch.equal(contrastive_loss(maps, index), contrastive_loss(maps, concept_tokens))
    vectors, labels = concept_vectors(maps[1], index)
    assert torch.allclose(contrastive_loss(maps, index)[1], NTXentLoss(temperature=0.5)(vectors, labels), atol=1e-5)
