// CPU micro-benchmarks behind docs/cpu_gemm.md, all in one run so that the
// figures can be compared with each other:
//   stream/copy, stream/read  memory bandwidth with NumThreads() threads over
//                             arrays of ColdBytes() (>= 256 MiB, >= 4 x LLC),
//                             bytes_per_second;
//   peak/fma                  measured FMA throughput of all threads (FLOPS),
//                             next to the /proc/cpuinfo clock;
//   gemm/<dtype>/m:../n:../k:../<impl>
//                             y[m,n] = x[m,k] * w[n,k]^T, float32 x and y,
//                             F32 or BF16 w: FLOPS (2 m n k per call) and
//                             bytes_per_second = weight bytes per call / time.
// Weights are "cold" as in decode: every call uses the next of several copies
// that together span ColdBytes(), so they come from DRAM, not from the LLC.
//
// impls: dmoe       dmoe::cpu::MatMul as shipped (own kernel or sgemm);
//        dmoe-own   the own kernel with the best ISA, at every m (F32 only:
//                   for BF16 it is what "dmoe" runs);
//        dmoe-avx2  the own kernel's AVX2 variant (machines without AVX-512);
//        openblas   cblas_sgemm (F32); for BF16, Debian's build lacks
//                   cblas_sbgemm, so w is widened to f32 in the timed loop
//                   and sgemm runs on that (see BM_GemmOpenBlas);
//        onednn     dnnl::matmul, weights reordered once (outside the timed
//                   loop) into the layout the primitive asks for; f32 x with
//                   bf16 weights if the library has it, else x is reordered
//                   to bf16 inside the timed loop.
// Usage: cpu_bench --benchmark_repetitions=3 --benchmark_enable_random_interleaving=true
#include <benchmark/benchmark.h>

#include "bench/memory_bandwidth.h"
#include <cblas.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <tuple>
#include <unordered_map>
#include <vector>

#include "core/cpu/matmul.h"
#include "core/cpu/parallel.h"
#include "core/dtype.h"
#include "core/tensor.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define BENCH_X86 1
#else
#define BENCH_X86 0
#endif

#ifdef DMOE_HAVE_DNNL
#include <dnnl.hpp>
#endif
#ifdef DMOE_HAVE_OPENMP
#include <omp.h>
#endif

namespace {

using dmoe::DType;
using dmoe::Matrix;
using dmoe::cpu::NumThreads;
using dmoe::cpu::ParallelFor;

constexpr int64_t kMiB = 1 << 20;

// Bytes that stay "cold": max(256 MiB, 4 x the largest cache), so that
// arrays or weight copies of that total size come from DRAM.
int64_t ColdBytes() {
  static const int64_t bytes = [] {
    int64_t largest = 0;
    for (const auto& c : benchmark::CPUInfo::Get().caches) {
      largest = std::max<int64_t>(largest, c.size);
    }
    return std::max<int64_t>(256 * kMiB, (4 * largest + kMiB - 1) / kMiB * kMiB);
  }();
  return bytes;
}

// ---------------------------------------------------------------------------
// Thread pools of different libraries spin for a while after a call
// (OpenBLAS ~0.1 s with sched_yield, GOMP a little); on a small machine that
// steals cores from the next benchmark. Wait once whenever the library
// changes.

enum class Lib { kNone, kDmoe, kOpenBlas, kOneDnn };
Lib last_lib = Lib::kNone;

void Settle(Lib lib) {
  if (lib != last_lib && (last_lib == Lib::kOpenBlas || last_lib == Lib::kOneDnn)) {
    std::this_thread::sleep_for(std::chrono::milliseconds(250));
  }
  last_lib = lib;
}

// ---------------------------------------------------------------------------
// Memory bandwidth.

struct AlignedFree {
  void operator()(void* p) const { std::free(p); }
};
using Buffer = std::unique_ptr<char, AlignedFree>;

Buffer Allocate(int64_t bytes) {
  const int64_t rounded = (bytes + 4095) / 4096 * 4096;
  return Buffer(static_cast<char*>(std::aligned_alloc(4096, rounded)));
}

struct StreamArrays {
  Buffer a, b;
  StreamArrays() : a(Allocate(ColdBytes())), b(Allocate(ColdBytes())) {
    std::memset(a.get(), 1, ColdBytes());
    std::memset(b.get(), 2, ColdBytes());
  }
};

StreamArrays& Stream() {
  static StreamArrays* s = new StreamArrays();
  return *s;
}

// Splits [0, bytes) into NumThreads() 4 KiB-aligned parts, one per thread.
void ForEachPart(int64_t bytes, const std::function<void(int64_t, int64_t)>& fn) {
  const int threads = NumThreads();
  const int64_t per = (bytes / threads + 4095) / 4096 * 4096;
  ParallelFor(threads, 1, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      const int64_t lo = std::min(bytes, t * per), hi = std::min(bytes, (t + 1) * per);
      if (hi > lo) fn(lo, hi);
    }
  });
}

void BM_StreamCopy(benchmark::State& state) {
  StreamArrays& s = Stream();
  Settle(Lib::kDmoe);
  for (auto _ : state) {
    ForEachPart(ColdBytes(), [&](int64_t lo, int64_t hi) {
      std::memcpy(s.b.get() + lo, s.a.get() + lo, hi - lo);
    });
    benchmark::ClobberMemory();
  }
  // STREAM convention: bytes read + bytes written.
  state.SetBytesProcessed(state.iterations() * 2 * ColdBytes());
  state.counters["threads"] = NumThreads();
}

void BM_StreamRead(benchmark::State& state) {
  StreamArrays& s = Stream();
  Settle(Lib::kDmoe);
  uint64_t sum = 0;
  for (auto _ : state) sum += dmoe::bench::ReadPass(s.a.get(), ColdBytes());
  benchmark::DoNotOptimize(sum);
  state.SetBytesProcessed(state.iterations() * ColdBytes());
  state.counters["threads"] = NumThreads();
}

// ---------------------------------------------------------------------------
// Peak FLOP/s: independent FMA chains on every thread.

constexpr int64_t kFmaIters = 1 << 22;

#if BENCH_X86
__attribute__((target("avx512f"))) float FmaChains512(int64_t iters) {
  const __m512 b = _mm512_set1_ps(0.9999999f), c = _mm512_set1_ps(1e-7f);
  __m512 a[12];
  for (int i = 0; i < 12; ++i) a[i] = _mm512_set1_ps(1.f + i);
  for (int64_t it = 0; it < iters; ++it) {
#pragma GCC unroll 12
    for (int i = 0; i < 12; ++i) a[i] = _mm512_fmadd_ps(a[i], b, c);
  }
  __m512 s = a[0];
  for (int i = 1; i < 12; ++i) s = _mm512_add_ps(s, a[i]);
  return _mm512_reduce_add_ps(s);
}

__attribute__((target("avx2,fma"))) float FmaChains256(int64_t iters) {
  const __m256 b = _mm256_set1_ps(0.9999999f), c = _mm256_set1_ps(1e-7f);
  __m256 a[12];
  for (int i = 0; i < 12; ++i) a[i] = _mm256_set1_ps(1.f + i);
  for (int64_t it = 0; it < iters; ++it) {
#pragma GCC unroll 12
    for (int i = 0; i < 12; ++i) a[i] = _mm256_fmadd_ps(a[i], b, c);
  }
  __m256 s = a[0];
  for (int i = 1; i < 12; ++i) s = _mm256_add_ps(s, a[i]);
  float out[8];
  _mm256_storeu_ps(out, s);
  return out[0] + out[7];
}
#endif

// FLOPs of one FmaChains call on one thread (0 when no FMA unit is known).
int64_t FmaFlopsPerCall(bool avx512) { return kFmaIters * 12 * (avx512 ? 16 : 8) * 2; }

void BM_PeakFma(benchmark::State& state) {
#if BENCH_X86
  const bool avx512 = state.range(0) != 0;
  if (avx512 ? !__builtin_cpu_supports("avx512f") : !__builtin_cpu_supports("fma")) {
    state.SkipWithError("ISA not supported");
    return;
  }
  Settle(Lib::kDmoe);
  std::vector<float> sink(NumThreads() * 4);
  for (auto _ : state) {
    ParallelFor(NumThreads(), 1, [&](int64_t b, int64_t e) {
      for (int64_t t = b; t < e; ++t) {
        sink[t] += avx512 ? FmaChains512(kFmaIters) : FmaChains256(kFmaIters);
      }
    });
  }
  benchmark::DoNotOptimize(sink.data());
  state.counters["FLOPS"] = benchmark::Counter(
      static_cast<double>(FmaFlopsPerCall(avx512)) * NumThreads(),
      benchmark::Counter::kIsIterationInvariantRate);
  state.counters["threads"] = NumThreads();
#else
  state.SkipWithError("no x86 FMA microbenchmark on this architecture");
#endif
}

// ---------------------------------------------------------------------------
// GEMM operands: rotating copies of one random weight matrix.

struct Weights {
  DType dtype;
  int64_t n, k;
  int64_t bytes;  // of one copy
  Buffer data;
  std::vector<Matrix> copies;
};

Weights& GetWeights(DType dtype, int64_t n, int64_t k) {
  static std::map<std::tuple<int, int64_t, int64_t>, std::unique_ptr<Weights>> cache;
  auto& slot = cache[{static_cast<int>(dtype), n, k}];
  if (slot) return *slot;
  slot = std::make_unique<Weights>();
  Weights& w = *slot;
  w.dtype = dtype;
  w.n = n;
  w.k = k;
  const int64_t esize = dtype == DType::kBF16 ? 2 : 4;
  w.bytes = n * k * esize;
  const int64_t stride = (w.bytes + 4095) / 4096 * 4096;
  const int64_t count = std::max<int64_t>(2, (ColdBytes() + w.bytes - 1) / w.bytes);
  w.data = Allocate(stride * count);
  // Values ~ U(-1, 1) from a 64-bit LCG; no denormals.
  uint64_t state = 0x9E3779B97F4A7C15ull ^ (n * 131 + k);
  char* first = w.data.get();
  for (int64_t i = 0; i < n * k; ++i) {
    state = state * 6364136223846793005ull + 1442695040888963407ull;
    const float v = static_cast<float>(static_cast<int64_t>(state >> 40) - (1 << 23)) /
                    static_cast<float>(1 << 23);
    if (dtype == DType::kBF16) {
      reinterpret_cast<uint16_t*>(first)[i] = dmoe::FloatToBf16(v);
    } else {
      reinterpret_cast<float*>(first)[i] = v;
    }
  }
  for (int64_t c = 0; c < count; ++c) {
    char* p = first + c * stride;
    if (c > 0) std::memcpy(p, first, w.bytes);
    Matrix m;
    m.dtype = dtype;
    m.rows = n;
    m.cols = k;
    m.data = p;
    w.copies.push_back(m);
  }
  return w;
}

std::vector<float> Activations(int64_t m, int64_t k) {
  std::vector<float> x(m * k);
  for (int64_t i = 0; i < m * k; ++i) x[i] = static_cast<float>((i * 7919) % 2001 - 1000) / 1000.f;
  return x;
}

void SetGemmCounters(benchmark::State& state, int64_t m, const Weights& w) {
  state.counters["FLOPS"] =
      benchmark::Counter(2.0 * m * w.n * w.k, benchmark::Counter::kIsIterationInvariantRate);
  state.SetBytesProcessed(state.iterations() * w.bytes);
}

enum class Impl { kDmoe, kDmoeOwn, kDmoeAvx2, kOpenBlas, kOneDnn };

const char* ImplName(Impl impl) {
  switch (impl) {
    case Impl::kDmoe:
      return "dmoe";
    case Impl::kDmoeOwn:
      return "dmoe-own";
    case Impl::kDmoeAvx2:
      return "dmoe-avx2";
    case Impl::kOpenBlas:
      return "openblas";
    case Impl::kOneDnn:
      return "onednn";
  }
  return "?";
}

void BM_GemmDmoe(benchmark::State& state, Impl impl, DType dtype, int64_t m, int64_t n,
                 int64_t k) {
  Weights& w = GetWeights(dtype, n, k);
  const std::vector<float> x = Activations(m, k);
  std::vector<float> y(m * n);
  Settle(Lib::kDmoe);
  size_t c = 0;
  for (auto _ : state) {
    const Matrix& wc = w.copies[c];
    if (++c == w.copies.size()) c = 0;
    if (impl == Impl::kDmoe) {
      dmoe::cpu::MatMul(x.data(), m, wc, y.data());
    } else {
      const auto isa = impl == Impl::kDmoeAvx2 ? dmoe::cpu::GemmIsa::kAvx2
                                                 : dmoe::cpu::BestGemmIsa();
      dmoe::cpu::MatMulOwn(isa, x.data(), m, wc, y.data());
    }
    benchmark::DoNotOptimize(y.data());
  }
  SetGemmCounters(state, m, w);
}

// Debian's OpenBLAS 0.3.21 is built without BUILD_BFLOAT16: cblas.h declares
// cblas_sbgemm / cblas_sbstobf16 but libopenblas.so does not export them. So
// the OpenBLAS path for BF16 weights is what a caller would have to do:
// widen the weights to float32 (multi-threaded, inside the timed loop) and
// call sgemm. Keeping a float32 copy instead costs as much as the F32 case.
void WidenBf16(const uint16_t* in, float* out, int64_t count) {
  ParallelFor(count, 1 << 16, [&](int64_t b, int64_t e) {
    uint32_t* o = reinterpret_cast<uint32_t*>(out);
    for (int64_t i = b; i < e; ++i) o[i] = static_cast<uint32_t>(in[i]) << 16;
  });
}

void BM_GemmOpenBlas(benchmark::State& state, DType dtype, int64_t m, int64_t n, int64_t k) {
  Weights& w = GetWeights(dtype, n, k);
  const std::vector<float> x = Activations(m, k);
  std::vector<float> y(m * n);
  std::vector<float> wide(dtype == DType::kBF16 ? n * k : 0);
  Settle(Lib::kOpenBlas);
  size_t c = 0;
  for (auto _ : state) {
    const Matrix& wc = w.copies[c];
    if (++c == w.copies.size()) c = 0;
    const float* wf = wc.dtype == DType::kF32 ? wc.f32() : wide.data();
    if (dtype == DType::kBF16) WidenBf16(wc.bf16(), wide.data(), n * k);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m, n, k, 1.f, x.data(), k, wf, k, 0.f,
                y.data(), n);
    benchmark::DoNotOptimize(y.data());
  }
  SetGemmCounters(state, m, w);
  if (dtype == DType::kBF16) state.SetLabel("w widened to f32 in loop + sgemm (no sbgemm)");
}

#ifdef DMOE_HAVE_DNNL
// ---------------------------------------------------------------------------
// oneDNN.

dnnl::engine& Engine() {
  static dnnl::engine* e = new dnnl::engine(dnnl::engine::kind::cpu, 0);
  return *e;
}

// Weight copies reordered into a primitive's preferred layout, cached by
// (shape, dtype, layout) so that the benchmarks of several m share them.
const std::vector<dnnl::memory>& PackedWeights(Weights& w, const dnnl::memory::desc& want) {
  static std::vector<std::tuple<Weights*, dnnl::memory::desc, std::vector<dnnl::memory>>> cache;
  for (auto& [pw, desc, mems] : cache) {
    if (pw == &w && desc == want) return mems;
  }
  // Keep at most a few packed sets alive (they are as large as the copies).
  if (cache.size() >= 16) cache.erase(cache.begin());
  using dt = dnnl::memory::data_type;
  const dnnl::memory::desc plain({w.k, w.n}, w.dtype == DType::kBF16 ? dt::bf16 : dt::f32,
                                 dnnl::memory::dims{1, w.k});
  dnnl::stream s(Engine());
  std::vector<dnnl::memory> mems;
  for (const Matrix& c : w.copies) {
    dnnl::memory src(plain, Engine(), const_cast<void*>(c.data));
    dnnl::memory dst(want, Engine());
    dnnl::reorder(src, dst).execute(s, src, dst);
    mems.push_back(dst);
  }
  s.wait();
  cache.emplace_back(&w, want, std::move(mems));
  return std::get<2>(cache.back());
}

void BM_GemmOneDnn(benchmark::State& state, DType dtype, int64_t m, int64_t n, int64_t k) {
  using dt = dnnl::memory::data_type;
  using tag = dnnl::memory::format_tag;
  Weights& w = GetWeights(dtype, n, k);
  const std::vector<float> x = Activations(m, k);
  std::vector<float> y(m * n);
  const dt wdt = dtype == DType::kBF16 ? dt::bf16 : dt::f32;
  const dnnl::memory::desc x_f32({m, k}, dt::f32, tag::ab);
  const dnnl::memory::desc y_md({m, n}, dt::f32, tag::ab);
  const dnnl::memory::desc w_any({k, n}, wdt, tag::any);
  // F32 activations with BF16 weights if this oneDNN has it, else BF16 x.
  bool convert_x = false;
  std::unique_ptr<dnnl::matmul::primitive_desc> pd;
  try {
    pd = std::make_unique<dnnl::matmul::primitive_desc>(
        dnnl::matmul::desc(x_f32, w_any, y_md), Engine());
  } catch (const dnnl::error&) {
    if (dtype != DType::kBF16) throw;
    convert_x = true;
    const dnnl::memory::desc x_bf16({m, k}, dt::bf16, tag::ab);
    pd = std::make_unique<dnnl::matmul::primitive_desc>(
        dnnl::matmul::desc(x_bf16, w_any, y_md), Engine());
  }
  const dnnl::matmul prim(*pd);
  const std::vector<dnnl::memory>& packed = PackedWeights(w, pd->weights_desc());
  dnnl::memory x_mem(x_f32, Engine(), const_cast<float*>(x.data()));
  dnnl::memory y_mem(y_md, Engine(), y.data());
  dnnl::memory xb_mem;
  std::unique_ptr<dnnl::reorder> to_bf16;
  if (convert_x) {
    xb_mem = dnnl::memory(pd->src_desc(), Engine());
    to_bf16 = std::make_unique<dnnl::reorder>(x_mem, xb_mem);
  }
  std::vector<std::unordered_map<int, dnnl::memory>> args;
  for (const dnnl::memory& wm : packed) {
    args.push_back({{DNNL_ARG_SRC, convert_x ? xb_mem : x_mem},
                    {DNNL_ARG_WEIGHTS, wm},
                    {DNNL_ARG_DST, y_mem}});
  }
  dnnl::stream s(Engine());
  Settle(Lib::kOneDnn);
  size_t c = 0;
  for (auto _ : state) {
    if (convert_x) to_bf16->execute(s, x_mem, xb_mem);
    prim.execute(s, args[c]);
    s.wait();
    if (++c == args.size()) c = 0;
    benchmark::DoNotOptimize(y.data());
  }
  SetGemmCounters(state, m, w);
  state.SetLabel(std::string(convert_x ? "x:bf16(reordered in loop)" : "x:f32") +
                 " impl:" + pd->impl_info_str());
}
#endif  // DMOE_HAVE_DNNL

// ---------------------------------------------------------------------------
// Machine description for the log.

std::string CpuInfoField(const std::string& key) {
  std::ifstream in("/proc/cpuinfo");
  std::string line;
  while (std::getline(in, line)) {
    if (line.compare(0, key.size(), key) == 0) {
      const auto colon = line.find(':');
      if (colon != std::string::npos) return line.substr(colon + 2);
    }
  }
  return "";
}

void RegisterAll() {
  benchmark::RegisterBenchmark("stream/copy", BM_StreamCopy)->UseRealTime()->MinTime(0.5);
  benchmark::RegisterBenchmark("stream/read", BM_StreamRead)->UseRealTime()->MinTime(0.5);
  benchmark::RegisterBenchmark("peak/fma/avx512", BM_PeakFma)->Arg(1)->UseRealTime();
  benchmark::RegisterBenchmark("peak/fma/avx2", BM_PeakFma)->Arg(0)->UseRealTime();
  const std::vector<std::pair<int64_t, int64_t>> shapes = {
      {2048, 2048}, {1408, 2048}, {2048, 1408}, {4096, 4096}};
  const bool has_avx2_variant = dmoe::cpu::GemmIsaSupported(dmoe::cpu::GemmIsa::kAvx2) &&
                                dmoe::cpu::BestGemmIsa() != dmoe::cpu::GemmIsa::kAvx2;
  for (DType dtype : {DType::kF32, DType::kBF16}) {
    // m = 512 (F32 only): where MatMul's F32 switch to sgemm is decided.
    const std::vector<int64_t> ms = dtype == DType::kF32
                                        ? std::vector<int64_t>{1, 8, 32, 128, 512}
                                        : std::vector<int64_t>{1, 8, 32, 128};
    for (int64_t m : ms) {
      for (auto [n, k] : shapes) {
        std::vector<Impl> impls = {Impl::kDmoe};
        if (dtype == DType::kF32) impls.push_back(Impl::kDmoeOwn);
        if (has_avx2_variant && m <= 128) impls.push_back(Impl::kDmoeAvx2);
        impls.push_back(Impl::kOpenBlas);
#ifdef DMOE_HAVE_DNNL
        impls.push_back(Impl::kOneDnn);
#endif
        for (Impl impl : impls) {
          const std::string name = std::string("gemm/") + (dtype == DType::kF32 ? "f32" : "bf16") +
                                   "/m:" + std::to_string(m) + "/n:" + std::to_string(n) +
                                   "/k:" + std::to_string(k) + "/" + ImplName(impl);
          benchmark::internal::Benchmark* b = nullptr;
          switch (impl) {
            case Impl::kOpenBlas:
              b = benchmark::RegisterBenchmark(name.c_str(), BM_GemmOpenBlas, dtype, m, n, k);
              break;
            case Impl::kOneDnn:
#ifdef DMOE_HAVE_DNNL
              b = benchmark::RegisterBenchmark(name.c_str(), BM_GemmOneDnn, dtype, m, n, k);
#endif
              break;
            default:
              b = benchmark::RegisterBenchmark(name.c_str(), BM_GemmDmoe, impl, dtype, m, n, k);
          }
          if (b) b->UseRealTime()->Unit(benchmark::kMicrosecond);
        }
      }
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  const int threads = NumThreads();
  openblas_set_num_threads(threads);
#ifdef DMOE_HAVE_OPENMP
  omp_set_num_threads(threads);  // oneDNN's runtime here is OpenMP
#endif
  const std::string model = CpuInfoField("model name");
  const std::string mhz = CpuInfoField("cpu MHz");
  const unsigned hw = std::thread::hardware_concurrency();
  std::printf("cpu: %s, %u logical CPUs, /proc/cpuinfo clock %s MHz\n", model.c_str(), hw,
              mhz.c_str());
  std::printf("threads: dmoe %d, OpenBLAS %d (%s, core %s)\n", threads,
              openblas_get_num_threads(), openblas_get_config(), openblas_get_corename());
  std::printf("dmoe own-kernel ISA: %s; F32 own kernel for m <= %ld\n",
              dmoe::cpu::GemmIsaName(dmoe::cpu::BestGemmIsa()),
              static_cast<long>(dmoe::cpu::kOwnF32MaxTokens));
#ifdef DMOE_HAVE_DNNL
  const dnnl_version_t* v = dnnl_version();
  std::printf("oneDNN %d.%d.%d (cpu runtime %u)\n", v->major, v->minor, v->patch,
              v->cpu_runtime);
#else
  std::printf("oneDNN: not found at build time\n");
#endif
  // Nominal peak: threads x clock x FP32 FLOPs per cycle, for the FMA width
  // and FMA pipes of the core; compare with peak/fma (measured).
  const double ghz = std::atof(mhz.c_str()) / 1000.0;
  std::printf(
      "peak estimate at the cpuinfo clock: %d x %.2f GHz x {16|32|64} FP32 FLOP/cycle "
      "(1x256-bit | 2x256-bit | 2x512-bit FMA) = %.0f | %.0f | %.0f GFLOP/s; "
      "peak/fma/* measures it\n",
      threads, ghz, threads * ghz * 16, threads * ghz * 32, threads * ghz * 64);
  benchmark::AddCustomContext("dmoe_threads", std::to_string(threads));
  benchmark::AddCustomContext("cpu_model", model);
  benchmark::AddCustomContext("cpuinfo_mhz", mhz);
  benchmark::AddCustomContext("openblas_core", openblas_get_corename());
  benchmark::AddCustomContext("dmoe_isa", dmoe::cpu::GemmIsaName(dmoe::cpu::BestGemmIsa()));
  RegisterAll();
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
