// Framing of tagged messages over a channel that only moves byte ranges of sizes both ends agree
// on in advance (NCCL send/recv: the receiver posts a receive of exactly the sender's count, in
// the same order). A message travels as a fixed-size header, then its payload in chunks of at
// most the header's chunk_bytes; the receiver learns every size from the header before it posts
// the receive. Pure C++ (no NCCL, no CUDA) so that it is tested without a GPU; the NCCL
// transport (transport/nccl_transport.h) moves the pieces.
//
// Header (kFrameHeaderBytes = 64, little-endian):
//   0  u32 magic "DMF1"        4  u16 version (1)     6  u16 header bytes (64)
//   8  u64 tag (<= kMaxTag; in the MoE data plane it holds step, layer and micro-batch,
//          router/data_plane_tags.h)
//   16 u64 sequence: 0, 1, 2, ... per (sender, receiver) stream, so a lost or repeated frame shows
//   24 u64 payload bytes       32 u32 chunk bytes (> 0)   36..59 zero
//   60 u32 FNV-1a of bytes 0..59
#ifndef DMOE_TRANSPORT_MESSAGE_FRAME_H_
#define DMOE_TRANSPORT_MESSAGE_FRAME_H_

#include <array>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "transport/transport.h"

namespace dmoe::transport {

inline constexpr size_t kFrameHeaderBytes = 64;

// What a stream accepts; both ends should use the same values. A sender's chunk_bytes must be
// <= the receiver's max_chunk_bytes (the receiver's staging buffer).
struct FrameLimits {
  uint64_t max_payload_bytes = uint64_t{1} << 30;
  uint32_t chunk_bytes = 4u << 20;      // what this end sends
  uint32_t max_chunk_bytes = 4u << 20;  // what this end accepts
};

struct FrameHeader {
  uint64_t tag = 0;
  uint64_t sequence = 0;
  uint64_t payload_bytes = 0;
  uint32_t chunk_bytes = 0;
};

std::array<uint8_t, kFrameHeaderBytes> EncodeFrameHeader(const FrameHeader& header);
// DATA_LOSS naming what is wrong (short buffer, magic, version, checksum, reserved bytes, a tag
// wider than kTagBits, chunk_bytes 0 or above limits.max_chunk_bytes) and RESOURCE_EXHAUSTED for
// a payload above limits.max_payload_bytes.
absl::StatusOr<FrameHeader> DecodeFrameHeader(absl::Span<const uint8_t> bytes, const FrameLimits& limits);

// The payload's chunks: every one chunk_bytes long but the last; none for an empty payload.
size_t NumChunks(uint64_t payload_bytes, uint32_t chunk_bytes);

// One message ready to go: send header_bytes, then each of `chunks` in order (spans into the
// caller's payload, which must outlive the frame).
struct EncodedFrame {
  std::array<uint8_t, kFrameHeaderBytes> header_bytes;
  std::vector<absl::Span<const uint8_t>> chunks;
};

// The send side of one (sender, receiver) stream: numbers the frames. Not thread-safe.
class FrameEncoder {
 public:
  explicit FrameEncoder(const FrameLimits& limits) : limits_(limits) {}
  // INVALID_ARGUMENT for a tag above kMaxTag, RESOURCE_EXHAUSTED for a payload above
  // max_payload_bytes (nothing is consumed: the next frame gets the same sequence number).
  absl::StatusOr<EncodedFrame> Encode(NodeId peer, uint64_t tag, absl::Span<const uint8_t> payload);

 private:
  const FrameLimits limits_;
  uint64_t next_sequence_ = 0;
};

// The receive side of one stream from `from`: says where the next piece goes, then turns the
// pieces back into Messages. Not thread-safe. After an error every call fails with that error:
// once a header cannot be trusted, neither can anything after it.
class FrameDecoder {
 public:
  FrameDecoder(NodeId from, const FrameLimits& limits) : from_(from), limits_(limits) {}

  // Where the next piece must be written; its size is what the next receive must take.
  absl::Span<uint8_t> receive_buffer();
  bool awaiting_header() const { return !in_message_; }

  // `received` bytes were written to receive_buffer() (must be all of it). The Message once its
  // last piece is in; nullopt while more pieces are expected. DATA_LOSS for a bad header (see
  // DecodeFrameHeader), a sequence number out of order, or a short piece.
  absl::StatusOr<std::optional<Message>> Commit(size_t received);

  uint64_t messages_decoded() const { return next_sequence_; }

 private:
  absl::Status Fail(absl::Status status);

  const NodeId from_;
  const FrameLimits limits_;
  absl::Status error_;
  std::array<uint8_t, kFrameHeaderBytes> header_{};
  bool in_message_ = false;
  FrameHeader current_;
  Message message_;
  uint64_t offset_ = 0;  // payload bytes received of the current message
  uint64_t next_sequence_ = 0;
};

}  // namespace dmoe::transport

#endif  // DMOE_TRANSPORT_MESSAGE_FRAME_H_
