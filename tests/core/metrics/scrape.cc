#include "tests/core/metrics/scrape.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <sstream>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"

namespace dmoe::testing {

absl::StatusOr<std::string> HttpGet(int port, const std::string& path_and_query, absl::Duration timeout) {
  const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return absl::InternalError(absl::StrCat("socket: ", std::strerror(errno)));
  struct Closer {
    int fd;
    ~Closer() { ::close(fd); }
  } closer{fd};
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) {
    return absl::UnavailableError(absl::StrCat("connect 127.0.0.1:", port, ": ", std::strerror(errno)));
  }
  const std::string request =
      absl::StrCat("GET ", path_and_query, " HTTP/1.0\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
  if (::send(fd, request.data(), request.size(), MSG_NOSIGNAL) != static_cast<ssize_t>(request.size())) {
    return absl::UnavailableError(absl::StrCat("send to 127.0.0.1:", port, ": ", std::strerror(errno)));
  }
  std::string response;
  const absl::Time deadline = absl::Now() + timeout;
  char buf[65536];
  for (;;) {
    const int64_t left_ms = absl::ToInt64Milliseconds(deadline - absl::Now());
    if (left_ms <= 0) return absl::DeadlineExceededError(absl::StrCat("GET ", path_and_query, ": no answer in time"));
    pollfd p{fd, POLLIN, 0};
    if (::poll(&p, 1, static_cast<int>(left_ms)) <= 0) continue;
    const ssize_t n = ::recv(fd, buf, sizeof buf, 0);
    if (n < 0) return absl::UnavailableError(absl::StrCat("recv: ", std::strerror(errno)));
    if (n == 0) break;
    response.append(buf, static_cast<size_t>(n));
  }
  const size_t header_end = response.find("\r\n\r\n");
  if (header_end == std::string::npos) return absl::UnavailableError("malformed HTTP answer");
  const std::string status_line = response.substr(0, response.find("\r\n"));
  std::string body = response.substr(header_end + 4);
  if (!absl::StrContains(status_line, " 200")) {
    return absl::UnavailableError(absl::StrCat("GET ", path_and_query, ": ", status_line, ": ", body));
  }
  return body;
}

double Scrape::Sum(const std::string& name, const std::set<std::string>& label_filters) const {
  double sum = 0;
  for (const auto& [key, value] : series) {
    const size_t brace = key.find('{');
    if (key.substr(0, brace) != name) continue;
    bool match = true;
    for (const std::string& f : label_filters) match = match && absl::StrContains(key, f);
    if (match) sum += value;
  }
  return sum;
}

absl::StatusOr<Scrape> ParseExposition(const std::string& text) {
  Scrape s;
  for (absl::string_view line : absl::StrSplit(text, '\n', absl::SkipEmpty())) {
    if (line.front() == '#') continue;
    // Label values may hold spaces; the value follows the closing brace.
    const size_t close = line.rfind('}');
    const size_t space = line.find(' ', close == absl::string_view::npos ? 0 : close);
    if (space == absl::string_view::npos) return absl::InvalidArgumentError(absl::StrCat("bad line: ", line));
    const std::string key(line.substr(0, space));
    absl::string_view rest = line.substr(space + 1);
    rest = rest.substr(0, rest.find(' '));  // an optional timestamp follows
    double value = 0;
    if (rest == "+Inf") {
      value = HUGE_VAL;
    } else if (rest == "-Inf") {
      value = -HUGE_VAL;
    } else if (rest == "NaN") {
      value = NAN;
    } else if (!absl::SimpleAtod(rest, &value)) {
      return absl::InvalidArgumentError(absl::StrCat("bad value in: ", line));
    }
    s.series[key] = value;
    s.names.insert(key.substr(0, key.find('{')));
  }
  return s;
}

absl::StatusOr<Scrape> ScrapeMetrics(int port) {
  absl::StatusOr<std::string> body = HttpGet(port, "/metrics");
  if (!body.ok()) return body.status();
  return ParseExposition(*body);
}

std::set<std::string> PromqlMetricNames(const std::string& expr) {
  // Drop what holds no metric name: strings, {matchers}, [ranges], and the
  // label lists after grouping keywords.
  std::string e;
  int brace = 0, bracket = 0;
  char quote = 0;
  for (char c : expr) {
    if (quote != 0) {
      if (c == quote) quote = 0;
      continue;
    }
    if (c == '"' || c == '\'') {
      quote = c;
    } else if (c == '{') {
      ++brace;
    } else if (c == '}') {
      --brace;
    } else if (c == '[') {
      ++bracket;
    } else if (c == ']') {
      --bracket;
    } else if (brace == 0 && bracket == 0) {
      e += c;
    }
  }
  static const std::set<std::string> kKeywords = {"by", "without", "on", "ignoring", "group_left", "group_right", "and",
                                                  "or", "unless", "bool", "offset", "inf", "nan",
                                                  // aggregations: `sum by (x) (..)` puts a modifier before the (
                                                  "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count",
                                                  "count_values", "bottomk", "topk", "quantile"};
  static const std::set<std::string> kGrouping = {"by", "without", "on", "ignoring", "group_left", "group_right"};
  std::set<std::string> names;
  auto ident_start = [](char c) { return std::isalpha(static_cast<unsigned char>(c)) || c == '_' || c == ':'; };
  auto ident_char = [](char c) { return std::isalnum(static_cast<unsigned char>(c)) || c == '_' || c == ':'; };
  size_t i = 0;
  while (i < e.size()) {
    if (std::isdigit(static_cast<unsigned char>(e[i])) || e[i] == '.') {  // a number, maybe 1e3
      while (i < e.size() && (ident_char(e[i]) || e[i] == '.')) ++i;
      continue;
    }
    if (!ident_start(e[i])) {
      ++i;
      continue;
    }
    const size_t begin = i;
    while (i < e.size() && ident_char(e[i])) ++i;
    const std::string word = e.substr(begin, i - begin);
    size_t next = i;
    while (next < e.size() && e[next] == ' ') ++next;
    const bool call = next < e.size() && e[next] == '(';
    if (kGrouping.contains(absl::AsciiStrToLower(word)) && call) {
      i = e.find(')', next);  // skip the label list
      if (i == std::string::npos) break;
      continue;
    }
    if (call || kKeywords.contains(absl::AsciiStrToLower(word))) continue;
    names.insert(word);
  }
  return names;
}

std::string UrlEncode(const std::string& s) {
  std::string out;
  for (unsigned char c : s) {
    if (std::isalnum(c) || c == '-' || c == '_' || c == '.' || c == '~') {
      out += static_cast<char>(c);
    } else {
      absl::StrAppend(&out, "%", absl::Hex(c, absl::kZeroPad2));
    }
  }
  return out;
}

}  // namespace dmoe::testing
