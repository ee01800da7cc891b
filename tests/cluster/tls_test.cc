// TLS and message-size limits on the client API, against a real cluster,
// with certificates made at test time (testing::TestCertificates).
#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "proto/grpc_credentials.h"
#include "tests/cluster/cluster_harness.h"
#include "tests/core/model_test_util.h"
#include "tests/test_util.h"

namespace dmoe {
namespace {

namespace fs = std::filesystem;
using testing::Cluster;
using testing::ClusterOptions;
using testing::GenerateIds;

std::unique_ptr<Cluster> StartTlsCluster(std::vector<std::string> extra_flags = {}) {
  const testing::TestPki& pki = testing::TestCertificates();
  ClusterOptions o;
  o.model_dir = testing::GoldenModelDir().string();
  o.scheduler_flags = {"--tls-cert", pki.server_cert.string(), "--tls-key", pki.server_key.string()};
  o.scheduler_flags.insert(o.scheduler_flags.end(), extra_flags.begin(), extra_flags.end());
  auto c = Cluster::Start(o);
  EXPECT_TRUE(c.ok()) << c.status();
  return c.ok() ? std::move(*c) : nullptr;
}

std::unique_ptr<v1::Generation::Stub> Client(const Cluster& cluster, const TlsFiles& files,
                                             const std::string& server_name = "") {
  absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> credentials = MakeChannelCredentials(files);
  EXPECT_TRUE(credentials.ok()) << credentials.status();
  grpc::ChannelArguments args;
  if (!server_name.empty()) args.SetSslTargetNameOverride(server_name);
  return v1::Generation::NewStub(grpc::CreateCustomChannel(absl::StrCat("127.0.0.1:", cluster.client_port()),
                                                           *credentials, args));
}

std::string Ids(const std::vector<int32_t>& ids) {
  std::string s;
  for (size_t i = 0; i < ids.size(); ++i) s += (i ? "," : "") + std::to_string(ids[i]);
  return s;
}

testing::ProgramRun DmoeGenerate(const Cluster& cluster, const std::vector<int32_t>& prompt,
                                 const std::vector<std::string>& tls_flags) {
  std::vector<std::string> args = {"generate", "--server", absl::StrCat("127.0.0.1:", cluster.client_port()), "--ids",
                                   Ids(prompt), "--max-tokens", "16", "--ignore-eos", "--json"};
  args.insert(args.end(), tls_flags.begin(), tls_flags.end());
  return testing::RunProgram((testing::BinDir() / "dmoe").string(), args);
}

TEST(ClientApiTls, TlsClientWithTheCaGetsTheGoldenGeneration) {
  const testing::TestPki& pki = testing::TestCertificates();
  auto cluster = StartTlsCluster();
  ASSERT_NE(cluster, nullptr);
  const auto cases = testing::LoadGoldenCases(testing::GoldenModelDir());
  auto client = Client(*cluster, {.ca = pki.ca.string()});
  const testing::Generated g = GenerateIds(*client, cases[0].prompt_ids, 16);
  ASSERT_TRUE(g.status.ok()) << g.status.error_message();
  EXPECT_EQ(g.ids, cases[0].greedy_ids);

  // The CLI, by address and by a name the certificate carries.
  const testing::ProgramRun r = DmoeGenerate(*cluster, cases[1].prompt_ids, {"--tls-ca", pki.ca.string()});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(nlohmann::json::parse(r.out)["ids"].get<std::vector<int32_t>>(), cases[1].greedy_ids) << r.out;
  const testing::ProgramRun named = DmoeGenerate(
      *cluster, cases[2].prompt_ids, {"--tls-ca", pki.ca.string(), "--tls-server-name", "scheduler.dmoe.test"});
  ASSERT_EQ(named.exit_code, 0) << named.err;
  EXPECT_EQ(nlohmann::json::parse(named.out)["ids"].get<std::vector<int32_t>>(), cases[2].greedy_ids);
}

TEST(ClientApiTls, PlaintextAndWrongCaClientsAreRefused) {
  const testing::TestPki& pki = testing::TestCertificates();
  auto cluster = StartTlsCluster();
  ASSERT_NE(cluster, nullptr);
  const std::vector<int32_t> prompt = {4, 5, 6};

  const testing::Generated plain = GenerateIds(*Client(*cluster, {}), prompt, 4);
  EXPECT_EQ(plain.status.error_code(), grpc::StatusCode::UNAVAILABLE) << plain.status.error_message();
  EXPECT_TRUE(plain.ids.empty());

  const testing::Generated wrong = GenerateIds(*Client(*cluster, {.ca = pki.other_ca.string()}), prompt, 4);
  EXPECT_EQ(wrong.status.error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_NE(wrong.status.error_message().find("certificate verify failed"), std::string::npos)
      << wrong.status.error_message();

  // A name the certificate does not carry.
  const testing::Generated misnamed =
      GenerateIds(*Client(*cluster, {.ca = pki.ca.string()}, "elsewhere.test"), prompt, 4);
  EXPECT_EQ(misnamed.status.error_code(), grpc::StatusCode::UNAVAILABLE) << misnamed.status.error_message();

  // The CLI says what failed, in one line.
  const testing::ProgramRun r = DmoeGenerate(*cluster, prompt, {"--tls-ca", pki.other_ca.string()});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("UNAVAILABLE"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("certificate verify failed"), std::string::npos) << r.err;
  EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
  const testing::ProgramRun missing = DmoeGenerate(*cluster, prompt, {"--tls-ca", "/nonexistent/ca.pem"});
  EXPECT_EQ(missing.exit_code, 1);
  EXPECT_NE(missing.err.find("--tls-ca /nonexistent/ca.pem: cannot open"), std::string::npos) << missing.err;

  // The cluster still serves a proper client.
  const testing::Generated ok = GenerateIds(*Client(*cluster, {.ca = pki.ca.string()}), prompt, 4);
  EXPECT_TRUE(ok.status.ok()) << ok.status.error_message();
  EXPECT_EQ(ok.ids.size(), 4u);
}

TEST(ClientApiTls, ClientCertificateRequiredWithClientCa) {
  const testing::TestPki& pki = testing::TestCertificates();
  auto cluster = StartTlsCluster({"--tls-client-ca", pki.ca.string()});
  ASSERT_NE(cluster, nullptr);
  const std::vector<int32_t> prompt = {7, 8, 9};
  const testing::Generated anonymous = GenerateIds(*Client(*cluster, {.ca = pki.ca.string()}), prompt, 4);
  EXPECT_EQ(anonymous.status.error_code(), grpc::StatusCode::UNAVAILABLE) << anonymous.status.error_message();
  const testing::Generated with_cert = GenerateIds(
      *Client(*cluster, {.cert = pki.client_cert.string(), .key = pki.client_key.string(), .ca = pki.ca.string()}),
      prompt, 4);
  EXPECT_TRUE(with_cert.status.ok()) << with_cert.status.error_message();
  EXPECT_EQ(with_cert.ids.size(), 4u);
  // A certificate the client CA did not sign: the server's own would not do
  // either, being for servers only; a self-signed one is refused.
  const testing::Generated foreign = GenerateIds(
      *Client(*cluster, {.cert = pki.other_ca.string(),
                         .key = pki.other_ca_key.string(),
                         .ca = pki.ca.string()}),
      prompt, 4);
  EXPECT_EQ(foreign.status.error_code(), grpc::StatusCode::UNAVAILABLE) << foreign.status.error_message();
}

TEST(ClientApiLimits, OversizedRequestIsResourceExhausted) {
  const testing::TestPki& pki = testing::TestCertificates();
  auto cluster = StartTlsCluster({"--max-request-bytes", "65536"});
  ASSERT_NE(cluster, nullptr);
  auto client = Client(*cluster, {.ca = pki.ca.string()});
  v1::GenerateRequest request;
  request.set_text(std::string(70000, 'a'));
  request.set_max_tokens(1);
  grpc::ClientContext ctx;
  auto reader = client->Generate(&ctx, request);
  v1::GenerateResponse r;
  EXPECT_FALSE(reader->Read(&r));
  const grpc::Status st = reader->Finish();
  EXPECT_EQ(st.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << st.error_message();
  // Just under the limit is parsed and validated (this prompt is longer than
  // the context).
  request.set_text(std::string(60000, 'a'));
  grpc::ClientContext ctx2;
  auto reader2 = client->Generate(&ctx2, request);
  EXPECT_FALSE(reader2->Read(&r));
  const grpc::Status st2 = reader2->Finish();
  EXPECT_EQ(st2.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << st2.error_message();
  EXPECT_NE(st2.error_message().find("does not fit the context"), std::string::npos) << st2.error_message();
}

TEST(ClientApiLimits, DefaultLimitRefusesFiveMebibytes) {
  ClusterOptions o;
  o.model_dir = testing::GoldenModelDir().string();
  auto cluster = Cluster::Start(o);
  ASSERT_TRUE(cluster.ok()) << cluster.status();
  v1::GenerateRequest request;
  for (int i = 0; i < (5 << 20); ++i) request.mutable_token_ids()->add_ids(5);  // one byte each
  request.set_max_tokens(1);
  grpc::ClientContext ctx;
  auto reader = (*cluster)->client().Generate(&ctx, request);
  v1::GenerateResponse r;
  EXPECT_FALSE(reader->Read(&r));
  const grpc::Status st = reader->Finish();
  EXPECT_EQ(st.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << st.error_message();
}

}  // namespace
}  // namespace dmoe
