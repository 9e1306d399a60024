"""Backend choice: `VAE_FAST_BACKEND` or `vae_fast.use_backend(name)`.

"auto": CUDA tensors use Triton; CPU tensors use the C++ kernels; other devices (and a missing
extension, after one warning) use the reference. A forced backend never falls back: what it
cannot handle raises `NotImplementedError`.
"""
from __future__ import annotations

import contextlib
import os
import warnings

import torch

from . import _ext
from ._enums import Backend

BACKENDS = ("auto", "triton", "cpu", "reference")
ENV = "VAE_FAST_BACKEND"
_stack: list = []  # use_backend's nesting (a plain list: torch.compile traces reads of it)
_warned = False
_CPU, _TRITON = int(Backend.CPU), int(Backend.TRITON)


def _check(name, source: str = "vae_fast backend") -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS}, got {name!r}")
    return name


# os.environ.get costs a microsecond a call (a KeyError when unset), a tenth of a tiny loss's
# whole host time: read the variable from the mapping os.environ keeps, where there is one
_environ_data = getattr(os.environ, "_data", None)
_ENV_KEY = os.environ.encodekey(ENV) if _environ_data is not None else None


def _env_name():
    if _environ_data is None or torch.compiler.is_compiling():
        return os.environ.get(ENV)
    raw = _environ_data.get(_ENV_KEY)
    return None if raw is None else os.environ.decodevalue(raw)


def current() -> str:
    """The backend asked for: the innermost `use_backend`, else $VAE_FAST_BACKEND, else auto."""
    if _stack:
        return _stack[-1]
    name = _env_name() or "auto"
    return name if name in BACKENDS else _check(name, f"${ENV} (the vae_fast backend)")


@contextlib.contextmanager
def use_backend(name: str):
    """`with vae_fast.use_backend("reference"): ...` runs every loss inside on that backend."""
    _stack.append(_check(name))
    try:
        yield
    finally:
        _stack.pop()


def triton_runs_on(device: torch.device) -> bool:
    return device.type in _ext.triton_devices


def cpu_extension():
    """(vae_fast._C, "") when the compiled extension is loaded, else (None, why not)."""
    return _ext.module, _ext.reason


def _unavailable(name: str):
    return NotImplementedError(f"vae_fast: the {name} backend is unavailable: {_ext.reason}")


def code(t: torch.Tensor):
    """The op's backend code for tensors on `t`'s device (a Backend), or None: the reference.

    Raises NotImplementedError for a forced backend that cannot run there. (The Triton
    backend on CPU tensors without TRITON_INTERPRET=1 is refused by the op itself.)"""
    global _warned
    name = _stack[-1] if _stack else current()
    if name == "reference":
        return None
    cpu, cuda = t.is_cpu, t.is_cuda
    if name == "auto":
        if _ext.module is not None:
            if cpu:
                return _CPU
            if cuda and "cuda" in _ext.triton_devices:
                return _TRITON
        if (cpu or cuda) and not _warned:
            _warned = True
            why = _ext.reason or "Triton is not installed"
            warnings.warn(f"vae_fast: the fused kernels are unavailable on {t.device.type} ({why}); "
                          "these tensors use the reference implementation", RuntimeWarning,
                          stacklevel=4)
        return None
    if not (cpu or cuda) or (name == "cpu" and not cpu):
        raise NotImplementedError(f"vae_fast: the {name} backend cannot run on {t.device}")
    if _ext.module is None:
        raise _unavailable(name)
    return _CPU if name == "cpu" else _TRITON


def resolve(device: torch.device) -> str:
    """The backend that runs for tensors on `device`: "triton", "cpu" or "reference"."""
    c = code(torch.empty(0, device=device))
    return "reference" if c is None else ("cpu" if c == _CPU else "triton")
