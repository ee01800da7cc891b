#include "tests/transport/fake_piece_channel.h"

#include <algorithm>
#include <cstring>
#include <deque>
#include <map>
#include <set>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"

namespace dmoe::transport::testing {

struct FakeFabricState {
  FakeFabricState(int n, size_t cap) : num_nodes(n), capacity(cap) {}
  const int num_nodes;
  const size_t capacity;
  mutable absl::Mutex mu;
  std::map<std::pair<NodeId, NodeId>, std::deque<std::vector<uint8_t>>> queues ABSL_GUARDED_BY(mu);
  std::map<std::pair<NodeId, NodeId>, size_t> corrupt ABSL_GUARDED_BY(mu);  // (from, to) -> byte
  std::set<NodeId> stopped ABSL_GUARDED_BY(mu);
  std::set<NodeId> shut_down ABSL_GUARDED_BY(mu);
  size_t largest_group ABSL_GUARDED_BY(mu) = 0;
};

namespace {

class FakeChannel final : public PieceChannel {
 public:
  FakeChannel(std::shared_ptr<FakeFabricState> state, NodeId rank) : s_(std::move(state)), rank_(rank) {}

  absl::StatusOr<double> SendGroup(absl::Span<const Piece> pieces, absl::Time deadline) override {
    absl::MutexLock lock(&s_->mu);
    s_->largest_group = std::max(s_->largest_group, pieces.size());
    for (const Piece& p : pieces) {
      auto& q = s_->queues[{rank_, p.peer}];
      auto room = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(s_->mu) {
        return q.size() < s_->capacity || s_->shut_down.contains(rank_);
      };
      s_->mu.AwaitWithDeadline(absl::Condition(&room), deadline);
      if (s_->shut_down.contains(rank_)) return absl::CancelledError("channel shut down");
      if (q.size() >= s_->capacity) {
        return absl::DeadlineExceededError(absl::StrCat("peer ", p.peer, " is not receiving"));
      }
      std::vector<uint8_t> bytes(p.bytes.begin(), p.bytes.end());
      if (auto it = s_->corrupt.find({rank_, p.peer}); it != s_->corrupt.end()) {
        if (it->second < bytes.size()) bytes[it->second] ^= 0x01;
        s_->corrupt.erase(it);
      }
      q.push_back(std::move(bytes));
    }
    return 0.0;
  }

  absl::Status Receive(NodeId peer, absl::Span<uint8_t> into) override {
    absl::MutexLock lock(&s_->mu);
    auto& q = s_->queues[{peer, rank_}];
    auto ready = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(s_->mu) {
      return s_->shut_down.contains(rank_) || (!q.empty() && !s_->stopped.contains(rank_));
    };
    s_->mu.Await(absl::Condition(&ready));
    if (s_->shut_down.contains(rank_)) return absl::CancelledError("channel shut down");
    if (q.front().size() != into.size()) {
      return absl::InternalError(absl::StrCat("receive of ", into.size(), " bytes from node ", peer,
                                              ", the sender sent ", q.front().size()));
    }
    if (!into.empty()) std::memcpy(into.data(), q.front().data(), into.size());
    q.pop_front();
    return absl::OkStatus();
  }

  void Shutdown() override {
    absl::MutexLock lock(&s_->mu);
    s_->shut_down.insert(rank_);
  }

 private:
  const std::shared_ptr<FakeFabricState> s_;
  const NodeId rank_;
};

}  // namespace

FakePieceFabric::FakePieceFabric(int num_nodes, size_t capacity)
    : state_(std::make_shared<FakeFabricState>(num_nodes, capacity)) {}

std::unique_ptr<PieceChannel> FakePieceFabric::Channel(NodeId rank) {
  return std::make_unique<FakeChannel>(state_, rank);
}

void FakePieceFabric::CorruptNext(NodeId from, NodeId to, size_t offset) {
  absl::MutexLock lock(&state_->mu);
  state_->corrupt[{from, to}] = offset;
}

void FakePieceFabric::StopReceiving(NodeId rank) {
  absl::MutexLock lock(&state_->mu);
  state_->stopped.insert(rank);
}

void FakePieceFabric::ResumeReceiving(NodeId rank) {
  absl::MutexLock lock(&state_->mu);
  state_->stopped.erase(rank);
}

size_t FakePieceFabric::largest_group() const {
  absl::MutexLock lock(&state_->mu);
  return state_->largest_group;
}

}  // namespace dmoe::transport::testing
