// Dense products of the CPU backend: activations are float32, weights are
// F32 or BF16 (kept in their stored dtype), accumulation is float32.
// docs/cpu_gemm.md describes the kernels and the measurements behind the
// choices made here.
#ifndef DMOE_CORE_CPU_MATMUL_H_
#define DMOE_CORE_CPU_MATMUL_H_

#include <cstdint>

#include "core/tensor.h"

namespace dmoe::cpu {

// y[m, w.rows] = x[m, w.cols] * w^T, i.e. y[t][i] = sum_j w[i][j] x[t][j].
// x rows are `ldx` floats apart, y rows `ldy` apart (0: dense).
// Multi-threaded (core/cpu/parallel.h).
//
// BF16 weights always go through dmoe's own kernel (MatMulOwn below): the
// weights are widened to float32 in registers, the activations stay exact
// float32. F32 weights go through the own kernel while m <= kOwnF32MaxTokens
// (decode and small prefill chunks, where it measurably beats OpenBLAS) and
// through OpenBLAS sgemm above (where it did not in docs/cpu_gemm.md's runs).
//
// Batch invariance: whenever the own kernel runs (BF16 always, F32 for
// m <= kOwnF32MaxTokens), every output element is computed by the same
// sequence of float operations whatever m is and whatever the other rows of
// x hold, so a token's result is bitwise the same alone or in a batch. sgemm
// (F32, m > kOwnF32MaxTokens) may round differently with m.
void MatMul(const float* x, int64_t m, const Matrix& w, float* y,
            int64_t ldx = 0, int64_t ldy = 0);

// Largest m for which MatMul sends F32 weights to the own kernel.
inline constexpr int64_t kOwnF32MaxTokens = 128;

// Instruction-set variants of the own kernel, picked at run time.
enum class GemmIsa { kScalar, kAvx2, kAvx512 };

// The variant MatMul uses on this CPU: AVX-512 (F+BW+VL) if present, else
// AVX2+FMA, else portable scalar code. Decided once.
GemmIsa BestGemmIsa();
// Whether this CPU can run `isa` (kScalar always).
bool GemmIsaSupported(GemmIsa isa);
// "scalar", "avx2", "avx512".
const char* GemmIsaName(GemmIsa isa);

// dmoe's own kernel, for F32 or BF16 weights and any m, with the given
// variant (which must be supported); MatMul calls it with BestGemmIsa().
// Batch-invariant as described above; different variants round differently
// from each other (each is deterministic). For tests and benchmarks.
void MatMulOwn(GemmIsa isa, const float* x, int64_t m, const Matrix& w, float* y,
               int64_t ldx = 0, int64_t ldy = 0);

}  // namespace dmoe::cpu

#endif  // DMOE_CORE_CPU_MATMUL_H_
