// Benchmarks of EGGROLL (issue 7), ratios against baselines of the same run:
//
//   es/forward/ratios/d<d>_N<N>_r<r>_t<threads>: the population forward (one input row per member,
//       fp32 square layer, noise regenerated inside the call) against the plain batched X W^T of
//       the same batch: OpenBLAS sgemm, Eigen built -march=native, and lowrank's own
//       linear_forward. `throughput/best_blas` = t(faster of OpenBLAS and Eigen) /
//       t(population forward), the fraction of plain inference throughput against the issue's
//       baseline (target >= 0.8); `throughput/lowrank_linear` the same against lowrank's own plain
//       forward (stricter where it is the fastest).
//   es/update/ratios/d<d>_N<N>_r<r>_t<threads>: the update contraction (noise regenerated, members
//       of a pair collapsed, one rank-update GEMM per chunk) against the equivalent GEMM
//       G += U V^T with U (d x N r / 2), V (d x N r / 2) already in memory: OpenBLAS sgemm and
//       Eigen native. `flop_rate/best_gemm` = t(best GEMM) / t(update), the fraction of the GEMM's
//       FLOP rate (same flop count; target >= 0.8).
//   es/noise/...: normals per second of the factor generator (for the record).
//
// Every implementation of a ratios row runs once per iteration in a random order (bench_util.hpp).
#include <benchmark/benchmark.h>

#include <cmath>
#include <cstdint>
#include <functional>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include <Eigen/Core>

#include "bench_util.hpp"
#define LOWRANK_BASELINE_NS native
#include "eigen_baseline.hpp"
#undef LOWRANK_BASELINE_NS
#include "lora_forward_baseline.hpp"
#include "lowrank/es/eggroll.hpp"
#include "lowrank/kernels/lora_forward.hpp"

#if defined(LOWRANK_BENCH_OPENBLAS)
#include <cblas.h>
#endif

namespace {

using lowrank::Index;
using lowrank_bench::set_threads;
namespace es = lowrank::es;
using RowMatrixXf = lora_forward_baseline::RowMatrixXf;

RowMatrixXf random_matrix(Index rows, Index cols, unsigned seed, float scale) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> d(0.0f, scale);
  RowMatrixXf m(rows, cols);
  for (Index i = 0; i < m.size(); ++i) m.data()[i] = d(gen);
  return m;
}

es::Perturbation perturbation(std::int64_t n, int r) {
  es::Perturbation p;
  p.key = es::NoiseKey{2026, 0, 0};
  p.rank = r;
  p.sigma = 0.01;
  p.population = n;
  p.antithetic = es::Antithetic::interleaved;
  return p;
}

void bm_forward(benchmark::State& state, Index d, std::int64_t n, int r, int threads) {
  set_threads(threads);
  const RowMatrixXf X = random_matrix(n, d, 1, 1.0f), W = random_matrix(d, d, 2, 1.0f / 32);
  RowMatrixXf Y(n, d), Yb(n, d), Ye(n, d);
  std::vector<std::int64_t> members(static_cast<std::size_t>(n));
  std::iota(members.begin(), members.end(), std::int64_t{0});
  const es::Perturbation p = perturbation(n, r);
  const auto Xv = lowrank::row_major<const float>(X.data(), n, d);
  const lowrank::WeightView<const float> Wv{lowrank::row_major<const float>(W.data(), d, d), lowrank::Layout::out_in};
  const int ni = static_cast<int>(n), di = static_cast<int>(d);
  (void)ni, (void)di;
  const std::function<void()> impls[] = {
      [&] { es::population_forward(Xv, Wv, p, members, lowrank::row_major(Y.data(), n, d)); },
#if defined(LOWRANK_BENCH_OPENBLAS)
      [&] {
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, ni, di, di, 1.0f, X.data(), di, W.data(), di, 0.0f,
                    Yb.data(), di);
      },
#else
      [] {},
#endif
      [&] { lora_forward_baseline::eigen_base(X, W, Ye); },
      [&] { lowrank::linear_forward(Xv, Wv, lowrank::row_major(Yb.data(), n, d)); },
  };
  const std::vector<double> t = lowrank_bench::interleaved_medians(state, impls);
  double best = t[2];
#if defined(LOWRANK_BENCH_OPENBLAS)
  best = std::min(best, t[1]);
  state.counters["throughput/openblas"] = t[1] / t[0];
#endif
  state.counters["throughput/eigen_native"] = t[2] / t[0];
  state.counters["throughput/lowrank_linear"] = t[3] / t[0];
  state.counters["throughput/best_blas"] = best / t[0];
  state.counters["forward_ms"] = t[0] * 1e3;
}

void bm_update(benchmark::State& state, Index d, std::int64_t n, int r, int threads) {
  set_threads(threads);
  const es::Perturbation p = perturbation(n, r);
  std::vector<double> f(static_cast<std::size_t>(n));
  for (std::int64_t i = 0; i < n; ++i) f[static_cast<std::size_t>(i)] = std::sin(0.1 * static_cast<double>(i));
  RowMatrixXf G = RowMatrixXf::Zero(d, d);
  const Index k = static_cast<Index>(es::noise_count(n, p.antithetic)) * r;
  // The equivalent GEMM's operands, column-major (d x k), as the contraction builds them.
  const Eigen::MatrixXf U = Eigen::MatrixXf::Random(d, k), V = Eigen::MatrixXf::Random(d, k);
  Eigen::MatrixXf Ge = Eigen::MatrixXf::Zero(d, d);
  const int di = static_cast<int>(d), ki = static_cast<int>(k);
  (void)di, (void)ki;
  const std::function<void()> impls[] = {
      [&] { es::aggregate_update(p, f, 1e-3, lowrank::row_major(G.data(), d, d)); },
#if defined(LOWRANK_BENCH_OPENBLAS)
      [&] {
        cblas_sgemm(CblasColMajor, CblasNoTrans, CblasTrans, di, di, ki, 1e-3f, U.data(), di, V.data(), di, 1.0f,
                    Ge.data(), di);
      },
#else
      [] {},
#endif
      [&] { native::eigen_rank_update(Ge, U, V, 1e-3f); },
  };
  const std::vector<double> t = lowrank_bench::interleaved_medians(state, impls);
  double best = t[2];
#if defined(LOWRANK_BENCH_OPENBLAS)
  best = std::min(best, t[1]);
  state.counters["flop_rate/openblas"] = t[1] / t[0];
#endif
  state.counters["flop_rate/eigen_native"] = t[2] / t[0];
  state.counters["flop_rate/best_gemm"] = best / t[0];
  state.counters["update_ms"] = t[0] * 1e3;
  state.counters["GFLOPs"] = 2.0 * d * d * k / t[0] * 1e-9;
}

void bm_noise(benchmark::State& state) {
  set_threads(1);
  const Index d = 4096;
  std::vector<float> a(d), b(d);
  std::uint32_t index = 0;
  for (auto _ : state) {
    es::eggroll_factors(es::NoiseKey{1, 2, 3}, index++, d, d, 1, a.data(), b.data());
    benchmark::DoNotOptimize(a.data());
  }
  state.counters["normals_per_s"] = benchmark::Counter(static_cast<double>(2 * d) * state.iterations(),
                                                       benchmark::Counter::kIsRate);
}

void register_all() {
  for (int t : {1, 2}) {
    for (int r : {1, 4}) {
      const std::string tag = "d1024_N512_r" + std::to_string(r) + "_t" + std::to_string(t);
      benchmark::RegisterBenchmark(("es/forward/ratios/" + tag).c_str(),
                                   [r, t](benchmark::State& s) { bm_forward(s, 1024, 512, r, t); })
          ->Iterations(41)
          ->Unit(benchmark::kMillisecond);
      benchmark::RegisterBenchmark(("es/update/ratios/" + tag).c_str(),
                                   [r, t](benchmark::State& s) { bm_update(s, 1024, 512, r, t); })
          ->Iterations(21)
          ->Unit(benchmark::kMillisecond);
    }
  }
  benchmark::RegisterBenchmark("es/noise/factors_d4096_r1_t1", bm_noise)->Unit(benchmark::kMicrosecond);
}

}  // namespace

int main(int argc, char** argv) {
  lowrank_bench::quiet_thread_pools(argv);
  register_all();
  benchmark::Initialize(&argc, argv);
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
