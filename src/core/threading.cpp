#include "lowrank/core/threading.hpp"

#include <atomic>

#include <Eigen/Core>

#if defined(LOWRANK_HAVE_OPENMP)
#include <omp.h>
#endif

LOWRANK_BEGIN_NAMESPACE
namespace {
std::atomic<int> g_threads{0};
}

void set_num_threads(int threads) {
  g_threads.store(threads > 0 ? threads : 0, std::memory_order_relaxed);
#if defined(LOWRANK_HAVE_OPENMP)
  // The Eigen products inside lowrank's compiled code (SVDs, small solves, the optimizers'
  // r x r products) use OpenMP too: cap them with the same count, or idle OpenMP threads spin
  // against the caller's (measured: 10x slower Online Subspace Descent steps on a busy 2-core VM).
  Eigen::setNbThreads(threads > 0 ? threads : 0);
#endif
}

int num_threads() noexcept {
#if defined(LOWRANK_HAVE_OPENMP)
  const int requested = g_threads.load(std::memory_order_relaxed);
  return requested > 0 ? requested : omp_get_max_threads();
#else
  return 1;
#endif
}

bool has_openmp() noexcept {
#if defined(LOWRANK_HAVE_OPENMP)
  return true;
#else
  return false;
#endif
}

LOWRANK_END_NAMESPACE
