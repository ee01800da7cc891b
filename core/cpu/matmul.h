// Dense products of the CPU backend: activations are float32, weights are
// F32 or BF16 (kept in their stored dtype), accumulation is float32.
#ifndef DMOE_CORE_CPU_MATMUL_H_
#define DMOE_CORE_CPU_MATMUL_H_

#include <cstdint>

#include "core/tensor.h"

namespace dmoe::cpu {

// y[m, w.rows] = x[m, w.cols] * w^T, i.e. y[t][i] = sum_j w[i][j] x[t][j].
// x rows are `ldx` floats apart, y rows `ldy` apart (0: dense).
// F32 weights go through OpenBLAS sgemm; BF16 weights through dmoe's own
// kernel (docs/performance.md says why). Multi-threaded. The BF16 kernel
// computes every output element independently of the other rows of x, so a
// token's result does not depend on the batch it shares; sgemm may round
// differently with m (within float32 rounding).
void MatMul(const float* x, int64_t m, const Matrix& w, float* y,
            int64_t ldx = 0, int64_t ldy = 0);

}  // namespace dmoe::cpu

#endif  // DMOE_CORE_CPU_MATMUL_H_
