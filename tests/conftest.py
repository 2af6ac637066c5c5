"""Shared test helpers: where ../shared lives, and a skip marker for tests that need it."""
import os
import sys
from pathlib import Path

# Triton kernels run on CPU tensors through the interpreter. The flag is read when a kernel is *defined*, so it
# must be set before any test module imports msda_triton (collection imports every module first).
if not os.environ.get("CUDA_VISIBLE_DEVICES") and "TRITON_INTERPRET" not in os.environ:
    try:
        import torch as _t

        if not _t.cuda.is_available():
            os.environ["TRITON_INTERPRET"] = "1"
    except Exception:
        pass

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

# 2 threads on CI's 2 cores; OMP_NUM_THREADS=1 when something else runs beside the tests (2 OpenMP threads on a
# busy 2-core machine can be 10-20x slower than 1)
if "OMP_NUM_THREADS" not in os.environ:
    torch.set_num_threads(min(2, os.cpu_count() or 1))
