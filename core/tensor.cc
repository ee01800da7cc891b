#include "core/tensor.h"

#include <utility>

namespace dmoe {

Matrix Matrix::RowSlice(int64_t begin, int64_t count) const {
  Matrix m = *this;
  m.rows = count;
  m.data = static_cast<const char*>(data) + begin * cols * DTypeSize(dtype);
  return m;
}

Matrix Matrix::FromFloats(std::vector<float> values, int64_t rows, int64_t cols) {
  auto owned = std::make_shared<std::vector<float>>(std::move(values));
  Matrix m;
  m.dtype = DType::kF32;
  m.rows = rows;
  m.cols = cols;
  m.data = owned->data();
  m.keepalive = std::shared_ptr<const void>(owned, owned->data());
  return m;
}

Matrix Matrix::FromBf16(std::vector<uint16_t> values, int64_t rows, int64_t cols) {
  auto owned = std::make_shared<std::vector<uint16_t>>(std::move(values));
  Matrix m;
  m.dtype = DType::kBF16;
  m.rows = rows;
  m.cols = cols;
  m.data = owned->data();
  m.keepalive = std::shared_ptr<const void>(owned, owned->data());
  return m;
}

}  // namespace dmoe
