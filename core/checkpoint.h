// Typed access to checkpoint tensors with shape checks and dtype handling
// (MODEL_SPEC.md 2.2): F32 and BF16 are used in place (memory-mapped), F16
// becomes F32, F8_E4M3 with its weight_scale_inv block scales is
// dequantized to BF16 on load.
#ifndef DMOE_CORE_CHECKPOINT_H_
#define DMOE_CORE_CHECKPOINT_H_

#include <array>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "core/safetensors.h"
#include "core/tensor.h"

namespace dmoe {

class CheckpointReader {
 public:
  // `fp8_block_size`: quantization_config.weight_block_size, if any.
  CheckpointReader(const TensorStore& store, std::optional<std::array<int64_t, 2>> fp8_block_size)
      : store_(store), fp8_block_size_(fp8_block_size) {}

  bool Has(const std::string& name) const { return store_.Find(name) != nullptr; }
  // A [rows, cols] weight. DATA_LOSS naming the file and tensor when it is
  // missing, has another shape, or (FP8) lacks valid scales.
  absl::StatusOr<Matrix> ReadMatrix(const std::string& name, int64_t rows, int64_t cols) const;
  // Same, converted to F32 (the router runs in float32).
  absl::StatusOr<Matrix> ReadMatrixF32(const std::string& name, int64_t rows, int64_t cols) const;
  // A [n] vector as float32.
  absl::StatusOr<std::vector<float>> ReadVector(const std::string& name, int64_t n) const;

 private:
  absl::StatusOr<const TensorInfo*> Lookup(const std::string& name, std::vector<int64_t> shape) const;
  const TensorStore& store_;
  std::optional<std::array<int64_t, 2>> fp8_block_size_;
};

// Dequantizes an FP8 E4M3 [rows, cols] weight with its [ceil(rows/bo),
// ceil(cols/bi)] scale multipliers to float (row-major).
std::vector<float> DequantizeFp8(const uint8_t* w, int64_t rows, int64_t cols, const float* scale_inv,
                                 int64_t block_rows, int64_t block_cols);

}  // namespace dmoe

#endif  // DMOE_CORE_CHECKPOINT_H_
