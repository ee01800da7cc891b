// The CUDA compute backend (core/compute_backend.h) on one GPU: non-expert
// weights resident in GPU memory as bf16 (F32 checkpoints are rounded to
// bf16 once; FP8 checkpoints arrive dequantized to bf16 by the loader and
// stay bf16 here), the router float32, routed experts stacked per layer for
// the grouped GEMMs, the latent cache in GPU pages (kernels.h's layout),
// activations float32 in device memory. Kernels: core/cuda/kernels.h and
// core/cuda/backend_kernels.h; dense GEMMs through cuBLASLt, the float32
// router through cuBLAS SGEMM. Attention is the absorbed form throughout
// (prefill and decode; MODEL_SPEC.md 3.5). Every CUDA and cuBLAS call's
// failure becomes a Status naming the call. Plain C++ header.
#ifndef DMOE_CORE_CUDA_CUDA_COMPUTE_BACKEND_H_
#define DMOE_CORE_CUDA_CUDA_COMPUTE_BACKEND_H_

#include <cstdint>
#include <memory>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "core/compute_backend.h"
#include "core/config.h"
#include "core/model_weights.h"

namespace dmoe::cuda {

// Weights, GEMM inputs and the latent cache: bf16, or float32 (true
// float32 products, the CPU backend's precision, at twice the memory).
// kAuto: float32 for a checkpoint stored in float32, else bf16 (dummy
// weights included).
enum class CudaPrecision { kAuto, kBf16, kF32 };

struct CudaBackendOptions {
  int device = 0;
  CudaPrecision precision = CudaPrecision::kAuto;
  // Device memory kept free for a step's working buffers when sizing the
  // latent cache by memory fraction.
  int64_t working_memory_bytes = 4ll << 30;
};

// OK when CUDA device `device` exists and answers; UNAVAILABLE naming the
// CUDA error otherwise (no driver, no GPU).
absl::Status CheckCudaDevice(int device);

// Uploads the loaded weights (the host copies of the matrices are dropped
// afterwards; weights() keeps the config, norms and biases).
absl::StatusOr<std::shared_ptr<ComputeBackend>> CreateCudaBackend(std::shared_ptr<const ModelWeights> weights,
                                                                  const CudaBackendOptions& options = {});

// Random weights of `config`'s shapes for the selected tensors, generated
// on the GPU: the values WriteRandomModel / RandomModelWeights give for
// `seed` (so a CPU run of the same dummy model is the reference).
absl::StatusOr<std::shared_ptr<ComputeBackend>> CreateDummyCudaBackend(const ModelConfig& config,
                                                                       const WeightSelection& selection,
                                                                       uint64_t seed,
                                                                       const CudaBackendOptions& options = {});

// Brackets the work a profiler started with capture off records
// (cudaProfilerStart / cudaProfilerStop; ncu --profile-from-start off).
absl::Status SetProfilerCapture(bool on);

}  // namespace dmoe::cuda

#endif  // DMOE_CORE_CUDA_CUDA_COMPUTE_BACKEND_H_
