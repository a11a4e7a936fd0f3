// Adam moments and the full-rank AdamW step (include/lowrank/optim/adam.hpp).
#include "lowrank/optim/adam.hpp"

#include <cmath>
#include <limits>

#include "common-inl.hpp"
#include "lowrank/core/error.hpp"

LOWRANK_BEGIN_NAMESPACE

namespace optim {

using detail::fail;

void check_adam_config(const char* fn, const AdamConfig& c) {
  if (!(c.beta1 >= 0 && c.beta1 < 1)) fail(fn, "adam.beta1 is {}; it must be in [0, 1)", c.beta1);
  if (!(c.beta2 >= 0 && c.beta2 < 1)) fail(fn, "adam.beta2 is {}; it must be in [0, 1)", c.beta2);
  if (!(c.eps >= 0) || !std::isfinite(c.eps)) fail(fn, "adam.eps is {}; it must be finite and >= 0", c.eps);
  if (!(c.weight_decay >= 0) || !std::isfinite(c.weight_decay))
    fail(fn, "adam.weight_decay is {}; it must be finite and >= 0", c.weight_decay);
}

AdamScalars adam_scalars(const AdamConfig& config, std::int64_t t, double lr) {
  constexpr const char* fn = "lowrank::optim::adam_scalars";
  check_adam_config(fn, config);
  if (t < 1) fail(fn, "t is {}; the step number after the increment must be >= 1", t);
  if (!(lr >= 0) || !std::isfinite(lr)) fail(fn, "lr is {}; it must be finite and >= 0", lr);
  double bc1 = 1, bc2 = 1;
  if (config.bias_correction) {
    bc1 = 1 - std::pow(config.beta1, static_cast<double>(t));
    bc2 = 1 - std::pow(config.beta2, static_cast<double>(t));
  }
  AdamScalars s;
  // beta1 = 0 or beta2 = 0 give bc = 1; bc1 > 0 always since beta1 < 1.
  s.step_size = lr * std::sqrt(bc2) / bc1;
  s.eps = config.eps_convention == EpsConvention::torch ? config.eps * std::sqrt(bc2) : config.eps;
  return s;
}

void adam_moments(const float* g, Index ldg, float* m, float* v, float* n, Index rows, Index cols, double beta1,
                  double beta2, double eps) noexcept {
  const float b1 = static_cast<float>(beta1), c1 = static_cast<float>(1 - beta1);
  const float b2 = static_cast<float>(beta2), c2 = static_cast<float>(1 - beta2);
  const float e = static_cast<float>(eps);
  for (Index i = 0; i < rows; ++i) {
    const float* gi = g + i * ldg;
    float* mi = m + i * cols;
    float* vi = v + i * cols;
    float* ni = n + i * cols;
    for (Index j = 0; j < cols; ++j) {
      const float gj = gi[j];
      const float mj = b1 * mi[j] + c1 * gj;
      const float vj = b2 * vi[j] + c2 * (gj * gj);
      mi[j] = mj;
      vi[j] = vj;
      ni[j] = mj / (std::sqrt(vj) + e);
    }
  }
}

bool adam_step(MatrixView<float> W, MatrixView<const float> G, AdamState& state, const AdamConfig& config, double lr,
               NonFinitePolicy policy) {
  constexpr const char* fn = "lowrank::optim::adam_step";
  if (W.rows != G.rows || W.cols != G.cols)
    fail(fn, "W is {}x{} but G is {}x{}", W.rows, W.cols, G.rows, G.cols);
  if (W.empty()) fail(fn, "W is {}x{} (empty)", W.rows, W.cols);
  if (W.data == nullptr || G.data == nullptr) fail(fn, "W or G ({}x{}) has a null pointer", W.rows, W.cols);
  const bool fresh = state.m.size() == 0 && state.v.size() == 0;
  if (!fresh && (state.m.rows() != W.rows || state.m.cols() != W.cols || state.v.rows() != W.rows ||
                 state.v.cols() != W.cols))
    fail(fn, "the state is {}x{} (m) and {}x{} (v) but W is {}x{}", state.m.rows(), state.m.cols(), state.v.rows(),
         state.v.cols(), W.rows, W.cols);
  const AdamScalars s = adam_scalars(config, state.step + 1, lr);  // validates config and lr
  if (!(s.step_size <= static_cast<double>(std::numeric_limits<float>::max()) &&
        lr * config.weight_decay <= static_cast<double>(std::numeric_limits<float>::max())))
    fail(fn, "lr is {}: the step size {} or the decay {} does not fit in fp32 (W is {}x{})", lr, s.step_size,
         lr * config.weight_decay, W.rows, W.cols);
  const auto bad = internal::first_nonfinite(G);
  if (bad.first >= 0) {
    if (policy == NonFinitePolicy::skip) return false;
    fail(fn, "G ({}x{}) has a non-finite value {} at ({}, {})", G.rows, G.cols, G(bad.first, bad.second), bad.first,
         bad.second);
  }
  if (fresh) state = AdamState(W.rows, W.cols);
  ++state.step;
  internal::AdamCoefficients k;
  k.b1 = static_cast<float>(config.beta1), k.c1 = static_cast<float>(1 - config.beta1);
  k.b2 = static_cast<float>(config.beta2), k.c2 = static_cast<float>(1 - config.beta2);
  k.eps = static_cast<float>(s.eps), k.step = static_cast<float>(s.step_size);
  k.decay = static_cast<float>(lr * config.weight_decay);
  k.before = config.decay == DecayPlacement::before_update;
  float* m = state.m.data();
  float* v = state.v.data();
  internal::for_row_slices(W.rows, W.cols, [&](Index i0, Index i1) { internal::adam_rows(W, G, m, v, i0, i1, k); });
  return true;
}

}  // namespace optim

LOWRANK_END_NAMESPACE
