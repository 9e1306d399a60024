"""Loads vae_fast._C, the extension compiled at install time (setup.py), which defines the ops
in `torch.ops.vae_fast` and their CPU, Meta and autograd kernels; then registers, from Python,
the kernels of the launch-only ops that run Triton (vae_fast/triton_kernels.py, and
vae_fast/triton_mixture.py for mixture_prior_kl).

Nothing is compiled here. An extension that cannot load (not built, or built for another torch)
leaves `module` None and says why in `reason`: the "auto" backend then warns once and uses the
reference, and a forced fused backend raises NotImplementedError with that reason.
"""
from __future__ import annotations

import importlib.util
import os

import torch

module = None  # vae_fast._C once loaded
reason = ""  # why it is not
triton_devices: tuple = ()  # device types whose tensors the Triton kernels take


def _load():
    global module, reason
    try:
        from . import _build_info
    except ImportError:
        reason = ("vae_fast._C is not built: install vae_fast with "
                  "`pip install --no-build-isolation .` (or -e .), which compiles it")
        return
    if _build_info.TORCH_VERSION != torch.__version__:
        # another torch's ABI may crash instead of failing to import: do not even try
        reason = (f"vae_fast._C was built for torch {_build_info.TORCH_VERSION} and this is torch "
                  f"{torch.__version__}: reinstall vae_fast against this torch")
        return
    try:
        from . import _C
    except (ImportError, OSError) as e:
        reason = f"vae_fast._C could not be loaded: {e}"
        return
    module = _C


_lib = None  # keeps the Python kernel registrations alive


def _triton_fwd(*args):
    from . import triton_kernels

    triton_kernels.launch_forward(*args)


def _triton_scale(*args):
    from . import triton_kernels

    triton_kernels.launch_scale(*args)


def _triton_dmol(*args):
    from . import triton_kernels

    triton_kernels.launch_dmol(*args)


def _triton_mixture_fwd(*args):
    from . import triton_mixture

    triton_mixture.launch_forward(*args)


def _triton_mixture_bwd(*args):
    from . import triton_mixture

    triton_mixture.launch_backward(*args)


def register_triton(device_type: str) -> None:
    """Let the Triton kernels take tensors of `device_type` ("cuda"; "cpu" runs them in
    Triton's interpreter, or, for vae_fast.aot, records their launches)."""
    global _lib, triton_devices
    if module is None or device_type in triton_devices:
        return
    if _lib is None:
        _lib = torch.library.Library("vae_fast", "IMPL")
    key = {"cuda": "CUDA", "cpu": "CPU"}[device_type]
    _lib.impl("triton_fwd", _triton_fwd, key)
    _lib.impl("triton_scale", _triton_scale, key)
    _lib.impl("triton_dmol", _triton_dmol, key)
    _lib.impl("triton_mixture_fwd", _triton_mixture_fwd, key)
    _lib.impl("triton_mixture_bwd", _triton_mixture_bwd, key)
    triton_devices = triton_devices + (device_type,)


_load()
if module is not None and importlib.util.find_spec("triton") is not None:
    register_triton("cuda")
    if os.environ.get("TRITON_INTERPRET") == "1":
        register_triton("cpu")
