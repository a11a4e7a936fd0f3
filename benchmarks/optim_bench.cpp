// Benchmarks of the low-rank-state optimizers (issue 6), ratios against baselines of the same run:
//
//   optim/galore_step/ratios/<m>x<n>_r<r>_t<threads>: one GaLore step (project, Adam in the
//       subspace, back-projection into W) against its two projection GEMMs alone, R = G Q and
//       W += c N Q^T, done by OpenBLAS sgemm (when found), by Eigen, and by lowrank's own
//       projector (project + add_back, the step minus Adam and bookkeeping).
//   optim/frugal_step/ratios/...: FRUGAL steps (sign-SGD residual) against the GaLore step on the
//       same shape: at GaLore's rank (SVD basis), at FRUGAL's default density 0.25 (SVD basis) and
//       with the column (coordinate) projector at density 0.25; and FRUGAL's block optimizer (its
//       pre-training variant) over four tensors of the shape at density 0.25 (one active, Adam; three
//       on sign-SGD), a quarter of its group step per tensor.
//   optim/refresh/<m>x<n>_r<r>: the subspace refresh with the randomized SVD (r + 10 columns, two
//       power iterations) against an exact SVD, LAPACK sgesdd from OpenBLAS (what torch.linalg.svd
//       calls on CPU), with the captured energy of both bases.
//
// Every implementation of a ratios row runs once per iteration in a random order; the counters
// are ratios of medians.
#include <benchmark/benchmark.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <random>
#include <vector>

#include <Eigen/Core>

#include "bench_util.hpp"
#include "lowrank/core/matrix.hpp"
#include "lowrank/linalg/svd.hpp"
#include "lowrank/optim/block.hpp"
#include "lowrank/optim/subspace.hpp"

#if defined(LOWRANK_BENCH_OPENBLAS)
#include <cblas.h>
extern "C" void sgesdd_(const char* jobz, const int* m, const int* n, float* a, const int* lda, float* s, float* u,
                        const int* ldu, float* vt, const int* ldvt, float* work, const int* lwork, int* iwork,
                        int* info);
#endif

namespace {

using lowrank::ColMatrix;
using lowrank::Index;
using lowrank::MatrixView;
using lowrank::RowMatrix;
using lowrank_bench::set_threads;
namespace optim = lowrank::optim;

// A gradient with a decaying spectrum: sum_i s_i x_i y_i^T over 512 random directions with
// s_i = 1 / (1 + i / 16), plus Gaussian noise at 1e-3 of the entries' scale.
RowMatrix<float> gradient(Index m, Index n, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal;
  const Index k = 512;
  RowMatrix<float> X(m, k), Y(n, k);
  for (Index i = 0; i < m; ++i)
    for (Index j = 0; j < k; ++j) X(i, j) = normal(rng) / std::sqrt(static_cast<float>(m));
  for (Index i = 0; i < n; ++i)
    for (Index j = 0; j < k; ++j) Y(i, j) = normal(rng) / std::sqrt(static_cast<float>(n));
  for (Index j = 0; j < k; ++j) X.col(j) *= 1.0f / (1.0f + static_cast<float>(j) / 16.0f);
  RowMatrix<float> G = X * Y.transpose();
  const float noise = 1e-3f / std::sqrt(static_cast<float>(std::min(m, n)));
  for (Index i = 0; i < m; ++i)
    for (Index j = 0; j < n; ++j) G(i, j) += noise * normal(rng);
  return G;
}

MatrixView<float> mv(RowMatrix<float>& M) { return {M.data(), M.rows(), M.cols(), M.cols(), 1}; }
MatrixView<const float> cmv(const RowMatrix<float>& M) { return {M.data(), M.rows(), M.cols(), M.cols(), 1}; }

// An orthonormal basis n x r (random; the step's cost does not depend on which).
ColMatrix<float> basis(Index n, Index r, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal;
  ColMatrix<float> Q(n, r);
  for (Index j = 0; j < r; ++j)
    for (Index i = 0; i < n; ++i) Q(i, j) = normal(rng);
  lowrank::linalg::detail::orthonormalize_columns(Q);
  return Q;
}

// ---- GaLore step against its two GEMMs ---------------------------------------------------------------

void bm_galore_step(benchmark::State& state, Index m, Index n, Index r, int threads) {
  set_threads(threads);
  const RowMatrix<float> G = gradient(m, n, 1) * 1e-2f;
  RowMatrix<float> W = gradient(m, n, 2);
  optim::SubspaceConfig c = optim::galore_config(r);
  c.update_gap = std::int64_t{1} << 40;  // no refresh inside the timed steps
  optim::SubspaceOptimizer opt(m, n, c);
  const ColMatrix<float> Q = basis(opt.projector().side_length(), r, 3);
  opt.projector().set_basis(Q);
  opt.step(mv(W), cmv(G), 1e-6);  // allocates the state and workspace
  RowMatrix<float> R(m, r), N = RowMatrix<float>::Random(m, r) * 1e-3f;
  RowMatrix<float> Rl;
  const int mi = static_cast<int>(m), ni = static_cast<int>(n), ri = static_cast<int>(r);
  (void)mi, (void)ni, (void)ri;
  double sign = 1;
  const std::function<void()> impls[] = {
      [&] { opt.step(mv(W), cmv(G), 1e-6); },
#if defined(LOWRANK_BENCH_OPENBLAS)
      [&] {
        // R (m x r) = G (m x n, row-major) Q (n x r, column-major); W (row-major) += c N Q^T.
        // Q column-major n x r is Q^T row-major r x n with ld n.
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, mi, ri, ni, 1.0f, G.data(), ni, Q.data(), ni, 0.0f,
                    R.data(), ri);
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, mi, ni, ri, static_cast<float>(-1e-6 * sign), N.data(),
                    ri, Q.data(), ni, 1.0f, W.data(), ni);
        sign = -sign;
      },
#else
      [] {},
#endif
      [&] {
        R.noalias() = G * Q;
        W.noalias() += (static_cast<float>(-1e-6 * sign) * N) * Q.transpose();
        sign = -sign;
      },
      [&] {
        opt.projector().project(cmv(G), Rl);
        opt.projector().add_back(mv(W), N, -1e-6 * sign);
        sign = -sign;
      },
  };
  const std::vector<double> t = lowrank_bench::interleaved_medians(state, impls);
#if defined(LOWRANK_BENCH_OPENBLAS)
  state.counters["step/openblas_gemms"] = t[0] / t[1];
#endif
  state.counters["step/eigen_gemms"] = t[0] / t[2];
  state.counters["step/lowrank_projections"] = t[0] / t[3];
  state.counters["step_ms"] = t[0] * 1e3;
}

// ---- FRUGAL step against the GaLore step ----------------------------------------------------------

void bm_frugal_step(benchmark::State& state, Index m, Index n, Index r, int threads) {
  set_threads(threads);
  const RowMatrix<float> G = gradient(m, n, 4) * 1e-2f;
  RowMatrix<float> W = gradient(m, n, 5);
  const auto make = [&](optim::SubspaceConfig c) {
    c.update_gap = std::int64_t{1} << 40;
    optim::SubspaceOptimizer opt(m, n, c);
    if (c.basis.method == optim::BasisMethod::coordinates) {
      std::vector<Index> idx;
      for (Index k = 0; k < c.rank; ++k) idx.push_back(k * (opt.projector().side_length() / c.rank));
      opt.projector().set_coordinates(idx);
    } else {
      opt.projector().set_basis(basis(opt.projector().side_length(), c.rank, 6));
    }
    opt.step(mv(W), cmv(G), 1e-6);
    return opt;
  };
  optim::SubspaceConfig same = optim::frugal_config(m, n, 0.25);
  same.rank = r;
  optim::SubspaceOptimizer galore = make(optim::galore_config(r));
  optim::SubspaceOptimizer frugal_r = make(same);
  optim::SubspaceOptimizer frugal_d = make(optim::frugal_config(m, n, 0.25));
  optim::SubspaceOptimizer frugal_c = make(optim::frugal_config(m, n, 0.25, optim::BasisMethod::coordinates));
  // Block optimizer: four tensors of their own (W and G), one active.
  constexpr int kBlocks = 4;
  std::vector<RowMatrix<float>> Wb, Gb;
  std::vector<MatrixView<float>> wb;
  std::vector<MatrixView<const float>> gb;
  for (int b = 0; b < kBlocks; ++b) {
    Wb.push_back(W);
    Gb.push_back(gradient(m, n, 7 + static_cast<std::uint64_t>(b)) * 1e-2f);
  }
  for (int b = 0; b < kBlocks; ++b) wb.push_back(mv(Wb[static_cast<std::size_t>(b)])), gb.push_back(cmv(Gb[static_cast<std::size_t>(b)]));
  optim::BlockConfig bc = optim::frugal_block_config(0.25);
  bc.update_gap = std::int64_t{1} << 40;
  optim::BlockOptimizer blocks(std::vector<optim::BlockShape>(kBlocks, optim::BlockShape{m, n}), bc);
  blocks.step(wb, gb, 1e-6);
  const std::function<void()> impls[] = {
      [&] { galore.step(mv(W), cmv(G), 1e-6); },
      [&] { frugal_r.step(mv(W), cmv(G), 1e-6); },
      [&] { frugal_d.step(mv(W), cmv(G), 1e-6); },
      [&] { frugal_c.step(mv(W), cmv(G), 1e-6); },
      [&] { blocks.step(wb, gb, 1e-6); },
  };
  const std::vector<double> t = lowrank_bench::interleaved_medians(state, impls);
  state.counters["frugal_same_rank/galore"] = t[1] / t[0];
  state.counters["frugal_rho0.25/galore"] = t[2] / t[0];
  state.counters["frugal_columns0.25/galore"] = t[3] / t[0];
  state.counters["frugal_blocks0.25/galore"] = t[4] / kBlocks / t[0];
  state.counters["galore_ms"] = t[0] * 1e3;
}

// ---- refresh: randomized against exact SVD ------------------------------------------------------

void bm_refresh(benchmark::State& state, Index m, Index n, Index r, int threads) {
  set_threads(threads);
  const RowMatrix<float> G = gradient(m, n, 7);
  const double total = G.cast<double>().squaredNorm();
  double t_rand = 0, t_exact = 0, e_rand = 0, e_exact = 0;
  for (auto _ : state) {
    optim::Projector p(m, n, r, optim::Side::right);
    optim::BasisOptions o;
    o.method = optim::BasisMethod::randomized_svd;
    t_rand = lowrank_bench::seconds([&] { e_rand = p.refresh(cmv(G), o, 0); });
#if defined(LOWRANK_BENCH_OPENBLAS)
    // Exact: sgesdd with singular vectors (torch.linalg.svd's driver), on a column-major copy.
    ColMatrix<float> A = G;
    const int mi = static_cast<int>(m), ni = static_cast<int>(n), k = static_cast<int>(std::min(m, n));
    std::vector<float> s(static_cast<std::size_t>(k)), u(static_cast<std::size_t>(m) * k), vt(static_cast<std::size_t>(k) * n);
    std::vector<int> iwork(8 * static_cast<std::size_t>(k));
    int info = 0, lwork = -1;
    float query = 0;
    sgesdd_("S", &mi, &ni, A.data(), &mi, s.data(), u.data(), &mi, vt.data(), &k, &query, &lwork, iwork.data(), &info);
    lwork = static_cast<int>(query);
    std::vector<float> work(static_cast<std::size_t>(lwork));
    t_exact = lowrank_bench::seconds([&] {
      sgesdd_("S", &mi, &ni, A.data(), &mi, s.data(), u.data(), &mi, vt.data(), &k, work.data(), &lwork,
              iwork.data(), &info);
    });
    double top = 0;
    for (Index i = 0; i < r; ++i) top += static_cast<double>(s[static_cast<std::size_t>(i)]) * s[static_cast<std::size_t>(i)];
    e_exact = top / total;
#endif
  }
  state.counters["randomized_s"] = t_rand;
  state.counters["energy_randomized"] = e_rand;
#if defined(LOWRANK_BENCH_OPENBLAS)
  state.counters["exact_sgesdd_s"] = t_exact;
  state.counters["sgesdd/randomized"] = t_exact / t_rand;
  state.counters["energy_exact"] = e_exact;
  state.counters["energy_rel_gap"] = (e_exact - e_rand) / e_exact;
#endif
}

void register_all() {
  for (int t : {1, 2}) {
    benchmark::RegisterBenchmark(("optim/galore_step/ratios/4096x4096_r128_t" + std::to_string(t)).c_str(),
                                 [t](benchmark::State& s) { bm_galore_step(s, 4096, 4096, 128, t); })
        ->Iterations(15)
        ->Unit(benchmark::kMillisecond);
    benchmark::RegisterBenchmark(("optim/frugal_step/ratios/4096x4096_r128_t" + std::to_string(t)).c_str(),
                                 [t](benchmark::State& s) { bm_frugal_step(s, 4096, 4096, 128, t); })
        ->Iterations(9)
        ->Unit(benchmark::kMillisecond);
  }
  benchmark::RegisterBenchmark("optim/refresh/4096x4096_r128_t2",
                               [](benchmark::State& s) { bm_refresh(s, 4096, 4096, 128, 2); })
      ->Iterations(1)
      ->Unit(benchmark::kSecond);
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
