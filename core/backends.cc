#include "core/backends.h"

#include <cstdio>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "core/cpu/cpu_backend.h"
#include "core/log.h"
#include "core/safetensors.h"
#include "core/status_macros.h"
#include "core/synthetic_checkpoint.h"
#ifdef DMOE_HAVE_CUDA
#include "core/cuda/cuda_compute_backend.h"
#endif

namespace dmoe {
namespace {

// (layer, expert) of "model.layers.{l}.mlp.experts.{e}.*", else nullopt.
std::optional<std::pair<int64_t, int64_t>> RoutedExpertOf(const std::string& name) {
  std::vector<std::string> parts = absl::StrSplit(name, '.');
  if (parts.size() < 6 || parts[0] != "model" || parts[1] != "layers" || parts[3] != "mlp" || parts[4] != "experts") {
    return std::nullopt;
  }
  int64_t l = 0, e = 0;
  if (!absl::SimpleAtoi(parts[2], &l) || !absl::SimpleAtoi(parts[5], &e)) return std::nullopt;
  return std::make_pair(l, e);
}

}  // namespace

absl::StatusOr<Device> ParseDevice(std::string_view name) {
  if (name == "cpu") return Device::kCpu;
  if (name == "cuda") return Device::kCuda;
  return absl::InvalidArgumentError(absl::StrCat("--device '", std::string(name), "' must be cpu or cuda"));
}

absl::StatusOr<LoadFormat> ParseLoadFormat(std::string_view name) {
  if (name == "auto" || name == "safetensors") return LoadFormat::kSafetensors;
  if (name == "dummy") return LoadFormat::kDummy;
  return absl::InvalidArgumentError(absl::StrCat("--load-format '", std::string(name), "' must be auto, safetensors or dummy"));
}

absl::StatusOr<BackendOptions> ParseBackendOptions(std::string_view device, std::string_view load_format) {
  BackendOptions o;
  DMOE_ASSIGN_OR_RETURN(o.device, ParseDevice(device));
  DMOE_ASSIGN_OR_RETURN(o.load_format, ParseLoadFormat(load_format));
  return o;
}

const char* DeviceName(Device device) { return device == Device::kCuda ? "cuda" : "cpu"; }

bool CudaBackendBuilt() {
#ifdef DMOE_HAVE_CUDA
  return true;
#else
  return false;
#endif
}

absl::StatusOr<std::shared_ptr<const ModelWeights>> RandomModelWeights(const ModelConfig& config,
                                                                       const WeightSelection& selection,
                                                                       uint64_t seed) {
  std::vector<TensorInfo> tensors;
  for (const RandomTensorSpec& spec : RandomTensorSpecs(config)) {
    const auto expert = RoutedExpertOf(spec.name);
    const bool wanted = expert.has_value()
                            ? (!selection.routed_expert || selection.routed_expert(expert->first, expert->second))
                            : selection.non_expert;
    if (!wanted) continue;
    const std::vector<float> values = RandomTensorValues(spec, seed);
    TensorInfo t;
    t.name = spec.name;
    t.shape = spec.shape;
    t.file = "(dummy)";
    if (spec.shape.size() == 1) {  // norms and biases stay float32, as WriteRandomModel writes them
      auto bytes = std::make_shared<std::vector<float>>(values);
      t.dtype = DType::kF32;
      t.data = reinterpret_cast<const uint8_t*>(bytes->data());
      t.nbytes = static_cast<int64_t>(bytes->size() * sizeof(float));
      t.mapping = bytes;
    } else {
      auto bytes = std::make_shared<std::vector<uint16_t>>(values.size());
      for (size_t i = 0; i < values.size(); ++i) (*bytes)[i] = FloatToBf16(values[i]);
      t.dtype = DType::kBF16;
      t.data = reinterpret_cast<const uint8_t*>(bytes->data());
      t.nbytes = static_cast<int64_t>(bytes->size() * sizeof(uint16_t));
      t.mapping = bytes;
    }
    tensors.push_back(std::move(t));
  }
  std::unique_ptr<TensorStore> store = TensorStore::FromTensors(std::move(tensors));
  return ModelWeights::Load(config, *store, selection);
}

absl::StatusOr<std::shared_ptr<ComputeBackend>> LoadComputeBackend(const std::filesystem::path& model_dir,
                                                                   const WeightSelection& selection,
                                                                   const BackendOptions& options) {
  if (options.device == Device::kCuda) {
#ifdef DMOE_HAVE_CUDA
    // Fail on a machine without a GPU before reading gigabytes of weights.
    DMOE_RETURN_IF_ERROR(cuda::CheckCudaDevice(options.cuda_device));
    cuda::CudaBackendOptions cuda_options;
    cuda_options.device = options.cuda_device;
    if (options.load_format == LoadFormat::kDummy) {
      DMOE_ASSIGN_OR_RETURN(ModelConfig config, ModelConfig::Load(model_dir));
      return cuda::CreateDummyCudaBackend(config, selection, options.dummy_seed, cuda_options);
    }
    DMOE_ASSIGN_OR_RETURN(std::shared_ptr<const ModelWeights> weights, ModelWeights::Load(model_dir, selection));
    return cuda::CreateCudaBackend(std::move(weights), cuda_options);
#else
    return absl::UnavailableError(
        "--device cuda: this dmoe was built without the CUDA backend (configure with -DDMOE_CUDA=ON and nvcc)");
#endif
  }
  std::shared_ptr<const ModelWeights> weights;
  if (options.load_format == LoadFormat::kDummy) {
    DMOE_ASSIGN_OR_RETURN(ModelConfig config, ModelConfig::Load(model_dir));
    DMOE_ASSIGN_OR_RETURN(weights, RandomModelWeights(config, selection, options.dummy_seed));
  } else {
    DMOE_ASSIGN_OR_RETURN(weights, ModelWeights::Load(model_dir, selection));
  }
  return std::make_shared<CpuBackend>(std::move(weights));
}

}  // namespace dmoe
