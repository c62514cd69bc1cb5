"""benchmarks/speed.py on the tiny model: every case runs and the table compares them (no timing checks)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import speed


def test_cases_run_and_the_table_compares_them_with_the_sequential_engine(tmp_path):
    """The CLoRA cases share one code path (their specs differ by ``engine``/``parity``, which the
    pipeline tests cover); the sequential one and plain diffusers ("merged") run here."""
    folder, loras = speed.prepare(tmp_path, "tiny", "fp32", 2)
    assert (folder / "model_index.json").is_file() and [p.name for p in loras] == [
        "lora0.safetensors",
        "lora1.safetensors",
    ]
    built = loras[0].stat().st_mtime_ns
    assert speed.prepare(tmp_path, "tiny", "fp32", 1)[1] == loras[:1]
    assert loras[0].stat().st_mtime_ns == built  # a matching build is reused, not rebuilt

    rows = []
    for case, images in (("sequential", 1), ("merged", 1), ("merged", 2)):
        cfg = {"case": case, "loras": 2, "model": str(folder), "lora_files": [str(p) for p in loras]}
        cfg.update(device="cpu", dtype="fp32", size=64, steps=1, repeats=1, max_batch=None, num_images=images)
        cfg["spec_overrides"] = {"iterative_iters": 1}  # the default 20 extra updates at step 0 cost minutes here
        result = speed.run_case(cfg)
        assert len(result["times_s"]) == 1 and result["times_s"][0] > 0 and result["peak_gb"] > 0.1, case
        row = {"case": case, "loras": 2, "images_per_call": images, "status": "ok"}
        rows.append(dict(row, s_per_image=result["times_s"][0]))
    rows.append({"case": "parity", "loras": 2, "images_per_call": 1, "status": "skipped: time budget"})
    speed.compare(rows)
    lines = speed.table(rows)
    assert lines[0].split()[:4] == ["case", "LoRAs", "images/call", "s/image"] and len(lines) == 2 + len(rows)
    assert lines[2].split()[4] == "1.00x" and lines[3].split()[4].endswith("x")  # merged vs sequential
    assert lines[4].split()[5].endswith("x") and lines[3].split()[5] == "-"  # 2 images per call vs 1
    assert "(skipped: time budget)" in lines[5]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--loras", "2,9"], "each count must be 1..8"),
        (["--size", "100"], "multiple of 32"),
        (["--cases", "fast"], "--cases"),
        (["--set", "iterative_iters"], "KEY=VALUE"),
    ],
)
def test_bad_arguments_are_named(args, message, capsys):
    with pytest.raises(SystemExit):
        speed.parse_args(args + ["--device", "cpu"])
    assert message in capsys.readouterr().err


def test_the_sdxl_layout_runs_clora_and_merged_with_kohya_sdxl_loras(tmp_path):
    """``--arch sdxl`` writes the same files as ``tiny-sdxl``, at full size: a diffusers SDXL folder and
    kohya SDXL LoRAs; the CLoRA case loads ``CLoRAXLPipeline`` by the model's family."""
    from safetensors import safe_open

    folder, loras = speed.prepare(tmp_path, "tiny-sdxl", "fp32", 1)
    with safe_open(str(loras[0]), framework="pt") as handle:
        keys, metadata = list(handle.keys()), handle.metadata()
    assert metadata["ss_base_model_version"].startswith("sdxl")
    assert any(k.startswith("lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.") for k in keys)
    assert any(k.startswith("lora_te2_text_model_encoder_layers_0_self_attn_q_proj.") for k in keys)
    for case in ("batched", "merged"):
        cfg = {"case": case, "loras": 1, "model": str(folder), "lora_files": [str(loras[0])]}
        cfg.update(device="cpu", dtype="fp32", size=64, steps=1, repeats=1, max_batch=1, num_images=2)
        cfg["spec_overrides"] = {"iterative_iters": 1}
        result = speed.run_case(cfg)
        assert len(result["times_s"]) == 1 and result["peak_gb"] > 0.1, case


def test_sdxl_defaults_are_its_own_size_and_steps_without_parity(capsys):
    args = speed.parse_args(["--arch", "sdxl", "--device", "cpu", "--set", "iterative_iters=0", "--set", "seed=3"])
    assert (args.size, args.steps, args.set) == (1024, 30, {"iterative_iters": 0, "seed": 3})
    assert "parity" not in args.cases and "parity" in speed.parse_args(["--device", "cpu"]).cases
    with pytest.raises(SystemExit):
        speed.parse_args(["--arch", "sdxl", "--cases", "parity", "--device", "cpu"])
    assert "no SDXL version" in capsys.readouterr().err


def test_the_command_builds_runs_and_writes_the_table_and_csv(tmp_path):
    """The driver as users run it: the build and the case each in a process of their own."""
    import csv
    import subprocess

    command = [sys.executable, str(Path(speed.__file__)), "--arch", "tiny", "--device", "cpu", "--size", "64"]
    command += ["--steps", "1", "--loras", "1", "--cases", "sequential", "--repeats", "1", "--work", str(tmp_path)]
    command += ["--set", "iterative_iters=1", "--csv", str(tmp_path / "speed.csv")]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (
        "tiny architecture, fp32, 64x64, 1 DDIM steps, median of 1 call(s) per case, iterative_iters=1" in proc.stdout
    )
    assert (tmp_path / "tiny-fp32" / "loras" / "lora0.safetensors").is_file()
    (row,) = list(csv.DictReader(open(tmp_path / "speed.csv")))
    assert (row["case"], row["loras"], row["images_per_call"], row["status"]) == ("sequential", "1", "1", "ok")
    assert float(row["s_per_image"]) > 0


def test_memory_phases_reports_every_phase_of_an_sdxl_image(tmp_path, capsys):
    import memory_phases

    table = memory_phases.main(["--arch", "tiny-sdxl", "--device", "cpu", "--size", "64", "--work", str(tmp_path)])
    assert set(table) == {
        "load the model",
        "load the LoRAs",
        "encode the branches' prompts",
        "gradient pass (contrastive update)",
        "other: guided passes, masks, scheduler steps",
        "VAE decode",
        "VAE decode in float32 (as an fp16 GPU run does)",  # bf16 on the CPU: the GPU's fp16 decode is emulated
    }
    assert all(peak > 0.1 for peak in table.values())
    assert "tiny-sdxl, bf16, 64x64, 2 LoRAs, max_batch automatic, cpu" in capsys.readouterr().out
