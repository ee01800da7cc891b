#include "core/cpu/ops.h"

#include <algorithm>
#include <cmath>

namespace dmoe::cpu {

void RmsNorm(const float* x, int64_t n, int64_t d, const float* w, float eps, float* out, int64_t ldx,
             int64_t ldo) {
  if (ldx == 0) ldx = d;
  if (ldo == 0) ldo = d;
  for (int64_t t = 0; t < n; ++t) {
    const float* xt = x + t * ldx;
    float* ot = out + t * ldo;
    float ss = 0.f;
    for (int64_t i = 0; i < d; ++i) ss += xt[i] * xt[i];
    const float inv = 1.0f / std::sqrt(ss / static_cast<float>(d) + eps);
    for (int64_t i = 0; i < d; ++i) ot[i] = w[i] * (xt[i] * inv);
  }
}

void SiluMul(float* gate, const float* up, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float g = gate[i];
    gate[i] = g / (1.0f + std::exp(-g)) * up[i];
  }
}

void Softmax(float* x, int64_t n) {
  const float mx = *std::max_element(x, x + n);
  float sum = 0.f;
  for (int64_t i = 0; i < n; ++i) sum += (x[i] = std::exp(x[i] - mx));
  const float inv = 1.0f / sum;
  for (int64_t i = 0; i < n; ++i) x[i] *= inv;
}

void Axpy(float a, const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

float Dot(const float* a, const float* b, int64_t n) {
  float s = 0.f;
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

}  // namespace dmoe::cpu
