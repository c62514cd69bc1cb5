"""The demo's synthetic world and its programmatic judge (no model needed)."""

import numpy as np
import pytest

from clora.demo import judge as J
from clora.demo import world


def test_judge_passes_drawn_compositions_and_fails_missing_concepts():
    rates = J.validate(n=80, seed=7)
    assert rates["full"] >= 0.97
    assert rates["missing"] <= 0.03
    assert rates["plain"] <= 0.03


def test_judge_detects_leak_and_wrong_colour():
    rng = np.random.default_rng(0)
    sc = world.sample_scene(rng, shapes=["circle", "square"], concepts=["sks_circle", "zwx_square"])
    exp = J.expects_for_scene(sc)
    assert J.judge(world.render(sc)[0], exp).passed
    # the square wears the circle's stripes: the circle's pattern leaked, the square is missing
    leaked = world.Scene(
        [
            sc.objects[0],
            world.Obj(
                "square", concept="sks_circle", cx=sc.objects[1].cx, cy=sc.objects[1].cy, size=sc.objects[1].size
            ),
        ]
    )
    v = J.judge(world.render(leaked)[0], exp)
    assert not v.passed
    assert v.objects[0].leaked and not v.objects[1].present
    # plain objects: right shape, wrong colour
    sc2 = world.sample_scene(rng, shapes=["triangle"], colors=["red"])
    assert J.judge(world.render(sc2)[0], [J.Expect("triangle", "red")]).passed
    assert not J.judge(world.render(sc2)[0], [J.Expect("triangle", "blue")]).passed
    assert not J.judge(world.render(sc2)[0], [J.Expect("circle", "red")]).passed


def test_judge_checks_style_background():
    rng = np.random.default_rng(1)
    sc = world.sample_scene(rng, n_objects=2, background=world.STYLE_BACKGROUND)
    img, _ = world.render(sc)
    assert J.judge(img, J.expects_for_scene(sc), style="dark").passed
    plain = world.render(world.Scene(sc.objects))[0]
    assert not J.judge(plain, J.expects_for_scene(sc), style="dark").passed


def test_scenes_are_deterministic_and_masks_exact():
    a = world.sample_scene(np.random.default_rng(3))
    b = world.sample_scene(np.random.default_rng(3))
    assert a.caption() == b.caption()
    img, masks = world.render(a)
    assert len(masks) == len(a.objects)
    assert all(m.any() for m in masks)
    total = np.sum(masks, axis=0)
    assert total.max() == 1  # objects never overlap
    assert (img[total == 0] == world.BACKGROUND).all()


@pytest.mark.parametrize("word", world.WORDS)
def test_every_grammar_word_is_one_token(tmp_path_factory, word):
    from transformers import CLIPTokenizer

    from clora.demo.tokenizer import write_tokenizer

    d = tmp_path_factory.getbasetemp() / "demo_tok"
    if not (d / "vocab.json").exists():
        write_tokenizer(d, world.WORDS)
    tok = CLIPTokenizer.from_pretrained(str(d))
    ids = tok(word).input_ids
    assert len(ids) == 3 and ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
