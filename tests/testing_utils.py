# Copyright 2026 The diffusers-sla authors. Licensed under the Apache License, Version 2.0.
"""Shared test helpers: markers for optional hardware, the golden-data location, error metrics."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
# CI clones the repo with the team's `shared/` folder beside it; users' clones have no such folder.
GOLDEN_DIR = Path(os.environ.get("DIFFUSERS_SLA_GOLDEN_DIR", REPO_ROOT.parent / "shared" / "golden"))

require_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def require_golden(fn):
    return pytest.mark.skipif(
        not (GOLDEN_DIR / "index.json").is_file(),
        reason=f"golden files from the SLA reference not found at {GOLDEN_DIR} (they live in the team's shared/ "
        "folder beside the repo; set DIFFUSERS_SLA_GOLDEN_DIR to point elsewhere)",
    )(fn)


def golden_cases() -> dict:
    index = GOLDEN_DIR / "index.json"
    return json.loads(index.read_text()) if index.is_file() else {}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ computed in float64."""
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm()).item()
