#include "eigen_baseline.hpp"

namespace LOWRANK_BASELINE_NS {

void eigen_rank_update(Eigen::MatrixXf& w, const Eigen::MatrixXf& u, const Eigen::MatrixXf& v, float alpha) {
  w.noalias() += (alpha * u) * v.transpose();
}

void eigen_rank1_vectors(Eigen::MatrixXf& w, const Eigen::VectorXf& u, const Eigen::VectorXf& v, float alpha) {
  w.noalias() += (alpha * u) * v.transpose();
}

void eigen_rank_update(Eigen::Matrix<Eigen::bfloat16, Eigen::Dynamic, Eigen::Dynamic>& w, const Eigen::MatrixXf& u,
                       const Eigen::MatrixXf& v, float alpha) {
  w = (w.cast<float>() + (alpha * u) * v.transpose()).cast<Eigen::bfloat16>();
}

double fma_peak_kernel(long iterations) {
  // 12 independent accumulators of the machine's widest vector hide the FMA latency on current
  // x86 cores (GCC vector extensions, so that -march tuning cannot narrow them).
#if defined(__AVX512F__)
  constexpr int kBytes = 64;
#elif defined(__AVX__)
  constexpr int kBytes = 32;
#else
  constexpr int kBytes = 16;
#endif
  typedef float vec __attribute__((vector_size(kBytes)));
  constexpr int kLanes = kBytes / 4, kChains = 12;
  vec acc[kChains];
  for (int i = 0; i < kChains; ++i) acc[i] = vec{} + static_cast<float>(i);
  const vec a = vec{} + 0.999f, b = vec{} + 1e-3f;
  for (long it = 0; it < iterations; ++it) {
#pragma GCC unroll 12
    for (int i = 0; i < kChains; ++i) acc[i] = acc[i] * a + b;
  }
  float sum = 0;
  for (int i = 0; i < kChains; ++i) sum += acc[i][0];
  asm volatile("" : : "r"(sum));
  return 2.0 * kLanes * kChains * static_cast<double>(iterations);
}

}  // namespace LOWRANK_BASELINE_NS
