// MatMul (and each ISA variant of dmoe's own kernel) against a float64
// reference, with edge shapes, strides and the batch-invariance guarantee.
#include "core/cpu/matmul.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "core/tensor.h"

namespace dmoe::cpu {
namespace {

Matrix RandomMatrix(DType dtype, int64_t rows, int64_t cols, std::mt19937& rng) {
  std::normal_distribution<float> dist(0.f, 1.f);
  if (dtype == DType::kBF16) {
    std::vector<uint16_t> v(rows * cols);
    for (auto& e : v) e = FloatToBf16(dist(rng));
    return Matrix::FromBf16(std::move(v), rows, cols);
  }
  std::vector<float> v(rows * cols);
  for (auto& e : v) e = dist(rng);
  return Matrix::FromFloats(std::move(v), rows, cols);
}

std::vector<float> RandomVector(int64_t n, std::mt19937& rng) {
  std::normal_distribution<float> dist(0.f, 1.f);
  std::vector<float> v(n);
  for (auto& e : v) e = dist(rng);
  return v;
}

// The variants to check: MatMul itself and every own-kernel ISA this CPU runs.
struct Variant {
  std::string name;
  bool own;  // MatMulOwn (always batch-invariant) rather than MatMul
  GemmIsa isa;
};

std::vector<Variant> Variants() {
  std::vector<Variant> v = {{"MatMul", false, BestGemmIsa()}};
  for (GemmIsa isa : {GemmIsa::kScalar, GemmIsa::kAvx2, GemmIsa::kAvx512}) {
    if (GemmIsaSupported(isa)) v.push_back({std::string("own-") + GemmIsaName(isa), true, isa});
  }
  return v;
}

void RunVariant(const Variant& v, const float* x, int64_t m, const Matrix& w, float* y, int64_t ldx,
         int64_t ldy) {
  if (v.own) {
    MatMulOwn(v.isa, x, m, w, y, ldx, ldy);
  } else {
    MatMul(x, m, w, y, ldx, ldy);
  }
}

// Checks y against a float64 reference. Tolerance: any float32 evaluation
// order of a k-term dot product (FMA or not) is within gamma_k * sum|w||x| of
// the exact value, gamma_k = k u / (1 - k u), u = 2^-24. We allow 2 k u
// sum|w||x| (plus 1e-30 for k = 0 rows of zeros). A wrong, missing or
// doubled term is off by ~ sum|w||x| / k, far above that for every k here.
void CheckAgainstReference(const Variant& v, DType dtype, int64_t m, int64_t n, int64_t k,
                           bool strided, std::mt19937& rng) {
  const Matrix w = RandomMatrix(dtype, n, k, rng);
  const int64_t ldx = strided ? k + 5 : k;
  const int64_t ldy = strided ? n + 3 : n;
  const std::vector<float> x = RandomVector(m * ldx, rng);
  const float kSentinel = 12345.f;
  std::vector<float> y(m * ldy, kSentinel);
  RunVariant(v, x.data(), m, w, y.data(), strided ? ldx : 0, strided ? ldy : 0);
  const double u = std::ldexp(1.0, -24);
  for (int64_t t = 0; t < m; ++t) {
    for (int64_t i = 0; i < n; ++i) {
      double ref = 0, mag = 0;
      for (int64_t j = 0; j < k; ++j) {
        const double p = static_cast<double>(w.at(i, j)) * x[t * ldx + j];
        ref += p;
        mag += std::fabs(p);
      }
      const double tol = 2.0 * k * u * mag + 1e-30;
      ASSERT_NEAR(y[t * ldy + i], ref, tol)
          << v.name << " " << DTypeName(dtype) << " m=" << m << " n=" << n << " k=" << k
          << " strided=" << strided << " t=" << t << " i=" << i;
    }
    for (int64_t i = n; i < ldy; ++i) {
      ASSERT_EQ(y[t * ldy + i], kSentinel) << v.name << ": wrote past row " << t << " of y";
    }
  }
}

TEST(MatMulTest, MatchesFloat64ReferenceOnEdgeShapes) {
  std::mt19937 rng(1234);
  const std::vector<Variant> variants = Variants();
  for (const Variant& v : variants) {
    for (DType dtype : {DType::kF32, DType::kBF16}) {
      for (int64_t m : {1, 2, 3, 5, 8, 17, 33}) {
        for (int64_t n : {1, 3, 16, 17, 130}) {
          for (int64_t k : {1, 7, 16, 33, 257, 1024}) {
            // Strided for every other shape (both layouts get every m).
            const bool strided = ((m + n + k) & 1) != 0;
            CheckAgainstReference(v, dtype, m, n, k, strided, rng);
            if (::testing::Test::HasFatalFailure()) return;
          }
        }
      }
    }
  }
}

TEST(MatMulTest, StridedAndDenseBothChecked) {
  std::mt19937 rng(99);
  for (const Variant& v : Variants()) {
    for (DType dtype : {DType::kF32, DType::kBF16}) {
      for (bool strided : {false, true}) {
        CheckAgainstReference(v, dtype, 33, 130, 257, strided, rng);
        CheckAgainstReference(v, dtype, 2, 17, 33, strided, rng);
        if (::testing::Test::HasFatalFailure()) return;
      }
    }
  }
}

// MatMul with F32 weights above kOwnF32MaxTokens goes to sgemm; check it too.
TEST(MatMulTest, F32AboveOwnKernelRangeMatchesReference) {
  std::mt19937 rng(7);
  const Variant v{"MatMul", false, BestGemmIsa()};
  CheckAgainstReference(v, DType::kF32, kOwnF32MaxTokens + 7, 130, 257, true, rng);
  CheckAgainstReference(v, DType::kF32, kOwnF32MaxTokens + 1, 17, 33, false, rng);
}

TEST(MatMulTest, ZeroColumnsGiveZeros) {
  for (const Variant& v : Variants()) {
    for (DType dtype : {DType::kF32, DType::kBF16}) {
      Matrix w = dtype == DType::kF32 ? Matrix::FromFloats({}, 5, 0) : Matrix::FromBf16({}, 5, 0);
      std::vector<float> y(3 * 5, 7.f);
      const float x = 0.f;
      RunVariant(v, &x, 3, w, y.data(), 1, 5);
      for (float e : y) EXPECT_EQ(e, 0.f) << v.name;
    }
  }
}

bool SameBits(float a, float b) { return std::memcmp(&a, &b, sizeof a) == 0; }

// The row of token t must be bitwise the same whether t is computed alone, in
// a batch of 7 or of 32, or at another position among other tokens.
void CheckBatchInvariance(const Variant& v, DType dtype, int64_t n, int64_t k) {
  std::mt19937 rng(static_cast<uint32_t>(n * 31 + k));
  const Matrix w = RandomMatrix(dtype, n, k, rng);
  const int64_t kBatch = 32;
  const int64_t ldx = k + 3;
  const std::vector<float> x = RandomVector(kBatch * ldx, rng);
  std::vector<float> y32(kBatch * n), y7(7 * n), y1(n);
  RunVariant(v, x.data(), kBatch, w, y32.data(), ldx, n);
  RunVariant(v, x.data(), 7, w, y7.data(), ldx, n);
  // Reversed batch: token t sits at position 31 - t among the same tokens.
  std::vector<float> xr(kBatch * ldx), yr(kBatch * n);
  for (int64_t t = 0; t < kBatch; ++t) {
    std::memcpy(&xr[(kBatch - 1 - t) * ldx], &x[t * ldx], k * sizeof(float));
  }
  RunVariant(v, xr.data(), kBatch, w, yr.data(), ldx, n);
  for (int64_t t = 0; t < kBatch; ++t) {
    RunVariant(v, &x[t * ldx], 1, w, y1.data(), 0, 0);
    for (int64_t i = 0; i < n; ++i) {
      const std::string where = v.name + " " + std::string(DTypeName(dtype)) +
                                " n=" + std::to_string(n) + " k=" + std::to_string(k) +
                                " t=" + std::to_string(t) + " i=" + std::to_string(i);
      ASSERT_TRUE(SameBits(y1[i], y32[t * n + i])) << where << ": m=1 vs m=32";
      ASSERT_TRUE(SameBits(y1[i], yr[(kBatch - 1 - t) * n + i])) << where << ": reversed";
      if (t < 7) ASSERT_TRUE(SameBits(y1[i], y7[t * n + i])) << where << ": m=1 vs m=7";
    }
  }
}

TEST(MatMulTest, BatchInvariant) {
  for (const Variant& v : Variants()) {
    for (DType dtype : {DType::kBF16, DType::kF32}) {
      // F32 through MatMul is batch-invariant only while it uses the own kernel.
      if (!v.own && dtype == DType::kF32 && kOwnF32MaxTokens < 32) continue;
      // 130 x 1031: row and column tails; 300 x 2048: several panels and
      // threads (the tiles and thread ranges differ between m = 1 and m > 1).
      CheckBatchInvariance(v, dtype, 130, 1031);
      CheckBatchInvariance(v, dtype, 300, 2048);
      if (::testing::Test::HasFatalFailure()) return;
    }
  }
}

TEST(MatMulTest, IsaNames) {
  EXPECT_TRUE(GemmIsaSupported(GemmIsa::kScalar));
  EXPECT_TRUE(GemmIsaSupported(BestGemmIsa()));
  EXPECT_STREQ(GemmIsaName(GemmIsa::kAvx2), "avx2");
}

}  // namespace
}  // namespace dmoe::cpu
