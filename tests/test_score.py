"""``clora score``: CLIP-T, CLIP-I and DINO on PNGs with their specs, with tiny random CLIP and DINO models."""

import csv

import numpy as np
import pytest
import torch
from conftest import SD15_TOKENIZER
from PIL import Image

from clora.cli import main
from clora.pngmeta import save_png


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny CLIP (with the real SD 1.5 CLIP tokenizer) and a tiny DINO-style ViT, saved as folders."""
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPTokenizer,
        ViTConfig,
        ViTImageProcessor,
        ViTModel,
    )

    root = tmp_path_factory.mktemp("scorers")
    torch.manual_seed(0)
    small = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4}
    config = CLIPConfig(
        text_config={**small, "vocab_size": 49408, "max_position_embeddings": 77},
        vision_config={**small, "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    CLIPModel(config).save_pretrained(root / "clip")
    CLIPTokenizer.from_pretrained(str(SD15_TOKENIZER)).save_pretrained(root / "clip")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(root / "clip")
    ViTModel(ViTConfig(**small, image_size=32, patch_size=8), add_pooling_layer=False).save_pretrained(root / "dino")
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(root / "dino")
    return root / "clip", root / "dino"


def picture(seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (48, 48, 3), dtype=np.uint8))


SPEC = {
    "prompt": "a cat and a dog in a garden",
    "concepts": [
        {"lora": "cat.safetensors", "phrase": "cat"},
        {"lora": "dog.safetensors", "phrase": "dog", "name": "puppy"},
    ],
}


@pytest.fixture()
def generated(tmp_path):
    """Three PNGs as clora generate writes them (two methods), and reference images per concept."""
    folder = tmp_path / "out"
    folder.mkdir()
    for k, method in enumerate(["clora", "clora", "merge"]):
        save_png(picture(k), folder / f"img-{k}.png", {**SPEC, "seed": k, "method": method}, {"device": "cpu"})
    refs = tmp_path / "refs"
    (refs / "cat").mkdir(parents=True)
    (refs / "puppy").mkdir()
    picture(10).save(refs / "cat" / "a.png")
    picture(11).save(refs / "cat" / "b.jpg")
    picture(1).save(refs / "puppy" / "same-as-img-1.png")
    return folder, refs


def test_scores_every_image_against_its_prompt_and_references(models, generated, tmp_path, capsys):
    from transformers import CLIPModel, CLIPProcessor

    clip, dino = models
    folder, refs = generated
    out = tmp_path / "scores.csv"
    args = [
        "score",
        str(folder),
        "--references",
        str(refs),
        "--clip",
        str(clip),
        "--dino",
        str(dino),
        "--csv",
        str(out),
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert printed.strip().endswith(str(out)) and "mean of 2  clora" in printed and "mean of 1  merge" in printed

    with open(out) as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == [
        "image", "method", "seed", "clip_t", "clip_i", "dino", "clip_i:cat", "clip_i:puppy", "dino:cat", "dino:puppy"
    ]  # fmt: skip
    assert [(r["image"], r["method"], r["seed"]) for r in rows] == [
        ("img-0.png", "clora", "0"), ("img-1.png", "clora", "1"), ("img-2.png", "merge", "2")
    ]  # fmt: skip
    # the image that is its concept's only reference: cosine 1 with itself, under both models
    assert float(rows[1]["clip_i:puppy"]) == pytest.approx(1.0, abs=1e-3)
    assert float(rows[1]["dino:puppy"]) == pytest.approx(1.0, abs=1e-3)
    assert float(rows[0]["clip_i:puppy"]) < 0.999
    for r in rows:
        assert float(r["clip_i"]) == pytest.approx((float(r["clip_i:cat"]) + float(r["clip_i:puppy"])) / 2, abs=2e-4)

    # CLIP-T, recomputed here with transformers directly
    model, processor = CLIPModel.from_pretrained(str(clip)), CLIPProcessor.from_pretrained(str(clip))
    inputs = processor(
        text=[SPEC["prompt"]], images=[Image.open(folder / "img-2.png").convert("RGB")], return_tensors="pt"
    )
    with torch.no_grad():
        output = model(**inputs)
    expected = torch.nn.functional.cosine_similarity(output.image_embeds, output.text_embeds).item()
    assert float(rows[2]["clip_t"]) == pytest.approx(expected, abs=1e-3)


def test_without_references_only_clip_t_and_no_dino_model(models, generated, tmp_path):
    clip, _ = models
    folder, _ = generated
    out = tmp_path / "t.csv"
    assert main(["score", str(folder), "--clip", str(clip), "--dino", str(tmp_path / "absent"), "--csv", str(out)]) == 0
    with open(out) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 and all(r["clip_t"] and not r["clip_i"] and not r["dino"] for r in rows)


def test_a_png_without_a_spec_or_a_missing_reference_folder_is_one_line(models, generated, tmp_path, capsys):
    clip, dino = models
    folder, refs = generated
    out = tmp_path / "bad.csv"
    common = ["--clip", str(clip), "--dino", str(dino), "--csv", str(out)]

    (refs / "puppy" / "same-as-img-1.png").unlink()
    (refs / "puppy").rmdir()
    assert main(["score", str(folder), "--references", str(refs), *common]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line == f"error: --references: no folder {refs / 'puppy'} for concept 'puppy'; " + (
        "expected REFERENCES/<concept name or phrase>/"
    )

    picture(5).save(folder / "plain.png")
    assert main(["score", str(folder), *common]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: {folder / 'plain.png'}: has no 'clora' text chunk")
    assert main(["score", str(folder), "--csv", str(tmp_path / "x.txt")]) == 2
    assert "--csv: " in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob("*.tmp"))
