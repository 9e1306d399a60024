"""`python -m vae_fast.aot`: prove every kernel compiles for real GPUs, without a GPU.

For each kernel specialization (argument types, 16-divisibility, constexprs; recorded from real
launches) and each target (sm_80 Ampere, sm_90 Hopper) it runs the real Triton compiler, then
prints whether it compiled, its registers and spills (`cuobjdump --dump-resource-usage` on the
cubin, shipped in the triton wheel) and whether the loads are 128-bit vector loads
(`ld.global.v4.b32` / `ld.global.v2.b64` in the PTX). Exit status 1 when any fails, when an
aligned float32/bfloat16 case of the built-in table has no vectorized load, or when a
discretized logistic mixture kernel spills (stack or local memory).

    python -m vae_fast.aot                 # the built-in table of representative calls
    python -m vae_fast.aot --specs F.json  # specializations recorded elsewhere (the test run)
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

ARCHS = (80, 90)
KERNELS = ("_fused_loss_fwd_kernel", "_finalize_kernel", "_scale_grads_kernel", "_dmol_kernel",
           "_mixture_fwd_kernel", "_mixture_bwd_rows_kernel", "_mixture_bwd_cols_kernel")
NO_SPILLS = ("_dmol_kernel",)  # a pixel's whole mixture must stay in registers
_VECTOR = re.compile(r"ld\.global(?:\.\w+)*\.(?:v4\.b32|v2\.b64|v4\.b16|v8\.b16)")
_SCALAR = re.compile(r"ld\.global(?:\.\w+)*\.(?:b32|b64|b16|b8|u8|f32|f64)\s")


def spec_of(kernel_name: str, arg_names, args, kwargs, num_warps: int = 4) -> dict:
    """A launch's specialization, exactly as Triton's JIT derives it."""
    import triton.language as tl
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    bound = dict(zip(arg_names, args))
    bound.update(kwargs)
    out = []
    for name in arg_names:
        v = bound[name]
        if isinstance(v, tl.dtype):
            out.append([name, "constexpr", {"dtype": v.name}])
            continue
        ty, spec = native_specialize_impl(BaseBackend, v, False, True, True)
        if ty == "constexpr" or name in kwargs:
            out.append([name, "constexpr", v if not hasattr(v, "value") else v.value])
        else:
            out.append([name, ty, spec == "D"])
    return {"kernel": kernel_name, "args": out, "num_warps": num_warps}


def spec_key(spec: dict) -> str:
    return json.dumps(spec, sort_keys=True)


def kernel_modules() -> dict:
    """Kernel name -> the module that defines it (and its LAST_NUM_WARPS)."""
    from . import triton_kernels as tk, triton_mixture as tm

    return {k: tm if k in tm.KERNELS else tk for k in KERNELS}


def _kernels():
    os.environ.pop("TRITON_INTERPRET", None)
    from . import triton_kernels as tk

    from triton.runtime.jit import JITFunction

    if not isinstance(tk._fused_loss_fwd_kernel, JITFunction):
        raise RuntimeError("vae_fast.aot must run without TRITON_INTERPRET=1 (run it in a fresh process)")
    return {k: getattr(mod, k) for k, mod in kernel_modules().items()}


def _cuobjdump():
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return path if os.path.exists(path) else None


def compile_spec(spec: dict, arch: int, kernels=None) -> dict:
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernels = kernels or _kernels()
    fn = kernels[spec["kernel"]]
    signature, constexprs, attrs = {}, {}, {}
    for i, (name, ty, extra) in enumerate(spec["args"]):
        if ty == "constexpr":
            signature[name] = "constexpr"
            constexprs[name] = tl.dtype(extra["dtype"]) if isinstance(extra, dict) else extra
        else:
            signature[name] = ty
            if extra:
                attrs[(i,)] = [["tt.divisibility", 16]]
    result = {"kernel": spec["kernel"], "arch": f"sm_{arch}", "ok": False}
    try:
        compiled = triton.compile(
            ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
            target=GPUTarget("cuda", arch, 32),
            # FP fusion on, as a launch under Triton 3.9 gets it by default (said explicitly
            # here, which also silences 3.9's warning that the default will change)
            options={"num_warps": spec.get("num_warps", 4), "enable_fp_fusion": True},
        )
    except Exception as e:  # noqa: BLE001 - the report names what failed
        result["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        return result
    ptx = compiled.asm["ptx"]
    result.update(ok=True, vector_loads=len(_VECTOR.findall(ptx)), scalar_loads=len(_SCALAR.findall(ptx)))
    tool = _cuobjdump()
    if tool:
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "k.cubin")
            with open(path, "wb") as f:
                f.write(compiled.asm["cubin"])
            usage = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True).stdout
        for field in ("REG", "STACK", "LOCAL"):
            m = re.search(rf"\b{field}:(\d+)", usage)
            result[field.lower()] = int(m.group(1)) if m else None
    return result


def builtin_cases():
    """Representative calls (name, thunk, aligned fp32/bf16?) covering every likelihood, every
    reduction mode, broadcast parameters and the backward. Sizes are multiples of 16 so the
    arguments are 16-divisible, as they are for typical image batches on a GPU."""
    import torch

    import vae_fast

    def t(*shape, dtype=torch.float32, grad=True):
        x = torch.randn(*shape, dtype=dtype)
        return x.requires_grad_(grad)

    def elbo(likelihood, dtype, reduction="batchmean", **kw):
        def run():
            x = t(16, 256, dtype=dtype)
            y = torch.rand(16, 256).to(dtype) if likelihood != "bernoulli_bool" else torch.rand(16, 256) > 0.5
            if likelihood == "bernoulli_probs":
                x = torch.rand(16, 256, dtype=dtype).requires_grad_()
            out = vae_fast.elbo_loss(
                x, y, t(16, 32, dtype=dtype), t(16, 32, dtype=dtype),
                likelihood="bernoulli" if likelihood == "bernoulli_bool" else likelihood,
                recon_logvar=kw.get("rlv"), prior_mu=kw.get("pmu"), prior_logvar=kw.get("plv"),
                beta=0.5, reduction=reduction, return_terms=True)
            (out.loss.sum() * 2).backward()
        return run

    cases = []
    for dtype, dname in ((torch.float32, "fp32"), (torch.bfloat16, "bf16"), (torch.float16, "fp16"), (torch.float64, "fp64")):
        aligned = dname in ("fp32", "bf16")
        for lik in ("bernoulli", "bernoulli_bool", "bernoulli_probs", "gaussian", "continuous_bernoulli"):
            cases.append((f"elbo {lik} {dname} batchmean", elbo(lik, dtype), aligned))
        cases.append((f"elbo bernoulli {dname} none", elbo("bernoulli", dtype, "none"), aligned))
    cases.append(("elbo gaussian fp32 per-pixel logvar, learned (Z,) prior",
                  elbo("gaussian", torch.float32, rlv=t(16, 256), pmu=t(32), plv=t(32)), True))
    cases.append(("elbo gaussian fp32 scalar logvar", elbo("gaussian", torch.float32, rlv=t(1, 1)), True))

    def bce():
        x, y = t(16, 64), torch.rand(16, 64)
        out = vae_fast.binary_cross_entropy_with_logits(x, y, t(64), "none", t(64))
        (out * 2).sum().backward()
    cases.append(("bce_with_logits fp32 weight+pos_weight elementwise", bce, True))

    def dmol(C, dtype, M=10, grad=True, channels_last=False, elbo=False):
        def run():
            params = torch.randn(16, (10 if C == 3 else 3) * M, 32, 32, dtype=dtype)
            if channels_last:
                params = params.to(memory_format=torch.channels_last)
            params.requires_grad_(grad)
            target = (torch.randint(0, 256, (16, C, 32, 32)) / 127.5 - 1).to(dtype)
            if elbo:
                out = vae_fast.elbo_loss(params, target, t(16, 32, dtype=dtype), t(16, 32, dtype=dtype),
                                         likelihood="discretized_logistic_mixture")
            else:
                out = vae_fast.discretized_logistic_mixture_nll(params, target)
            if grad:
                (out * 2).backward()
        return run

    for dtype, dname in ((torch.float32, "fp32"), (torch.bfloat16, "bf16"), (torch.float16, "fp16"), (torch.float64, "fp64")):
        cases.append((f"dmol C=3 M=10 {dname}", dmol(3, dtype), False))
    cases.append(("dmol C=1 M=10 fp32", dmol(1, torch.float32), False))
    cases.append(("dmol C=3 M=5 fp32", dmol(3, torch.float32, M=5), False))
    cases.append(("dmol C=3 M=30 fp32", dmol(3, torch.float32, M=30), False))
    cases.append(("dmol C=3 M=10 fp32 channels_last", dmol(3, torch.float32, channels_last=True), False))
    cases.append(("dmol C=3 M=10 fp32 forward only", dmol(3, torch.float32, grad=False), False))
    cases.append(("elbo dmol C=3 M=10 fp32", dmol(3, torch.float32, elbo=True), False))

    def mixture(dtype, logits=True, grad=True, B=256, K=500, Z=64):
        def run():
            lv, plv = t(B, Z, dtype=dtype, grad=grad), t(1, Z, dtype=dtype, grad=grad)
            out = vae_fast.mixture_prior_kl(t(B, Z, dtype=dtype, grad=grad), t(B, Z, dtype=dtype, grad=grad), lv,
                                            t(K, Z, dtype=dtype, grad=grad), plv,
                                            t(K, dtype=dtype, grad=grad) if logits else None)
            if grad:
                out.backward()
        return run

    for dtype, dname in ((torch.float32, "fp32"), (torch.bfloat16, "bf16"), (torch.float64, "fp64")):
        cases.append((f"mixture_prior_kl B=256 K=500 Z=64 {dname}", mixture(dtype), False))
    cases.append(("mixture_prior_kl B=5 K=3 Z=7 fp32 equal weights", mixture(torch.float32, False, B=5, K=3, Z=7), False))
    cases.append(("mixture_prior_kl fp32 forward only", mixture(torch.float32, grad=False), False))
    return cases


def record_builtin() -> list[tuple[str, list[dict], bool]]:
    """Run the built-in cases through the public functions and the real launchers, forced onto
    the Triton backend with CPU tensors and launching replaced by recording (no GPU, no
    interpreter needed: outputs are left uninitialized)."""
    import vae_fast
    from vae_fast import _ext

    recorded = []

    class _Recorder:
        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                warps = kwargs.pop("num_warps", 4)
                recorded.append(spec_of(self.fn.__name__, self.fn.arg_names, args, kwargs, warps))
            return launch

    modules = kernel_modules()
    names = KERNELS
    saved = {n: getattr(modules[n], n) for n in names}
    _ext.register_triton("cpu")  # the launchers take CPU tensors; the recorders launch nothing
    out = []
    try:
        for n in names:
            setattr(modules[n], n, _Recorder(saved[n]))
        with vae_fast.use_backend("triton"):
            for name, thunk, aligned in builtin_cases():
                recorded.clear()
                thunk()
                out.append((name, list(recorded), aligned))
    finally:
        for n in names:
            setattr(modules[n], n, saved[n])
    return out


def _compile_one(job):
    return compile_spec(*job)


def _compile_all(jobs: list, workers: int) -> list:
    """compile_spec over (spec, arch) jobs, in order, in `workers` fresh processes (each
    compile is single-threaded Python + LLVM: the test run's 1600 of them take ~12 minutes on
    one core of a 2-core machine with a cold Triton cache)."""
    if workers <= 1 or len(jobs) < 2:
        kernels = _kernels()
        return [compile_spec(spec, arch, kernels) for spec, arch in jobs]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(_compile_one, jobs, chunksize=8))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vae_fast.aot", description=__doc__.splitlines()[0])
    ap.add_argument("--specs", help="JSON list of recorded specializations to compile instead of the built-in table")
    ap.add_argument("--json", help="write the full report here")
    ap.add_argument("--quiet", action="store_true", help="print failures and the summary only")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                    help="compiler processes (default: one per CPU)")
    args = ap.parse_args(argv)

    _kernels()
    if args.specs:
        with open(args.specs) as f:
            groups = [("recorded", json.load(f), False)]
    else:
        groups = record_builtin()
    todo = {}
    for _, specs, _ in groups:
        for spec in specs:
            for arch in ARCHS:
                todo.setdefault((spec_key(spec), arch), (spec, arch))
    seen = dict(zip(todo, _compile_all(list(todo.values()), args.jobs)))
    report, failures = [], []
    for case, specs, aligned in groups:
        for spec in specs:
            key = spec_key(spec)
            for arch in ARCHS:
                r = dict(seen[(key, arch)], case=case)
                report.append(r)
                bad = not r["ok"]
                if aligned and r["ok"] and r["kernel"] == "_fused_loss_fwd_kernel" and not r["vector_loads"]:
                    bad, r["error"] = True, "no 128-bit vector load in an aligned fp32/bf16 case"
                if r["ok"] and r["kernel"] in NO_SPILLS and (r.get("local") or r.get("stack")):
                    bad, r["error"] = True, (f"spills: regs={r.get('reg')} stack={r.get('stack')} "
                                             f"local={r.get('local')}")
                if bad:
                    failures.append(r)
                if not args.quiet or bad:
                    status = "ok " if not bad else "FAIL"
                    extra = r.get("error") or (
                        f"regs={r.get('reg')} stack={r.get('stack')} spills(local)={r.get('local')} "
                        f"loads: {r['vector_loads']} vector / {r['scalar_loads']} scalar")
                    print(f"{status} {r['arch']} {r['kernel']:<24} {case:<52} {extra}")
    n_specs = len({k for k, _ in seen})
    print(f"\n{n_specs} kernel specializations x {len(ARCHS)} archs: "
          f"{len(seen) - len({(k, a) for (k, a), r in seen.items() if not r['ok']})} compiled, "
          f"{len(failures)} failures")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
