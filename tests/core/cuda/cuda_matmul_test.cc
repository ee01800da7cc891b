// The CUDA BF16 matmul against the CPU backend. Without a GPU every test
// skips, saying why (never a silent pass).
#include <cmath>
#include <random>

#include "core/cpu/matmul.h"
#include "core/cuda/cuda_backend.h"
#include "gtest/gtest.h"

namespace dmoe {
namespace {

class CudaMatMulTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto devices = cuda::ListDevices();
    if (!devices.ok() || devices->empty()) {
      GTEST_SKIP() << "no CUDA device: " << (devices.ok() ? "0 devices" : std::string(devices.status().message()));
    }
  }
};

TEST_F(CudaMatMulTest, MatchesCpuAcrossShapes) {
  std::mt19937 rng(1);
  std::uniform_real_distribution<float> u(-1, 1);
  for (int64_t m : {1, 3, 32}) {
    for (auto [rows, cols] : std::vector<std::pair<int64_t, int64_t>>{{1, 1}, {17, 33}, {130, 257}, {512, 2048}}) {
      std::vector<uint16_t> w(rows * cols);
      for (auto& v : w) v = FloatToBf16(u(rng));
      std::vector<float> x(m * cols);
      for (auto& v : x) v = u(rng);
      const Matrix mat = Matrix::FromBf16(w, rows, cols);
      std::vector<float> cpu(m * rows), gpu(m * rows);
      cpu::MatMul(x.data(), m, mat, cpu.data());
      ASSERT_TRUE(cuda::MatMulBf16(x.data(), m, mat, gpu.data()).ok());
      for (int64_t i = 0; i < m * rows; ++i) {
        EXPECT_NEAR(gpu[i], cpu[i], 1e-5 * cols) << "m=" << m << " rows=" << rows << " cols=" << cols;
      }
    }
  }
}

}  // namespace
}  // namespace dmoe
