// GPU benchmarks of lowrank::cuda against the device's own limits, in one run: the rank update
// against a device-to-device copy of the same bytes, the fused LoRA forward and the EGGROLL
// population forward against the cuBLAS base GEMM alone, and the randomized SVD (time and
// captured energy; scripts/gpu_torch_baselines.py times torch.svd_lowrank on the same recipe). cudaEvent timing, medians of batches
// (several launches per batch for short kernels), inputs rotated among several copies so that
// the 50 MB L2 does not hold them across repetitions. Prints a table and writes JSON lines
// (argv[1], default cuda_bench.json). `--once` calls every case once, untimed, for a profiler.
#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "lowrank/cuda/eggroll.hpp"
#include "lowrank/cuda/lora_forward.hpp"
#include "lowrank/cuda/rank_update.hpp"
#include "lowrank/cuda/svd.hpp"

namespace {

using lowrank::bf16;
namespace lc = lowrank::cuda;

void ck(cudaError_t s, const char* what) {
  if (s != cudaSuccess) {
    std::fprintf(stderr, "%s: %s\n", what, cudaGetErrorString(s));
    std::exit(1);
  }
}

void* dalloc(std::size_t bytes) {
  void* p = nullptr;
  ck(cudaMalloc(&p, bytes), "cudaMalloc");
  return p;
}

// Fills n elements of T with normal(0, scale) via a host buffer (random data, never zeros).
template <class T>
void fill(T* d, std::size_t n, float scale, std::uint64_t seed) {
  std::vector<T> h(std::min<std::size_t>(n, std::size_t{1} << 22));
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> dist(0.0f, scale);
  for (auto& x : h) x = static_cast<T>(dist(rng));
  for (std::size_t off = 0; off < n; off += h.size()) {
    const std::size_t c = std::min(h.size(), n - off);
    ck(cudaMemcpy(d + off, h.data(), c * sizeof(T), cudaMemcpyHostToDevice), "upload");
  }
}

cudaStream_t g_stream = nullptr;
// `--once`: every case but the SVD is called once, untimed and outside graphs (for a profiler such
// as ncu; scripts/gpu-check.sh), rank updates at 8192^2; the printed figures are then meaningless.
bool g_once = false;

// Median milliseconds per call of f(rep), each call enqueued on g_stream: `batch` calls are
// captured into a CUDA graph (launch gaps and host-side argument checks out of the numbers) and
// the graph replayed `batches` times, each replay timed with events. With graph == false the
// calls themselves are timed (host overhead included when it exceeds the device time).
double time_ms(const std::function<void(int)>& f, int batch, int batches = 15, bool graph = true) {
  if (g_once) {
    f(0);
    ck(cudaStreamSynchronize(g_stream), "once");
    return 1.0;
  }
  for (int i = 0; i < 3; ++i) f(i);
  ck(cudaStreamSynchronize(g_stream), "warm-up");
  cudaEvent_t a, b;
  ck(cudaEventCreate(&a), "event");
  ck(cudaEventCreate(&b), "event");
  cudaGraphExec_t exec = nullptr;
  if (graph) {
    cudaGraph_t g = nullptr;
    ck(cudaStreamBeginCapture(g_stream, cudaStreamCaptureModeRelaxed), "begin capture");
    for (int i = 0; i < batch; ++i) f(i);
    ck(cudaStreamEndCapture(g_stream, &g), "end capture");
    ck(cudaGraphInstantiate(&exec, g, 0), "instantiate");
    cudaGraphDestroy(g);
    ck(cudaGraphLaunch(exec, g_stream), "graph warm-up");
    ck(cudaStreamSynchronize(g_stream), "graph warm-up");
  }
  std::vector<double> t;
  int rep = 0;
  for (int k = 0; k < batches; ++k) {
    ck(cudaEventRecord(a, g_stream), "record");
    if (graph) {
      ck(cudaGraphLaunch(exec, g_stream), "graph launch");
    } else {
      for (int i = 0; i < batch; ++i) f(rep++);
    }
    ck(cudaEventRecord(b, g_stream), "record");
    ck(cudaEventSynchronize(b), "sync");
    float ms = 0;
    ck(cudaEventElapsedTime(&ms, a, b), "elapsed");
    t.push_back(ms / batch);
  }
  ck(cudaGetLastError(), "launch");
  if (exec != nullptr) cudaGraphExecDestroy(exec);
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

FILE* json = nullptr;
void record(const std::string& name, double ms, double baseline_ms, const std::string& baseline, double ratio,
            const std::string& ratio_kind) {
  std::printf("%-40s %10.4f ms   %-22s %10.4f ms   ratio %.3f (%s)\n", name.c_str(), ms, baseline.c_str(), baseline_ms,
              ratio, ratio_kind.c_str());
  std::fflush(stdout);
  if (json != nullptr) {
    std::fprintf(json,
                 "{\"name\": \"%s\", \"ms\": %.6f, \"baseline\": \"%s\", \"baseline_ms\": %.6f, \"ratio\": %.10g, "
                 "\"ratio_kind\": \"%s\"}\n",
                 name.c_str(), ms, baseline.c_str(), baseline_ms, ratio, ratio_kind.c_str());
    std::fflush(json);
  }
}

template <class TW>
void bench_rank_update(const char* type, std::int64_t d) {
  const std::size_t elems = static_cast<std::size_t>(d) * d;
  auto* w = static_cast<TW*>(dalloc(elems * sizeof(TW)));
  auto* w2 = static_cast<TW*>(dalloc(elems * sizeof(TW)));
  fill(w, elems, 1.0f, 1);
  fill(w2, elems, 1.0f, 2);
  // Copy of the same bytes: read W, write W.
  // Not through a graph: a captured device-to-device copy ran at 2/3 of the stream copy's rate
  // (H200, 2026-11-27), so the limit is the plain cudaMemcpyAsync.
  const double copy = time_ms([&](int rep) {
    ck(cudaMemcpyAsync(rep % 2 ? w : w2, rep % 2 ? w2 : w, elems * sizeof(TW), cudaMemcpyDeviceToDevice, g_stream), "copy");
  }, 1, 15, false);
  const double bytes = 2.0 * static_cast<double>(elems * sizeof(TW));
  std::printf("device copy %s %lldx%lld: %.4f ms = %.0f GB/s (read + write)\n", type, static_cast<long long>(d),
              static_cast<long long>(d), copy, bytes / copy / 1e6);
  for (std::int64_t r : {1, 16}) {
    auto* u = static_cast<float*>(dalloc(static_cast<std::size_t>(d * r) * 4));
    auto* v = static_cast<float*>(dalloc(static_cast<std::size_t>(d * r) * 4));
    fill(u, static_cast<std::size_t>(d * r), 1e-3f, 3);
    fill(v, static_cast<std::size_t>(d * r), 1e-3f, 4);
    const double ms = time_ms([&](int rep) {
      lc::rank_update<TW>(lc::device_row_major(rep % 2 ? w : w2, d, d), lc::device_row_major<const float>(u, d, r),
                          lc::device_row_major<const float>(v, d, r), 0.5, {}, g_stream);
    }, 1);
    record(std::string("rank_update ") + type + " " + std::to_string(d) + "^2 r=" + std::to_string(r), ms, copy,
           "device copy", copy / ms, "fraction of copy bandwidth");
    const double piped = time_ms([&](int rep) {
      lc::rank_update<TW>(lc::device_row_major(rep % 2 ? w : w2, d, d), lc::device_row_major<const float>(u, d, r),
                          lc::device_row_major<const float>(v, d, r), 0.5, {}, g_stream,
                          lc::DeviceRankUpdateOptions{true});
    }, 1);
    record(std::string("rank_update ") + type + " " + std::to_string(d) + "^2 r=" + std::to_string(r) + " pipelined",
           piped, copy, "device copy", copy / piped, "fraction of copy bandwidth");
    if (!std::is_same_v<TW, float> && r == 16) {
      lowrank::RankUpdateOptions o;
      o.rounding = lowrank::Rounding::stochastic;
      o.seed = 5;
      const double sr = time_ms([&](int rep) {
        lc::rank_update<TW>(lc::device_row_major(rep % 2 ? w : w2, d, d), lc::device_row_major<const float>(u, d, r),
                            lc::device_row_major<const float>(v, d, r), 0.5, o, g_stream);
      }, 1);
      record(std::string("rank_update ") + type + " stochastic r=16", sr, copy, "device copy", copy / sr,
             "fraction of copy bandwidth");
    }
    cudaFree(u);
    cudaFree(v);
  }
  cudaFree(w);
  cudaFree(w2);
}

template <class T>
void bench_lora(const char* type, std::int64_t d, std::int64_t r, std::int64_t tokens,
                const lc::DeviceLoraOptions& options = {}, const char* suffix = "") {
  constexpr int sets = 3;
  T *x[sets], *w[sets], *a[sets], *b[sets], *y[sets];
  for (int s = 0; s < sets; ++s) {
    x[s] = static_cast<T*>(dalloc(static_cast<std::size_t>(tokens * d) * sizeof(T)));
    w[s] = static_cast<T*>(dalloc(static_cast<std::size_t>(d * d) * sizeof(T)));
    a[s] = static_cast<T*>(dalloc(static_cast<std::size_t>(r * d) * sizeof(T)));
    b[s] = static_cast<T*>(dalloc(static_cast<std::size_t>(d * r) * sizeof(T)));
    y[s] = static_cast<T*>(dalloc(static_cast<std::size_t>(tokens * d) * sizeof(T)));
    fill(x[s], static_cast<std::size_t>(tokens * d), 1.0f, 10 + s);
    fill(w[s], static_cast<std::size_t>(d * d), 0.02f, 20 + s);
    fill(a[s], static_cast<std::size_t>(r * d), 0.02f, 30 + s);
    fill(b[s], static_cast<std::size_t>(d * r), 0.02f, 40 + s);
  }
  const std::size_t ws_bytes = lc::lora_forward_workspace_bytes(tokens, r);
  void* ws = dalloc(std::max<std::size_t>(ws_bytes, 256));
  const int batch = tokens <= 256 ? 20 : 3;
  const double base = time_ms([&](int rep) {
    const int s = rep % sets;
    lc::linear_forward<T>(lc::device_row_major<const T>(x[s], tokens, d), lc::device_row_major<const T>(w[s], d, d),
                          lc::device_row_major(y[s], tokens, d), g_stream);
  }, batch);
  const double fused = time_ms([&](int rep) {
    const int s = rep % sets;
    lc::lora_forward<T>(lc::device_row_major<const T>(x[s], tokens, d), lc::device_row_major<const T>(w[s], d, d),
                        lc::device_row_major<const T>(a[s], r, d), lc::device_row_major<const T>(b[s], d, r), 2.0,
                        lc::device_row_major(y[s], tokens, d), ws, ws_bytes, g_stream,
                        options);
  }, batch);
  record(std::string("lora_forward ") + type + " d=" + std::to_string(d) + " r=" + std::to_string(r) +
             " tokens=" + std::to_string(tokens) + suffix,
         fused, base, "cuBLAS base GEMM", fused / base, "time over base GEMM");
  if (tokens == 1 && suffix[0] == 0) {
    // The same calls timed one by one from the host (no graph): the API's argument checks.
    const double base_direct = time_ms([&](int rep) {
      const int s = rep % sets;
      lc::linear_forward<T>(lc::device_row_major<const T>(x[s], tokens, d), lc::device_row_major<const T>(w[s], d, d),
                            lc::device_row_major(y[s], tokens, d), g_stream);
    }, batch, 15, false);
    const double fused_direct = time_ms([&](int rep) {
      const int s = rep % sets;
      lc::lora_forward<T>(lc::device_row_major<const T>(x[s], tokens, d), lc::device_row_major<const T>(w[s], d, d),
                          lc::device_row_major<const T>(a[s], r, d), lc::device_row_major<const T>(b[s], d, r), 2.0,
                          lc::device_row_major(y[s], tokens, d), ws, ws_bytes, g_stream,
                          options);
    }, batch, 15, false);
    record(std::string("lora_forward ") + type + " tokens=1 (stream, no graph)", fused_direct, base_direct,
           "cuBLAS base (no graph)", fused_direct / base_direct, "time over base GEMM");
  }
  for (int s = 0; s < sets; ++s) {
    cudaFree(x[s]);
    cudaFree(w[s]);
    cudaFree(a[s]);
    cudaFree(b[s]);
    cudaFree(y[s]);
  }
  cudaFree(ws);
}

template <class T>
void bench_eggroll(const char* type, std::int64_t d, std::int64_t n, std::int64_t r) {
  constexpr int sets = 2;
  T *x[sets], *w[sets], *y[sets];
  for (int s = 0; s < sets; ++s) {
    x[s] = static_cast<T*>(dalloc(static_cast<std::size_t>(n * d) * sizeof(T)));
    w[s] = static_cast<T*>(dalloc(static_cast<std::size_t>(d * d) * sizeof(T)));
    y[s] = static_cast<T*>(dalloc(static_cast<std::size_t>(n * d) * sizeof(T)));
    fill(x[s], static_cast<std::size_t>(n * d), 1.0f, 50 + s);
    fill(w[s], static_cast<std::size_t>(d * d), 0.02f, 60 + s);
  }
  lc::EggrollPopulation pop;
  pop.key = {1234, 1, 0};
  pop.rank = r;
  pop.sigma = 0.01;
  pop.population = n;
  pop.antithetic = lowrank::es::Antithetic::interleaved;
  const double base = time_ms([&](int rep) {
    const int s = rep % sets;
    lc::linear_forward<T>(lc::device_row_major<const T>(x[s], n, d), lc::device_row_major<const T>(w[s], d, d),
                          lc::device_row_major(y[s], n, d), g_stream);
  }, 5);
  const double egg = time_ms([&](int rep) {
    const int s = rep % sets;
    lc::eggroll_forward<T>(lc::device_row_major<const T>(x[s], n, d), lc::device_row_major<const T>(w[s], d, d), pop,
                           lc::device_row_major(y[s], n, d), g_stream);
  }, 5);
  record(std::string("eggroll_forward ") + type + " d=" + std::to_string(d) + " N=" + std::to_string(n) +
             " r=" + std::to_string(r),
         egg, base, "cuBLAS base GEMM", base / egg, "throughput vs plain inference");
  for (int s = 0; s < sets; ++s) {
    cudaFree(x[s]);
    cudaFree(w[s]);
    cudaFree(y[s]);
  }
}

// Randomized SVD of an m x n fp32 matrix with 512 directions of weights 1 / (1 + i / 16) plus
// small noise (the recipe of scripts/gpu_torch_baselines.py): time per call (it synchronizes, so
// no graph) and the captured energy sum(S^2) / ||A||^2.
void bench_svd(std::int64_t m, std::int64_t n, std::int64_t k, std::int64_t q, int niter) {
  constexpr std::int64_t kDirections = 512;
  auto* a = static_cast<float*>(dalloc(static_cast<std::size_t>(m * n) * 4));
  auto* u0 = static_cast<float*>(dalloc(static_cast<std::size_t>(m * kDirections) * 4));
  auto* v0 = static_cast<float*>(dalloc(static_cast<std::size_t>(n * kDirections) * 4));
  fill(u0, static_cast<std::size_t>(m * kDirections), 1.0f, 70);
  fill(v0, static_cast<std::size_t>(n * kDirections), 1.0f, 71);
  fill(a, static_cast<std::size_t>(m * n), 1e-2f / std::sqrt(static_cast<float>(m * n)), 72);
  {  // u0 columns scaled by w_i / sqrt(m n) on the host side of the upload, then A += U0 V0^T.
    std::vector<float> h(static_cast<std::size_t>(m * kDirections));
    ck(cudaMemcpy(h.data(), u0, h.size() * 4, cudaMemcpyDeviceToHost), "download");
    for (std::int64_t i = 0; i < m; ++i)
      for (std::int64_t j = 0; j < kDirections; ++j)
        h[static_cast<std::size_t>(i * kDirections + j)] *=
            static_cast<float>(1.0 / (1.0 + static_cast<double>(j) / 16.0) / std::sqrt(static_cast<double>(m * n)));
    ck(cudaMemcpy(u0, h.data(), h.size() * 4, cudaMemcpyHostToDevice), "upload");
    lc::rank_update<float>(lc::device_row_major(a, m, n), lc::device_row_major<const float>(u0, m, kDirections),
                           lc::device_row_major<const float>(v0, n, kDirections), 1.0, {}, g_stream);
    ck(cudaStreamSynchronize(g_stream), "build A");
  }
  auto* u = static_cast<float*>(dalloc(static_cast<std::size_t>(m * k) * 4));
  auto* v = static_cast<float*>(dalloc(static_cast<std::size_t>(n * k) * 4));
  auto* s = static_cast<float*>(dalloc(static_cast<std::size_t>(k) * 4));
  lc::DeviceSvdOptions o;
  o.q = q;
  o.power_iterations = niter;
  const std::size_t bytes = lc::truncated_svd_workspace_bytes(m, n, k, o);
  void* ws = dalloc(bytes);
  const auto call = [&](int) {
    lc::truncated_svd(lc::device_row_major<const float>(a, m, n), lc::device_col_major(u, m, k),
                      lc::device_col_major(s, k, 1), lc::device_col_major(v, n, k), ws, bytes, o, g_stream);
  };
  const double ms = time_ms(call, 1, 9, false);
  std::vector<float> hs(static_cast<std::size_t>(k)), ha(static_cast<std::size_t>(m * n));
  ck(cudaMemcpy(hs.data(), s, hs.size() * 4, cudaMemcpyDeviceToHost), "download S");
  ck(cudaMemcpy(ha.data(), a, ha.size() * 4, cudaMemcpyDeviceToHost), "download A");
  double captured = 0, total = 0;
  for (float x : hs) captured += static_cast<double>(x) * x;
  for (float x : ha) total += static_cast<double>(x) * x;
  const double energy = captured / total;
  record("truncated_svd fp32 " + std::to_string(m) + "x" + std::to_string(n) + " k=" + std::to_string(k) +
             " q=" + std::to_string(q) + " niter=" + std::to_string(niter),
         ms, ms, "(itself)", energy, "captured energy of the top k");
  for (void* p : {static_cast<void*>(a), static_cast<void*>(u0), static_cast<void*>(v0), static_cast<void*>(u),
                  static_cast<void*>(v), static_cast<void*>(s), ws})
    cudaFree(p);
}

}  // namespace

int main(int argc, char** argv) {
  std::string why;
  if (!lc::device_available(&why)) {
    std::printf("no CUDA device: %s\n", why.c_str());
    return 0;
  }
  g_once = argc > 1 && std::string(argv[1]) == "--once";
  if (!g_once) json = std::fopen(argc > 1 ? argv[1] : "cuda_bench.json", "w");
  ck(cudaStreamCreateWithFlags(&g_stream, cudaStreamNonBlocking), "stream");
  cudaDeviceProp prop{};
  int dev = 0, driver = 0, runtime = 0;
  ck(cudaGetDevice(&dev), "device");
  ck(cudaGetDeviceProperties(&prop, dev), "props");
  cudaDriverGetVersion(&driver);
  cudaRuntimeGetVersion(&runtime);
  std::printf("device: %s, %d SMs, %.0f MB L2, driver API %d, runtime %d\n", prop.name, prop.multiProcessorCount,
              prop.l2CacheSize / 1e6, driver, runtime);
  // --once (a profiler's run): 8192^2 updates (the profiler replays each kernel many times, saving
  // and restoring W), no SVD.
  const std::int64_t big = g_once ? 8192 : 16384;
  bench_rank_update<float>("fp32", big);
  bench_rank_update<bf16>("bf16", big);
  for (std::int64_t tokens : {1, 16, 256, 4096}) bench_lora<bf16>("bf16", 4096, 16, tokens);
  {
    lc::DeviceLoraOptions one_pass;
    one_pass.bf16_one_pass_max_tokens = 16;
    lc::DeviceLoraOptions term;
    term.term_max_tokens = 512;
    for (std::int64_t tokens : {1, 16}) bench_lora<bf16>("bf16", 4096, 16, tokens, one_pass, " (one-pass mma)");
    lc::DeviceLoraOptions one_pass_fma = one_pass;
    one_pass_fma.bf16_one_pass_tensor_cores = false;
    for (std::int64_t tokens : {1, 4}) bench_lora<bf16>("bf16", 4096, 16, tokens, one_pass_fma, " (one-pass FMA)");
    bench_lora<bf16>("bf16", 4096, 16, 256, term, " (term kernel)");
  }
  for (std::int64_t tokens : {1, 256}) bench_lora<float>("fp32", 4096, 16, tokens);
  bench_eggroll<bf16>("bf16", 4096, 2048, 1);
  bench_eggroll<bf16>("bf16", 4096, 2048, 4);
  bench_eggroll<float>("fp32", 4096, 2048, 1);
  if (!g_once) bench_svd(4096, 4096, 128, 138, 2);
  if (json != nullptr) std::fclose(json);
  return 0;
}
