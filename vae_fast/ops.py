"""vae_fast's operators, as the compiled extension defines them (csrc/ops.cpp):

- `torch.ops.vae_fast.fused_loss(x, y, rlv, w, pw, mu, lv, pmu, plv, beta_t, api, kind,
  reduction, full, rlv_c, lv_c, pmu_c, plv_c, beta, backend) -> (loss, nll, kl)`: what every
  public loss calls. A reconstruction term over (x, y) with its parameters (rlv: Gaussian
  log-variance, w: BCE weight, pw: pos_weight) and a KL term over mu with its parameters (lv,
  pmu, plv), `loss = nll + beta * kl`. A parameter is a tensor, or, when its slot is None, the
  number in its `*_c` argument (w and pw: 1). `beta_t`, a 0-d tensor, replaces `beta`. The
  integer codes (kind, reduction, backend, api) are vae_fast._enums'. Its autograd is
  registered in C++; its backward only scales the gradients the forward wrote.
- `torch.ops.vae_fast.fused_fwd(<the same>, needs) -> (loss, nll, kl, g_x, ..., g_plv)`: the
  fused pass itself, which also writes the gradients of the slots in the bit mask `needs`
  (empty tensors elsewhere). Kernels: CPU (C++), CUDA (Triton), Meta (shapes only).
- `torch.ops.vae_fast.triton_fwd` / `triton_scale`: launch-only, implemented in Python by
  vae_fast/triton_kernels.py and registered by vae_fast/_ext.py.

`fused_loss` and `fused_fwd` below are those ops (None when the extension did not load).
"""
from __future__ import annotations

import torch

from . import _ext

fused_loss = torch.ops.vae_fast.fused_loss.default if _ext.module is not None else None
fused_fwd = torch.ops.vae_fast.fused_fwd.default if _ext.module is not None else None
SLOTS = ("x", "y", "rlv", "w", "pw", "mu", "lv", "pmu", "plv")
