import os
import sys

from .measure import STEADY_HEAP
from .run import main, parse_args


def _steady_heap(argv) -> None:
    """--steady-heap: run again with glibc's heap settings of bench/measure.py (read only at
    process start), unless they are already in the environment."""
    if "--steady-heap" in argv and any(os.environ.get(k) != v for k, v in STEADY_HEAP.items()):
        sys.stdout.flush()
        os.execve(sys.executable, [sys.executable, "-m", "bench", *argv], {**os.environ, **STEADY_HEAP})


def _dmol(argv) -> int:
    """`python -m bench --dmol [options]`: the discretized logistic mixture benchmark
    (bench/dmol.py) with bench/run.py's options (--device, --threads, --backend, --out, --quick,
    --reps, --min-time, --no-flush, --contenders)."""
    from . import dmol

    rest = [a for a in argv if a != "--dmol"]
    if "-h" in rest or "--help" in rest:
        print("--dmol: instead, fwd+bwd of vae_fast.discretized_logistic_mixture_nll against an "
              "eager PixelCNN++ loss and torch.compile of it (bench/dmol.py); honours --device, "
              "--threads, --backend, --out, --quick, --reps, --min-time, --no-flush, --contenders\n")
    return dmol.main(parse_args(rest), rest)


_steady_heap(sys.argv[1:])
raise SystemExit(_dmol(sys.argv[1:]) if "--dmol" in sys.argv[1:] else main())
