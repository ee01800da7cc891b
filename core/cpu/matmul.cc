#include "core/cpu/matmul.h"

#include <cblas.h>

#include <algorithm>

#include "core/cpu/parallel.h"

namespace dmoe::cpu {
namespace {

// Dot products of `rows` BF16 weight rows with m activation rows.
void MatMulBf16(const float* x, int64_t m, const Matrix& w, float* y, int64_t ldx,
                int64_t ldy) {
  const int64_t n = w.rows, k = w.cols;
  ParallelFor(n, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> row(k);
    for (int64_t i = begin; i < end; ++i) {
      const uint16_t* wr = w.bf16() + i * k;
      for (int64_t j = 0; j < k; ++j) row[j] = Bf16ToFloat(wr[j]);
      for (int64_t t = 0; t < m; ++t) {
        const float* xt = x + t * ldx;
        float acc = 0.f;
        for (int64_t j = 0; j < k; ++j) acc += row[j] * xt[j];
        y[t * ldy + i] = acc;
      }
    }
  });
}

}  // namespace

void MatMul(const float* x, int64_t m, const Matrix& w, float* y, int64_t ldx,
            int64_t ldy) {
  if (m <= 0 || w.rows == 0) return;
  if (ldx == 0) ldx = w.cols;
  if (ldy == 0) ldy = w.rows;
  if (w.dtype == DType::kBF16) {
    MatMulBf16(x, m, w, y, ldx, ldy);
    return;
  }
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(m),
              static_cast<int>(w.rows), static_cast<int>(w.cols), 1.0f, x,
              static_cast<int>(ldx), w.f32(), static_cast<int>(w.cols), 0.0f, y,
              static_cast<int>(ldy));
}

}  // namespace dmoe::cpu
