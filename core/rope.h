// Rotary position embedding of the rope part of q and k, with yarn
// (MODEL_SPEC.md 3.3 and 3.4).
#ifndef DMOE_CORE_ROPE_H_
#define DMOE_CORE_ROPE_H_

#include <cstdint>
#include <vector>

#include "core/config.h"

namespace dmoe {

// Immutable; safe to share across threads.
class Rope {
 public:
  explicit Rope(const ModelConfig& config);

  // Rotates y[0, qk_rope_head_dim) in place for position `pos`. Pairs are
  // (y[2i], y[2i+1]) when interleaved, else (y[i], y[i + dr/2]).
  void Apply(int64_t pos, float* y) const;

  // The attention softmax scale: qk_head_dim^-0.5, times m(f, mscale_all_dim)^2 with yarn.
  float softmax_scale() const { return softmax_scale_; }
  float attention_factor() const { return attention_factor_; }
  const std::vector<float>& inv_freq() const { return inv_freq_; }

 private:
  int64_t dim_;
  bool interleaved_;
  std::vector<float> inv_freq_;  // rounded to float32, as transformers does
  float attention_factor_ = 1.0f;
  float softmax_scale_ = 1.0f;
};

}  // namespace dmoe

#endif  // DMOE_CORE_ROPE_H_
