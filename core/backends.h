// Choosing and loading a compute backend (core/compute_backend.h) by
// --device and --load-format, for the CLI and the node binaries.
#ifndef DMOE_CORE_BACKENDS_H_
#define DMOE_CORE_BACKENDS_H_

#include <cstdint>
#include <filesystem>
#include <memory>
#include <string_view>

#include "absl/status/statusor.h"
#include "core/compute_backend.h"
#include "core/model_weights.h"

namespace dmoe {

enum class Device { kCpu, kCuda };
enum class LoadFormat {
  kSafetensors,  // the checkpoint's weights
  kDummy,        // random weights of the config's shapes (WriteRandomModel's values), no weight files read
};

// "cpu" | "cuda"; INVALID_ARGUMENT otherwise.
absl::StatusOr<Device> ParseDevice(std::string_view name);
// "auto" | "safetensors" | "dummy"; INVALID_ARGUMENT otherwise.
absl::StatusOr<LoadFormat> ParseLoadFormat(std::string_view name);
const char* DeviceName(Device device);

struct BackendOptions {
  Device device = Device::kCpu;
  LoadFormat load_format = LoadFormat::kSafetensors;
  uint64_t dummy_seed = 0;
  int cuda_device = 0;
};

// --device and --load-format values (as given, or their defaults "cpu" and
// "auto") as options.
absl::StatusOr<BackendOptions> ParseBackendOptions(std::string_view device, std::string_view load_format);

// Whether this build has the CUDA backend (-DDMOE_CUDA=ON).
bool CudaBackendBuilt();

// Loads `selection` of the model in `model_dir` (config.json; weights unless
// dummy) where `options.device` computes. --device cuda in a build without
// CUDA, or on a machine without a usable GPU: UNAVAILABLE saying which.
absl::StatusOr<std::shared_ptr<ComputeBackend>> LoadComputeBackend(const std::filesystem::path& model_dir,
                                                                   const WeightSelection& selection,
                                                                   const BackendOptions& options);

// Random host weights (BF16 matrices, F32 norms) of `config` for the
// selected tensors, the values WriteRandomModel writes for `seed`.
absl::StatusOr<std::shared_ptr<const ModelWeights>> RandomModelWeights(const ModelConfig& config,
                                                                       const WeightSelection& selection,
                                                                       uint64_t seed);

}  // namespace dmoe

#endif  // DMOE_CORE_BACKENDS_H_
