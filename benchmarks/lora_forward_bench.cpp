// lora_forward/<impl>/<tokens>x<in>x<out>_r<r>_<type>_t<threads>: Y = X W^T + s (X A^T) B^T for a
// batch of tokens, W out x in (nn.Linear), everything row-major, against the base product alone.
//   impl lowrank          : lowrank::lora_forward (fused)
//   impl lowrank-base     : lowrank::linear_forward (X W^T, same kernels, no LoRA)
//   impl eigen-base       : Y = X W^T with Eigen built -march=native (GEMV for one token)
//   impl eigen-unfused    : Y = X W^T; T = X A^T; Y += s T B^T as separate Eigen products (native)
//   impl openblas-base    : cblas_sgemv (one token) / cblas_sgemm
//   impl ratios           : all of the above timed interleaved, once each per iteration, and the
//                           medians' ratios reported as counters:
//                           fused/best_base (best of eigen, openblas, lowrank base), fused/eigen_base,
//                           fused/openblas_base, fused/lowrank_base, unfused/best_base.
// Counters: bytes_per_second counts W read once; FLOP/s counts 2 tokens out in (the base product).
#include <benchmark/benchmark.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include <Eigen/Core>

#include "bench_util.hpp"
#include "lora_forward_baseline.hpp"
#include "lowrank/core/threading.hpp"
#include "lowrank/kernels/lora_forward.hpp"
#include "lowrank/kernels/targets.hpp"

#if defined(LOWRANK_BENCH_OPENBLAS)
#include <cblas.h>
#endif

namespace {

using lowrank_bench::set_threads;
using Index = Eigen::Index;
using lora_forward_baseline::RowMatrixXf;
constexpr Index kIn = 4096, kOut = 4096;


template <class TW>
struct Problem {
  Index tokens, r;
  RowMatrixXf x, w, a, b, y, t;
  Eigen::Matrix<TW, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor> w_stored;
  float scale = 0.5f;
  Problem(Index tokens_, Index r_)
      : tokens(tokens_),
        r(r_),
        x(RowMatrixXf::Random(tokens_, kIn)),
        w(RowMatrixXf::Random(kOut, kIn)),
        a(RowMatrixXf::Random(r_, kIn)),
        b(RowMatrixXf::Random(kOut, r_)),
        y(tokens_, kOut),
        t(tokens_, r_) {
    w_stored = w.template cast<TW>();
  }
  lowrank::WeightView<const TW> weight() const {
    return {lowrank::row_major<const TW>(w_stored.data(), kOut, kIn), lowrank::Layout::out_in};
  }
  void fused() {
    lowrank::lora_forward(lowrank::view(x), weight(), lowrank::view(a), lowrank::view(b), scale, lowrank::view(y));
  }
  void lowrank_base() { lowrank::linear_forward(lowrank::view(x), weight(), lowrank::view(y)); }
  void eigen_base() { lora_forward_baseline::eigen_base(x, w, y); }
  void eigen_unfused() { lora_forward_baseline::eigen_unfused(x, w, a, b, scale, t, y); }
#if defined(LOWRANK_BENCH_OPENBLAS)
  void openblas_base() {
    const int m = static_cast<int>(tokens), n = static_cast<int>(kOut), k = static_cast<int>(kIn);
    if (m == 1) {
      cblas_sgemv(CblasRowMajor, CblasNoTrans, n, k, 1.0f, w.data(), k, x.data(), 1, 0.0f, y.data(), 1);
    } else {
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m, n, k, 1.0f, x.data(), k, w.data(), k, 0.0f, y.data(),
                  n);
    }
  }
#endif
};

template <class TW>
void set_counters(benchmark::State& state, Index tokens) {
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations()) * kOut * kIn *
                          static_cast<std::int64_t>(sizeof(TW)));
  state.counters["FLOP/s"] = benchmark::Counter(2.0 * static_cast<double>(tokens) * kOut * kIn,
                                                benchmark::Counter::kIsIterationInvariantRate);
}

template <class TW, void (Problem<TW>::*F)()>
void bm(benchmark::State& state, Index tokens, Index r, int threads) {
  set_threads(threads);
  Problem<TW> p(tokens, r);
  for (auto _ : state) {
    (p.*F)();
    benchmark::ClobberMemory();
  }
  set_counters<TW>(state, tokens);
  state.SetLabel(std::string(lowrank::to_string(lowrank::active_target())));
}

// Every implementation once per iteration, in a random order; ratios of the medians.
void bm_ratios(benchmark::State& state, Index tokens, Index r, int threads) {
  set_threads(threads);
  Problem<float> p(tokens, r);
  enum { fused, lowrank_base, eigen_base, eigen_unfused, openblas_base, kCount };
  const std::function<void()> impls[kCount] = {
      [&] { p.fused(); },
      [&] { p.lowrank_base(); },
      [&] { p.eigen_base(); },
      [&] { p.eigen_unfused(); },
#if defined(LOWRANK_BENCH_OPENBLAS)
      [&] { p.openblas_base(); },
#else
      [] {},
#endif
  };
  const std::vector<double> m = lowrank_bench::interleaved_medians(state, impls);
  double best = std::min(m[lowrank_base], m[eigen_base]);
#if defined(LOWRANK_BENCH_OPENBLAS)
  best = std::min(best, m[openblas_base]);
  state.counters["fused/openblas_base"] = m[fused] / m[openblas_base];
#endif
  state.counters["fused/best_base"] = m[fused] / best;
  state.counters["fused/eigen_base"] = m[fused] / m[eigen_base];
  state.counters["fused/lowrank_base"] = m[fused] / m[lowrank_base];
  state.counters["unfused/best_base"] = m[eigen_unfused] / best;
  state.counters["fused_ms"] = m[fused] * 1e3;
  state.counters["best_base_ms"] = best * 1e3;
  state.SetLabel(std::string(lowrank::to_string(lowrank::active_target())));
}

template <class F>
void add(const std::string& impl, Index tokens, Index r, const char* type, int threads, F f, int min_iterations = 0) {
  const std::string name = "lora_forward/" + impl + "/" + std::to_string(tokens) + "x" + std::to_string(kIn) + "x" +
                           std::to_string(kOut) + "_r" + std::to_string(r) + "_" + type + "_t" + std::to_string(threads);
  auto* b = benchmark::RegisterBenchmark(name.c_str(), [=](benchmark::State& s) { f(s, tokens, r, threads); })
                ->Unit(benchmark::kMillisecond)
                ->UseRealTime();
  if (min_iterations > 0) b->Iterations(min_iterations);
}

int register_all() {
  const int max_threads = lowrank::num_threads();
  std::vector<int> thread_counts{1};
  if (max_threads > 1) thread_counts.push_back(max_threads);
  const Index r = 16;
  for (int t : thread_counts)
    for (Index tokens : {1, 16, 256}) {
      add("ratios", tokens, r, "f32", t, bm_ratios, tokens == 256 ? 9 : tokens == 16 ? 41 : 101);
      add("lowrank", tokens, r, "f32", t, bm<float, &Problem<float>::fused>);
      add("lowrank-base", tokens, r, "f32", t, bm<float, &Problem<float>::lowrank_base>);
      add("eigen-base", tokens, r, "f32", t, bm<float, &Problem<float>::eigen_base>);
      add("eigen-unfused", tokens, r, "f32", t, bm<float, &Problem<float>::eigen_unfused>);
#if defined(LOWRANK_BENCH_OPENBLAS)
      add("openblas-base", tokens, r, "f32", t, bm<float, &Problem<float>::openblas_base>);
#endif
      add("lowrank", tokens, r, "bf16", t, bm<Eigen::bfloat16, &Problem<Eigen::bfloat16>::fused>);
      add("lowrank-base", tokens, r, "bf16", t, bm<Eigen::bfloat16, &Problem<Eigen::bfloat16>::lowrank_base>);
    }
  return 0;
}
const int registered = register_all();

}  // namespace

LOWRANK_BENCHMARK_MAIN()
