"""Fused C++ CPU backend: builds ``csrc/`` on first use and wraps its ops.

The extension is compiled with ``-march=native`` by ``torch.utils.cpp_extension``
the first time :func:`available` or :func:`load` is called, and cached under
``~/.cache/vae_fast/`` (``$VAE_FAST_CACHE_DIR`` or ``$XDG_CACHE_HOME/vae_fast`` if
set) in a directory named after the torch version, a hash of the sources and
flags, and a fingerprint of this CPU's instruction set, so a build is never
reused on a machine that could not run it.

Callers (``vae_fast``'s core) pass tensors that are already validated,
contiguous and on the CPU; the C++ side re-checks shapes and dtypes with
``TORCH_CHECK`` and raises ``RuntimeError`` on a mismatch.

The extension is also a Python module whose ``eager_loss`` (``eager_op`` here)
is the eager fast path of ``vae_fast.functional``: it checks its own case and
answers ``[]`` for anything else.
"""

from __future__ import annotations

import hashlib
import os
import platform
import threading
from pathlib import Path
from typing import Optional, Sequence

import torch

__all__ = ["available", "unavailable_reason", "load", "fused_forward", "scale_", "eager_op"]

_NAMESPACE = "vae_fast_cpu"
# -ffp-contract=fast lets the compiler fuse a*b+c into FMAs; no -ffast-math,
# which would let it assume away NaN and Inf.
_CFLAGS = ["-O3", "-march=native", "-fopenmp", "-ffp-contract=fast", "-DNDEBUG"]
_LDFLAGS = ["-fopenmp"]

_lock = threading.Lock()
_ops = None
_reason: Optional[str] = None
# the extension module's eager_loss (csrc/eager.cpp) once it is loaded: vae_fast.functional's
# eager fast path; None means: take the general path
eager_op = None


def _source_dir() -> Optional[Path]:
    here = Path(__file__).resolve().parent
    for cand in (here / "csrc", here.parent / "csrc"):
        if (cand / "ops.cpp").is_file():
            return cand
    return None


def _cpu_fingerprint() -> str:
    """What -march=native will see: vendor, model and the CPU feature flags."""
    parts = [platform.machine(), torch.backends.cpu.get_cpu_capability()]
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            wanted = {"vendor_id", "cpu family", "model", "model name", "flags", "Features",
                      "CPU implementer", "CPU part"}
            seen = set()
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in wanted and key not in seen:
                    seen.add(key)
                    parts.append(f"{key}={value.strip()}")
                if not line.strip() and seen:
                    break  # first processor is enough
    except OSError:
        parts.append(platform.processor())
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:12]


def _cache_root() -> Path:
    env = os.environ.get("VAE_FAST_CACHE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "vae_fast"


def _build():
    src = _source_dir()
    if src is None:
        raise RuntimeError("the C++ sources (csrc/) are not installed next to vae_fast")
    files = sorted(p for p in src.iterdir() if p.suffix in (".cpp", ".h"))
    h = hashlib.sha256()
    for p in files:
        h.update(p.name.encode())
        h.update(p.read_bytes())
    h.update(" ".join(_CFLAGS + _LDFLAGS).encode())
    src_hash = h.hexdigest()[:12]
    tv = torch.__version__.replace("+", "_")
    key = f"torch{tv}-src{src_hash}-cpu{_cpu_fingerprint()}"
    build_dir = _cache_root() / key
    build_dir.mkdir(parents=True, exist_ok=True)

    from torch.utils import cpp_extension

    module = cpp_extension.load(
        name=f"vae_fast_cpu_{src_hash}",
        sources=[str(p) for p in files if p.suffix == ".cpp"],
        extra_cflags=_CFLAGS,
        extra_ldflags=_LDFLAGS,
        extra_include_paths=[str(src)],
        build_directory=str(build_dir),
        is_python_module=True,
        verbose=os.environ.get("VAE_FAST_VERBOSE_BUILD", "") not in ("", "0"),
    )
    return getattr(torch.ops, _NAMESPACE), module


def _ensure() -> None:
    global _ops, _reason, eager_op
    if _ops is not None or _reason is not None:
        return
    with _lock:
        if _ops is not None or _reason is not None:
            return
        try:
            ops, module = _build()
            # touch both ops so a half-registered library fails here, not later
            ops.fused_forward  # noqa: B018
            ops.scale_  # noqa: B018
            eager_op = module.eager_loss
            _ops = ops
        except BaseException as exc:  # a missing compiler raises all sorts of things
            if isinstance(exc, KeyboardInterrupt):
                raise
            _reason = (
                "the vae_fast C++ CPU extension could not be built or loaded: "
                f"{type(exc).__name__}: {_summarize(str(exc))}"
            )


def _summarize(text: str) -> str:
    """The line of a build log that says what went wrong (the compiler's first error)."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    for ln in lines:
        low = ln.lower()
        if ("error" in low or "not found" in low or "no such file" in low) and \
                not low.startswith(("error building extension", "ninja: build stopped")):
            return ln[:400]
    return lines[-1][:400] if lines else ""


def available() -> bool:
    """True when the extension is built and loaded (builds it on first call).

    Never raises: a missing compiler or a failed build gives False, and
    :func:`unavailable_reason` says why.
    """
    _ensure()
    return _ops is not None


def unavailable_reason() -> str:
    """Why :func:`available` is False ('' when it is True)."""
    _ensure()
    return _reason or ""


def load():
    """The loaded op namespace (``torch.ops.vae_fast_cpu``); RuntimeError when unavailable."""
    _ensure()
    if _ops is None:
        raise RuntimeError(_reason)
    return _ops


def fused_forward(
    x: Optional[torch.Tensor],
    y: Optional[torch.Tensor],
    rlv: Optional[torch.Tensor],
    w: Optional[torch.Tensor],
    pw: Optional[torch.Tensor],
    mu: Optional[torch.Tensor],
    lv: Optional[torch.Tensor],
    pmu: Optional[torch.Tensor],
    plv: Optional[torch.Tensor],
    *,
    rows: int,
    row_len_r: int,
    row_len_k: int,
    modes: Sequence[int],
    inners: Sequence[int],
    counts: Sequence[int],
    consts: Sequence[float],
    kind: int,
    full: bool,
    red_mode: int,
    scale_r: float,
    scale_k: float,
    beta: float,
    out_loss: Optional[torch.Tensor],
    out_nll: Optional[torch.Tensor],
    out_kl: Optional[torch.Tensor],
    grads: Sequence[Optional[torch.Tensor]],
) -> None:
    """One pass over both streams: losses into ``out_*``, gradients into ``grads``.

    Reconstruction stream (``kind`` 1 Bernoulli logits, 2 Bernoulli probabilities,
    3 Gaussian, 0 absent): ``x``, ``y`` with ``rows * row_len_r`` elements.
    KL stream (absent when ``mu`` is None): ``mu`` with ``rows * row_len_k``.
    ``modes/inners/counts[i]`` describe (rlv, w, pw, lv, pmu, plv): 0 constant
    (``consts`` = (rlv, pmu, plv) values; w = pw = 1, lv = 0), 1 full, 2 element
    ``off`` reads ``param[(off // inner) % count]``.
    ``red_mode``: 0 sums (0-d outputs), 1 per row (``rows`` outputs), 2 per element
    (``out_loss`` has one value per reconstruction element, no KL stream).
    ``out_nll = scale_r * sum(nll)``, ``out_kl = scale_k * sum(kl)``,
    ``out_loss = out_nll + beta * out_kl``.
    ``grads``: 9 entries for (x, y, rlv, w, pw, mu, lv, pmu, plv), None or a
    contiguous full-size buffer that receives d(loss element)/d(input) times
    ``scale_r`` (recon) or ``scale_k`` (KL).  Inputs are never written.
    Sums accumulate in float64 per chunk of fixed size: bitwise reproducible
    for any thread count.
    """
    load().fused_forward(
        x, y, rlv, w, pw, mu, lv, pmu, plv,
        int(rows), int(row_len_r), int(row_len_k),
        [int(v) for v in modes], [int(v) for v in inners], [int(v) for v in counts],
        [float(v) for v in consts],
        int(kind), bool(full), int(red_mode), float(scale_r), float(scale_k), float(beta),
        out_loss, out_nll, out_kl, list(grads),
    )


def scale_(
    bufs_r: Sequence[torch.Tensor],
    bufs_k: Sequence[torch.Tensor],
    g_loss: Optional[torch.Tensor],
    g_nll: Optional[torch.Tensor],
    g_kl: Optional[torch.Tensor],
    *,
    beta: float,
    red_mode: int,
    rows: int,
    row_len_r: int,
    row_len_k: int,
) -> None:
    """Backward: multiply the stored gradient buffers by grad_output, in place.

    Recon buffers by ``c_r = g_loss + g_nll``, KL buffers by
    ``c_k = beta * g_loss + g_kl`` (a missing grad counts as 0), taken per row in
    ROWS mode and per element in ELEMENTWISE mode.  A coefficient of exactly 1
    leaves its range untouched (no memory traffic).
    """
    bufs_r = list(bufs_r)
    bufs_k = list(bufs_k)
    if not bufs_r and not bufs_k:
        return
    load().scale_(
        bufs_r, bufs_k, g_loss, g_nll, g_kl, float(beta), int(red_mode), int(rows),
        int(row_len_r), int(row_len_k),
    )
