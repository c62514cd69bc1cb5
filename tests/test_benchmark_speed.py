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
    for case in ("sequential", "merged"):
        cfg = {"case": case, "loras": 2, "model": str(folder), "lora_files": [str(p) for p in loras]}
        cfg.update(device="cpu", dtype="fp32", size=64, steps=1, repeats=1, max_batch=None)
        cfg["spec_overrides"] = {"iterative_iters": 1}  # the default 20 extra updates at step 0 cost minutes here
        result = speed.run_case(cfg)
        assert len(result["times_s"]) == 1 and result["times_s"][0] > 0 and result["peak_gb"] > 0.1, case
        rows.append({"case": case, "loras": 2, "status": "ok", "s_per_image": result["times_s"][0]})
    rows.append({"case": "parity", "loras": 2, "status": "skipped: time budget"})
    speed.compare(rows)
    lines = speed.table(rows)
    assert lines[0].split()[:3] == ["case", "LoRAs", "s/image"] and len(lines) == 2 + len(rows)
    assert lines[2].split()[3] == "1.00x" and lines[3].split()[3].endswith("x")  # merged vs sequential
    assert "(skipped: time budget)" in lines[4]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--loras", "2,9"], "each count must be 1..8"),
        (["--size", "100"], "multiple of 32"),
        (["--cases", "fast"], "--cases"),
    ],
)
def test_bad_arguments_are_named(args, message, capsys):
    with pytest.raises(SystemExit):
        speed.parse_args(args + ["--device", "cpu"])
    assert message in capsys.readouterr().err
