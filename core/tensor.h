// Weight and activation buffers of the CPU backend.
#ifndef DMOE_CORE_TENSOR_H_
#define DMOE_CORE_TENSOR_H_

#include <cstdint>
#include <memory>
#include <vector>

#include "core/dtype.h"

namespace dmoe {

// A 2-D weight matrix [rows = out, cols = in], row-major (nn.Linear layout),
// stored as F32 or BF16. Owns or shares (e.g. with a memory-mapped file) its
// bytes through `keepalive`. Immutable after load; safe to share across threads.
struct Matrix {
  DType dtype = DType::kF32;  // kF32 or kBF16 only
  int64_t rows = 0;
  int64_t cols = 0;
  const void* data = nullptr;
  std::shared_ptr<const void> keepalive;

  bool empty() const { return data == nullptr; }
  int64_t bytes() const { return rows * cols * DTypeSize(dtype); }
  const float* f32() const { return static_cast<const float*>(data); }
  const uint16_t* bf16() const { return static_cast<const uint16_t*>(data); }
  // Element (r, c) as float.
  float at(int64_t r, int64_t c) const {
    const int64_t i = r * cols + c;
    return dtype == DType::kF32 ? f32()[i] : Bf16ToFloat(bf16()[i]);
  }
  // Rows [begin, begin + count) as a view sharing this matrix's storage.
  Matrix RowSlice(int64_t begin, int64_t count) const;

  static Matrix FromFloats(std::vector<float> values, int64_t rows, int64_t cols);
  static Matrix FromBf16(std::vector<uint16_t> values, int64_t rows, int64_t cols);
};

}  // namespace dmoe

#endif  // DMOE_CORE_TENSOR_H_
