// Helpers for the CUDA kernel tests: skip without a device, host<->device
// vectors, poison fills and error norms.
#ifndef DMOE_TESTS_CORE_CUDA_CUDA_TEST_UTIL_H_
#define DMOE_TESTS_CORE_CUDA_CUDA_TEST_UTIL_H_

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "core/cuda/kernels.h"
#include "gtest/gtest.h"

namespace dmoe::cuda::testing {

// Skips the test, saying why, when no CUDA device is present (CI).
class CudaTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto n = DeviceCount();
    if (!n.ok()) GTEST_SKIP() << "no CUDA device: " << n.status().message();
  }
};

template <typename T>
DeviceBuffer Upload(const std::vector<T>& v) {
  auto b = DeviceBuffer::Allocate(v.size() * sizeof(T));
  EXPECT_TRUE(b.ok()) << b.status();
  EXPECT_TRUE(CopyToDevice(b->data(), v.data(), v.size() * sizeof(T), nullptr).ok());
  return std::move(*b);
}

// A buffer of `count` T filled with 0xFF bytes (NaN for float and bf16,
// -1 for ints): an element no kernel wrote stays detectable.
template <typename T>
DeviceBuffer Poisoned(size_t count) {
  auto b = DeviceBuffer::Allocate(count * sizeof(T));
  EXPECT_TRUE(b.ok()) << b.status();
  EXPECT_TRUE(FillBytes(b->data(), 0xFF, count * sizeof(T), nullptr).ok());
  return std::move(*b);
}

template <typename T>
std::vector<T> Download(const DeviceBuffer& b, size_t count) {
  std::vector<T> v(count);
  EXPECT_TRUE(CopyToHost(v.data(), b.data(), count * sizeof(T), nullptr).ok());
  EXPECT_TRUE(StreamSynchronize(nullptr).ok());
  return v;
}

// ||got - ref|| / ||ref|| (L2); infinity when got has a NaN or ref is 0.
template <typename T, typename R>
double RelL2(const std::vector<T>& got, const std::vector<R>& ref) {
  double num = 0, den = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    const double g = static_cast<double>(got[i]), r = static_cast<double>(ref[i]);
    if (std::isnan(g)) return INFINITY;
    num += (g - r) * (g - r);
    den += r * r;
  }
  return den > 0 ? std::sqrt(num / den) : (num == 0 ? 0 : INFINITY);
}

}  // namespace dmoe::cuda::testing

#endif  // DMOE_TESTS_CORE_CUDA_CUDA_TEST_UTIL_H_
