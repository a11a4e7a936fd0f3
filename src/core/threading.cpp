#include "lowrank/core/threading.hpp"

#include <atomic>

#if defined(LOWRANK_HAVE_OPENMP)
#include <omp.h>
#endif

LOWRANK_BEGIN_NAMESPACE
namespace {
std::atomic<int> g_threads{0};
}

void set_num_threads(int threads) { g_threads.store(threads > 0 ? threads : 0, std::memory_order_relaxed); }

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
