// FRUGAL's block optimizer (include/lowrank/optim/block.hpp).
#include "lowrank/optim/block.hpp"

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <utility>
#include <vector>

#include "common-inl.hpp"
#include "lowrank/core/error.hpp"

LOWRANK_BEGIN_NAMESPACE

namespace optim {

using detail::fail;
using internal::decayed_update;
using internal::sign_of;

namespace {

// k = round(density L) with ties to even (Python's round, FRUGAL's).
Index active_count_for(double density, Index count) {
  return static_cast<Index>(std::nearbyint(density * static_cast<double>(count)));
}

// Validates shapes and config; returns k.
Index check_config(const char* fn, const std::vector<BlockShape>& shapes, const BlockConfig& c) {
  if (shapes.empty()) fail(fn, "the group has no blocks");
  for (std::size_t i = 0; i < shapes.size(); ++i)
    if (shapes[i].rows <= 0 || shapes[i].cols <= 0)
      fail(fn, "shapes[{}] is {}x{}; every block must be non-empty", i, shapes[i].rows, shapes[i].cols);
  if (!(c.density >= 0 && c.density <= 1)) fail(fn, "density is {}; it must be in [0, 1]", c.density);
  if (c.update_gap < 1) fail(fn, "update_gap is {}; it must be >= 1", c.update_gap);
  if (!(c.active_lr_scale >= 0) || !std::isfinite(c.active_lr_scale))
    fail(fn, "active_lr_scale is {}; it must be finite and >= 0", c.active_lr_scale);
  if (!(c.inactive_lr_scale >= 0) || !std::isfinite(c.inactive_lr_scale))
    fail(fn, "inactive_lr_scale is {}; it must be finite and >= 0", c.inactive_lr_scale);
  if (c.inactive == ResidualRule::fira)
    fail(fn, "inactive is ResidualRule::fira; the block optimizer takes none, sign_sgd or sgd");
  check_adam_config(fn, c.adam);
  const auto count = static_cast<Index>(shapes.size());
  const Index k = active_count_for(c.density, count);
  if (c.order == BlockOrder::mirror && k % 2 != 0)
    fail(fn, "the mirror order activates pairs but round({} x {} blocks) = {} is odd", c.density, count, k);
  return k;
}

// The scalars of one step: Adam's for the active blocks, the state-free rule's for the others.
struct Coefficients {
  internal::AdamCoefficients adam;
  float lr_f = 0;
  ResidualRule rule = ResidualRule::none;
};

// Rows [i0, i1) of an inactive block: the state-free rule.
void inactive_rows(MatrixView<float> W, MatrixView<const float> G, Index i0, Index i1, const Coefficients& k) {
  const Index n = W.cols;
  const bool sign = k.rule == ResidualRule::sign_sgd;
  const float lr = k.rule == ResidualRule::none ? 0.0f : k.lr_f;
  const float decay = k.adam.decay;
  const bool before = k.adam.before;
  for (Index i = i0; i < i1; ++i) {
    if (W.col_stride == 1 && G.col_stride == 1) {
      float* w = &W(i, 0);
      const float* g = &G(i, 0);
      if (sign) {
        for (Index j = 0; j < n; ++j) w[j] = decayed_update(w[j], lr * sign_of(g[j]), decay, before);
      } else {
        for (Index j = 0; j < n; ++j) w[j] = decayed_update(w[j], lr * g[j], decay, before);
      }
    } else {
      for (Index j = 0; j < n; ++j) {
        const float g = G(i, j);
        W(i, j) = decayed_update(W(i, j), lr * (sign ? sign_of(g) : g), decay, before);
      }
    }
  }
}

}  // namespace

BlockConfig frugal_block_config(double density, BlockOrder order) {
  BlockConfig c;
  c.density = density;
  c.order = order;
  c.update_gap = 200;
  c.inactive = ResidualRule::sign_sgd;
  if (!(density >= 0 && density <= 1))
    fail("lowrank::optim::frugal_block_config", "density is {}; it must be in [0, 1]", density);
  return c;
}

BlockOptimizer::BlockOptimizer(std::vector<BlockShape> shapes, const BlockConfig& config)
    : shapes_(std::move(shapes)), config_(config) {
  active_count_ = check_config("lowrank::optim::BlockOptimizer", shapes_, config_);
  states_.resize(shapes_.size());
  const auto count = static_cast<Index>(shapes_.size());
  start_ = config_.order == BlockOrder::descending ? count - 1 : 0;
}

std::vector<Index> BlockOptimizer::next_window(const BlockConfig& config, Index count, Index k, std::int64_t n,
                                               Index& start) {
  std::vector<Index> window;
  window.reserve(static_cast<std::size_t>(k));
  switch (config.order) {
    case BlockOrder::random:
      return internal::random_subset(config.seed, static_cast<std::uint64_t>(n), count, k);
    case BlockOrder::ascending:
      for (Index j = 0; j < k; ++j) window.push_back((start + j) % count);
      start += k;
      if (start >= count) start -= count;
      break;
    case BlockOrder::descending:
      for (Index j = 0; j < k; ++j) window.push_back(((start - j) % count + count) % count);
      start -= k;
      if (start < 0) start += count;
      break;
    case BlockOrder::mirror: {
      const Index half = count / 2;
      for (Index j = 0; j < k / 2; ++j) {
        const Index idx = (start + j) % half;  // k / 2 > 0 implies half > 0 (k <= count)
        window.push_back(idx);
        window.push_back(count - 1 - idx);
      }
      start += k / 2;
      if (start >= half) start -= half;
      break;
    }
  }
  return window;
}

bool BlockOptimizer::is_active(Index block) const {
  if (block < 0 || block >= blocks())
    fail("lowrank::optim::BlockOptimizer::is_active", "block is {}; the group has {} blocks", block, blocks());
  return states_[static_cast<std::size_t>(block)].m.size() != 0;  // blocks are never empty
}

const AdamState& BlockOptimizer::state(Index block) const {
  if (block < 0 || block >= blocks())
    fail("lowrank::optim::BlockOptimizer::state", "block is {}; the group has {} blocks", block, blocks());
  return states_[static_cast<std::size_t>(block)];
}

std::size_t BlockOptimizer::state_bytes() const noexcept {
  std::size_t bytes = 0;
  for (const auto& s : states_) bytes += s.bytes();
  return bytes;
}

std::size_t BlockOptimizer::state_bytes_for(const std::vector<BlockShape>& shapes, const BlockConfig& config) {
  const Index k = check_config("lowrank::optim::BlockOptimizer::state_bytes_for", shapes, config);
  const auto count = static_cast<Index>(shapes.size());
  const auto bytes_of = [&](Index i) {
    const auto& s = shapes[static_cast<std::size_t>(i)];
    return adam_state_bytes(s.rows, s.cols);
  };
  if (config.order == BlockOrder::random) {
    std::vector<std::size_t> sizes;
    for (Index i = 0; i < count; ++i) sizes.push_back(bytes_of(i));
    std::sort(sizes.begin(), sizes.end(), std::greater<>());
    std::size_t total = 0;
    for (Index i = 0; i < k; ++i) total += sizes[static_cast<std::size_t>(i)];
    return total;
  }
  // The cyclic orders revisit their first start within `count` switches.
  Index start = config.order == BlockOrder::descending ? count - 1 : 0;
  std::size_t most = 0;
  for (Index n = 0; n < count; ++n) {
    std::size_t total = 0;
    for (Index i : next_window(config, count, k, n, start)) total += bytes_of(i);
    most = std::max(most, total);
  }
  return most;
}

BlockStepReport BlockOptimizer::step(std::span<const MatrixView<float>> W, std::span<const MatrixView<const float>> G,
                                     double lr) {
  constexpr const char* fn = "lowrank::optim::BlockOptimizer::step";
  const auto count = static_cast<Index>(shapes_.size());
  if (static_cast<Index>(W.size()) != count || static_cast<Index>(G.size()) != count)
    fail(fn, "W has {} and G has {} views but the group has {} blocks", W.size(), G.size(), count);
  if (!(lr >= 0) || !std::isfinite(lr)) fail(fn, "lr is {}; it must be finite and >= 0", lr);
  for (Index b = 0; b < count; ++b) {
    const auto i = static_cast<std::size_t>(b);
    const BlockShape s = shapes_[i];
    if (W[i].rows != s.rows || W[i].cols != s.cols || G[i].rows != s.rows || G[i].cols != s.cols)
      fail(fn, "block {}: W is {}x{} and G is {}x{} but the block is {}x{}", b, W[i].rows, W[i].cols, G[i].rows,
           G[i].cols, s.rows, s.cols);
    if (W[i].data == nullptr || G[i].data == nullptr || W[i].row_stride <= 0 || W[i].col_stride <= 0 ||
        G[i].row_stride <= 0 || G[i].col_stride <= 0)
      fail(fn, "block {} ({}x{}): W or G has a null pointer or strides that are not positive", b, s.rows, s.cols);
  }
  // Every scalar the kernels use must fit in fp32 (a finite lr times a finite scale can overflow):
  // checked here, before anything changes. The Adam step size is at most lr_a / (1 - beta1).
  const double lr_a = lr * config_.active_lr_scale;
  const double lr_f = lr_a * config_.inactive_lr_scale;
  const double decay = lr * config_.adam.weight_decay;
  const double step_bound = config_.adam.bias_correction ? lr_a / (1 - config_.adam.beta1) : lr_a;
  constexpr double kFloatMax = std::numeric_limits<float>::max();
  if (!(lr_a <= kFloatMax && lr_f <= kFloatMax && decay <= kFloatMax && step_bound <= kFloatMax))
    fail(fn, "lr is {}: with active_lr_scale {}, inactive_lr_scale {} and weight_decay {} the step sizes ({}, {}, "
         "decay {}) do not fit in fp32", lr, config_.active_lr_scale, config_.inactive_lr_scale,
         config_.adam.weight_decay, step_bound, lr_f, decay);
  BlockStepReport report;
  for (Index b = 0; b < count; ++b) {
    const auto i = static_cast<std::size_t>(b);
    const auto bad = internal::first_nonfinite(G[i]);
    if (bad.first >= 0) {
      if (config_.non_finite == NonFinitePolicy::skip) return report;
      fail(fn, "block {}: G ({}x{}) has a non-finite value {} at ({}, {})", b, G[i].rows, G[i].cols,
           G[i](bad.first, bad.second), bad.first, bad.second);
    }
  }

  // 1. Switch: the next window with fresh state. New moments are allocated before anything changes,
  //    so a failed allocation leaves the optimizer as it was.
  if (steps_ % config_.update_gap == 0) {
    Index start = start_;
    std::vector<Index> window = next_window(config_, count, active_count_, switches_, start);
    std::vector<AdamState> fresh(shapes_.size());
    for (Index b : window) {
      const auto i = static_cast<std::size_t>(b);
      if (states_[i].m.size() == 0) fresh[i] = AdamState(shapes_[i].rows, shapes_[i].cols);
    }
    std::vector<char> now(shapes_.size(), 0);
    for (Index b : window) now[static_cast<std::size_t>(b)] = 1;
    for (std::size_t i = 0; i < shapes_.size(); ++i) {
      if (!now[i]) {
        states_[i] = AdamState{};  // frees the moments (FRUGAL's state.clear())
      } else if (fresh[i].m.size() != 0) {
        states_[i] = std::move(fresh[i]);
      } else {
        states_[i].zero(true);
      }
    }
    active_list_ = std::move(window);
    start_ = start;
    ++switches_;
    report.switched = true;
  }

  // 2-3. Decay and the update, block by block.
  Coefficients k;
  k.adam.b1 = static_cast<float>(config_.adam.beta1);
  k.adam.c1 = static_cast<float>(1 - config_.adam.beta1);
  k.adam.b2 = static_cast<float>(config_.adam.beta2);
  k.adam.c2 = static_cast<float>(1 - config_.adam.beta2);
  k.adam.decay = static_cast<float>(decay);
  k.adam.before = config_.adam.decay == DecayPlacement::before_update;
  k.lr_f = static_cast<float>(lr_f);
  k.rule = config_.inactive;
  for (Index b = 0; b < count; ++b) {
    const auto i = static_cast<std::size_t>(b);
    const MatrixView<float> Wb = W[i];
    const MatrixView<const float> Gb = G[i];
    AdamState& st = states_[i];
    if (st.m.size() != 0) {  // active
      const AdamScalars s = adam_scalars(config_.adam, st.step + 1, lr_a);
      ++st.step;
      internal::AdamCoefficients ka = k.adam;
      ka.eps = static_cast<float>(s.eps);
      ka.step = static_cast<float>(s.step_size);
      float* m = st.m.data();
      float* v = st.v.data();
      internal::for_row_slices(Wb.rows, Wb.cols,
                               [&](Index i0, Index i1) { internal::adam_rows(Wb, Gb, m, v, i0, i1, ka); });
    } else if (k.rule != ResidualRule::none || k.adam.decay != 0.0f) {  // FRUGAL's 'no' rule: nothing to do
      internal::for_row_slices(Wb.rows, Wb.cols, [&](Index i0, Index i1) { inactive_rows(Wb, Gb, i0, i1, k); });
    }
  }
  ++steps_;
  report.taken = true;
  return report;
}

}  // namespace optim

LOWRANK_END_NAMESPACE
