"""Test set-up: Triton's interpreter on CPU tensors, the backend fixture, and the record of every
Triton kernel specialization the run launches, compiled for sm_80 and sm_90 at the end."""
import json
import os
import subprocess
import sys
import tempfile

# Triton's interpreter runs the kernels on CPU tensors; set before triton is imported anywhere.
# On a GPU machine, VAE_FAST_TEST_GPU=1 keeps the real compiler for tests/test_cuda.py.
GPU_RUN = os.environ.get("VAE_FAST_TEST_GPU") == "1"
if not GPU_RUN:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from vae_fast import _backend  # noqa: E402

try:
    from hypothesis import HealthCheck, settings

    _common = dict(deadline=None, print_blob=True,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    settings.register_profile("ci", derandomize=True, database=None, max_examples=40, **_common)
    settings.register_profile("long", max_examples=1000, **_common)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
except ImportError:  # pragma: no cover
    pass

FUSED_BACKENDS = ("triton", "cpu")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require_backend(name: str) -> None:
    """The compiled extension must be there in CI (installing builds it: its absence is a
    failure, not a skip); on a developer machine without it, the tests that need it skip with
    the reason."""
    ext, why = _backend.cpu_extension()
    if ext is None:
        if IN_CI:
            pytest.fail(f"vae_fast._C must be built and loaded in CI: {why}")
        pytest.skip(f"vae_fast._C unavailable: {why}")
    if name == "triton":
        if GPU_RUN:
            pytest.skip("VAE_FAST_TEST_GPU=1: the interpreter is off, CPU tensors cannot use Triton")
        assert _backend.triton_runs_on(torch.device("cpu")), "TRITON_INTERPRET=1 did not take effect"


def fused_backends() -> list:
    """The fused backends that can run here (for parametrizations that must not skip)."""
    out = []
    if not GPU_RUN and _backend.triton_runs_on(torch.device("cpu")):
        out.append("triton")
    if _backend.cpu_extension()[0] is not None:
        out.append("cpu")
    return out


@pytest.fixture(params=FUSED_BACKENDS)
def backend(request):
    """Each fused backend in turn, forced (no silent fallback)."""
    require_backend(request.param)
    with _backend.use_backend(request.param):
        yield request.param


# --- launch counting and specialization recording, through Triton's own pre-run hooks -------

LAUNCHES = {}
SPECS = {}


def _install_hooks():
    from vae_fast import aot

    for name, mod in aot.kernel_modules().items():
        fn = getattr(mod, name)

        def hook(*args, _name=name, _fn=fn, _mod=mod, **kwargs):
            LAUNCHES[_name] = LAUNCHES.get(_name, 0) + 1
            kwargs = {k: v for k, v in kwargs.items() if k in _fn.arg_names}
            spec = aot.spec_of(_name, _fn.arg_names, args, kwargs, _mod.LAST_NUM_WARPS.get(_name, 4))
            SPECS.setdefault(aot.spec_key(spec), spec)

        fn.add_pre_run_hook(hook)


_install_hooks()


@pytest.fixture
def launches():
    """Counts of Triton kernel launches (by kernel name) made inside the test."""
    LAUNCHES.clear()
    return LAUNCHES


def pytest_sessionfinish(session, exitstatus):
    """Every specialization this run launched must also compile for sm_80 and sm_90."""
    if not SPECS or os.environ.get("VAE_FAST_SKIP_AOT") == "1":
        return
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(list(SPECS.values()), f)
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter:  # the compiles take minutes: say what the silence is
        reporter.write_line(f"AOT: compiling the {len(SPECS)} Triton kernel specializations this run "
                            "launched for sm_80 and sm_90 with the real Triton compiler "
                            "(VAE_FAST_SKIP_AOT=1 skips this) ...")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "vae_fast.aot", "--quiet", "--specs", f.name],
                          capture_output=True, text=True, env=env)
    os.unlink(f.name)
    summary = proc.stdout.strip().splitlines()[-1:] or [proc.stderr.strip()[-2000:]]
    line = f"AOT (launched specializations, sm_80 + sm_90): {summary[0]}"
    if reporter:
        reporter.write_line(line)
    if proc.returncode != 0:
        if reporter:
            reporter.write_line(proc.stdout[-4000:] + proc.stderr[-4000:])
        session.exitstatus = 1
