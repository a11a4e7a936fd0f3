#include "lora_forward_baseline.hpp"

namespace lora_forward_baseline {

void eigen_base(const RowMatrixXf& x, const RowMatrixXf& w, RowMatrixXf& y) { y.noalias() = x * w.transpose(); }

void eigen_unfused(const RowMatrixXf& x, const RowMatrixXf& w, const RowMatrixXf& a, const RowMatrixXf& b, float s,
                   RowMatrixXf& t, RowMatrixXf& y) {
  y.noalias() = x * w.transpose();
  t.noalias() = x * a.transpose();
  y.noalias() += (s * t) * b.transpose();
}

}  // namespace lora_forward_baseline
