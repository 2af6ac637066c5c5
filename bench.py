"""
bench.py — speed and memory, measured side by side in one run (never asserted in tests).

    python bench.py augment [--image PATH] [--threads N] [--device cpu|cuda]
    python bench.py msda    [--device cuda] [--batch 1]
    python bench.py step    [--config configs/pretrain_demo.py] [--device cpu|cuda] [--iters 5]

Every subcommand prints a human-readable table and ends with ONE line holding a JSON object, so runs can be
compared by script (`python bench.py augment | tail -1 | python -m json.tool`).
"""
import argparse
import json
import sys
import time

import torch


def timeit(fn, warmup=1, iters=5, device="cpu"):
    """Median wall time of fn() in milliseconds (synchronising CUDA around each call)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return times[len(times) // 2]


# <<bench_augment>>

# <<bench_msda>>

# <<bench_step>>


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["augment", "msda", "step"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--image", default=None, help="augment: benchmark on this volume instead of a synthetic one")
    p.add_argument("--batch", type=int, default=None, help="batch size (default: per subcommand)")
    p.add_argument("--iters", type=int, default=None, help="timed iterations (default: per subcommand)")
    p.add_argument("--config", default=None, help="step: a pretrain config file (default: the demo config)")
    args, rest = p.parse_known_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    result = globals()[f"bench_{args.what}"](args, rest)
    result.setdefault("device", args.device)
    result.setdefault("threads", torch.get_num_threads())
    print(json.dumps(result))
