import sys

from .run import main, parse_args


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


raise SystemExit(_dmol(sys.argv[1:]) if "--dmol" in sys.argv[1:] else main())
