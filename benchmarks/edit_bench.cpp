// Model-editing benchmarks (issue 5), each a ratio against a baseline timed in the same run:
//
//   edit/second_moment/ratios/<n>x<d>_f32_t<threads>: SecondMoment::add of n fp32 keys of size d
//       (fp64 accumulation) against OpenBLAS cblas_dsyrk on the same keys already in fp64 (its
//       conversion is not timed), cblas_ssyrk (fp32 accumulation) and Eigen's
//       selfadjointView<Lower>().rankUpdate in fp64. Counters: FLOP rate ratios with SYRK's
//       n d (d + 1) flops for everyone.
//   edit/rome/ratios/<d>x<d>_f32: a ROME edit with a cached factor (solve, u, v, applied to an fp32
//       weight; W k given, as the model's forward provides it) against rank_update alone.
//   edit/memit/ratios/<n>x<d>: MEMIT for n requests through the cached factor and Woodbury
//       against the reference code's approach, a dense fp64 LU solve of lambda C + K K^T
//       (LAPACK dgesv from OpenBLAS when found, K K^T with dsyrk), and the same with Eigen
//       (GEMM and PartialPivLU), with the residuals ||dW (lambda C + K K^T) - R K^T|| / ||R K^T||.
//
// Every implementation runs once per iteration in a random order; the counters are ratios of the
// medians.
#include <benchmark/benchmark.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include <Eigen/Core>
#include <Eigen/LU>

#include "bench_util.hpp"
#include "lowrank/core/matrix.hpp"
#include "lowrank/core/threading.hpp"
#include "lowrank/edit/factored.hpp"
#include "lowrank/edit/memit.hpp"
#include "lowrank/edit/rome.hpp"
#include "lowrank/kernels/rank_update.hpp"
#include "lowrank/linalg/moments.hpp"
#include "lowrank/linalg/spd.hpp"

#if defined(LOWRANK_BENCH_OPENBLAS)
#include <cblas.h>
extern "C" void dgesv_(const int* n, const int* nrhs, double* a, const int* lda, int* ipiv, double* b, const int* ldb,
                       int* info);
#endif

namespace {

using lowrank_bench::set_threads;
using lowrank::ColMatrix;
using lowrank::Index;
using lowrank::RowMatrix;
using lowrank::Vector;

// A synthetic SPD second moment: diagonal plus a low-rank term (cheap to build at d = 4096).
ColMatrix<double> synthetic_moment(Index d, std::mt19937_64& rng) {
  std::normal_distribution<double> normal;
  ColMatrix<double> G(d, 64);
  for (Index j = 0; j < 64; ++j)
    for (Index i = 0; i < d; ++i) G(i, j) = normal(rng);
  ColMatrix<double> C = G * G.transpose() / 64.0;
  for (Index i = 0; i < d; ++i) C(i, i) += 0.5 + std::exp(-static_cast<double>(i) / 500.0);
  return C;
}

// ---- second moment ---------------------------------------------------------------------------------

void bm_second_moment(benchmark::State& state, Index n, Index d, int threads) {
  set_threads(threads);
  std::mt19937_64 rng(1);
  std::normal_distribution<float> normal;
  RowMatrix<float> keys(n, d);
  for (Index t = 0; t < n; ++t)
    for (Index i = 0; i < d; ++i) keys(t, i) = normal(rng);
  const RowMatrix<double> keys64 = keys.cast<double>();
  const ColMatrix<float> keys32c = keys;  // column-major copies for the baselines' K^T
  lowrank::linalg::SecondMoment acc(d);
  ColMatrix<double> c64 = ColMatrix<double>::Zero(d, d);
  ColMatrix<float> c32 = ColMatrix<float>::Zero(d, d);
  ColMatrix<double> eig = ColMatrix<double>::Zero(d, d);
  const int di = static_cast<int>(d), ni = static_cast<int>(n);
  const std::function<void()> impls[] = {
      [&] { acc.add(keys); },
#if defined(LOWRANK_BENCH_OPENBLAS)
      // C (d x d, column-major, lower) += K^T K with K n x d row-major = A^T with A d x n col-major.
      [&] { cblas_dsyrk(CblasColMajor, CblasLower, CblasNoTrans, di, ni, 1.0, keys64.data(), di, 1.0, c64.data(), di); },
      [&] { cblas_ssyrk(CblasColMajor, CblasLower, CblasNoTrans, di, ni, 1.0f, keys.data(), di, 1.0f, c32.data(), di); },
#else
      [] {},
      [] {},
#endif
      [&] { eig.selfadjointView<Eigen::Lower>().rankUpdate(keys64.transpose()); },
  };
  (void)keys32c;
  (void)di;
  (void)ni;
  const std::vector<double> m = lowrank_bench::interleaved_medians(state, impls);
  const double flops = static_cast<double>(n) * static_cast<double>(d) * static_cast<double>(d + 1);
  state.counters["lowrank_GFLOPs"] = flops / m[0] * 1e-9;
#if defined(LOWRANK_BENCH_OPENBLAS)
  state.counters["rate/dsyrk"] = m[1] / m[0];
  state.counters["rate/ssyrk"] = m[2] / m[0];
#endif
  state.counters["rate/eigen_rankUpdate"] = m[3] / m[0];
}

// ---- ROME --------------------------------------------------------------------------------------------

void bm_rome(benchmark::State& state, Index d) {
  set_threads(1);
  std::mt19937_64 rng(2);
  const lowrank::linalg::SpdFactor factor(synthetic_moment(d, rng));
  std::normal_distribution<double> normal;
  RowMatrix<float> w(d, d);
  for (Index i = 0; i < d; ++i)
    for (Index j = 0; j < d; ++j) w(i, j) = static_cast<float>(normal(rng)) * 0.01f;
  Vector<double> k(d), v_star(d), wk(d);
  for (Index i = 0; i < d; ++i) k(i) = normal(rng), v_star(i) = normal(rng), wk(i) = normal(rng);
  ColMatrix<float> u = ColMatrix<float>::Random(d, 1) * 1e-6f, v = ColMatrix<float>::Random(d, 1) * 1e-6f;
  const lowrank::WeightView<float> W{lowrank::view(w), lowrank::Layout::out_in};
  double sign = 1;
  const std::function<void()> impls[] = {
      [&] {
        lowrank::edit::FactoredEdit e = lowrank::edit::rome(k, k, v_star, wk, factor);
        e.V *= 1e-6;  // keep W bounded over the iterations
        lowrank::edit::apply(W, e, sign);
        sign = -sign;
      },
      [&] { lowrank::rank_update(w, v, u, 1.0); },
  };
  const std::vector<double> m = lowrank_bench::interleaved_medians(state, impls);
  state.counters["rome/rank1"] = m[0] / m[1];
  state.counters["rome_ms"] = m[0] * 1e3;
  state.counters["rank1_ms"] = m[1] * 1e3;
}

// ---- MEMIT -------------------------------------------------------------------------------------------

void bm_memit(benchmark::State& state, Index n, Index d, int threads) {
  set_threads(threads);
  std::mt19937_64 rng(3);
  const ColMatrix<double> C = synthetic_moment(d, rng);
  const lowrank::linalg::SpdFactor factor(C);
  std::normal_distribution<double> normal;
  ColMatrix<double> K(d, n), R(d, n);
  for (Index j = 0; j < n; ++j)
    for (Index i = 0; i < d; ++i) K(i, j) = normal(rng), R(i, j) = normal(rng);
  const double lambda = 15000.0 / static_cast<double>(d);  // GPT-J's weight relative to an O(1) moment
  ColMatrix<double> ours_u, ref_u;
  auto reference = [&] {
    ColMatrix<double> M = lambda * C;
#if defined(LOWRANK_BENCH_OPENBLAS)
    const int di = static_cast<int>(d), ni = static_cast<int>(n);
    cblas_dsyrk(CblasColMajor, CblasLower, CblasNoTrans, di, ni, 1.0, K.data(), di, 1.0, M.data(), di);
    M.triangularView<Eigen::StrictlyUpper>() = M.transpose();
    ref_u = K;
    std::vector<int> ipiv(static_cast<std::size_t>(d));
    int info = 0;
    dgesv_(&di, &ni, M.data(), &di, ipiv.data(), ref_u.data(), &di, &info);
#else
    M.noalias() += K * K.transpose();
    ref_u = M.partialPivLu().solve(K);  // no OpenBLAS: the reference is Eigen's LU too
#endif
  };
  ColMatrix<double> eigen_u;
  auto eigen_reference = [&] {  // the same approach with Eigen, what a C++ user has at hand
    ColMatrix<double> M = lambda * C;
    M.noalias() += K * K.transpose();
    eigen_u = M.partialPivLu().solve(K);
  };
  const std::function<void()> impls[] = {
      [&] { ours_u = lowrank::edit::memit(K, R, factor, lambda).U; },
      reference,
      eigen_reference,
  };
  const std::vector<double> m = lowrank_bench::interleaved_medians(state, impls);
  // Residuals of the normal equations dW (lambda C + K K^T) = R K^T, with dW = R U^T.
  const ColMatrix<double> M = lambda * C + K * K.transpose();
  const ColMatrix<double> RKt = R * K.transpose();
  auto residual = [&](const ColMatrix<double>& U) { return ((R * U.transpose()) * M - RKt).norm() / RKt.norm(); };
  state.counters["reference/lowrank"] = m[1] / m[0];
  state.counters["eigen_lu/lowrank"] = m[2] / m[0];
  state.counters["lowrank_s"] = m[0];
  state.counters["reference_s"] = m[1];
  state.counters["residual_lowrank"] = residual(ours_u);
  state.counters["residual_reference"] = residual(ref_u);
  state.counters["residual_eigen"] = residual(eigen_u);
}

int register_all() {
  const int max_threads = lowrank::num_threads();
  std::vector<int> thread_counts{1};
  if (max_threads > 1) thread_counts.push_back(max_threads);
  for (int t : thread_counts) {
    benchmark::RegisterBenchmark(("edit/second_moment/ratios/1024x4096_f32_t" + std::to_string(t)).c_str(),
                                 [t](benchmark::State& s) { bm_second_moment(s, 1024, 4096, t); })
        ->Iterations(5)
        ->Unit(benchmark::kMillisecond)
        ->UseRealTime();
  }
  benchmark::RegisterBenchmark("edit/rome/ratios/4096x4096_f32_t1", [](benchmark::State& s) { bm_rome(s, 4096); })
      ->Iterations(31)
      ->Unit(benchmark::kMillisecond)
      ->UseRealTime();
  benchmark::RegisterBenchmark(("edit/memit/ratios/1000x4096_t" + std::to_string(max_threads)).c_str(),
                               [max_threads](benchmark::State& s) { bm_memit(s, 1000, 4096, max_threads); })
      ->Iterations(3)
      ->Unit(benchmark::kMillisecond)
      ->UseRealTime();
  return 0;
}
const int registered = register_all();

}  // namespace

LOWRANK_BENCHMARK_MAIN()
