import os
import sys
from pathlib import Path

# Tests run on the CPU, offline, with the project root importable.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pytest


@pytest.fixture(autouse=True)
def _full_size_data(monkeypatch):
    # `bash run.sh test` sets ASIF_SMOKE for the notebooks; unit tests choose
    # their own sizes and set it themselves where they test it.
    monkeypatch.delenv("ASIF_SMOKE", raising=False)
