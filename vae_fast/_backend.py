"""Backend choice: `VAE_FAST_BACKEND` or `vae_fast.use_backend(name)`.

"auto": CUDA tensors use Triton; CPU tensors use the C++ extension when it builds, else the
reference (with one warning). A forced backend never falls back: what it cannot handle raises
`NotImplementedError`.
"""
from __future__ import annotations

import contextlib
import os
import warnings

import torch

BACKENDS = ("auto", "triton", "cpu", "reference")
ENV = "VAE_FAST_BACKEND"
_stack: list = []  # use_backend's nesting (a plain list: torch.compile traces reads of it)
_warned = False


def _check(name, source: str = "vae_fast backend") -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS}, got {name!r}")
    return name


def current() -> str:
    """The backend asked for: the innermost `use_backend`, else $VAE_FAST_BACKEND, else auto."""
    if _stack:
        return _stack[-1]
    return _check(os.environ.get(ENV, "auto") or "auto", f"${ENV} (the vae_fast backend)")


@contextlib.contextmanager
def use_backend(name: str):
    """`with vae_fast.use_backend("reference"): ...` runs every loss inside on that backend."""
    _stack.append(_check(name))
    try:
        yield
    finally:
        _stack.pop()


def triton_runs_on(device: torch.device) -> bool:
    if device.type == "cuda":
        return True
    if device.type != "cpu" or os.environ.get("TRITON_INTERPRET") != "1":
        return False
    from triton.runtime.interpreter import InterpretedFunction

    from . import triton_kernels

    return isinstance(triton_kernels._fused_loss_fwd_kernel, InterpretedFunction)


def cpu_extension():
    """The C++ extension module, or None with the reason (builds it on first use)."""
    why = _cpu_unavailable()
    if why:
        return None, why
    from . import _cpu

    return _cpu, ""


@torch.compiler.assume_constant_result
def _cpu_unavailable() -> str:
    """"" when the C++ extension loads, else why not. torch.compile calls this eagerly while it
    traces (the first vae_fast call may be inside a compiled step) and keeps the answer."""
    try:
        from . import _cpu
    except ImportError as e:  # pragma: no cover - the module ships with the package
        return f"vae_fast._cpu could not be imported: {e}"
    return "" if _cpu.available() else _cpu.unavailable_reason()


def resolve(device: torch.device) -> str:
    """The backend that will run for tensors on `device`: "triton", "cpu" or "reference"."""
    global _warned
    name = current()
    if name == "reference":
        return name
    if name == "triton":
        if not triton_runs_on(device):
            hint = " (set TRITON_INTERPRET=1 before importing vae_fast)" if device.type == "cpu" else ""
            raise NotImplementedError(f"vae_fast: the triton backend cannot run on {device}{hint}")
        return name
    if name == "cpu":
        if device.type != "cpu":
            raise NotImplementedError(f"vae_fast: the cpu backend cannot run on {device}")
        why = _cpu_unavailable()
        if why:
            raise NotImplementedError(f"vae_fast: the cpu backend is unavailable: {why}")
        return name
    # auto
    if device.type == "cuda":
        return "triton"
    if device.type == "cpu":
        why = _cpu_unavailable()
        if not why:
            return "cpu"
        if not _warned:
            _warned = True
            warnings.warn(f"vae_fast: the C++ CPU extension is unavailable ({why}); "
                          "CPU tensors use the reference implementation", RuntimeWarning, stacklevel=3)
    return "reference"
