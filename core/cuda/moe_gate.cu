// The MoE gate (MODEL_SPEC.md 3.7) on the GPU: one warp per token, scores
// and selection in shared memory, top-k by repeated warp argmax (larger
// value first, lower index on ties: core/moe_gate.cc's order).
#include <cfloat>

#include "core/cuda/cuda_util.cuh"
#include "core/cuda/kernels.h"

namespace dmoe::cuda {
namespace {

constexpr int kMaxExperts = 512;
constexpr int kMaxTopK = 16;
constexpr int kWarpsPerBlock = 4;

struct Best {
  float v;
  int32_t i;
};

__device__ __forceinline__ void Merge(Best& a, float v, int32_t i) {
  if (v > a.v || (v == a.v && i < a.i)) {
    a.v = v;
    a.i = i;
  }
}

__device__ __forceinline__ Best WarpBest(Best b) {
  for (int o = 16; o > 0; o /= 2) {
    const float ov = __shfl_xor_sync(0xffffffffu, b.v, o);
    const int32_t oi = __shfl_xor_sync(0xffffffffu, b.i, o);
    Merge(b, ov, oi);
  }
  return b;
}

__device__ __forceinline__ float WarpMax(float v) {
  for (int o = 16; o > 0; o /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

__device__ __forceinline__ float WarpSum(float v) {
  for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__global__ void __launch_bounds__(kWarpsPerBlock * 32) MoeGateKernel(MoeGateParams p) {
  __shared__ float s_score[kWarpsPerBlock][kMaxExperts];
  __shared__ float s_select[kWarpsPerBlock][kMaxExperts];
  __shared__ bool s_taken[kWarpsPerBlock][kMaxExperts];
  __shared__ bool s_keep[kWarpsPerBlock][kMaxExperts];  // per group
  __shared__ float s_group[kWarpsPerBlock][kMaxExperts];
  __shared__ int32_t s_top[kWarpsPerBlock][kMaxTopK];

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t t = blockIdx.x * int64_t{kWarpsPerBlock} + warp;
  if (t >= p.n) return;
  const int E = static_cast<int>(p.num_experts);
  const float* z = p.logits + t * p.num_experts;
  float* score = s_score[warp];
  float* select = s_select[warp];

  if (p.scoring == GateScoring::kSigmoid) {
    for (int e = lane; e < E; e += 32) score[e] = 1.0f / (1.0f + expf(-z[e]));
  } else {
    float mx = -INFINITY;
    for (int e = lane; e < E; e += 32) mx = fmaxf(mx, z[e]);
    mx = WarpMax(mx);
    float sum = 0.f;
    for (int e = lane; e < E; e += 32) sum += (score[e] = expf(z[e] - mx));
    sum = WarpSum(sum);
    for (int e = lane; e < E; e += 32) score[e] /= sum;
  }
  for (int e = lane; e < E; e += 32) {
    float s = score[e];
    if (p.correction_bias != nullptr) s += p.correction_bias[e];
    if (p.serving_bias != nullptr) s += p.serving_bias[e];
    select[e] = s;
    s_taken[warp][e] = false;
  }
  __syncwarp();

  if (p.topk_method != GateTopk::kGreedy) {
    const int G = static_cast<int>(p.n_group), per_group = E / G;
    for (int g = lane; g < G; g += 32) {
      const float* s = select + g * per_group;
      float gs;
      if (p.topk_method == GateTopk::kNoauxTc) {
        float a = -INFINITY, b = -INFINITY;  // the two largest
        for (int i = 0; i < per_group; ++i) {
          if (s[i] > a) {
            b = a;
            a = s[i];
          } else if (s[i] > b) {
            b = s[i];
          }
        }
        gs = a + b;
      } else {
        gs = -INFINITY;
        for (int i = 0; i < per_group; ++i) gs = fmaxf(gs, s[i]);
      }
      s_group[warp][g] = gs;
      s_keep[warp][g] = false;
    }
    __syncwarp();
    for (int round = 0; round < p.topk_group; ++round) {
      Best b{-INFINITY, INT32_MAX};
      for (int g = lane; g < G; g += 32) {
        if (!s_keep[warp][g]) Merge(b, s_group[warp][g], g);
      }
      b = WarpBest(b);
      if (lane == 0 && b.i != INT32_MAX) s_keep[warp][b.i] = true;
      __syncwarp();
    }
    // transformers masks dropped groups with 0 (DeepSeek code: -inf).
    for (int e = lane; e < E; e += 32) {
      if (!s_keep[warp][e / per_group]) select[e] = 0.0f;
    }
    __syncwarp();
  }

  const int K = static_cast<int>(p.top_k);
  for (int j = 0; j < K; ++j) {
    Best b{-INFINITY, INT32_MAX};
    for (int e = lane; e < E; e += 32) {
      if (!s_taken[warp][e]) Merge(b, select[e], e);
    }
    b = WarpBest(b);
    if (b.i == INT32_MAX) {
      // Only when every remaining score is NaN: take the lowest untaken index.
      for (int e = 0; e < E; ++e) {
        if (!s_taken[warp][e]) {
          b.i = e;
          break;
        }
      }
    }
    if (lane == 0) {
      s_taken[warp][b.i] = true;
      s_top[warp][j] = b.i;
    }
    __syncwarp();
  }
  if (lane == 0) {
    float denom = 0.f;  // summed in selection order, as core/moe_gate.cc
    for (int j = 0; j < K; ++j) denom += score[s_top[warp][j]];
    for (int j = 0; j < K; ++j) {
      float w = score[s_top[warp][j]];
      if (p.renormalize) w /= (denom + 1e-20f);
      p.topk_idx[t * K + j] = s_top[warp][j];
      p.topk_weights[t * K + j] = w * p.routed_scaling_factor;
    }
  }
}

}  // namespace

absl::Status MoeGateRoute(const MoeGateParams& p, Stream stream) {
  DMOE_CUDA_CHECK_ARG(p.num_experts > 0 && p.num_experts <= kMaxExperts, "MoeGateRoute: 0 < num_experts <= 512");
  DMOE_CUDA_CHECK_ARG(p.top_k > 0 && p.top_k <= kMaxTopK && p.top_k <= p.num_experts,
                      "MoeGateRoute: 0 < top_k <= min(16, num_experts)");
  if (p.topk_method != GateTopk::kGreedy) {
    DMOE_CUDA_CHECK_ARG(p.n_group > 0 && p.num_experts % p.n_group == 0, "MoeGateRoute: n_group divides num_experts");
    DMOE_CUDA_CHECK_ARG(p.topk_group >= 1 && p.topk_group <= p.n_group, "MoeGateRoute: 1 <= topk_group <= n_group");
  }
  if (p.n <= 0) return absl::OkStatus();
  const int64_t blocks = CeilDiv(p.n, kWarpsPerBlock);
  MoeGateKernel<<<static_cast<unsigned>(blocks), kWarpsPerBlock * 32, 0, AsStream(stream)>>>(p);
  return LaunchStatus("MoeGateKernel");
}

}  // namespace dmoe::cuda
