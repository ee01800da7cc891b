#include "core/rope.h"

#include <algorithm>
#include <cmath>

namespace dmoe {
namespace {

// Yarn's magnitude correction m(s, mu) (MODEL_SPEC.md 3.4).
double YarnMscale(double scale, double mscale) {
  if (scale <= 1.0) return 1.0;
  return 0.1 * mscale * std::log(scale) + 1.0;
}

}  // namespace

Rope::Rope(const ModelConfig& c) : dim_(c.qk_rope_head_dim), interleaved_(c.rope_interleave) {
  const int64_t half = dim_ / 2;
  const double base = c.rope_theta;
  std::vector<double> theta(half);
  for (int64_t i = 0; i < half; ++i) {
    // transformers: 1 / base^(arange(0, dim, 2) / dim), in float32.
    theta[i] = 1.0 / std::pow(base, static_cast<double>(2 * i) / static_cast<double>(dim_));
  }
  inv_freq_.resize(half);
  double scale = std::pow(static_cast<double>(c.qk_head_dim()), -0.5);
  const RopeScaling& y = c.rope_scaling;
  if (!y.yarn) {
    for (int64_t i = 0; i < half; ++i) inv_freq_[i] = static_cast<float>(theta[i]);
  } else {
    const double f = y.factor;
    const double l0 = static_cast<double>(y.original_max_position_embeddings);
    auto corr = [&](double b) {
      return static_cast<double>(dim_) * std::log(l0 / (b * 2.0 * M_PI)) / (2.0 * std::log(base));
    };
    double lo = corr(y.beta_fast), hi = corr(y.beta_slow);
    if (y.truncate) {
      lo = std::floor(lo);
      hi = std::ceil(hi);
    }
    lo = std::max(lo, 0.0);
    hi = std::min(hi, static_cast<double>(dim_ - 1));
    if (lo == hi) hi += 0.001;
    for (int64_t i = 0; i < half; ++i) {
      const double ramp = std::clamp((static_cast<double>(i) - lo) / (hi - lo), 0.0, 1.0);
      // transformers forms these in float32: pos_freq = base^(2i/d).
      const float pos_freq = static_cast<float>(1.0 / theta[i]);
      const float extrapolation = 1.0f / pos_freq;
      const float interpolation = 1.0f / (static_cast<float>(f) * pos_freq);
      const float extrapolation_factor = 1.0f - static_cast<float>(ramp);
      inv_freq_[i] = interpolation * (1.0f - extrapolation_factor) + extrapolation * extrapolation_factor;
    }
    if (y.attention_factor.has_value()) {
      attention_factor_ = static_cast<float>(*y.attention_factor);
    } else if (y.mscale.value_or(0.0) != 0.0 && y.mscale_all_dim.value_or(0.0) != 0.0) {
      attention_factor_ = static_cast<float>(YarnMscale(f, *y.mscale) / YarnMscale(f, *y.mscale_all_dim));
    } else {
      attention_factor_ = static_cast<float>(YarnMscale(f, 1.0));
    }
    if (y.mscale_all_dim.value_or(0.0) != 0.0) {
      const double m = YarnMscale(f, *y.mscale_all_dim);
      scale *= m * m;
    }
  }
  softmax_scale_ = static_cast<float>(scale);
}

void Rope::Apply(int64_t pos, float* y) const {
  const int64_t half = dim_ / 2;
  const float p = static_cast<float>(pos);
  for (int64_t i = 0; i < half; ++i) {
    const float angle = p * inv_freq_[i];  // float32 product, as transformers
    const float cs = std::cos(angle) * attention_factor_;
    const float sn = std::sin(angle) * attention_factor_;
    float* a = interleaved_ ? &y[2 * i] : &y[i];
    float* b = interleaved_ ? &y[2 * i + 1] : &y[i + half];
    const float av = *a, bv = *b;
    *a = av * cs - bv * sn;
    *b = bv * cs + av * sn;
  }
}

}  // namespace dmoe
