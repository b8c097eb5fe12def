"""Shared test setup: make the project root importable, keep the CPU thread count small, and run the smoke study
once for the test files that read it (the study, the check of one checkpoint, reading results back)."""
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def smoke_study(tmp_path_factory):
    """OUT folder of `python evaluate.py --preset smoke --methods sparse`: one trained checkpoint
    (ckpt/sparse_0.5_0), its cached videos (runs/), per_clip.csv and the tables."""
    import evaluate
    out = str(tmp_path_factory.mktemp("study"))
    evaluate.main(["--preset", "smoke", "--methods", "sparse", "--out", out])
    return out
