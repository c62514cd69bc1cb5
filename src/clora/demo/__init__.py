"""The embedded demo: a tiny text-to-image model and LoRAs trained on a synthetic world.

``clora demo`` -> :func:`run_demo`; ``clora demo --benchmark`` -> :func:`run_benchmark`; ``--family flux``
(``family="flux"``) runs both on the Flux demo model (``flux_model``, ``assets/flux``).
See ``MODEL_CARD.md`` next to this file for what the model is and what was measured.
"""

from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).parent / "assets"
MODEL_DIR = ASSETS / "model"
LORA_DIR = ASSETS / "loras"


def run_demo(out_dir: Path = Path("."), **kwargs) -> Path:
    """Compose the demo concept LoRAs with CLoRA on CPU; write ``clora-demo.png``; return its path."""
    from .bench import run_demo as _run

    return _run(Path(out_dir), **kwargs)


def run_benchmark(out_csv: Path = Path("clora-benchmark.csv"), seeds: int = 64, **kwargs):
    """Every method (CLoRA, merge, switch, composite) on 2- and 3-concept compositions, judged programmatically."""
    from .bench import run_benchmark as _run

    return _run(Path(out_csv), seeds=seeds, **kwargs)


__all__ = ["ASSETS", "LORA_DIR", "MODEL_DIR", "run_benchmark", "run_demo"]
