#include "core/checkpoint.h"

#include <cstring>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "core/status_macros.h"

namespace dmoe {
namespace {

std::string Shape(const std::vector<int64_t>& s) { return absl::StrCat("[", absl::StrJoin(s, ", "), "]"); }

std::vector<float> ToFloats(const TensorInfo& t) {
  const int64_t n = t.numel();
  std::vector<float> out(n);
  switch (t.dtype) {
    case DType::kF32:
      std::memcpy(out.data(), t.data, n * sizeof(float));
      break;
    case DType::kBF16:
      for (int64_t i = 0; i < n; ++i) {
        uint16_t v;
        std::memcpy(&v, t.data + 2 * i, 2);
        out[i] = Bf16ToFloat(v);
      }
      break;
    case DType::kF16:
      for (int64_t i = 0; i < n; ++i) {
        uint16_t v;
        std::memcpy(&v, t.data + 2 * i, 2);
        out[i] = F16ToFloat(v);
      }
      break;
    case DType::kF8E4M3:
      for (int64_t i = 0; i < n; ++i) out[i] = Fp8E4M3ToFloat(t.data[i]);
      break;
  }
  return out;
}

Matrix View(const TensorInfo& t, int64_t rows, int64_t cols) {
  Matrix m;
  m.dtype = t.dtype;
  m.rows = rows;
  m.cols = cols;
  m.data = t.data;
  m.keepalive = t.mapping;
  return m;
}

}  // namespace

std::vector<float> DequantizeFp8(const uint8_t* w, int64_t rows, int64_t cols, const float* scale_inv,
                                 int64_t block_rows, int64_t block_cols) {
  const int64_t scale_cols = (cols + block_cols - 1) / block_cols;
  float table[256];
  for (int i = 0; i < 256; ++i) table[i] = Fp8E4M3ToFloat(static_cast<uint8_t>(i));
  std::vector<float> out(rows * cols);
  for (int64_t i = 0; i < rows; ++i) {
    const float* srow = scale_inv + (i / block_rows) * scale_cols;
    for (int64_t j = 0; j < cols; ++j) out[i * cols + j] = table[w[i * cols + j]] * srow[j / block_cols];
  }
  return out;
}

absl::StatusOr<const TensorInfo*> CheckpointReader::Lookup(const std::string& name,
                                                           std::vector<int64_t> shape) const {
  const TensorInfo* t = store_.Find(name);
  if (t == nullptr) return absl::DataLossError(absl::StrCat("checkpoint: tensor '", name, "' is missing"));
  if (t->shape != shape) {
    return absl::DataLossError(absl::StrCat(t->file, ": tensor '", name, "' has shape ", t->ShapeString(),
                                            ", config.json implies ", Shape(shape)));
  }
  return t;
}

absl::StatusOr<Matrix> CheckpointReader::ReadMatrix(const std::string& name, int64_t rows, int64_t cols) const {
  DMOE_ASSIGN_OR_RETURN(const TensorInfo* t, Lookup(name, {rows, cols}));
  switch (t->dtype) {
    case DType::kF32:
    case DType::kBF16:
      return View(*t, rows, cols);
    case DType::kF16:
      return Matrix::FromFloats(ToFloats(*t), rows, cols);
    case DType::kF8E4M3: {
      const std::string scale_name = name + "_scale_inv";
      const std::array<int64_t, 2> block = fp8_block_size_.value_or(std::array<int64_t, 2>{128, 128});
      const int64_t sr = (rows + block[0] - 1) / block[0], sc = (cols + block[1] - 1) / block[1];
      const TensorInfo* s = store_.Find(scale_name);
      if (s == nullptr) {
        return absl::DataLossError(absl::StrCat(t->file, ": FP8 tensor '", name, "' has no '", scale_name, "'"));
      }
      if (s->shape != std::vector<int64_t>{sr, sc}) {
        return absl::DataLossError(absl::StrCat(s->file, ": tensor '", scale_name, "' has shape ", s->ShapeString(),
                                                ", weight_block_size [", block[0], ", ", block[1], "] implies ",
                                                Shape({sr, sc})));
      }
      const std::vector<float> scales = ToFloats(*s);
      const std::vector<float> w = DequantizeFp8(t->data, rows, cols, scales.data(), block[0], block[1]);
      std::vector<uint16_t> bf16(w.size());
      for (size_t i = 0; i < w.size(); ++i) bf16[i] = FloatToBf16(w[i]);
      return Matrix::FromBf16(std::move(bf16), rows, cols);
    }
  }
  return absl::InternalError("unreachable dtype");
}

absl::StatusOr<Matrix> CheckpointReader::ReadMatrixF32(const std::string& name, int64_t rows, int64_t cols) const {
  DMOE_ASSIGN_OR_RETURN(Matrix m, ReadMatrix(name, rows, cols));
  if (m.dtype == DType::kF32) return m;
  std::vector<float> values(rows * cols);
  for (int64_t i = 0; i < rows * cols; ++i) values[i] = Bf16ToFloat(m.bf16()[i]);
  return Matrix::FromFloats(std::move(values), rows, cols);
}

absl::StatusOr<std::vector<float>> CheckpointReader::ReadVector(const std::string& name, int64_t n) const {
  DMOE_ASSIGN_OR_RETURN(const TensorInfo* t, Lookup(name, {n}));
  if (t->dtype == DType::kF8E4M3) {
    return absl::DataLossError(absl::StrCat(t->file, ": tensor '", name, "' is F8_E4M3; expected a float vector"));
  }
  return ToFloats(*t);
}

}  // namespace dmoe
