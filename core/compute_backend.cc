#include "core/compute_backend.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include "core/status_macros.h"

namespace dmoe {

Buffer& Buffer::operator=(Buffer&& other) noexcept {
  if (this != &other) {
    Reset();
    data_ = std::exchange(other.data_, nullptr);
    size_ = std::exchange(other.size_, 0);
    release_ = std::move(other.release_);
    other.release_ = nullptr;
  }
  return *this;
}

void Buffer::Reset() {
  if (data_ != nullptr && release_) release_(data_);
  data_ = nullptr;
  size_ = 0;
  release_ = nullptr;
}

absl::Status RoutedExpertsOnHost(ComputeBackend& backend, int64_t layer, const float* host_x, int64_t n, int64_t k,
                                 const int32_t* host_topk_idx, const float* host_topk_weights, float* host_out) {
  if (backend.memory() == MemorySpace::kHost) {
    return backend.RoutedExperts(layer, host_x, n, k, host_topk_idx, host_topk_weights, host_out);
  }
  const int64_t count = n * backend.config().hidden_size;
  DMOE_ASSIGN_OR_RETURN(Buffer x, backend.Allocate(count));
  DMOE_ASSIGN_OR_RETURN(Buffer out, backend.Allocate(count));
  DMOE_RETURN_IF_ERROR(backend.Upload(host_x, count, x.data()));
  DMOE_RETURN_IF_ERROR(backend.RoutedExperts(layer, x.data(), n, k, host_topk_idx, host_topk_weights, out.data()));
  return backend.Download(out.data(), count, host_out);
}

absl::Status BackendExperts::BeginRoutedExperts(int64_t layer, int micro_batch, const float* x, int64_t n, int64_t k,
                                                const int32_t* topk_idx, const float* topk_weights) {
  const int slot = micro_batch & 1;
  const int64_t count = n * backend_.config().hidden_size;
  if (pending_[slot].size() < count) {
    DMOE_ASSIGN_OR_RETURN(pending_[slot], backend_.Allocate(count));
  }
  pending_count_[slot] = count;
  return backend_.RoutedExperts(layer, x, n, k, topk_idx, topk_weights, pending_[slot].data());
}

absl::Status BackendExperts::FinishRoutedExperts(int64_t layer, int micro_batch, float* out) {
  const int slot = micro_batch & 1;
  const int64_t count = std::exchange(pending_count_[slot], 0);
  return backend_.Copy(pending_[slot].data(), count, out);
}

}  // namespace dmoe
