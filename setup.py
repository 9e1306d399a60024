"""Builds vae_fast's C++ extension, vae_fast._C, at install time (setuptools CppExtension).

`pip install --no-build-isolation .`, `pip install --no-build-isolation -e .` and
`pip wheel --no-build-isolation .` all compile it against the torch already installed (an
isolated build would fetch another torch, whose ABI the extension would then be built for).
Nothing compiles at import or at first use, and no compiler is needed at run time.

The CPU kernels (csrc/kernels_impl.h) are compiled once per instruction set, side by side:
kernels_default.cpp with the baseline flags and, on x86-64, kernels_avx2.cpp and
kernels_avx512.cpp with their -m flags; csrc/cpu_dispatch.cpp picks one at run time. Never
-march=native: a wheel built here runs on any x86-64 CPU.
"""
import os
import platform
import sys
from concurrent.futures import ThreadPoolExecutor

from setuptools import setup

try:
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension
except ImportError:  # pragma: no cover - the message is the point
    sys.exit("vae_fast compiles its C++ extension against the torch it will run with: install "
             "torch first, then `pip install --no-build-isolation .` (or -e . / pip wheel)")

ROOT = os.path.dirname(os.path.abspath(__file__))
X86 = platform.machine().lower() in ("x86_64", "amd64")
# -ffp-contract=fast lets the compiler fuse a*b+c into FMAs; no -ffast-math, which would let
# it assume NaN and Inf away.
CFLAGS = ["-O3", "-fopenmp", "-ffp-contract=fast", "-DNDEBUG", "-Wno-psabi"]
ISA_FLAGS = {
    "avx2": ["-mavx2", "-mfma", "-mf16c"],
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c"],
}
SOURCES = ["ops.cpp", "module.cpp", "plan.cpp", "run.cpp", "cpu_dispatch.cpp", "kernels_default.cpp",
           "mixture.cpp", "free_bits.cpp", "iwae.cpp", "iwae_latent.cpp"]


class BuildWithIsaKernels(BuildExtension):
    """BuildExtension, plus the instruction-set builds of the kernels: each compiled with its
    own flags (in threads, while the baseline sources compile) and linked after the baseline
    objects, so that where several of them emit the same inline function the linker keeps
    the baseline copy."""

    def build_extension(self, ext):
        if not (X86 and ext.name == "vae_fast._C"):
            return super().build_extension(ext)
        args = ext.extra_compile_args
        flags = list(args["cxx"] if isinstance(args, dict) else args)
        pool = ThreadPoolExecutor(len(ISA_FLAGS))
        jobs = [pool.submit(self.compiler.compile, [os.path.join("csrc", f"kernels_{isa}.cpp")],
                            output_dir=os.path.join(self.build_temp, isa),
                            macros=ext.define_macros, include_dirs=ext.include_dirs,
                            extra_postargs=flags + isa_flags, depends=ext.depends)
                for isa, isa_flags in ISA_FLAGS.items()]
        link = self.compiler.link_shared_object

        def link_with_isa_objects(objects, *a, **k):
            return link(list(objects) + [o for j in jobs for o in j.result()], *a, **k)

        self.compiler.link_shared_object = link_with_isa_objects
        try:
            super().build_extension(ext)
        finally:
            self.compiler.link_shared_object = link
            pool.shutdown()


def write_build_info():
    """vae_fast/_build_info.py: the torch the extension is built against, checked before the
    extension is loaded (another torch's ABI could crash the process instead of raising)."""
    path = os.path.join(ROOT, "vae_fast", "_build_info.py")
    text = ('"""Written by setup.py when vae_fast._C is built."""\n'
            f"TORCH_VERSION = {torch.__version__!r}\n")
    if not os.path.exists(path) or open(path).read() != text:
        with open(path, "w") as f:
            f.write(text)


write_build_info()
headers = [os.path.join("csrc", f) for f in sorted(os.listdir(os.path.join(ROOT, "csrc")))
           if f.endswith(".h")]
setup(
    ext_modules=[CppExtension(
        "vae_fast._C",
        sources=[os.path.join("csrc", f) for f in SOURCES],
        include_dirs=[os.path.join(ROOT, "csrc")],
        define_macros=[("VAE_FAST_X86_BUILDS", "1")] if X86 else [],
        extra_compile_args={"cxx": CFLAGS},
        extra_link_args=["-fopenmp"],
        depends=headers,
    )],
    cmdclass={"build_ext": BuildWithIsaKernels},
)
