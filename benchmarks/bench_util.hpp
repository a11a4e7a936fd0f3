// Helpers shared by lowrank's benchmark programs: thread settings for every library in the run,
// wall-clock timing of one call, and interleaved timing of several implementations.
#pragma once

#include <benchmark/benchmark.h>

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstdlib>
#include <functional>
#include <random>
#include <span>
#include <vector>

#include <Eigen/Core>

#include "lowrank/core/threading.hpp"

#if defined(LOWRANK_BENCH_OPENBLAS)
extern "C" void openblas_set_num_threads(int);
#endif

namespace lowrank_bench {

/// The same thread count for lowrank, Eigen and (when linked) OpenBLAS.
inline void set_threads(int threads) {
  lowrank::set_num_threads(threads);
  Eigen::setNbThreads(threads);
#if defined(LOWRANK_BENCH_OPENBLAS)
  openblas_set_num_threads(threads);
#endif
}

/// Makes every library's worker threads sleep as soon as a call returns, by running the program
/// again with `OMP_WAIT_POLICY=passive` and `OPENBLAS_THREAD_TIMEOUT=4` (values the user set are
/// kept; both are read when the libraries load, hence the second run). Otherwise the threads a
/// call leaves spinning (OpenBLAS's for about 2^28 cycles, OpenMP's for a while) take one of a
/// small machine's cores from the next implementation timed: on 2 cores the ratios against
/// OpenBLAS swung between 0.5 and 1.6 from one run to the next (Zen 3 VM, 2026-11-28), and the
/// random order of `interleaved_medians` does not shed it when most calls follow a disturbing one.
/// `LOWRANK_BENCH_QUIET_POOLS` marks the second run (set it to run once, pools as they are); with
/// both variables already set there is nothing to change and no second run.
inline void quiet_thread_pools(char** argv) {
  if (std::getenv("LOWRANK_BENCH_QUIET_POOLS") != nullptr) return;
  if (std::getenv("OMP_WAIT_POLICY") != nullptr && std::getenv("OPENBLAS_THREAD_TIMEOUT") != nullptr) return;
  setenv("LOWRANK_BENCH_QUIET_POOLS", "1", 1);
  setenv("OMP_WAIT_POLICY", "passive", 0);
  setenv("OPENBLAS_THREAD_TIMEOUT", "4", 0);
  execv("/proc/self/exe", argv);  // returns only on failure: run on, with the pools as they are
}

/// Wall-clock seconds of one call.
inline double seconds(const std::function<void()>& f) {
  const auto t0 = std::chrono::steady_clock::now();
  f();
  benchmark::ClobberMemory();
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

inline double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const std::size_t n = v.size();
  return n % 2 == 1 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

/// Runs every implementation once per benchmark iteration, in a fresh random order each time, and
/// returns the median time of each. A rotation would keep each implementation's predecessor: the
/// worker threads a library leaves spinning after a call (OpenBLAS's) then always slow the same
/// next one (measured: 1.2x on the fused LoRA forward at 256 tokens on 2 threads, Zen 1 VM,
/// 2026-11-27); in a random order every implementation follows every other equally often. With
/// more threads than a few disturbed calls, only quiet pools help (`quiet_thread_pools`, which the
/// benchmark programs call first). One untimed warm-up call each first.
inline std::vector<double> interleaved_medians(benchmark::State& state, std::span<const std::function<void()>> impls) {
  std::vector<std::vector<double>> times(impls.size());
  for (const auto& f : impls) f();
  std::mt19937 rng(12345);
  std::vector<std::size_t> order(impls.size());
  for (std::size_t i = 0; i < order.size(); ++i) order[i] = i;
  for (auto _ : state) {
    std::shuffle(order.begin(), order.end(), rng);
    for (std::size_t i : order) times[i].push_back(seconds(impls[i]));
  }
  std::vector<double> medians;
  for (auto& t : times) medians.push_back(median(t));
  return medians;
}

}  // namespace lowrank_bench

/// BENCHMARK_MAIN with quiet thread pools (lowrank_bench::quiet_thread_pools).
#define LOWRANK_BENCHMARK_MAIN()                   \
  int main(int argc, char** argv) {                \
    lowrank_bench::quiet_thread_pools(argv);       \
    benchmark::Initialize(&argc, argv);            \
    benchmark::RunSpecifiedBenchmarks();           \
    benchmark::Shutdown();                         \
    return 0;                                      \
  }
