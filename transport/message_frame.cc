#include "transport/message_frame.h"

#include <algorithm>
#include <cstring>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "transport/mailbox.h"

namespace dmoe::transport {
namespace {

constexpr uint32_t kMagic = 0x31464D44;  // "DMF1" in little-endian byte order
constexpr uint16_t kVersion = 1;
constexpr size_t kChecksumOffset = 60;

template <typename T>
void Put(uint8_t* at, T value) {
  for (size_t i = 0; i < sizeof(T); ++i) at[i] = static_cast<uint8_t>(static_cast<uint64_t>(value) >> (8 * i));
}

template <typename T>
T Get(const uint8_t* at) {
  uint64_t v = 0;
  for (size_t i = 0; i < sizeof(T); ++i) v |= static_cast<uint64_t>(at[i]) << (8 * i);
  return static_cast<T>(v);
}

uint32_t Fnv1a(const uint8_t* data, size_t n) {
  uint32_t h = 2166136261u;
  for (size_t i = 0; i < n; ++i) h = (h ^ data[i]) * 16777619u;
  return h;
}

}  // namespace

std::array<uint8_t, kFrameHeaderBytes> EncodeFrameHeader(const FrameHeader& header) {
  std::array<uint8_t, kFrameHeaderBytes> b{};
  Put<uint32_t>(&b[0], kMagic);
  Put<uint16_t>(&b[4], kVersion);
  Put<uint16_t>(&b[6], kFrameHeaderBytes);
  Put<uint64_t>(&b[8], header.tag);
  Put<uint64_t>(&b[16], header.sequence);
  Put<uint64_t>(&b[24], header.payload_bytes);
  Put<uint32_t>(&b[32], header.chunk_bytes);
  Put<uint32_t>(&b[kChecksumOffset], Fnv1a(b.data(), kChecksumOffset));
  return b;
}

absl::StatusOr<FrameHeader> DecodeFrameHeader(absl::Span<const uint8_t> bytes, const FrameLimits& limits) {
  if (bytes.size() != kFrameHeaderBytes) {
    return absl::DataLossError(absl::StrCat("frame header of ", bytes.size(), " bytes, expected ", kFrameHeaderBytes));
  }
  const uint8_t* b = bytes.data();
  if (Get<uint32_t>(b) != kMagic) {
    return absl::DataLossError(absl::StrCat("frame header: bad magic 0x", absl::Hex(Get<uint32_t>(b))));
  }
  if (Get<uint16_t>(b + 4) != kVersion || Get<uint16_t>(b + 6) != kFrameHeaderBytes) {
    return absl::DataLossError(absl::StrCat("frame header: version ", Get<uint16_t>(b + 4), " size ",
                                            Get<uint16_t>(b + 6), ", expected version ", kVersion, " size ",
                                            kFrameHeaderBytes));
  }
  if (const uint32_t sum = Fnv1a(b, kChecksumOffset); sum != Get<uint32_t>(b + kChecksumOffset)) {
    return absl::DataLossError(absl::StrCat("frame header: checksum 0x", absl::Hex(Get<uint32_t>(b + kChecksumOffset)),
                                            " does not match its bytes (0x", absl::Hex(sum), ")"));
  }
  for (size_t i = 36; i < kChecksumOffset; ++i) {
    if (b[i] != 0) return absl::DataLossError(absl::StrCat("frame header: reserved byte ", i, " is not zero"));
  }
  FrameHeader h;
  h.tag = Get<uint64_t>(b + 8);
  h.sequence = Get<uint64_t>(b + 16);
  h.payload_bytes = Get<uint64_t>(b + 24);
  h.chunk_bytes = Get<uint32_t>(b + 32);
  if (h.tag > kMaxTag) {
    return absl::DataLossError(absl::StrCat("frame header: tag 0x", absl::Hex(h.tag), " wider than ", kTagBits, " bits"));
  }
  if (h.chunk_bytes == 0 || h.chunk_bytes > limits.max_chunk_bytes) {
    return absl::DataLossError(absl::StrCat("frame header: chunk of ", h.chunk_bytes,
                                            " bytes, accepted: 1..", limits.max_chunk_bytes));
  }
  if (h.payload_bytes > limits.max_payload_bytes) {
    return absl::ResourceExhaustedError(absl::StrCat("frame header: payload of ", h.payload_bytes,
                                                     " bytes exceeds the limit of ", limits.max_payload_bytes));
  }
  return h;
}

size_t NumChunks(uint64_t payload_bytes, uint32_t chunk_bytes) {
  return static_cast<size_t>((payload_bytes + chunk_bytes - 1) / chunk_bytes);
}

absl::StatusOr<EncodedFrame> FrameEncoder::Encode(NodeId peer, uint64_t tag, absl::Span<const uint8_t> payload) {
  if (absl::Status s = ValidateSendTag(peer, tag); !s.ok()) return s;
  if (payload.size() > limits_.max_payload_bytes) {
    return absl::ResourceExhaustedError(absl::StrCat("send to peer ", peer, ": payload of ", payload.size(),
                                                     " bytes exceeds the limit of ", limits_.max_payload_bytes));
  }
  if (limits_.chunk_bytes == 0) return absl::InvalidArgumentError("FrameLimits::chunk_bytes is 0");
  FrameHeader h{.tag = tag, .sequence = next_sequence_, .payload_bytes = payload.size(),
                .chunk_bytes = limits_.chunk_bytes};
  EncodedFrame frame{EncodeFrameHeader(h), {}};
  for (size_t offset = 0; offset < payload.size(); offset += limits_.chunk_bytes) {
    frame.chunks.push_back(payload.subspan(offset, limits_.chunk_bytes));
  }
  ++next_sequence_;
  return frame;
}

absl::Status FrameDecoder::Fail(absl::Status status) {
  error_ = absl::Status(status.code(), absl::StrCat("stream from node ", from_, ": ", status.message()));
  return error_;
}

absl::Span<uint8_t> FrameDecoder::receive_buffer() {
  if (!error_.ok()) return {};
  if (!in_message_) return absl::MakeSpan(header_);
  const uint64_t left = current_.payload_bytes - offset_;
  return absl::MakeSpan(message_.payload).subspan(offset_, std::min<uint64_t>(left, current_.chunk_bytes));
}

absl::StatusOr<std::optional<Message>> FrameDecoder::Commit(size_t received) {
  if (!error_.ok()) return error_;
  if (const size_t want = receive_buffer().size(); received != want) {
    return Fail(absl::DataLossError(absl::StrCat("received ", received, " bytes, expected ", want)));
  }
  if (!in_message_) {
    absl::StatusOr<FrameHeader> h = DecodeFrameHeader(header_, limits_);
    if (!h.ok()) return Fail(h.status());
    if (h->sequence != next_sequence_) {
      return Fail(absl::DataLossError(
          absl::StrCat("frame sequence ", h->sequence, ", expected ", next_sequence_, " (a frame was lost or repeated)")));
    }
    current_ = *h;
    message_ = Message{from_, h->tag, std::vector<uint8_t>(h->payload_bytes)};
    offset_ = 0;
    in_message_ = true;
  } else {
    offset_ += received;
  }
  if (offset_ < current_.payload_bytes) return std::nullopt;
  in_message_ = false;
  ++next_sequence_;
  return std::optional<Message>(std::move(message_));
}

}  // namespace dmoe::transport
