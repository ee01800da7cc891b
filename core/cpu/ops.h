// Elementwise and row-wise ops of the CPU backend (float32).
#ifndef DMOE_CORE_CPU_OPS_H_
#define DMOE_CORE_CPU_OPS_H_

#include <cstdint>

namespace dmoe::cpu {

// out[t] = w ⊙ x[t] / sqrt(mean(x[t]^2) + eps) for n rows of width d
// (MODEL_SPEC.md 3.2). x rows are ldx apart, out rows ldo apart (0: d).
void RmsNorm(const float* x, int64_t n, int64_t d, const float* w, float eps, float* out, int64_t ldx = 0,
             int64_t ldo = 0);

// gate[i] = silu(gate[i]) * up[i] for n values.
void SiluMul(float* gate, const float* up, int64_t n);

// In-place softmax over n values (max-subtracted, float32).
void Softmax(float* x, int64_t n);

// y[i] += a * x[i].
void Axpy(float a, const float* x, float* y, int64_t n);

float Dot(const float* a, const float* b, int64_t n);

}  // namespace dmoe::cpu

#endif  // DMOE_CORE_CPU_OPS_H_
