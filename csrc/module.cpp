// The Python module of the extension, vae_fast._C: what tests and tools ask the compiled code
// (the operators themselves live in torch.ops.vae_fast, registered by ops.cpp).
#include "cpu_kernels.h"
#include "enums.h"
#include "run.h"

#include <torch/headeronly/version.h>
#include <pybind11/pybind11.h>

#include <string>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "vae_fast's compiled operators (torch.ops.vae_fast) and their CPU kernels";
  m.def("cpu_capability", &vae_fast::cpu_capability,
        "the instruction set of the CPU kernels in use: avx512, avx2 or default");
  m.def("kernel_calls", &vae_fast::kernel_calls,
        "how many fused forward kernels this process has run");
  m.def("torch_version", [] { return std::string(TORCH_VERSION); },
        "the torch version this extension was compiled against");
  m.def("enums", [] {
    using namespace vae_fast;
    namespace py = pybind11;
    pybind11::dict d;
    d["Likelihood"] = py::dict(
        py::arg("NONE") = int64_t(kNone), py::arg("BERNOULLI") = int64_t(kBernoulli),
        py::arg("BERNOULLI_PROBS") = int64_t(kBernoulliProbs),
        py::arg("GAUSSIAN") = int64_t(kGaussian),
        py::arg("CONTINUOUS_BERNOULLI") = int64_t(kContinuousBernoulli),
        py::arg("DMOL") = int64_t(kDmol));
    d["Reduction"] = py::dict(
        py::arg("SUM") = int64_t(kSum), py::arg("BATCHMEAN") = int64_t(kBatchmean),
        py::arg("MEAN") = int64_t(kMean), py::arg("PER_SAMPLE") = int64_t(kPerSample),
        py::arg("ELEMENTWISE") = int64_t(kElementwise));
    d["RedMode"] = py::dict(py::arg("TOTAL") = int64_t(kTotal),
                                  py::arg("ROWS") = int64_t(kRows),
                                  py::arg("PER_ELEMENT") = int64_t(kPerElement));
    d["ParamMode"] = py::dict(
        py::arg("CONST") = int64_t(kConst), py::arg("FULL") = int64_t(kFull),
        py::arg("PERIODIC") = int64_t(kPeriodic), py::arg("EXPAND") = int64_t(kExpand));
    d["Backend"] = py::dict(py::arg("CPU") = int64_t(kCpuBackend),
                                  py::arg("TRITON") = int64_t(kTritonBackend));
    d["Api"] = py::dict(
        py::arg("RAW") = int64_t(kRawApi), py::arg("ELBO_LOSS") = int64_t(kElboLoss),
        py::arg("BERNOULLI_NLL") = int64_t(kBernoulliNll),
        py::arg("GAUSSIAN_NLL") = int64_t(kGaussianNll),
        py::arg("GAUSSIAN_KL") = int64_t(kGaussianKl),
        py::arg("SAMPLED_NLL") = int64_t(kSampledNll),
        py::arg("DMOL_NLL") = int64_t(kDmolNll),
        py::arg("BCE_WITH_LOGITS") = int64_t(kBceWithLogits),
        py::arg("BCE") = int64_t(kBce));
    return d;
  });
}
