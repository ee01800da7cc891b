// Scalar conversions of checkpoint element types (MODEL_SPEC.md 2.1, 2.2),
// checked against decoders written here from the format definitions.
#include "core/dtype.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

namespace dmoe {
namespace {

using ::testing::HasSubstr;

// ---- Independent reference decoders --------------------------------------

// E4M3FN: 1 sign bit, 4 exponent bits (bias 7), 3 mantissa bits; exponent 0
// is subnormal m/8 * 2^-6; no infinities; 0x7F / 0xFF are NaN.
double RefFp8(uint8_t v) {
  const bool neg = (v & 0x80) != 0;
  const int e = (v >> 3) & 0xF;
  const int m = v & 0x7;
  if (e == 0xF && m == 0x7) return std::numeric_limits<double>::quiet_NaN();
  double mag;
  if (e == 0) {
    mag = (m / 8.0) * std::pow(2.0, -6);
  } else {
    mag = (1.0 + m / 8.0) * std::pow(2.0, e - 7);
  }
  return neg ? -mag : mag;
}

// IEEE binary16: 5 exponent bits (bias 15), 10 mantissa bits.
double RefF16(uint16_t v) {
  const bool neg = (v & 0x8000) != 0;
  const int e = (v >> 10) & 0x1F;
  const int m = v & 0x3FF;
  double mag;
  if (e == 0) {
    mag = (m / 1024.0) * std::pow(2.0, -14);
  } else if (e == 31) {
    mag = m == 0 ? std::numeric_limits<double>::infinity() : std::numeric_limits<double>::quiet_NaN();
  } else {
    mag = (1.0 + m / 1024.0) * std::pow(2.0, e - 15);
  }
  return neg ? -mag : mag;
}

float FromBits(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

uint32_t ToBits(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  return bits;
}

bool SameFloat(float a, float b) {
  if (std::isnan(a) || std::isnan(b)) return std::isnan(a) && std::isnan(b);
  return ToBits(a) == ToBits(b);
}

// Reference float -> E4M3FN: nearest finite value, ties to the even code
// (even mantissa), saturating at +-448; NaN -> a NaN code.
uint8_t RefToFp8(float f) {
  if (std::isnan(f)) return 0x7F;
  const uint8_t sign = std::signbit(f) ? 0x80 : 0x00;
  const double a = std::fabs(static_cast<double>(f));
  if (a >= 448.0) return sign | 0x7E;
  // Finite magnitudes are increasing in the code for codes 0x00..0x7E.
  for (int c = 0; c < 0x7E; ++c) {
    const double lo = RefFp8(static_cast<uint8_t>(c)), hi = RefFp8(static_cast<uint8_t>(c + 1));
    if (a >= lo && a <= hi) {
      const double mid = (lo + hi) / 2;
      if (a < mid) return sign | static_cast<uint8_t>(c);
      if (a > mid) return sign | static_cast<uint8_t>(c + 1);
      return sign | static_cast<uint8_t>((c % 2 == 0) ? c : c + 1);
    }
  }
  return sign | 0x7E;
}

// ---- F8_E4M3 --------------------------------------------------------------

TEST(Fp8E4M3Test, AllCodesMatchReferenceDecoder) {
  for (int c = 0; c < 256; ++c) {
    const uint8_t code = static_cast<uint8_t>(c);
    const double want = RefFp8(code);
    const float got = Fp8E4M3ToFloat(code);
    if (std::isnan(want)) {
      EXPECT_TRUE(std::isnan(got)) << "code 0x" << std::hex << c;
    } else {
      EXPECT_EQ(static_cast<double>(got), want) << "code 0x" << std::hex << c;
      EXPECT_EQ(std::signbit(got), (c & 0x80) != 0) << "code 0x" << std::hex << c;
    }
  }
}

TEST(Fp8E4M3Test, SpecialCodes) {
  EXPECT_TRUE(std::isnan(Fp8E4M3ToFloat(0x7F)));
  EXPECT_TRUE(std::isnan(Fp8E4M3ToFloat(0xFF)));
  // Exactly two NaN codes; no infinities anywhere.
  int nans = 0;
  for (int c = 0; c < 256; ++c) {
    const float v = Fp8E4M3ToFloat(static_cast<uint8_t>(c));
    EXPECT_FALSE(std::isinf(v)) << c;
    nans += std::isnan(v) ? 1 : 0;
  }
  EXPECT_EQ(nans, 2);
  EXPECT_EQ(Fp8E4M3ToFloat(0x01), std::ldexp(1.0f, -9));
  EXPECT_EQ(Fp8E4M3ToFloat(0x07), 7.0f * std::ldexp(1.0f, -9));
  EXPECT_EQ(Fp8E4M3ToFloat(0x08), std::ldexp(1.0f, -6));  // smallest normal
  EXPECT_EQ(Fp8E4M3ToFloat(0x38), 1.0f);
  EXPECT_EQ(Fp8E4M3ToFloat(0x7E), 448.0f);
  EXPECT_EQ(Fp8E4M3ToFloat(0xFE), -448.0f);
  EXPECT_EQ(Fp8E4M3ToFloat(0x78), 256.0f);
  EXPECT_EQ(Fp8E4M3ToFloat(0x00), 0.0f);
  EXPECT_FALSE(std::signbit(Fp8E4M3ToFloat(0x00)));
  EXPECT_EQ(Fp8E4M3ToFloat(0x80), 0.0f);
  EXPECT_TRUE(std::signbit(Fp8E4M3ToFloat(0x80)));
  EXPECT_EQ(Fp8E4M3ToFloat(0x81), -std::ldexp(1.0f, -9));
}

TEST(Fp8E4M3Test, RoundTripsEveryFiniteCode) {
  for (int c = 0; c < 256; ++c) {
    if ((c & 0x7F) == 0x7F) continue;
    const uint8_t code = static_cast<uint8_t>(c);
    EXPECT_EQ(FloatToFp8E4M3(Fp8E4M3ToFloat(code)), code) << "code 0x" << std::hex << c;
  }
}

TEST(Fp8E4M3Test, NanEncodesToNan) {
  const uint8_t code = FloatToFp8E4M3(std::numeric_limits<float>::quiet_NaN());
  EXPECT_EQ(code & 0x7F, 0x7F);
  EXPECT_TRUE(std::isnan(Fp8E4M3ToFloat(code)));
}

TEST(Fp8E4M3Test, SaturatesAt448) {
  EXPECT_EQ(FloatToFp8E4M3(1000.0f), 0x7E);
  EXPECT_EQ(FloatToFp8E4M3(-1000.0f), 0xFE);
  EXPECT_EQ(FloatToFp8E4M3(449.0f), 0x7E);
  EXPECT_EQ(FloatToFp8E4M3(464.0f), 0x7E);
  EXPECT_EQ(FloatToFp8E4M3(1e30f), 0x7E);
  EXPECT_EQ(FloatToFp8E4M3(std::numeric_limits<float>::infinity()), 0x7E);
  EXPECT_EQ(FloatToFp8E4M3(-std::numeric_limits<float>::infinity()), 0xFE);
  EXPECT_EQ(FloatToFp8E4M3(std::numeric_limits<float>::max()), 0x7E);
}

TEST(Fp8E4M3Test, RoundsToNearestTiesToEven) {
  // 1.0 = 0x38, 1.125 = 0x39, 1.25 = 0x3A.
  EXPECT_EQ(FloatToFp8E4M3(1.0625f), 0x38);   // tie -> even 0x38
  EXPECT_EQ(FloatToFp8E4M3(1.1875f), 0x3A);   // tie -> even 0x3A
  EXPECT_EQ(FloatToFp8E4M3(std::nextafter(1.0625f, 2.0f)), 0x39);
  EXPECT_EQ(FloatToFp8E4M3(std::nextafter(1.0625f, 0.0f)), 0x38);
  EXPECT_EQ(FloatToFp8E4M3(-1.0625f), 0xB8);
  EXPECT_EQ(FloatToFp8E4M3(-1.1875f), 0xBA);
  // Subnormal ties: half of 2^-9 goes to zero, 1.5 * 2^-9 to 2 * 2^-9.
  EXPECT_EQ(FloatToFp8E4M3(std::ldexp(1.0f, -10)), 0x00);
  EXPECT_EQ(FloatToFp8E4M3(1.5f * std::ldexp(1.0f, -9)), 0x02);
  EXPECT_EQ(FloatToFp8E4M3(std::ldexp(1.0f, -12)), 0x00);
  // Between 7 * 2^-9 (0x07) and 2^-6 (0x08): tie -> 0x08.
  EXPECT_EQ(FloatToFp8E4M3(7.5f * std::ldexp(1.0f, -9)), 0x08);
  // 416 (0x7D) .. 448 (0x7E): tie 432 -> 0x7E (even).
  EXPECT_EQ(FloatToFp8E4M3(432.0f), 0x7E);
  EXPECT_EQ(FloatToFp8E4M3(424.0f), 0x7D);
  // -0.0 keeps its sign.
  EXPECT_EQ(FloatToFp8E4M3(-0.0f), 0x80);
  EXPECT_EQ(FloatToFp8E4M3(0.0f), 0x00);
}

TEST(Fp8E4M3Test, EveryMidpointBetweenAdjacentCodes) {
  for (int c = 0; c < 0x7E; ++c) {
    const float lo = Fp8E4M3ToFloat(static_cast<uint8_t>(c));
    const float hi = Fp8E4M3ToFloat(static_cast<uint8_t>(c + 1));
    const float mid = (lo + hi) / 2;  // exact in float
    const uint8_t even = static_cast<uint8_t>(c % 2 == 0 ? c : c + 1);
    EXPECT_EQ(FloatToFp8E4M3(mid), even) << "between 0x" << std::hex << c << " and 0x" << c + 1;
    EXPECT_EQ(FloatToFp8E4M3(std::nextafter(mid, 1000.0f)), c + 1) << "code 0x" << std::hex << c;
    EXPECT_EQ(FloatToFp8E4M3(std::nextafter(mid, 0.0f)), c) << "code 0x" << std::hex << c;
    EXPECT_EQ(FloatToFp8E4M3(-mid), 0x80 | even) << "code 0x" << std::hex << c;
  }
}

TEST(Fp8E4M3Test, SweepMatchesReferenceEncoder) {
  // Deterministic sweep over float bit patterns covering [2^-14, 2^10] of
  // both signs, plus zeros.
  const uint32_t lo = ToBits(std::ldexp(1.0f, -14)), hi = ToBits(1024.0f);
  int checked = 0;
  for (uint32_t b = lo; b <= hi; b += 997) {
    for (const float f : {FromBits(b), -FromBits(b)}) {
      ASSERT_EQ(FloatToFp8E4M3(f), RefToFp8(f)) << f;
      ++checked;
    }
  }
  EXPECT_GT(checked, 10000);
}

// ---- BF16 -----------------------------------------------------------------

TEST(Bf16Test, ToFloatIsUpperHalfOfFloatBits) {
  for (uint32_t c = 0; c < 65536; ++c) {
    const float want = FromBits(c << 16);
    ASSERT_TRUE(SameFloat(Bf16ToFloat(static_cast<uint16_t>(c)), want)) << c;
  }
  EXPECT_EQ(Bf16ToFloat(0x3F80), 1.0f);
  EXPECT_EQ(Bf16ToFloat(0xC000), -2.0f);
}

TEST(Bf16Test, RoundTripsEveryNonNanCode) {
  for (uint32_t c = 0; c < 65536; ++c) {
    const uint16_t code = static_cast<uint16_t>(c);
    const float f = Bf16ToFloat(code);
    if (std::isnan(f)) continue;
    ASSERT_EQ(FloatToBf16(f), code) << c;
  }
}

TEST(Bf16Test, RoundsToNearestEven) {
  // 1.0 = 0x3F80; one bf16 ulp at 1.0 is 2^-7.
  EXPECT_EQ(FloatToBf16(1.0f + std::ldexp(1.0f, -8)), 0x3F80);        // tie -> even
  EXPECT_EQ(FloatToBf16(1.0f + 3 * std::ldexp(1.0f, -8)), 0x3F82);    // tie -> even
  EXPECT_EQ(FloatToBf16(1.0f + std::ldexp(1.0f, -8) + std::ldexp(1.0f, -20)), 0x3F81);
  EXPECT_EQ(FloatToBf16(1.0f + std::ldexp(1.0f, -8) - std::ldexp(1.0f, -20)), 0x3F80);
  EXPECT_EQ(FloatToBf16(-(1.0f + std::ldexp(1.0f, -8))), 0xBF80);
  EXPECT_EQ(FloatToBf16(-(1.0f + 3 * std::ldexp(1.0f, -8))), 0xBF82);
  // Exhaustive over the 16 low bits for one upper half of each parity.
  for (uint32_t upper : {0x3F80u, 0x3F81u, 0x4049u, 0x00FFu}) {
    for (uint32_t low = 0; low < 65536; ++low) {
      const float f = FromBits((upper << 16) | low);
      uint32_t want = upper;
      if (low > 0x8000 || (low == 0x8000 && (upper & 1))) want = upper + 1;
      ASSERT_EQ(FloatToBf16(f), want) << std::hex << upper << " " << low;
    }
  }
  // Rounding up may carry into the exponent.
  EXPECT_EQ(FloatToBf16(FromBits(0x3FFFFFFFu)), 0x4000);
  // The largest float rounds to infinity.
  EXPECT_EQ(FloatToBf16(std::numeric_limits<float>::max()), 0x7F80);
  EXPECT_EQ(FloatToBf16(std::numeric_limits<float>::infinity()), 0x7F80);
  EXPECT_EQ(FloatToBf16(-std::numeric_limits<float>::infinity()), 0xFF80);
  EXPECT_EQ(FloatToBf16(-0.0f), 0x8000);
}

TEST(Bf16Test, NanStaysNan) {
  EXPECT_TRUE(std::isnan(Bf16ToFloat(FloatToBf16(std::numeric_limits<float>::quiet_NaN()))));
  // NaNs whose payload sits only in the low 16 bits must not become infinity.
  for (uint32_t bits : {0x7F800001u, 0xFF800001u, 0x7F807FFFu, 0x7FFFFFFFu, 0x7F80FFFFu, 0xFFC00000u}) {
    const uint16_t b = FloatToBf16(FromBits(bits));
    EXPECT_TRUE(std::isnan(Bf16ToFloat(b))) << std::hex << bits << " -> " << b;
    EXPECT_EQ(b & 0x8000, (bits >> 16) & 0x8000) << std::hex << bits;
  }
}

// ---- F16 ------------------------------------------------------------------

TEST(F16Test, AllCodesMatchReferenceDecoder) {
  for (uint32_t c = 0; c < 65536; ++c) {
    const uint16_t code = static_cast<uint16_t>(c);
    const double want = RefF16(code);
    const float got = F16ToFloat(code);
    if (std::isnan(want)) {
      ASSERT_TRUE(std::isnan(got)) << c;
    } else {
      ASSERT_EQ(static_cast<double>(got), want) << c;
      ASSERT_EQ(std::signbit(got), (c & 0x8000) != 0) << c;
    }
  }
}

TEST(F16Test, RoundTripsEveryNonNanCode) {
  for (uint32_t c = 0; c < 65536; ++c) {
    const uint16_t code = static_cast<uint16_t>(c);
    const float f = F16ToFloat(code);
    if (std::isnan(f)) continue;
    ASSERT_EQ(FloatToF16(f), code) << c;
  }
}

TEST(F16Test, SubnormalsAndLimits) {
  EXPECT_EQ(F16ToFloat(0x0001), std::ldexp(1.0f, -24));
  EXPECT_EQ(F16ToFloat(0x03FF), 1023.0f * std::ldexp(1.0f, -24));
  EXPECT_EQ(F16ToFloat(0x0400), std::ldexp(1.0f, -14));
  EXPECT_EQ(F16ToFloat(0x3C00), 1.0f);
  EXPECT_EQ(F16ToFloat(0x7BFF), 65504.0f);
  EXPECT_EQ(F16ToFloat(0x7C00), std::numeric_limits<float>::infinity());
  EXPECT_EQ(F16ToFloat(0xFC00), -std::numeric_limits<float>::infinity());
  EXPECT_TRUE(std::isnan(F16ToFloat(0x7E00)));
  EXPECT_TRUE(std::isnan(F16ToFloat(0x7C01)));
  EXPECT_TRUE(std::signbit(F16ToFloat(0x8000)));

  EXPECT_EQ(FloatToF16(std::ldexp(1.0f, -24)), 0x0001);
  EXPECT_EQ(FloatToF16(std::ldexp(1.0f, -25)), 0x0000);           // tie -> even (0)
  EXPECT_EQ(FloatToF16(std::nextafter(std::ldexp(1.0f, -25), 1.0f)), 0x0001);
  EXPECT_EQ(FloatToF16(1.5f * std::ldexp(1.0f, -24)), 0x0002);    // tie -> even
  EXPECT_EQ(FloatToF16(1e-10f), 0x0000);
  EXPECT_EQ(FloatToF16(-1e-10f), 0x8000);
  EXPECT_EQ(FloatToF16(1023.5f * std::ldexp(1.0f, -24)), 0x0400);  // tie into the normals
  EXPECT_EQ(FloatToF16(std::numeric_limits<float>::infinity()), 0x7C00);
  EXPECT_EQ(FloatToF16(-std::numeric_limits<float>::infinity()), 0xFC00);
  EXPECT_EQ(FloatToF16(65519.0f), 0x7BFF);
  EXPECT_EQ(FloatToF16(65520.0f), 0x7C00);  // tie past the max -> infinity
  EXPECT_EQ(FloatToF16(1e6f), 0x7C00);
  EXPECT_EQ(FloatToF16(-1e6f), 0xFC00);
  EXPECT_EQ(FloatToF16(1.0f + std::ldexp(1.0f, -11)), 0x3C00);      // tie -> even
  EXPECT_EQ(FloatToF16(1.0f + 3 * std::ldexp(1.0f, -11)), 0x3C02);  // tie -> even
  EXPECT_EQ(FloatToF16(-0.0f), 0x8000);
  const uint16_t nan = FloatToF16(std::numeric_limits<float>::quiet_NaN());
  EXPECT_TRUE(std::isnan(F16ToFloat(nan)));
}

TEST(F16Test, EveryMidpointBetweenAdjacentFiniteCodes) {
  for (uint32_t c = 0; c < 0x7BFF; ++c) {
    const float lo = F16ToFloat(static_cast<uint16_t>(c));
    const float hi = F16ToFloat(static_cast<uint16_t>(c + 1));
    const float mid = (lo + hi) / 2;  // exact in float
    const uint16_t even = static_cast<uint16_t>(c % 2 == 0 ? c : c + 1);
    ASSERT_EQ(FloatToF16(mid), even) << c;
    ASSERT_EQ(FloatToF16(std::nextafter(mid, 1e9f)), c + 1) << c;
    ASSERT_EQ(FloatToF16(std::nextafter(mid, 0.0f)), c) << c;
    ASSERT_EQ(FloatToF16(-mid), 0x8000 | even) << c;
  }
}

// ---- Names and sizes ------------------------------------------------------

TEST(DTypeTest, NamesSizesAndParsing) {
  struct Case {
    DType dtype;
    const char* name;
    int size;
  };
  for (const Case& c : {Case{DType::kF32, "F32", 4}, Case{DType::kBF16, "BF16", 2}, Case{DType::kF16, "F16", 2},
                        Case{DType::kF8E4M3, "F8_E4M3", 1}}) {
    EXPECT_EQ(DTypeName(c.dtype), c.name);
    EXPECT_EQ(DTypeSize(c.dtype), c.size);
    absl::StatusOr<DType> parsed = ParseDType(c.name);
    ASSERT_TRUE(parsed.ok()) << parsed.status();
    EXPECT_EQ(*parsed, c.dtype);
  }
}

TEST(DTypeTest, ParseRejectsUnsupported) {
  for (const std::string name : {"F64", "I64", "BOOL", "F8_E5M2", "f32", ""}) {
    absl::StatusOr<DType> parsed = ParseDType(name);
    ASSERT_FALSE(parsed.ok()) << name;
    EXPECT_EQ(parsed.status().code(), absl::StatusCode::kInvalidArgument) << name;
    if (!name.empty()) EXPECT_THAT(std::string(parsed.status().message()), HasSubstr(name));
  }
}

}  // namespace
}  // namespace dmoe
