"""Shared test helpers: where ../shared lives, a skip marker for tests that need it, and the two ways to run a
script: `script` (a new interpreter, as a user runs it) and `run_here` (inside the test process)."""
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

# pretrain.py's smallest model and crops: a step takes a fraction of a second
TINY_PRETRAIN = ["--embed_dim=32", "--depth=4", "--num_heads=2", "--patch_size=8", "--global_crops_size=16",
                 "--local_crops_size=8", "--n_local_crops=2", "--head_n_prototypes=64", "--head_hidden_dim=32",
                 "--head_bottleneck_dim=16", "--batch_size=4", "--num_workers=0", "--min_axis_size=8",
                 "--warmup_iters=1", "--warmup_teacher_temp_iters=1", "--freeze_last_layer_iters=0"]

# 2 threads on CI's 2 cores; OMP_NUM_THREADS=1 when something else runs beside the tests (2 OpenMP threads on a
# busy 2-core machine can be 10-20x slower than 1)
if "OMP_NUM_THREADS" not in os.environ:
    torch.set_num_threads(min(2, os.cpu_count() or 1))


def run_here(*args, cwd=ROOT):
    """`python SCRIPT ARGS...` run inside the test process (runpy) instead of a new interpreter, which spends
    ~2.5 s of CPU importing torch before the script reads its first argument. For tests of what a script does
    with its input; one run per script in a new interpreter (`script`) checks the interpreter's side.
    The run ends as the interpreter would end it: an uncaught exception goes through the sys.excepthook the script
    left (configurator's prints an input error as `error: ...` alone) with exit code 1, SystemExit gives its code,
    and the functions it registered with atexit run. Returns a subprocess.CompletedProcess. What a script sets for
    the whole process (argv, cwd, excepthook, torch threads, TF32 flags and global RNGs, logging handlers) is put
    back."""
    import atexit
    import contextlib
    import io
    import logging
    import random
    import runpy
    import subprocess

    import numpy as np

    argv = [str(a) for a in args]
    path = os.path.join(str(cwd), argv[0])  # as `python argv[0]` started in cwd finds it
    old_argv, old_cwd, old_hook, old_register = list(sys.argv), os.getcwd(), sys.excepthook, atexit.register
    threads, precision, cudnn_tf32 = torch.get_num_threads(), torch.get_float32_matmul_precision(), \
        torch.backends.cudnn.allow_tf32
    rngs = (torch.get_rng_state(), np.random.get_state(), random.getstate(),
            torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
    handlers = [(lg, list(lg.handlers)) for lg in [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
                if isinstance(lg, logging.Logger)]  # data.py run as a script adds its handler again
    exits = []
    atexit.register = lambda f, *a, **k: exits.append((f, a, k)) or f
    out, err, code = io.StringIO(), io.StringIO(), 0
    try:
        os.chdir(cwd)
        sys.argv = argv
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                runpy.run_path(path, run_name="__main__")
            except SystemExit as e:
                if e.code is None or isinstance(e.code, int):
                    code = e.code or 0
                else:  # sys.exit("message"): printed to stderr, exit code 1
                    print(e.code, file=sys.stderr)
                    code = 1
            except Exception as e:
                sys.excepthook(type(e), e, e.__traceback__)
                code = 1
            finally:
                for f, a, k in reversed(exits):
                    f(*a, **k)
    finally:
        os.chdir(old_cwd)
        sys.argv, sys.excepthook, atexit.register = old_argv, old_hook, old_register
        torch.set_num_threads(threads)
        torch.set_float32_matmul_precision(precision)
        torch.backends.cudnn.allow_tf32 = cudnn_tf32
        torch.set_rng_state(rngs[0])
        np.random.set_state(rngs[1])
        random.setstate(rngs[2])
        if rngs[3] is not None:
            torch.cuda.set_rng_state_all(rngs[3])
        for lg, hs in handlers:
            lg.handlers[:] = hs
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


def script(*args, cwd=ROOT):
    """`python SCRIPT ARGS...` in a new interpreter, as a user runs it."""
    import subprocess

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


def assert_input_error(p, *needles):
    """Exit code 1, the message (each needle) on stderr, and no traceback."""
    assert p.returncode == 1, (p.returncode, p.stdout[-2000:], p.stderr[-2000:])
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    for n in needles:
        assert n in p.stderr, (n, p.stderr[-2000:])
