"""``clora batch``: sweep files, ComposLoRA compositions, resumable runs with a manifest."""

import json

import numpy as np
import pytest
import yaml
from conftest import spec_dict
from PIL import Image

from clora import CLoRAError
from clora.batch import Manifest, seed_chunks, share
from clora.cli import main
from clora.sweep import load_sweep, parse_seeds

pytestmark = pytest.mark.usefixtures("reuse_loaded_pipelines")


def _write(path, data):
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture()
def sweep_file(tmp_path, tiny_model_dir, lora_dir):
    base = spec_dict(tiny_model_dir, lora_dir, steps=2, max_iter_to_alter=1, iterative_iters=0)
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(base))
    sweep = {
        "base": "spec.yaml",
        "compositions": [{"name": "cat-dog", "prompt": "a cat and a dog in a garden"}],
        "seeds": [0, "1-2"],
        "methods": ["clora", "merge"],
    }
    return _write(tmp_path / "sweep.yaml", sweep)


def test_seeds_take_integers_and_inclusive_ranges_once_each():
    assert parse_seeds([0, 1, "8-10", 9, " 3 - 4 "], "seeds") == [0, 1, 8, 9, 10, 3, 4]
    for bad in ([], ["8-"], [-1], ["5-3"], [True], "0-3"):
        with pytest.raises(CLoRAError, match="^seeds: "):
            parse_seeds(bad, "seeds")


def test_a_sweep_expands_to_jobs_with_stable_keys(sweep_file):
    data = yaml.safe_load(sweep_file.read_text())
    data["grid"] = {"mask_threshold": [0.3, 0.4]}
    _write(sweep_file, data)
    jobs = load_sweep(sweep_file)
    assert len(jobs) == 1 * 2 * 2 * 3
    assert jobs[0].key == "cat-dog/clora/mask_threshold=0.3/0" and jobs[-1].key == "cat-dog/merge/mask_threshold=0.4/2"
    assert {job.spec.mask_threshold for job in jobs} == {0.3, 0.4} and {job.spec.seed for job in jobs} == {0, 1, 2}
    assert all(job.spec.num_images == 1 and job.spec.method == job.method for job in jobs)
    assert share(jobs, 0, 5) + share(jobs, 1, 5) + share(jobs, 2, 5) + share(jobs, 3, 5) + share(jobs, 4, 5) == jobs
    assert sorted(len(share(jobs, r, 5)) for r in range(5)) == [2, 2, 2, 3, 3]  # balanced, in the sweep's order
    chunks = seed_chunks(jobs, images_per_call=2)
    assert [[j.seed for j in chunk] for chunk in chunks[:2]] == [[0, 1], [2]]  # consecutive seeds, 2 per call


@pytest.mark.parametrize(
    "change, message",
    [
        ({"seeds": ["x"]}, "seeds: expected an integer or a range"),
        ({"methods": ["clora", "magic"]}, "methods: expected a list of clora, merge, switch, composite"),
        ({"grid": {"seed": [1, 2]}}, "grid: seed cannot be a grid key"),
        ({"compositions": [{"name": "a/b"}]}, "compositions[0]: name: expected a folder name"),
        ({"compositions": [{"name": "x", "steps": 0}]}, "composition 'x': steps: expected an integer >= 1"),
        ({"extra": 1}, "unknown key 'extra'"),
    ],
)
def test_a_bad_sweep_is_one_line_exit_2_and_nothing_runs(sweep_file, tmp_path, capsys, change, message):
    _write(sweep_file, {**yaml.safe_load(sweep_file.read_text()), **change})
    assert main(["batch", str(sweep_file), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not (tmp_path / "out").exists()


def test_dry_run_counts_the_jobs_without_loading_a_model(sweep_file, tmp_path, capsys, monkeypatch):
    import clora.runtime

    monkeypatch.setattr(clora.runtime, "load_pipeline", lambda *a, **k: pytest.fail("a model was loaded"))
    assert main(["batch", str(sweep_file), "-o", str(tmp_path / "out"), "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "6 jobs" and lines[1].startswith("cat-dog/clora/0.png")
    assert not (tmp_path / "out").exists()


def test_a_run_writes_every_job_once_and_a_rerun_skips_them(sweep_file, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["batch", str(sweep_file), "-o", str(out), "--quiet", "--images-per-call", "2"]) == 0
    lines = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert sorted(line["job"] for line in lines) == sorted(job.key for job in load_sweep(sweep_file))
    assert all(line["status"] == "ok" and line["rank"] == 0 and line["seconds"] > 0 for line in lines)
    assert set(lines[0]) >= {"job", "composition", "method", "seed", "grid", "path", "status", "error"}
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png")) == sorted(
        line["path"] for line in lines
    )  # no other PNG under the folder
    from clora.evaluation import generated_images

    assert len(generated_images(out)) == 6  # clora score DIR finds every job's PNG in the sub-folders
    stored = json.loads(Image.open(out / "cat-dog/merge/2.png").text["clora"])
    assert (stored["seed"], stored["num_images"], stored["method"]) == (2, 1, "merge")

    # seed 1 of a batch of 2 is the single run of its seed (within 1/255)
    single = tmp_path / "single.png"
    assert main(["generate", "--from-png", str(out / "cat-dog/clora/1.png"), "-o", str(single), "--quiet"]) == 0
    difference = np.asarray(Image.open(single)).astype(int) - np.asarray(Image.open(out / "cat-dog/clora/1.png"))
    assert np.abs(difference).max() <= 1
    capsys.readouterr()

    assert main(["batch", str(sweep_file), "-o", str(out), "--quiet"]) == 0
    assert "0 job(s) run, 6 already done" in capsys.readouterr().out
    assert len((out / "manifest.jsonl").read_text().splitlines()) == 6

    (out / "cat-dog/clora/2.png").unlink()  # a lost image, and a line cut by a crash
    with open(out / "manifest.jsonl", "a") as handle:
        handle.write('{"job": "cat-dog/merge/0", "sta')
    assert main(["batch", str(sweep_file), "-o", str(out), "--quiet"]) == 0
    assert "1 job(s) run, 5 already done" in capsys.readouterr().out
    assert len(Manifest(out).latest()) == 6 and len((out / "manifest.jsonl").read_text().splitlines()) == 6


def test_a_failing_job_is_recorded_and_the_others_go_on(sweep_file, tmp_path, lora_dir, capsys):
    data = yaml.safe_load(sweep_file.read_text())
    data["methods"] = ["merge"]
    data["seeds"] = [0]
    missing = {"lora": str(tmp_path / "gone.safetensors"), "phrase": "cat"}
    data["compositions"].append({"name": "broken", "concepts": [missing]})
    _write(sweep_file, data)
    out = tmp_path / "out"
    assert main(["batch", str(sweep_file), "-o", str(out), "--quiet"]) == 1
    lines = {line["job"]: line for line in map(json.loads, (out / "manifest.jsonl").read_text().splitlines())}
    assert lines["cat-dog/merge/0"]["status"] == "ok" and (out / "cat-dog/merge/0.png").is_file()
    assert lines["broken/merge/0"]["status"] == "error" and "gone.safetensors" in lines["broken/merge/0"]["error"]
    assert not (out / "broken").exists()
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == f"error: 1 of 2 job(s) failed; see {out / 'manifest.jsonl'}"


def test_composlora_sets_expand_to_their_combinations(tmp_path, tiny_model_dir, lora_dir):
    info = {
        "character": [
            {"id": "character_1", "trigger": ["iu1", "long black hair"]},
            {"id": "character_2", "trigger": ["scarlett"]},
        ],
        "clothing": [{"id": "clothing_1", "trigger": ["school uniform", "red tie"]}],
        "style": [{"id": "style_1", "trigger": ["film grain"]}],
    }
    (tmp_path / "reality_lora_info.json").write_text(json.dumps(info))
    base = spec_dict(tiny_model_dir, lora_dir)
    sweep = {
        "base": base,
        "compositions": [{"composlora": "reality_lora_info.json", "loras": "loras", "elements": 2}],
        "seeds": [0],
    }
    jobs = load_sweep(_write(tmp_path / "sweep.yaml", sweep))
    names = [job.composition for job in jobs]
    # one character plus one element of one other category: 2 characters x (1 clothing + 1 style)
    assert names == ["character_1+clothing_1", "character_2+clothing_1", "character_1+style_1", "character_2+style_1"]
    first = jobs[0].spec
    assert first.prompt.endswith(", iu1, long black hair, school uniform, red tie")
    assert first.prompt.startswith("RAW photo")
    assert [c.phrase for c in first.concepts] == ["iu1, long black hair", "school uniform, red tie"]
    assert first.concepts[1].lora == str(tmp_path / "loras" / "clothing_1.safetensors")
    styled = jobs[2].spec
    assert [c.name for c in styled.concepts] == ["character_1"] and styled.styles[0].name == "style_1"
    assert styled.styles[0].weight == 0.8


def test_torchrun_shards_the_jobs_over_two_processes_with_the_same_pixels(sweep_file, tmp_path):
    """Two processes under torchrun (gloo on the CPU) make the same files as one process, each job once
    in the manifest, and both ranks do their share."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["batch", str(sweep_file), "-o", str(one), "--quiet"]) == 0
    torchrun = Path(sys.executable).with_name("torchrun")
    command = [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "clora", "batch", str(sweep_file)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([*command, "-o", str(two), "--quiet"], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [json.loads(line) for line in (two / "manifest.jsonl").read_text().splitlines()]
    assert len(lines) == 6 and len({line["job"] for line in lines}) == 6
    assert {line["rank"] for line in lines} == {0, 1}
    for line in lines:
        a, b = (np.asarray(Image.open(folder / line["path"])).astype(int) for folder in (one, two))
        assert np.abs(a - b).max() <= 1, line["job"]


def test_a_run_killed_mid_image_leaves_no_partial_png_and_its_rerun_makes_only_the_rest(sweep_file, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "out"
    command = [sys.executable, "-m", "clora", "batch", str(sweep_file), "-o", str(out), "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([*command, "--images-per-call", "1"], env=env, stderr=subprocess.DEVNULL)
    manifest = out / "manifest.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if manifest.is_file() and len(manifest.read_text().splitlines()) >= 2:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = {json.loads(line)["job"] for line in manifest.read_text().splitlines()}
    assert 2 <= len(done) < 6, "the run was not killed in the middle"
    for png in out.rglob("*.png"):  # every PNG in place is whole and carries its spec
        assert json.loads(Image.open(png).text["clora"])["num_images"] == 1
    proc = subprocess.run([*command, "--images-per-call", "1"], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"{6 - len(done)} job(s) run, {len(done)} already done" in proc.stdout
    assert len(manifest.read_text().splitlines()) == 6
    assert not list((out / ".partial").rglob("*.tmp"))


def test_the_bundled_demo_as_a_sweep_matches_the_demo_benchmark(tmp_path, capsys):
    """benchmarks/demo_sweep.yaml: 2 compositions x 4 methods x 4 seeds; each image is the one the demo
    benchmark's spec makes for that seed and method (within 1/255). Run with 6 steps and one extra update
    instead of the demo's 20 and 12 (the file's jobs otherwise: the test's time is the reason)."""
    from pathlib import Path

    from clora.demo.bench import clora_spec, load_clora_pipe

    shipped = Path(__file__).resolve().parents[1] / "benchmarks" / "demo_sweep.yaml"
    data = yaml.safe_load(shipped.read_text().replace("../src/", f"{shipped.parents[1] / 'src'}/"))
    quick = {"steps": 6, "max_iter_to_alter": 3, "iterative_steps": [0], "iterative_iters": 1}
    data["base"].update(quick)
    out = tmp_path / "demo"
    assert main(["batch", str(_write(tmp_path / "demo_sweep.yaml", data)), "-o", str(out), "--quiet"]) == 0
    lines = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert len(lines) == 32 and all(line["status"] == "ok" for line in lines)
    assert {line["composition"] for line in lines} == {"circle+square", "circle+triangle"}
    for names, method, seed in (
        (("sks_circle", "pqr_triangle"), "switch", 2),
        (("sks_circle", "zwx_square"), "clora", 3),
    ):
        expected = load_clora_pipe()(clora_spec(names, seed, method=method, **quick)).images[0]
        made = Image.open(
            out / ("circle+triangle" if "pqr_triangle" in names else "circle+square") / method / f"{seed}.png"
        )
        assert np.abs(np.asarray(made).astype(int) - np.asarray(expected).astype(int)).max() <= 1
