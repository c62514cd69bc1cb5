"""The batched branch runner against the sequential one, and per-sample LoRA routing."""

import numpy as np
import pytest
import torch
from conftest import spec_dict

from clora import spec_from_dict
from clora.methods import METHODS
from clora.routing import LoraRouter, lora_layers, row_groups


def pixels(result):
    return np.asarray(result.images[0]).astype(int)


def test_row_groups_merge_neighbouring_rows_with_the_same_weight():
    samples = [{}, {}, {"cat": 1.0, "style": 0.8}, {"cat": 1.0, "style": 0.8}, {"dog": 0.5, "style": 0.8}, {"dog": 0}]
    assert row_groups(samples) == [("cat", [(2, 4, 1.0)]), ("style", [(2, 5, 0.8)]), ("dog", [(4, 5, 0.5)])]


def test_routed_layers_give_each_row_its_own_adapters(tiny_pipe, lora_dir):
    """One batch through routed layers == each row alone with diffusers' set_adapters."""
    pipe = tiny_pipe
    cat, dog = pipe.add_lora(str(lora_dir / "cat.safetensors")), pipe.add_lora(str(lora_dir / "dog_kohya.safetensors"))
    rows = [{}, {cat: 1.0}, {cat: 0.5, dog: 1.5}, {dog: 1.0}]
    generator = torch.Generator().manual_seed(0)
    latent = torch.randn(len(rows), 4, 8, 8, generator=generator)
    context = torch.randn(len(rows), 77, 32, generator=generator)

    def unet(x, c):
        return pipe.unet(x, 500, encoder_hidden_states=c, return_dict=False)[0]

    expected = []
    for k, row in enumerate(rows):
        if row:
            pipe.enable_lora()
            pipe.set_adapters(list(row), adapter_weights=list(row.values()))
        else:
            pipe.disable_lora()
        expected.append(unet(latent[k : k + 1], context[k : k + 1]))
    pipe.disable_lora()
    pipe._clora_lora_disabled = None
    router = LoraRouter(lora_layers(pipe.unet, [cat, dog]))
    with router.installed():
        with router.routing(row_groups(rows)):
            batched = unet(latent, context)
        outside = unet(latent, context)  # installed, but no routing block: the base model
    pipe.disable_lora()
    assert torch.allclose(outside, unet(latent, context))
    assert torch.allclose(batched, torch.cat(expected), atol=1e-5)
    assert not torch.allclose(expected[1], expected[2], atol=1e-3)  # the rows really differ


@pytest.fixture(scope="module")
def three_concepts(tiny_model_dir, lora_dir):
    """Every kind of LoRA file at once: diffusers with text-encoder layers, kohya, UNet-only, a style."""
    return spec_from_dict(
        spec_dict(
            tiny_model_dir,
            lora_dir,
            prompt="a cat and a dog and a bird in a garden",
            concepts=[
                {"lora": str(lora_dir / "cat.safetensors"), "phrase": "cat", "trigger": "sks cat", "weight": 0.7},
                {"lora": str(lora_dir / "dog_kohya.safetensors"), "phrase": "dog", "trigger": "sks dog"},
                {"lora": str(lora_dir / "style_unet_only.safetensors"), "phrase": "bird", "weight": 1.3},
            ],
            styles=[{"lora": str(lora_dir / "style_unet_only_kohya.safetensors"), "weight": 0.6}],
            height=128,
            width=64,
            steps=2,
            max_iter_to_alter=1,
        )
    )


@pytest.fixture(scope="module")
def sequential_three(tiny_pipe, three_concepts):
    return tiny_pipe(three_concepts, engine="sequential", keep_maps=True)


@pytest.mark.parametrize("max_batch", [None, 3], ids=["one-call", "chunks-of-3"])
def test_batched_equals_sequential(tiny_pipe, three_concepts, sequential_three, max_batch):
    sequential = sequential_three
    batched = tiny_pipe(three_concepts, engine="batched", max_batch=max_batch, keep_maps=True)
    assert np.abs(pixels(batched) - pixels(sequential)).max() <= 1
    for a, b in zip(batched.attention_maps[0], sequential.attention_maps[0], strict=True):
        assert torch.allclose(a.float(), b.float(), atol=1e-3)
    differing = sum(int((a != b).sum()) for a, b in zip(batched.masks[0], sequential.masks[0], strict=True))
    assert differing <= 0.01 * sum(m.numel() for m in batched.masks[0])  # a threshold may flip on float noise
    for a, b in zip(batched.losses[0], sequential.losses[0], strict=True):
        assert np.allclose(a, b, rtol=1e-4)
    assert len(batched.losses[0][0]) == 2  # the contrastive updates ran (1 + 1 iterative)
    if max_batch == 3:  # 4 branches: the gradient pass (4 samples) and the guidance pass (8) both split
        assert (batched.memory_plan.gradient_batch, batched.memory_plan.guidance_batch) == (3, 3)
        assert batched.memory_plan.recompute
    assert batched.spec.engine == "batched" and sequential.spec.engine == "sequential"


def test_batched_runs_one_unet_call_per_pass_and_switches_no_adapter_in_the_loop(tiny_pipe, spec_two, monkeypatch):
    for concept in spec_two.concepts:  # loaded before counting: loading is not switching
        tiny_pipe.add_lora(concept.lora)
    calls, switches = [], []
    hook = tiny_pipe.unet.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    original = type(tiny_pipe).set_adapters

    def counting_set_adapters(self, *args, **kwargs):
        switches.append(args)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(tiny_pipe), "set_adapters", counting_set_adapters)
    try:
        tiny_pipe(spec_two.replace(steps=2, max_iter_to_alter=1, iterative_iters=1))
    finally:
        hook.remove()
    # step 0: 2 gradient passes (3 prompt halves each) + the CFG pass (2 x 3); step 1: the CFG pass
    assert calls == [3, 3, 6, 6]
    assert len(switches) == 2  # only while encoding the two concept prompts, before the loop


def _gradient(pipe, spec, latent, max_batch, images=1):
    """d(loss of image 0)/d(latents) from the batched runner's gradient pass."""
    from clora.attention import recording_cross_attention
    from clora.engine import BatchedBranchRunner
    from clora.loss import contrastive_loss
    from clora.memory import plan_memory
    from clora.tokens import plan_tokens

    plan = plan_tokens(pipe.tokenizer, spec)
    names = [pipe.add_lora(c.lora) for c in spec.concepts]
    layout = METHODS["clora"].branch_layout(plan.prompts, spec.prompt, len(names))
    branches = pipe._encode_branches(spec, layout, names, [], (64, 64), pipe.device)
    samples = images * len(branches)
    memory_plan = plan_memory(samples, 2 * samples, 1, 1, None, max_batch=max_batch)
    router = LoraRouter(lora_layers(pipe.unet, names))
    with recording_cross_attention(pipe.unet) as recorder, router.installed():
        runner = BatchedBranchRunner(pipe, branches, recorder, (2, 2), False, images, plan=memory_plan, router=router)
        x = latent.clone().requires_grad_(True)
        with torch.enable_grad():
            losses = contrastive_loss(runner(x, torch.tensor(500), grad=True, cfg=False).maps, plan.concept_tokens)
            return losses, torch.autograd.grad(losses[0], x)[0]


def test_chunked_gradient_pass_holds_one_chunk_and_gives_the_same_gradient(tiny_pipe, spec_two):
    latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    (_, whole), (_, chunked) = (_gradient(tiny_pipe, spec_two, latent, max_batch) for max_batch in (None, 1))
    assert whole.abs().sum() > 0
    assert torch.allclose(whole, chunked, atol=1e-6, rtol=1e-4)


def test_images_of_one_batch_do_not_push_each_other(tiny_pipe, spec_two):
    """Two images in one gradient pass (chunks of 4 rows, so image rows mix across chunks): the first
    image's loss and gradient are those of its own run, and nothing of it reaches the second latent."""
    generator = torch.Generator().manual_seed(2)
    latents = torch.randn(2, 4, 8, 8, generator=generator)
    losses, grad = _gradient(tiny_pipe, spec_two, latents, max_batch=4, images=2)
    alone_losses, alone = _gradient(tiny_pipe, spec_two, latents[:1], max_batch=None)
    assert grad[1].abs().sum() == 0 and grad[0].abs().sum() > 0
    assert torch.allclose(grad[:1], alone, atol=1e-6, rtol=1e-4)
    assert torch.allclose(losses[0], alone_losses[0], atol=1e-6) and not torch.allclose(losses[0], losses[1])


@pytest.fixture(scope="module")
def spec_two(tiny_model_dir, lora_dir):
    return spec_from_dict(spec_dict(tiny_model_dir, lora_dir))


def _dora_unet(tiny_model_dir):
    """The tiny UNet with a DoRA adapter "d" (peft's use_dora) and a plain LoRA adapter "plain"."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    unet = UNet2DConditionModel.from_pretrained(str(tiny_model_dir / "unet"))
    targets = ["to_q", "to_k", "to_v", "to_out.0"]
    unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=targets, use_dora=True), adapter_name="d")
    unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=targets), adapter_name="plain")
    return unet


@pytest.mark.parametrize("marked_by", ["lora_variant", "use_dora only"])
def test_dora_is_never_routed_as_plain_lora(tiny_model_dir, marked_by):
    """peft >= 0.15 marks DoRA in lora_variant and use_dora; older versions in use_dora alone. Either way the
    batched engine refuses it in one line instead of adding it as a plain LoRA delta."""
    from clora import CLoRAError

    unet = _dora_unet(tiny_model_dir)
    layers = [m for m in unet.modules() if "d" in (getattr(m, "lora_A", None) or {})]
    assert layers and all(m.use_dora["d"] for m in layers)
    if marked_by == "use_dora only":
        for layer in layers:
            getattr(layer, "lora_variant", {}).pop("d", None)
    with pytest.raises(CLoRAError, match="uses DoRA") as error:
        lora_layers(unet, ["d"])
    assert "\n" not in str(error.value) and "engine: sequential" in str(error.value)
    assert len(lora_layers(unet, ["plain"])) == len(layers)  # a plain LoRA on the same layers is routed


def test_one_lora_file_for_two_concepts_keeps_each_concepts_weight(tiny_pipe, tiny_model_dir, lora_dir, tmp_path):
    """The same file as two concepts (weights 0.5 and 1.5) is one adapter; it must act as two: the same
    pixels as a byte-different copy of it loaded as a second adapter, for CLoRA and for merge (whose one
    branch holds both concepts' LoRAs, i.e. that adapter at 0.5 + 1.5)."""
    from safetensors.torch import load_file, save_file

    cat = lora_dir / "cat.safetensors"
    copy = tmp_path / "cat_copy.safetensors"
    save_file(load_file(str(cat)), str(copy), metadata={"copy": "yes"})
    concepts = [{"lora": str(cat), "phrase": "cat", "weight": 0.5}, {"lora": str(cat), "phrase": "dog", "weight": 1.5}]
    same = spec_from_dict(spec_dict(tiny_model_dir, lora_dir, concepts=concepts, steps=2, iterative_iters=0))
    copied = same.replace(concepts=[concepts[0], dict(concepts[1], lora=str(copy))])
    for method in ("clora", "merge"):
        a, b = tiny_pipe(same, method=method), tiny_pipe(copied, method=method)
        assert np.abs(pixels(a) - pixels(b)).max() <= 1, method
    only_second = tiny_pipe(same.replace(concepts=[concepts[1]]), method="merge")
    assert np.abs(pixels(tiny_pipe(same, method="merge")) - pixels(only_second)).mean() > 1  # 0.5 was not dropped
