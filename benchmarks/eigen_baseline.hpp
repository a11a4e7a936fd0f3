// No include guard: included once per LOWRANK_BASELINE_NS.
#include <Eigen/Core>

// The Eigen code a user would write instead of lowrank::rank_update, compiled twice
// (benchmarks/CMakeLists.txt): LOWRANK_BASELINE_NS = portable, with the compiler's default flags
// as lowrank's consumers build (x86-64: SSE2), and native, with -march=native (the machine's full
// vector width).
#ifndef LOWRANK_BASELINE_NS
#error "define LOWRANK_BASELINE_NS"
#endif
#if defined(LOWRANK_BASELINE_EXPORT)
#define LOWRANK_BASELINE_API __attribute__((visibility("default")))
#else
#define LOWRANK_BASELINE_API
#endif
namespace LOWRANK_BASELINE_NS {
LOWRANK_BASELINE_API void eigen_rank_update(Eigen::MatrixXf& w, const Eigen::MatrixXf& u, const Eigen::MatrixXf& v, float alpha);
// Rank 1 written with vectors, the idiomatic Eigen outer product (a different code path in Eigen:
// column by column, where the matrix form above runs its GEMM).
LOWRANK_BASELINE_API void eigen_rank1_vectors(Eigen::MatrixXf& w, const Eigen::VectorXf& u, const Eigen::VectorXf& v,
                                              float alpha);
// bf16 weights: widen, update in fp32, round back.
LOWRANK_BASELINE_API void eigen_rank_update(Eigen::Matrix<Eigen::bfloat16, Eigen::Dynamic, Eigen::Dynamic>& w, const Eigen::MatrixXf& u,
                       const Eigen::MatrixXf& v, float alpha);

// FLOPs of a chain of independent fused multiply-adds on `threads` threads (2 flops each), for
// the core's FMA peak: returns the number of flops done.
LOWRANK_BASELINE_API double fma_peak_kernel(long iterations);
}  // namespace LOWRANK_BASELINE_NS
#undef LOWRANK_BASELINE_API
