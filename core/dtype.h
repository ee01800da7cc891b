// Element types of checkpoint tensors and their scalar conversions.
#ifndef DMOE_CORE_DTYPE_H_
#define DMOE_CORE_DTYPE_H_

#include <cstdint>
#include <cstring>
#include <string_view>

#include "absl/status/statusor.h"

namespace dmoe {

enum class DType { kF32, kBF16, kF16, kF8E4M3 };

// "F32", "BF16", "F16", "F8_E4M3" (safetensors spelling).
std::string_view DTypeName(DType dtype);
absl::StatusOr<DType> ParseDType(std::string_view name);
int DTypeSize(DType dtype);

inline float Bf16ToFloat(uint16_t v) {
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// Round to nearest even; NaN stays NaN.
inline uint16_t FloatToBf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

float F16ToFloat(uint16_t v);
uint16_t FloatToF16(float f);

// E4M3FN (MODEL_SPEC.md 2.2): bias 7, no infinities, 0x7F/0xFF are NaN.
float Fp8E4M3ToFloat(uint8_t v);
// Round to nearest even, saturating at +-448 (what DeepSeek's quantizer does).
uint8_t FloatToFp8E4M3(float f);

}  // namespace dmoe

#endif  // DMOE_CORE_DTYPE_H_
