// The NCCL transport's framing without NCCL: frames go from a FrameEncoder to a FrameDecoder
// piece by piece, as NCCL would move them (each receive exactly the size the decoder asks for),
// and the decoded messages are matched by tag in a Mailbox as the transport does.
#include "transport/message_frame.h"

#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/transport/transport_test_util.h"
#include "transport/mailbox.h"

namespace dmoe::transport {
namespace {

using ::dmoe::transport::testing::CheckPayload;
using ::dmoe::transport::testing::MakePayload;
using ::testing::HasSubstr;

constexpr uint32_t kChunk = 16;

FrameLimits SmallChunks() { return FrameLimits{.max_payload_bytes = 1000, .chunk_bytes = kChunk, .max_chunk_bytes = kChunk}; }

// Moves one encoded frame into `decoder` the way the NCCL receive loop does: each piece goes to
// receive_buffer(), whose size must be what the sender sent. Returns the decoded message, or the
// first error; counts the pieces received.
absl::StatusOr<std::optional<Message>> Deliver(const EncodedFrame& frame, FrameDecoder& decoder, int* pieces = nullptr) {
  std::vector<absl::Span<const uint8_t>> sent = {absl::MakeConstSpan(frame.header_bytes)};
  sent.insert(sent.end(), frame.chunks.begin(), frame.chunks.end());
  absl::StatusOr<std::optional<Message>> out = std::optional<Message>();
  for (absl::Span<const uint8_t> piece : sent) {
    absl::Span<uint8_t> into = decoder.receive_buffer();
    if (into.size() != piece.size()) {
      return absl::InternalError(absl::StrCat("decoder wants ", into.size(), " bytes, sender sent ", piece.size()));
    }
    if (!piece.empty()) std::memcpy(into.data(), piece.data(), piece.size());
    out = decoder.Commit(piece.size());
    if (pieces != nullptr) ++*pieces;
    if (!out.ok()) return out;
  }
  return out;
}

TEST(FrameHeaderTest, RoundTripsEveryField) {
  const FrameHeader h{.tag = kMaxTag - 5, .sequence = 0x0102030405060708, .payload_bytes = 999, .chunk_bytes = kChunk};
  absl::StatusOr<FrameHeader> back = DecodeFrameHeader(EncodeFrameHeader(h), SmallChunks());
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->tag, h.tag);
  EXPECT_EQ(back->sequence, h.sequence);
  EXPECT_EQ(back->payload_bytes, h.payload_bytes);
  EXPECT_EQ(back->chunk_bytes, h.chunk_bytes);
}

// Any single flipped bit anywhere in the header is DATA_LOSS (the checksum or a field check).
TEST(FrameHeaderTest, EveryCorruptedBitIsDataLoss) {
  const auto good = EncodeFrameHeader({.tag = 0xA5, .sequence = 3, .payload_bytes = 40, .chunk_bytes = kChunk});
  for (size_t byte = 0; byte < kFrameHeaderBytes; ++byte) {
    for (int bit = 0; bit < 8; ++bit) {
      auto bad = good;
      bad[byte] ^= static_cast<uint8_t>(1 << bit);
      absl::StatusOr<FrameHeader> h = DecodeFrameHeader(bad, SmallChunks());
      EXPECT_EQ(h.status().code(), absl::StatusCode::kDataLoss) << "byte " << byte << " bit " << bit;
    }
  }
}

TEST(FrameHeaderTest, ShortHeaderIsDataLoss) {
  const auto good = EncodeFrameHeader({.tag = 1, .sequence = 0, .payload_bytes = 0, .chunk_bytes = kChunk});
  absl::StatusOr<FrameHeader> h = DecodeFrameHeader(absl::MakeConstSpan(good).first(63), SmallChunks());
  EXPECT_EQ(h.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(h.status().message(), HasSubstr("63 bytes"));
}

TEST(FrameHeaderTest, LimitsAreEnforcedOnDecode) {
  const FrameLimits limits = SmallChunks();
  auto decode = [&](FrameHeader h) { return DecodeFrameHeader(EncodeFrameHeader(h), limits).status(); };
  absl::Status big = decode({.tag = 1, .payload_bytes = 1001, .chunk_bytes = kChunk});
  EXPECT_EQ(big.code(), absl::StatusCode::kResourceExhausted) << big;
  EXPECT_THAT(big.message(), HasSubstr("1001"));
  EXPECT_TRUE(decode({.tag = 1, .payload_bytes = 1000, .chunk_bytes = kChunk}).ok());
  absl::Status chunk = decode({.tag = 1, .payload_bytes = 10, .chunk_bytes = kChunk + 1});
  EXPECT_EQ(chunk.code(), absl::StatusCode::kDataLoss) << chunk;
  EXPECT_THAT(chunk.message(), HasSubstr("chunk of 17 bytes"));
  EXPECT_EQ(decode({.tag = 1, .payload_bytes = 10, .chunk_bytes = 0}).code(), absl::StatusCode::kDataLoss);
  absl::Status tag = decode({.tag = kMaxTag + 1, .payload_bytes = 10, .chunk_bytes = kChunk});
  EXPECT_EQ(tag.code(), absl::StatusCode::kDataLoss) << tag;
  EXPECT_THAT(tag.message(), HasSubstr("48 bits"));
}

TEST(FrameEncoderTest, RejectsWideTagsAndBigPayloadsWithoutUsingASequenceNumber) {
  FrameEncoder encoder(SmallChunks());
  const std::vector<uint8_t> big(1001);
  absl::StatusOr<EncodedFrame> f = encoder.Encode(7, 1, big);
  EXPECT_EQ(f.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(f.status().message(), HasSubstr("peer 7"));
  EXPECT_EQ(encoder.Encode(7, kMaxTag + 1, {}).status().code(), absl::StatusCode::kInvalidArgument);
  // The next frame still has sequence 0: the decoder accepts it.
  FrameDecoder decoder(3, SmallChunks());
  const std::vector<uint8_t> payload = MakePayload(3, 0, 5);  // the frame points into it
  absl::StatusOr<EncodedFrame> ok = encoder.Encode(7, 9, payload);
  ASSERT_TRUE(ok.ok()) << ok.status();
  absl::StatusOr<std::optional<Message>> m = Deliver(*ok, decoder);
  ASSERT_TRUE(m.ok()) << m.status();
  ASSERT_TRUE(m->has_value());
  EXPECT_EQ(CheckPayload(**m, 3, 0, 5), "");
}

// Sizes around the chunk size: the payload arrives in NumChunks pieces after the header and is
// reassembled byte for byte.
TEST(FrameStreamTest, ReassemblesEverySizeAcrossChunkBoundaries) {
  FrameEncoder encoder(SmallChunks());
  FrameDecoder decoder(2, SmallChunks());
  const std::vector<size_t> sizes = {0, 1, kChunk - 1, kChunk, kChunk + 1, 3 * kChunk + 5, 1000};
  for (size_t k = 0; k < sizes.size(); ++k) {
    const std::vector<uint8_t> payload = MakePayload(2, k, sizes[k]);
    absl::StatusOr<EncodedFrame> frame = encoder.Encode(0, 0x100 + k, payload);
    ASSERT_TRUE(frame.ok()) << frame.status();
    EXPECT_EQ(frame->chunks.size(), NumChunks(sizes[k], kChunk));
    int pieces = 0;
    absl::StatusOr<std::optional<Message>> m = Deliver(*frame, decoder, &pieces);
    ASSERT_TRUE(m.ok()) << m.status();
    ASSERT_TRUE(m->has_value()) << "size " << sizes[k];
    EXPECT_EQ(pieces, 1 + static_cast<int>(NumChunks(sizes[k], kChunk)));
    EXPECT_EQ((*m)->tag, 0x100 + k);
    EXPECT_EQ(CheckPayload(**m, 2, k, sizes[k]), "");
    EXPECT_TRUE(decoder.awaiting_header());
  }
  EXPECT_EQ(decoder.messages_decoded(), sizes.size());
}

TEST(FrameStreamTest, ALostFrameIsDataLossAndTheStreamStaysFailed) {
  FrameEncoder encoder(SmallChunks());
  FrameDecoder decoder(1, SmallChunks());
  const std::vector<uint8_t> p = MakePayload(1, 0, 20);
  absl::StatusOr<EncodedFrame> first = encoder.Encode(0, 1, p);
  absl::StatusOr<EncodedFrame> lost = encoder.Encode(0, 1, p);
  absl::StatusOr<EncodedFrame> third = encoder.Encode(0, 1, p);
  ASSERT_TRUE(first.ok() && lost.ok() && third.ok());
  ASSERT_TRUE(Deliver(*first, decoder).ok());
  absl::StatusOr<std::optional<Message>> m = Deliver(*third, decoder);
  EXPECT_EQ(m.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(m.status().message(), HasSubstr("sequence 2, expected 1"));
  EXPECT_THAT(m.status().message(), HasSubstr("node 1"));
  EXPECT_TRUE(decoder.receive_buffer().empty());
  EXPECT_EQ(decoder.Commit(0).status().code(), absl::StatusCode::kDataLoss);
}

TEST(FrameStreamTest, ACorruptHeaderOnTheWireFailsTheStream) {
  FrameEncoder encoder(SmallChunks());
  FrameDecoder decoder(1, SmallChunks());
  absl::StatusOr<EncodedFrame> frame = encoder.Encode(0, 1, MakePayload(1, 0, 20));
  ASSERT_TRUE(frame.ok());
  frame->header_bytes[24] ^= 0x40;  // payload bytes: 20 -> 84
  absl::StatusOr<std::optional<Message>> m = Deliver(*frame, decoder);
  EXPECT_EQ(m.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(m.status().message(), HasSubstr("checksum"));
}

TEST(FrameStreamTest, AShortPieceIsDataLoss) {
  FrameEncoder encoder(SmallChunks());
  FrameDecoder decoder(1, SmallChunks());
  absl::StatusOr<EncodedFrame> frame = encoder.Encode(0, 1, MakePayload(1, 0, 20));
  ASSERT_TRUE(frame.ok());
  std::memcpy(decoder.receive_buffer().data(), frame->header_bytes.data(), kFrameHeaderBytes);
  ASSERT_TRUE(decoder.Commit(kFrameHeaderBytes).ok());
  EXPECT_EQ(decoder.receive_buffer().size(), kChunk);
  absl::StatusOr<std::optional<Message>> m = decoder.Commit(kChunk - 1);
  EXPECT_EQ(m.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(m.status().message(), HasSubstr("received 15 bytes, expected 16"));
}

// Two senders' streams, each with its own decoder, interleaved into one mailbox: tag masks pick
// the messages, in order per (sender, tag), and Message.from names the sender.
TEST(FrameStreamTest, DecodedMessagesMatchByTagInTheMailbox) {
  Mailbox mailbox(0);
  constexpr uint64_t kA = 0xA000, kB = 0xB000, kKindMask = 0xF000;
  for (NodeId sender : {1, 2}) {
    FrameEncoder encoder(SmallChunks());
    FrameDecoder decoder(sender, SmallChunks());
    for (uint64_t i = 0; i < 6; ++i) {
      const uint64_t tag = (i % 2 ? kB : kA) | i;
      const std::vector<uint8_t> payload = MakePayload(sender, i, 3 * i + 1);
      absl::StatusOr<EncodedFrame> frame = encoder.Encode(0, tag, payload);
      ASSERT_TRUE(frame.ok());
      absl::StatusOr<std::optional<Message>> m = Deliver(*frame, decoder);
      ASSERT_TRUE(m.ok() && m->has_value()) << m.status();
      mailbox.Push(std::move(**m));
    }
  }
  auto exact = mailbox.Receive(kB | 3, ~uint64_t{0}, absl::Seconds(1));
  ASSERT_TRUE(exact.ok()) << exact.status();
  EXPECT_EQ(exact->from, 1);
  EXPECT_EQ(CheckPayload(*exact, 1, 3, 10), "");
  for (NodeId sender : {1, 2}) {
    for (uint64_t i : {0, 2, 4}) {
      auto a = mailbox.Receive(kA, kKindMask, absl::Seconds(1));
      ASSERT_TRUE(a.ok()) << a.status();
      EXPECT_EQ(a->from, sender);
      EXPECT_EQ(CheckPayload(*a, sender, i, 3 * i + 1), "");
    }
  }
  EXPECT_EQ(mailbox.Receive(kA, kKindMask, absl::Milliseconds(1)).status().code(),
            absl::StatusCode::kDeadlineExceeded);
}

}  // namespace
}  // namespace dmoe::transport
