"""The web UI's callbacks (form, preview, triggers, runner) without a browser."""

from __future__ import annotations

import json
import threading

import pytest
import torch
from conftest import spec_dict
from PIL import Image
from safetensors.torch import save_file

from clora import CLoRAError, spec_from_dict
from clora.cli import main
from clora.pngmeta import read_png_spec
from clora.spec import load_spec
from clora.ui import form as F
from clora.ui.runner import Cancelled, Runner, maps_picture


def test_the_form_opens_with_the_demo_and_previews_the_dry_run_plan(capsys, tmp_path):
    form = F.demo_form()
    assert form["prompt"] == "a circle and a square" and [c["phrase"] for c in form["concepts"]] == ["circle", "square"]
    rows = form["concepts"]  # each row holds what its boxes show; names ride along in "pinned"
    assert all(set(row) == set(F.CONCEPT_FIELDS) for row in rows)
    data = F.spec_data(
        form["model"], form["prompt"], rows, form["styles"], form["seed"], form["advanced"], form["pinned"]
    )
    shown = F.preview(data)
    assert shown.problems == []
    assert shown.highlighted == [("a ", None), ("circle", "sks_circle"), (" and a ", None), ("square", "zwx_square")]

    spec_path = tmp_path / "spec.json"  # the same form through the CLI's --dry-run: the same positions
    spec_path.write_text(json.dumps(F.build_spec(data).to_dict()))
    assert main(["generate", str(spec_path), "--dry-run"]) == 0
    dry_run = json.loads(capsys.readouterr().out)
    assert [list(map(list, c)) for c in shown.plan.concept_tokens] == dry_run["concept_tokens"]
    assert "| 1 (sks_circle) | a sks circle and a square | sks_circle | 2, 3 | `sks</w> circle</w>` |" in shown.table


def test_problems_show_inline_before_anything_runs():
    form = F.demo_form()

    def problems(**changes) -> list[str]:
        concepts = changes.pop("concepts", form["concepts"])
        advanced = dict(form["advanced"], **changes.pop("advanced", {}))
        prompt = changes.pop("prompt", form["prompt"])
        try:  # (the page shows a CLoRAError raised while reading the boxes the same way)
            return F.preview(F.spec_data(form["model"], prompt, concepts, [], 1, advanced)).problems
        except CLoRAError as exc:
            return [str(exc)]

    missing = [dict(form["concepts"][0], phrase="triangle"), form["concepts"][1]]
    assert problems(concepts=missing) == [
        "concepts[0].phrase: 'triangle' is not a whole word/phrase of the prompt 'a circle and a square'"
    ]
    assert problems(advanced={"steps": 0}) == ["steps: expected an integer >= 1, got 0"]
    assert problems(advanced={"iterative_steps": "0, ten"}) == [
        "iterative_steps: expected whole numbers separated by commas, got '0, ten'"
    ]
    assert problems(concepts=[]) == [
        "concepts: add at least one concept row with a LoRA file and a phrase of the prompt"
    ]
    long_prompt = "a circle and a square " + "on a red floor " * 20
    cut = problems(prompt=long_prompt)  # a warning per prompt: the base one and each concept's
    assert len(cut) == 3 and cut[0].startswith("the prompt is longer than the text encoder's 77 tokens; these words")
    late = "on a red floor " * 20 + "a circle and a square"
    assert "past the text encoder's 77-token limit" in problems(prompt=late)[0]


def test_advanced_boxes_turn_back_into_spec_values():
    form = F.demo_form()
    advanced = dict(form["advanced"], iterative_steps="0; 3,5", height=None, max_batch=None, steps=7.0)
    spec = F.build_spec(F.spec_data(form["model"], form["prompt"], form["concepts"], [], 3.0, advanced))
    assert spec.iterative_steps == (0, 3, 5) and spec.steps == 7 and spec.seed == 3
    assert spec.height is None and spec.max_batch is None
    big = F.spec_data(form["model"], form["prompt"], form["concepts"], [], " 18446744073709551615 ", advanced)
    assert F.build_spec(big).seed == 2**64 - 1  # the seed box is text: a browser's numbers stop at 2**53
    with pytest.raises(CLoRAError, match="^form: seed: "):
        F.build_spec(F.spec_data(form["model"], form["prompt"], form["concepts"], [], "-1", advanced))
    # every spec key is on the form (num_images: the page's number-of-images slider)
    on_form = {f.key for f in F.ADVANCED} | {"prompt", "concepts", "model", "seed", "styles", "num_images"}
    assert on_form | set(F.PINNED_KEYS) == set(spec.to_dict())


def test_a_trigger_is_suggested_from_the_lora_files_metadata(tmp_path):
    tensors = {"lora_unet_x.lora_down.weight": torch.zeros(1, 1)}
    with_phrase = tmp_path / "phrase.safetensors"
    save_file(tensors, with_phrase, metadata={"modelspec.trigger_phrase": "sks corgi"})
    tagged = tmp_path / "tagged.safetensors"
    frequencies = {"10_corgi": {"zwx corgi": 30, "dog": 12}, "5_more": {"dog": 10, "grass": 4}}
    save_file(tensors, tagged, metadata={"ss_tag_frequency": json.dumps(frequencies)})
    plain = tmp_path / "plain.safetensors"
    save_file(tensors, plain)

    assert F.suggested_trigger(str(with_phrase)) == "sks corgi"
    assert F.suggested_trigger(str(tagged)) == "zwx corgi"  # 30 beats dog's 12 + 10
    assert F.suggested_trigger(str(plain)) is None
    assert F.suggested_trigger(str(tmp_path / "missing.safetensors")) is None


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    return Runner("cpu", output_root=tmp_path_factory.mktemp("ui-runs"))


def test_runner_writes_pngs_with_their_spec_and_a_yaml_that_clora_reads(runner, tiny_model_dir, lora_dir):
    data = spec_dict(tiny_model_dir, lora_dir, steps=2)
    data["concepts"][0]["name"] = "whiskers"  # a key no box shows: it must survive a restore too
    spec = spec_from_dict(data)
    reports = []
    run = runner.generate(spec, num_images=2, with_merged=True, progress=lambda *r: reports.append(r))

    assert [p.name for p in run.images] == ["clora-3.png", "clora-4.png"]
    assert [p.name for p in run.merged] == ["clora-3-merged.png", "clora-4-merged.png"]
    # two calls (the 2 images as one batch, then merged), 2 steps each
    assert [r[0] for r in reports] == list(range(1, 5)) and {r[1] for r in reports} == {4}
    assert read_png_spec(run.images[1])["seed"] == 4 and read_png_spec(run.merged[0])["method"] == "merge"
    assert load_spec(run.spec_yaml) == run.output.image_spec(0)  # the downloaded YAML runs as it was
    assert len(run.output.images) == 2 and len(run.output.masks) == 2  # one call, maps kept for each image
    assert set(run.downloads) == {str(p) for p in (*run.images, *run.merged, run.spec_yaml)}

    first, last = maps_picture(run, 0, 1), maps_picture(run, 0, 2)
    assert first.size == last.size and first.tobytes() != last.tobytes()  # the step slider shows another step

    restored = F.form_from_png(str(run.images[0]))  # dropping the PNG restores the same spec
    assert all(set(row) == set(F.CONCEPT_FIELDS) for row in restored["concepts"])  # what the page's boxes hold
    again = F.spec_data(
        restored["model"],
        restored["prompt"],
        restored["concepts"],
        restored["styles"],
        restored["seed"],
        restored["advanced"],
        restored["pinned"],
    )
    assert F.build_spec(again) == run.output.image_spec(0)


def test_cancel_stops_after_the_current_step_and_writes_no_image(runner, tiny_model_dir, lora_dir, tmp_path):
    spec = spec_from_dict(spec_dict(tiny_model_dir, lora_dir, steps=3))
    own = Runner("cpu", output_root=tmp_path, load=lambda *_: runner.pipeline(spec))  # the loaded tiny model
    cancel = threading.Event()
    steps = []

    def press_cancel_after_the_first_step(done, total, what):
        steps.append(done)
        cancel.set()

    with pytest.raises(Cancelled, match="cancelled"):
        own.generate(spec, progress=press_cancel_after_the_first_step, cancel=cancel)
    assert steps == [1]
    assert list(tmp_path.glob("run-*")) and not list(tmp_path.glob("run-*/*"))


def test_a_bad_lora_is_one_line_before_the_model_loads(tmp_path, tiny_model_dir, lora_dir):
    loads = []
    runner = Runner("cpu", output_root=tmp_path, load=lambda *a: loads.append(a))
    data = spec_dict(tiny_model_dir, lora_dir)
    data["concepts"][0]["lora"] = str(tmp_path / "gone.safetensors")
    with pytest.raises(CLoRAError, match="gone.safetensors: LoRA file not found"):
        runner.generate(spec_from_dict(data))
    assert loads == []


def test_removing_a_concept_row_moves_the_rows_below_up():
    keys = ("lora", "phrase")
    values = ("a.safetensors", "cat", "b.safetensors", "dog", "c.safetensors", "horse")
    count, rest = F.remove_row(0, 3, values, keys, {"lora": "", "phrase": ""})
    assert count == 2 and rest == ["b.safetensors", "dog", "c.safetensors", "horse", "", ""]
    assert F.remove_row(2, 2, values, keys, {"lora": "", "phrase": ""})[0] == 2  # a hidden row: nothing shown changes


def test_ui_refuses_a_bad_port_in_one_line(capsys):
    assert main(["ui", "--port", "70000"]) == 2
    assert capsys.readouterr().err == "error: --port: expected 1..65535, got 70000\n"


def test_a_restored_png_without_a_spec_is_one_line(tmp_path):
    plain = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(plain)
    with pytest.raises(CLoRAError, match="has no 'clora' text chunk"):
        F.form_from_png(str(plain))


def test_ui_serves_this_machine_only_unless_asked_and_warns_when_asked(monkeypatch, capsys):
    import clora.ui

    served = []  # (Gradio itself is left out: the browser test starts the real server)
    monkeypatch.setattr(clora.ui, "serve", lambda runner, host, port: served.append((host, port, runner.device.type)))
    assert main(["ui", "--device", "cpu"]) == 0
    assert served == [("127.0.0.1", 7860, "cpu")] and capsys.readouterr().err == ""
    assert main(["ui", "--host", "0.0.0.0", "--port", "8000", "--device", "cpu"]) == 0
    assert served[-1] == ("0.0.0.0", 8000, "cpu")
    assert capsys.readouterr().err.startswith("warning: --host 0.0.0.0: the UI is reachable from other machines")
