// truncated_svd/<impl>/<n>x<n>_r<k>_f32_t<threads>: the rank-k truncated SVD of an n x n fp32
// matrix with a decaying spectrum, lowrank's randomized SVD against Eigen's BDCSVD (what a user of
// Eigen would call), on the same matrix in one run.
//   impl lowrank : lowrank::linalg::truncated_svd(M, k), default options (q = k + 10, 2 power
//                  iterations, randomized since q < n / 2)
//   impl eigen   : Eigen::BDCSVD<MatrixXf>(M, ComputeThinU | ComputeThinV), truncated to k (one
//                  iteration at 4096^2, where it takes minutes)
// The matrix: M = U_r diag(s) V_r^T + E with U_r, V_r (n x r, r = 512) the thin Q of the QR of
// Gaussian matrices, s_i = 1/(i+1) (harmonic decay), and E Gaussian noise of standard deviation
// s_{r-1} / (2 sqrt(n)), whose singular values fill [0, s_{r-1}] (a full-rank noise floor, so that
// BDCSVD meets a generic matrix, not an exactly low-rank one).
// Counters of the lowrank benchmark (the eigen benchmark of the same shape runs first and leaves
// its time and singular values):
//   speedup      BDCSVD time / randomized SVD time (mean per iteration)    acceptance: >= 20
//   speedup_cpu  the same with the thread's CPU time (cpu_s), steadier on a loaded machine
//   energy_ratio captured energy / the exact top-k captured energy (from BDCSVD's S)   >= 0.99
//   captured     captured energy of the randomized SVD, exact_top_k that of the exact SVD
#include <benchmark/benchmark.h>

#include <chrono>
#include <cmath>
#include <ctime>
#include <map>
#include <memory>
#include <string>

#include <Eigen/Core>
#include <Eigen/QR>
#include <Eigen/SVD>

#include "lowrank/core/philox.hpp"
#include "lowrank/linalg/svd.hpp"

#include "bench_util.hpp"

namespace {

using Index = Eigen::Index;
using MatF = Eigen::MatrixXf;

constexpr Index kSignalRank = 512;

MatF gaussian(Index rows, Index cols, std::uint64_t seed) {
  const lowrank::RandomStream rng(seed, 99);
  MatF g(rows, cols);
  for (Index j = 0; j < cols; ++j)
    for (Index i = 0; i < rows; ++i) g(i, j) = rng.normal(static_cast<std::uint64_t>(j * rows + i));
  return g;
}

// CPU time of the calling thread: on a machine shared with other jobs the wall-clock time of a
// single-threaded computation includes the time it waited for a core, the CPU time does not.
double thread_seconds() {
  timespec ts{};
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) + 1e-9 * static_cast<double>(ts.tv_nsec);
}

struct Problem {
  MatF m;
  double norm2 = 0;
  // Filled by the eigen benchmark.
  double exact_seconds = 0, exact_cpu_seconds = 0;
  Eigen::VectorXf exact_s;
};

Problem& problem(Index n) {
  static std::map<Index, std::unique_ptr<Problem>> cache;
  auto& p = cache[n];
  if (!p) {
    p = std::make_unique<Problem>();
    const Index r = std::min(kSignalRank, n);
    const auto basis = [&](std::uint64_t seed) -> MatF {
      const Eigen::HouseholderQR<MatF> qr(gaussian(n, r, seed));
      return qr.householderQ() * MatF::Identity(n, r);
    };
    Eigen::VectorXf s(r);
    for (Index i = 0; i < r; ++i) s(i) = 1.0f / static_cast<float>(i + 1);
    const float noise = s(r - 1) / (2.0f * std::sqrt(static_cast<float>(n)));
    p->m = noise * gaussian(n, n, 3);
    p->m.noalias() += basis(1) * s.asDiagonal() * basis(2).transpose();
    p->norm2 = p->m.cast<double>().squaredNorm();
  }
  return *p;
}

std::string shape(Index n, Index k, int threads) {
  return std::to_string(n) + "x" + std::to_string(n) + "_r" + std::to_string(k) + "_f32_t" + std::to_string(threads);
}

void bm_eigen(benchmark::State& state, Index n, Index k, int threads) {
  Eigen::setNbThreads(threads);
  Problem& p = problem(n);
  double best = 1e300, best_cpu = 1e300;
  for (auto _ : state) {
    const auto t0 = std::chrono::steady_clock::now();
    const double c0 = thread_seconds();
    const Eigen::BDCSVD<MatF> svd(p.m, Eigen::ComputeThinU | Eigen::ComputeThinV);
    MatF u = svd.matrixU().leftCols(k), v = svd.matrixV().leftCols(k);
    benchmark::DoNotOptimize(u.data());
    benchmark::DoNotOptimize(v.data());
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    best_cpu = std::min(best_cpu, thread_seconds() - c0);
    p.exact_s = svd.singularValues();
  }
  p.exact_seconds = best;
  p.exact_cpu_seconds = best_cpu;
  state.counters["cpu_s"] = best_cpu;
  state.counters["exact_top_k"] = p.exact_s.head(k).cast<double>().squaredNorm() / p.norm2;
}

void bm_lowrank(benchmark::State& state, Index n, Index k, int threads) {
  Eigen::setNbThreads(threads);
  Problem& p = problem(n);
  double total = 0, total_cpu = 0, captured = 0;
  std::int64_t count = 0;
  for (auto _ : state) {
    const auto t0 = std::chrono::steady_clock::now();
    const double c0 = thread_seconds();
    const auto r = lowrank::linalg::truncated_svd(p.m, k);
    total_cpu += thread_seconds() - c0;
    total += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    ++count;
    captured = r.captured_energy;
    benchmark::DoNotOptimize(r.U.data());
  }
  state.counters["captured"] = captured;
  state.counters["cpu_s"] = total_cpu / static_cast<double>(count);
  if (p.exact_s.size() > 0) {
    const double exact = p.exact_s.head(k).cast<double>().squaredNorm() / p.norm2;
    state.counters["exact_top_k"] = exact;
    state.counters["energy_ratio"] = captured / exact;
    state.counters["speedup"] = p.exact_seconds / (total / static_cast<double>(count));
    state.counters["speedup_cpu"] = p.exact_cpu_seconds / (total_cpu / static_cast<double>(count));
  }
}

int register_all() {
  const int threads = 1;  // the project VM has 2 cores shared with builds: one thread is steadier
  for (Index n : {1024, 4096}) {
    const Index k = 128;
    // The eigen benchmark runs first and leaves the exact singular values for the ratios.
    auto* e = benchmark::RegisterBenchmark(("truncated_svd/eigen/" + shape(n, k, threads)).c_str(),
                                           [=](benchmark::State& s) { bm_eigen(s, n, k, threads); });
    e->Unit(benchmark::kMillisecond)->UseRealTime();
    if (n >= 4096) e->Iterations(1);
    auto* l = benchmark::RegisterBenchmark(("truncated_svd/lowrank/" + shape(n, k, threads)).c_str(),
                                           [=](benchmark::State& s) { bm_lowrank(s, n, k, threads); });
    l->Unit(benchmark::kMillisecond)->UseRealTime();
  }
  return 0;
}
const int registered = register_all();

}  // namespace

LOWRANK_BENCHMARK_MAIN()
