"""Shared fixtures: the real SD 1.5 tokenizer, a tiny random SD 1.5-layout model, LoRA files."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).parent
sys.path.insert(0, str(TESTS))
SD15_TOKENIZER = TESTS / "fixtures" / "sd15_tokenizer"

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def sd15_tokenizer():
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(SD15_TOKENIZER))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from tiny_sd import build_tiny_sd15

    return build_tiny_sd15(tmp_path_factory.mktemp("tiny-sd15"), SD15_TOKENIZER)
