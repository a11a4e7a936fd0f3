// No include guard: included once per LOWRANK_BASELINE_NS.
#include <Eigen/Core>

// The Eigen code a user would write instead of lowrank::rank_update, compiled twice
// (benchmarks/CMakeLists.txt): LOWRANK_BASELINE_NS = portable, with the compiler's default flags
// as lowrank's consumers build (x86-64: SSE2), and native, with -march=native (the machine's full
// vector width).
#ifndef LOWRANK_BASELINE_NS
#error "define LOWRANK_BASELINE_NS"
#endif
namespace LOWRANK_BASELINE_NS {
void eigen_rank_update(Eigen::MatrixXf& w, const Eigen::MatrixXf& u, const Eigen::MatrixXf& v, float alpha);
// bf16 weights: widen, update in fp32, round back.
void eigen_rank_update(Eigen::Matrix<Eigen::bfloat16, Eigen::Dynamic, Eigen::Dynamic>& w, const Eigen::MatrixXf& u,
                       const Eigen::MatrixXf& v, float alpha);

// FLOPs of a chain of independent fused multiply-adds on `threads` threads (2 flops each), for
// the core's FMA peak: returns the number of flops done.
double fma_peak_kernel(long iterations);
}  // namespace LOWRANK_BASELINE_NS
