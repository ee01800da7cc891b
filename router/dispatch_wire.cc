#include "router/dispatch_wire.h"

#include <bit>
#include <cstring>
#include <string>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "core/status_macros.h"

namespace dmoe::router {
namespace {

constexpr uint8_t kMagic[4] = {'d', 'M', 'o', 'E'};
constexpr uint8_t kVersion = 1;
constexpr uint8_t kKindDispatch = 1;
constexpr uint8_t kKindPartialSums = 2;
constexpr size_t kCommonHeaderBytes = 40;
constexpr size_t kDispatchHeaderBytes = 48;

// Appends little-endian values to a byte buffer.
class Writer {
 public:
  explicit Writer(size_t reserve) { bytes_.reserve(reserve); }

  void Bytes(const void* p, size_t n) {
    const auto* b = static_cast<const uint8_t*>(p);
    bytes_.insert(bytes_.end(), b, b + n);
  }
  void U8(uint8_t v) { bytes_.push_back(v); }
  void U16(uint16_t v) { Uint(v, 2); }
  void U64(uint64_t v) { Uint(v, 8); }
  void I64(int64_t v) { Uint(static_cast<uint64_t>(v), 8); }
  // 4-byte elements (float, int32), bulk-copied on little-endian hosts.
  template <typename T>
  void Array(absl::Span<const T> a) {
    static_assert(sizeof(T) == 4);
    if constexpr (std::endian::native == std::endian::little) {
      Bytes(a.data(), a.size() * 4);
    } else {
      for (const T& v : a) {
        uint32_t u;
        std::memcpy(&u, &v, 4);
        Uint(u, 4);
      }
    }
  }
  std::vector<uint8_t> Take() { return std::move(bytes_); }

 private:
  void Uint(uint64_t v, int n) {
    for (int i = 0; i < n; ++i) bytes_.push_back(static_cast<uint8_t>(v >> (8 * i)));
  }
  std::vector<uint8_t> bytes_;
};

// Reads little-endian values; every read is bounds-checked by the caller
// through Need(), so nothing here can run past the buffer.
class Reader {
 public:
  explicit Reader(absl::Span<const uint8_t> bytes) : bytes_(bytes) {}

  size_t remaining() const { return bytes_.size() - pos_; }

  uint64_t Uint(int n) {
    uint64_t v = 0;
    for (int i = 0; i < n; ++i) v |= static_cast<uint64_t>(bytes_[pos_ + i]) << (8 * i);
    pos_ += n;
    return v;
  }
  int64_t I64() { return static_cast<int64_t>(Uint(8)); }
  const uint8_t* Skip(size_t n) {
    const uint8_t* p = bytes_.data() + pos_;
    pos_ += n;
    return p;
  }
  // Reads `count` 4-byte elements; REQUIRES count * 4 <= remaining().
  template <typename T>
  std::vector<T> Array(size_t count) {
    static_assert(sizeof(T) == 4);
    std::vector<T> out(count);
    if constexpr (std::endian::native == std::endian::little) {
      if (count > 0) std::memcpy(out.data(), Skip(count * 4), count * 4);
    } else {
      for (T& v : out) {
        const uint32_t u = static_cast<uint32_t>(Uint(4));
        std::memcpy(&v, &u, 4);
      }
    }
    return out;
  }

 private:
  absl::Span<const uint8_t> bytes_;
  size_t pos_ = 0;
};

// Elements of a [rows, cols] array of 4-byte values, when it fits in what is
// left of the message; DATA_LOSS naming the field otherwise. Divides rather
// than multiplies, so corrupt counts cannot overflow.
absl::StatusOr<size_t> ArrayElements(const char* what, const char* field, int64_t rows, int64_t cols,
                                     const Reader& r) {
  const size_t room = r.remaining() / 4;
  if (rows == 0 || cols == 0) return 0;
  if (static_cast<uint64_t>(cols) > room || static_cast<uint64_t>(rows) > room / static_cast<uint64_t>(cols)) {
    return absl::DataLossError(absl::StrCat(what, ": ", field, " needs ", rows, " x ", cols,
                                            " 4-byte values, only ", r.remaining(), " bytes are left"));
  }
  return static_cast<size_t>(rows * cols);
}

struct CommonHeader {
  int64_t layer = 0;
  uint64_t step_id = 0;
  int64_t num_tokens = 0;
  int64_t hidden_size = 0;
};

void WriteCommonHeader(Writer& w, uint8_t kind, int64_t layer, uint64_t step_id, int64_t num_tokens,
                       int64_t hidden_size) {
  w.Bytes(kMagic, sizeof(kMagic));
  w.U8(kVersion);
  w.U8(kind);
  w.U16(0);
  w.I64(layer);
  w.U64(step_id);
  w.I64(num_tokens);
  w.I64(hidden_size);
}

absl::StatusOr<CommonHeader> ReadCommonHeader(const char* what, uint8_t kind, size_t header_bytes, Reader& r) {
  if (r.remaining() < header_bytes) {
    return absl::DataLossError(
        absl::StrCat(what, ": header: message is ", r.remaining(), " bytes, the header alone is ", header_bytes));
  }
  if (std::memcmp(r.Skip(4), kMagic, 4) != 0) return absl::InvalidArgumentError(absl::StrCat(what, ": bad magic"));
  const uint64_t version = r.Uint(1);
  if (version != kVersion) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": version ", version, " is not ", kVersion));
  }
  const uint64_t got_kind = r.Uint(1);
  if (got_kind != kind) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": kind ", got_kind, " is not ", kind));
  }
  const uint64_t reserved = r.Uint(2);
  if (reserved != 0) return absl::InvalidArgumentError(absl::StrCat(what, ": reserved ", reserved, " is not 0"));
  CommonHeader h;
  h.layer = r.I64();
  h.step_id = r.Uint(8);
  h.num_tokens = r.I64();
  h.hidden_size = r.I64();
  if (h.layer < 0) return absl::InvalidArgumentError(absl::StrCat(what, ": layer ", h.layer, " < 0"));
  if (h.num_tokens < 0) return absl::InvalidArgumentError(absl::StrCat(what, ": num_tokens ", h.num_tokens, " < 0"));
  if (h.hidden_size < 1) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": hidden_size ", h.hidden_size, " < 1"));
  }
  return h;
}

absl::Status CheckFullyRead(const char* what, const char* last_field, const Reader& r) {
  if (r.remaining() != 0) {
    return absl::DataLossError(absl::StrCat(what, ": ", r.remaining(), " unexpected bytes after ", last_field));
  }
  return absl::OkStatus();
}

absl::Status CheckTopkIdx(const char* what, absl::Span<const int32_t> topk_idx) {
  for (size_t i = 0; i < topk_idx.size(); ++i) {
    if (topk_idx[i] < -1) {
      return absl::InvalidArgumentError(absl::StrCat(what, ": topk_idx[", i, "] = ", topk_idx[i], " < -1"));
    }
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::vector<uint8_t>> EncodeDispatch(int64_t layer, uint64_t step_id, int64_t hidden_size,
                                                    int64_t top_k, absl::Span<const float> hidden,
                                                    absl::Span<const int32_t> topk_idx,
                                                    absl::Span<const float> topk_weights) {
  constexpr char kWhat[] = "encode dispatch";
  if (layer < 0 || hidden_size < 1 || top_k < 1) {
    return absl::InvalidArgumentError(absl::StrCat(kWhat, ": layer ", layer, " must be >= 0, hidden_size ",
                                                   hidden_size, " and top_k ", top_k, " >= 1"));
  }
  if (hidden.size() % hidden_size != 0) {
    return absl::InvalidArgumentError(absl::StrCat(kWhat, ": hidden has ", hidden.size(),
                                                   " values, not a multiple of hidden_size ", hidden_size));
  }
  const int64_t num_tokens = static_cast<int64_t>(hidden.size()) / hidden_size;
  if (topk_idx.size() % top_k != 0 || static_cast<int64_t>(topk_idx.size()) / top_k != num_tokens ||
      topk_weights.size() != topk_idx.size()) {
    return absl::InvalidArgumentError(absl::StrCat(kWhat, ": topk_idx has ", topk_idx.size(), " and topk_weights ",
                                                   topk_weights.size(), " entries, expected num_tokens ",
                                                   num_tokens, " * top_k ", top_k));
  }
  DMOE_RETURN_IF_ERROR(CheckTopkIdx(kWhat, topk_idx));
  Writer w(kDispatchHeaderBytes + 4 * (hidden.size() + 2 * topk_idx.size()));
  WriteCommonHeader(w, kKindDispatch, layer, step_id, num_tokens, hidden_size);
  w.I64(top_k);
  w.Array(hidden);
  w.Array(topk_idx);
  w.Array(topk_weights);
  return w.Take();
}

absl::StatusOr<DispatchMessage> DecodeDispatch(absl::Span<const uint8_t> bytes) {
  constexpr char kWhat[] = "decode dispatch";
  Reader r(bytes);
  DMOE_ASSIGN_OR_RETURN(const CommonHeader h, ReadCommonHeader(kWhat, kKindDispatch, kDispatchHeaderBytes, r));
  DispatchMessage m;
  m.layer = h.layer;
  m.step_id = h.step_id;
  m.num_tokens = h.num_tokens;
  m.hidden_size = h.hidden_size;
  m.top_k = r.I64();
  if (m.top_k < 1) return absl::InvalidArgumentError(absl::StrCat(kWhat, ": top_k ", m.top_k, " < 1"));
  DMOE_ASSIGN_OR_RETURN(const size_t n_hidden, ArrayElements(kWhat, "hidden", m.num_tokens, m.hidden_size, r));
  m.hidden = r.Array<float>(n_hidden);
  DMOE_ASSIGN_OR_RETURN(const size_t n_idx, ArrayElements(kWhat, "topk_idx", m.num_tokens, m.top_k, r));
  m.topk_idx = r.Array<int32_t>(n_idx);
  DMOE_ASSIGN_OR_RETURN(const size_t n_w, ArrayElements(kWhat, "topk_weights", m.num_tokens, m.top_k, r));
  m.topk_weights = r.Array<float>(n_w);
  DMOE_RETURN_IF_ERROR(CheckFullyRead(kWhat, "topk_weights", r));
  DMOE_RETURN_IF_ERROR(CheckTopkIdx(kWhat, m.topk_idx));
  return m;
}

absl::StatusOr<std::vector<uint8_t>> EncodePartialSums(int64_t layer, uint64_t step_id, int64_t hidden_size,
                                                       absl::Span<const float> partial_sums) {
  constexpr char kWhat[] = "encode partial sums";
  if (layer < 0 || hidden_size < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat(kWhat, ": layer ", layer, " must be >= 0 and hidden_size ", hidden_size, " >= 1"));
  }
  if (partial_sums.size() % hidden_size != 0) {
    return absl::InvalidArgumentError(absl::StrCat(kWhat, ": partial_sums has ", partial_sums.size(),
                                                   " values, not a multiple of hidden_size ", hidden_size));
  }
  const int64_t num_tokens = static_cast<int64_t>(partial_sums.size()) / hidden_size;
  Writer w(kCommonHeaderBytes + 4 * partial_sums.size());
  WriteCommonHeader(w, kKindPartialSums, layer, step_id, num_tokens, hidden_size);
  w.Array(partial_sums);
  return w.Take();
}

absl::StatusOr<PartialSumsMessage> DecodePartialSums(absl::Span<const uint8_t> bytes) {
  constexpr char kWhat[] = "decode partial sums";
  Reader r(bytes);
  DMOE_ASSIGN_OR_RETURN(const CommonHeader h, ReadCommonHeader(kWhat, kKindPartialSums, kCommonHeaderBytes, r));
  PartialSumsMessage m;
  m.layer = h.layer;
  m.step_id = h.step_id;
  m.num_tokens = h.num_tokens;
  m.hidden_size = h.hidden_size;
  DMOE_ASSIGN_OR_RETURN(const size_t n, ArrayElements(kWhat, "partial_sums", m.num_tokens, m.hidden_size, r));
  m.partial_sums = r.Array<float>(n);
  DMOE_RETURN_IF_ERROR(CheckFullyRead(kWhat, "partial_sums", r));
  return m;
}

}  // namespace dmoe::router
