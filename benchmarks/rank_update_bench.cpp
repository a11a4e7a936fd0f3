// rank_update/<impl>/<m>x<n>_r<r>_<type>_t<threads>: W += alpha U V^T on a column-major W
// (Eigen's default), against Eigen, OpenBLAS and the in-place streaming limit, in one binary.
//   impl lowrank  : lowrank::rank_update
//   impl eigen    : W.noalias() += (alpha * U) * V^T   (bf16: W = (W.cast<float>() + alpha U V^T).cast<bf16>())
//   impl openblas : cblas_sger (r = 1) / cblas_sgemm with beta = 1 (fp32 only)
//   impl limit    : one read and one write of W's bytes (stream_limit.cpp)
// Counters: bytes_per_second counts W read + written once; FLOP/s counts 2 m n r.
#include <benchmark/benchmark.h>

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include <Eigen/Core>

#include "lowrank/lowrank.hpp"
#include "stream_limit.hpp"

#if defined(LOWRANK_BENCH_OPENBLAS)
#include <cblas.h>
extern "C" void openblas_set_num_threads(int);
#endif
#if defined(_OPENMP)
#include <omp.h>
#endif

namespace {

using Index = Eigen::Index;
constexpr Index kM = 4096, kN = 4096;

template <class T>
void set_counters(benchmark::State& state, Index m, Index n, Index r) {
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations()) * 2 * m * n * static_cast<std::int64_t>(sizeof(T)));
  state.counters["FLOP/s"] = benchmark::Counter(2.0 * static_cast<double>(m) * n * r,
                                                benchmark::Counter::kIsIterationInvariantRate);
}

void set_threads(int threads) {
  lowrank::set_num_threads(threads);
  Eigen::setNbThreads(threads);
#if defined(LOWRANK_BENCH_OPENBLAS)
  openblas_set_num_threads(threads);
#endif
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

template <class T>
void bm_eigen(benchmark::State& state, Index r, int threads) {
  set_threads(threads);
  Problem<T> p(kM, kN, r);
  for (auto _ : state) {
    if constexpr (std::is_same_v<T, float>) {
      p.w.noalias() += (kAlpha * p.u) * p.v.transpose();
    } else {
      p.w = (p.w.template cast<float>() + (kAlpha * p.u) * p.v.transpose()).template cast<T>();
    }
    benchmark::ClobberMemory();
  }
  set_counters<T>(state, kM, kN, r);
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
void bm_limit(benchmark::State& state, Index r, int threads) {
  set_threads(threads);
  Problem<T> p(kM, kN, 1);
  const std::ptrdiff_t count = kM * kN;
  for (auto _ : state) {
#if defined(_OPENMP)
#pragma omp parallel num_threads(threads)
    {
      const std::ptrdiff_t chunk = (count + threads - 1) / threads;
      const std::ptrdiff_t begin = chunk * omp_get_thread_num();
      const std::ptrdiff_t end = std::min(count, begin + chunk);
#else
    {
      const std::ptrdiff_t begin = 0, end = count;
#endif
      if constexpr (std::is_same_v<T, float>) {
        stream_limit_f32(p.w.data() + begin, end - begin, 0.0f);
      } else {
        stream_limit_u16(reinterpret_cast<std::uint16_t*>(p.w.data()) + begin, end - begin, 0);
      }
    }
    benchmark::ClobberMemory();
  }
  set_counters<T>(state, kM, kN, r);
}

template <class F>
void add(const std::string& impl, Index r, const char* type, int threads, F f) {
  const std::string name = "rank_update/" + impl + "/" + std::to_string(kM) + "x" + std::to_string(kN) + "_r" +
                           std::to_string(r) + "_" + type + "_t" + std::to_string(threads);
  benchmark::RegisterBenchmark(name.c_str(), [=](benchmark::State& s) { f(s, r, threads); })
      ->Unit(benchmark::kMillisecond)
      ->UseRealTime();
}

int register_all() {
  const int max_threads = lowrank::num_threads();
  std::vector<int> thread_counts{1};
  if (max_threads > 1) thread_counts.push_back(max_threads);
  for (int t : thread_counts)
    for (Index r : {1, 4, 16, 64}) {
      add("lowrank", r, "f32", t, bm_lowrank<float>);
      add("eigen", r, "f32", t, bm_eigen<float>);
#if defined(LOWRANK_BENCH_OPENBLAS)
      add("openblas", r, "f32", t, bm_openblas);
#endif
      add("limit", r, "f32", t, bm_limit<float>);
      add("lowrank", r, "bf16", t, bm_lowrank<Eigen::bfloat16>);
      add("eigen", r, "bf16", t, bm_eigen<Eigen::bfloat16>);
      add("limit", r, "bf16", t, bm_limit<Eigen::bfloat16>);
    }
  return 0;
}
const int registered = register_all();

}  // namespace

BENCHMARK_MAIN();
