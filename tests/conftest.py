"""Shared test helpers: where ../shared lives, and a skip marker for tests that need it."""
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the repo is flat: `import model` etc. from the tests

SHARED = Path(os.environ.get("NANO3DINO_SHARED", ROOT.parent / "shared"))
DATA = SHARED / "data"
GOLDEN = SHARED / "golden"

requires_shared = pytest.mark.skipif(
    not SHARED.is_dir(),
    reason=f"needs the real volumes / golden files in {SHARED} (absent in a user's clone; CI always has it)",
)

torch.set_num_threads(min(2, os.cpu_count() or 1))
