#pragma once
// The Eigen code a user would write instead of lowrank::lora_forward, built with -march=native
// (benchmarks/CMakeLists.txt). Row-major, as torch stores X (tokens x in), W (out x in, nn.Linear),
// A (r x in), B (out x r) and Y (tokens x out).
#include <Eigen/Core>

namespace lora_forward_baseline {
using RowMatrixXf = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
// Y = X W^T (Eigen's GEMV for one token, GEMM otherwise).
void eigen_base(const RowMatrixXf& x, const RowMatrixXf& w, RowMatrixXf& y);
// Y = X W^T + s (X A^T) B^T as separate products (t is a tokens x r scratch).
void eigen_unfused(const RowMatrixXf& x, const RowMatrixXf& w, const RowMatrixXf& a, const RowMatrixXf& b, float s,
                   RowMatrixXf& t, RowMatrixXf& y);
}  // namespace lora_forward_baseline
