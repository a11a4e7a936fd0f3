// rank_update/<impl>/<m>x<n>_r<r>_<type>_t<threads>: W += alpha U V^T on a column-major W
// (Eigen's default), against Eigen, OpenBLAS and the in-place streaming limit, in one binary.
//   impl lowrank  : lowrank::rank_update
//   impl eigen    : W.noalias() += (alpha * U) * V^T   (bf16: W = (W.cast<float>() + alpha U V^T).cast<bf16>()),
//                   built with the default flags a consumer of lowrank uses (eigen_baseline.cpp)
//   impl eigen-native : the same built with -march=native
//   impl eigen-vector(-native) : rank 1 only, u and v as Eigen::VectorXf (Eigen's outer-product path)
//   impl openblas : cblas_sger (r = 1) / cblas_sgemm with beta = 1 (fp32 only)
//   impl limit    : one read and one write of W's bytes (stream_limit.cpp)
// Counters: bytes_per_second counts W read + written once; FLOP/s counts 2 m n r.
#include <benchmark/benchmark.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include <Eigen/Core>

#include "bench_util.hpp"
#include "lowrank/lowrank.hpp"
#define LOWRANK_BASELINE_NS portable
#include "eigen_baseline.hpp"
#undef LOWRANK_BASELINE_NS
#define LOWRANK_BASELINE_NS native
#include "eigen_baseline.hpp"
#include "stream_limit.hpp"

#if defined(LOWRANK_BENCH_OPENBLAS)
#include <cblas.h>
#endif
#if defined(_OPENMP)
#include <omp.h>
#endif

namespace {

using lowrank_bench::set_threads;

using Index = Eigen::Index;
constexpr Index kM = 4096, kN = 4096;

template <class T>
void set_counters(benchmark::State& state, Index m, Index n, Index r) {
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations()) * 2 * m * n * static_cast<std::int64_t>(sizeof(T)));
  state.counters["FLOP/s"] = benchmark::Counter(2.0 * static_cast<double>(m) * n * r,
                                                benchmark::Counter::kIsIterationInvariantRate);
}


template <class T>
struct Problem {
  Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic> w;
  Eigen::MatrixXf u, v;
  Problem(Index m, Index n, Index r) : w(m, n), u(Eigen::MatrixXf::Random(m, r)), v(Eigen::MatrixXf::Random(n, r)) {
    w = Eigen::MatrixXf::Random(m, n).template cast<T>();
  }
};

// alpha is tiny so that repeated updates keep W bounded.
constexpr float kAlpha = 1e-6f;

template <class T>
void bm_lowrank(benchmark::State& state, Index r, int threads) {
  set_threads(threads);
  Problem<T> p(kM, kN, r);
  for (auto _ : state) {
    lowrank::rank_update(p.w, p.u, p.v, kAlpha);
    benchmark::ClobberMemory();
  }
  set_counters<T>(state, kM, kN, r);
  state.SetLabel(std::string(lowrank::to_string(lowrank::active_target())));
}

template <class T, bool kNative>
void bm_eigen(benchmark::State& state, Index r, int threads) {
  set_threads(threads);
  Problem<T> p(kM, kN, r);
  for (auto _ : state) {
    if constexpr (kNative) {
      native::eigen_rank_update(p.w, p.u, p.v, kAlpha);
    } else {
      portable::eigen_rank_update(p.w, p.u, p.v, kAlpha);
    }
    benchmark::ClobberMemory();
  }
  set_counters<T>(state, kM, kN, r);
}

template <bool kNative>
void bm_eigen_vectors(benchmark::State& state, Index r, int threads) {
  set_threads(threads);
  Problem<float> p(kM, kN, r);
  const Eigen::VectorXf u = p.u.col(0), v = p.v.col(0);
  for (auto _ : state) {
    if constexpr (kNative) {
      native::eigen_rank1_vectors(p.w, u, v, kAlpha);
    } else {
      portable::eigen_rank1_vectors(p.w, u, v, kAlpha);
    }
    benchmark::ClobberMemory();
  }
  set_counters<float>(state, kM, kN, r);
}

#if defined(LOWRANK_BENCH_OPENBLAS)
void bm_openblas(benchmark::State& state, Index r, int threads) {
  set_threads(threads);
  Problem<float> p(kM, kN, r);
  const int m = static_cast<int>(kM), n = static_cast<int>(kN), k = static_cast<int>(r);
  for (auto _ : state) {
    if (r == 1) {
      cblas_sger(CblasColMajor, m, n, kAlpha, p.u.data(), 1, p.v.data(), 1, p.w.data(), m);
    } else {
      cblas_sgemm(CblasColMajor, CblasNoTrans, CblasTrans, m, n, k, kAlpha, p.u.data(), m, p.v.data(), n, 1.0f,
                  p.w.data(), m);
    }
    benchmark::ClobberMemory();
  }
  set_counters<float>(state, kM, kN, r);
}
#endif

template <class T>
void limit_once(T* data, std::ptrdiff_t count, int threads, int streams) {
#if defined(_OPENMP)
#pragma omp parallel num_threads(threads)
  {
    const std::ptrdiff_t chunk = (count + threads - 1) / threads;
    const std::ptrdiff_t begin = std::min(count, chunk * omp_get_thread_num());
    const std::ptrdiff_t end = std::min(count, begin + chunk);
#else
  {
    const std::ptrdiff_t begin = 0, end = count;
#endif
    if constexpr (std::is_same_v<T, float>) {
      stream_limit_f32(data + begin, end - begin, 0.0f, streams);
    } else {
      stream_limit_u16(reinterpret_cast<std::uint16_t*>(data) + begin, end - begin, 0, streams);
    }
  }
}

// The limit is the fastest of the stream counts {1, 2, 4, 6, 8}, chosen by timing each (median of
// 5) before the measured loop.
template <class T>
int best_stream_count(T* data, std::ptrdiff_t count, int threads) {
  int best = 1;
  double best_time = 1e30;
  for (int streams : {1, 2, 4, 6, 8}) {
    std::vector<double> times;
    for (int rep = 0; rep < 5; ++rep) {
      const auto t0 = std::chrono::steady_clock::now();
      limit_once(data, count, threads, streams);
      times.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    }
    std::sort(times.begin(), times.end());
    if (times[2] < best_time) best_time = times[2], best = streams;
  }
  return best;
}

template <class T>
void bm_limit(benchmark::State& state, Index r, int threads) {
  set_threads(threads);
  Problem<T> p(kM, kN, 1);
  const std::ptrdiff_t count = kM * kN;
  const int streams = best_stream_count(p.w.data(), count, threads);
  for (auto _ : state) {
    limit_once(p.w.data(), count, threads, streams);
    benchmark::ClobberMemory();
  }
  set_counters<T>(state, kM, kN, r);
  state.SetLabel(std::to_string(streams) + " streams");
}

template <class F>
void add(const std::string& impl, Index r, const char* type, int threads, F f) {
  const std::string name = "rank_update/" + impl + "/" + std::to_string(kM) + "x" + std::to_string(kN) + "_r" +
                           std::to_string(r) + "_" + type + "_t" + std::to_string(threads);
  benchmark::RegisterBenchmark(name.c_str(), [=](benchmark::State& s) { f(s, r, threads); })
      ->Unit(benchmark::kMillisecond)
      ->UseRealTime();
}

// fma_peak/limit/f32_t<threads>: the cores' fp32 FMA throughput, for the FLOP/s of compute-bound
// ranks.
void bm_fma_peak(benchmark::State& state, int threads) {
  constexpr long kIterations = 1 << 22;
  double flops = 0;
  for (auto _ : state) {
#if defined(_OPENMP)
#pragma omp parallel num_threads(threads) reduction(+ : flops)
#endif
    flops += native::fma_peak_kernel(kIterations);
  }
  state.counters["FLOP/s"] = benchmark::Counter(flops, benchmark::Counter::kIsRate);
}

int register_all() {
  const int max_threads = lowrank::num_threads();
  std::vector<int> thread_counts{1};
  if (max_threads > 1) thread_counts.push_back(max_threads);
  for (int t : thread_counts) {
    benchmark::RegisterBenchmark(("fma_peak/limit/f32_t" + std::to_string(t)).c_str(),
                                 [t](benchmark::State& s) { bm_fma_peak(s, t); })
        ->UseRealTime();
  }
  for (int t : thread_counts)
    for (Index r : {1, 4, 16, 64}) {
      add("lowrank", r, "f32", t, bm_lowrank<float>);
      add("eigen", r, "f32", t, bm_eigen<float, false>);
      add("eigen-native", r, "f32", t, bm_eigen<float, true>);
      if (r == 1) {
        add("eigen-vector", r, "f32", t, bm_eigen_vectors<false>);
        add("eigen-vector-native", r, "f32", t, bm_eigen_vectors<true>);
      }
#if defined(LOWRANK_BENCH_OPENBLAS)
      add("openblas", r, "f32", t, bm_openblas);
#endif
      add("limit", r, "f32", t, bm_limit<float>);
      add("lowrank", r, "bf16", t, bm_lowrank<Eigen::bfloat16>);
      add("eigen", r, "bf16", t, bm_eigen<Eigen::bfloat16, false>);
      add("eigen-native", r, "bf16", t, bm_eigen<Eigen::bfloat16, true>);
      add("limit", r, "bf16", t, bm_limit<Eigen::bfloat16>);
    }
  return 0;
}
const int registered = register_all();

}  // namespace

LOWRANK_BENCHMARK_MAIN()
