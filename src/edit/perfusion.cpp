// Perfusion's key-locked gated rank-1 edit (include/lowrank/edit/perfusion.hpp). Compiled once into
// the library: the QR and the Cholesky solves stay out of users' translation units.
#include "../core/widen.hpp"
#include "lowrank/edit/perfusion.hpp"

#include <cmath>
#include <cstddef>
#include <utility>

#include <Eigen/QR>

#include "lowrank/core/error.hpp"
#include "lowrank/edit/rome.hpp"

LOWRANK_BEGIN_NAMESPACE

namespace edit {
namespace {

using detail::fail;

constexpr const char* kPrepare = "lowrank::edit::Perfusion";

using detail::widen;

// Both branches avoid exp overflow: the argument of exp is never positive.
double sigmoid(double z) {
  if (z >= 0) return 1.0 / (1.0 + std::exp(-z));
  const double e = std::exp(z);
  return e / (1.0 + e);
}

void check_gate(const char* fn, std::size_t c, double beta, double tau) {
  if (!std::isfinite(beta)) fail(fn, "concept {}: beta is {}; it must be finite", c, beta);
  if (!(tau > 0) || !std::isfinite(tau)) fail(fn, "concept {}: tau is {}; it must be finite and > 0", c, tau);
}

template <class TW>
void check_weight_view(const char* fn, WeightView<const TW> W) {
  if (W.matrix.empty()) return;
  if (W.matrix.data == nullptr) fail(fn, "W ({}x{}) has a null data pointer", W.matrix.rows, W.matrix.cols);
  if (W.matrix.row_stride <= 0 || W.matrix.col_stride <= 0)
    fail(fn, "W ({}x{}) has strides {}, {}; they must be positive", W.matrix.rows, W.matrix.cols,
         W.matrix.row_stride, W.matrix.col_stride);
}

// W M in fp64 (`out x k`) for `in x k` M, W widened from its storage.
template <class TW>
ColMatrix<double> weight_times_many(WeightView<const TW> W, const Eigen::Ref<const ColMatrix<double>>& M) {
  const MatrixView<const TW> w = W.as_out_in();
  ColMatrix<double> Y = ColMatrix<double>::Zero(w.rows, M.cols());
  for (Index k = 0; k < M.cols(); ++k)
    for (Index o = 0; o < w.rows; ++o) {
      double s = 0;
      for (Index i = 0; i < w.cols; ++i) s += widen(w(o, i)) * M(i, k);
      Y(o, k) = s;
    }
  return Y;
}

}  // namespace

template <SupportedScalar TW>
Vector<double> lock_key(WeightView<const TW> W, const Eigen::Ref<const Vector<double>>& i_super) {
  constexpr const char* fn = "lowrank::edit::lock_key";
  check_weight_view(fn, W);
  if (i_super.size() != W.in_features())
    fail(fn, "i_super has {} entries but W is out x in = {}x{}", i_super.size(), W.out_features(), W.in_features());
  if (!i_super.allFinite()) fail(fn, "i_super ({} entries) has a NaN or infinity", i_super.size());
  return weight_times(W, i_super);
}

template <SupportedScalar TW>
Perfusion::Perfusion(WeightView<const TW> W, const linalg::SpdFactor& C, std::span<const PerfusionConcept> concepts,
                     MultiConcept mode) {
  constexpr const char* fn = kPrepare;
  if (C.dim() == 0) fail(fn, "C is an empty factor (default-constructed)");
  const Index in = C.dim(), out = W.out_features();
  if (W.in_features() != in)
    fail(fn, "W is out x in = {}x{} but C is {}x{}: C must be in x in", out, W.in_features(), in, in);
  if (out == 0) fail(fn, "W is out x in = 0x{}: the output dimension must be >= 1", in);
  check_weight_view(fn, W);
  if (mode != MultiConcept::additive && mode != MultiConcept::exact)
    fail(fn, "mode is {}; it must be MultiConcept::additive or MultiConcept::exact", static_cast<int>(mode));

  const Index m = static_cast<Index>(concepts.size());
  ColMatrix<double> I(in, m), O(out, m);
  for (std::size_t c = 0; c < concepts.size(); ++c) {
    const PerfusionConcept& k = concepts[c];
    if (k.i_star.size() != in)
      fail(fn, "concepts[{}].i_star has {} entries but C is {}x{} (W is out x in = {}x{})", c, k.i_star.size(), in,
           in, out, in);
    if (k.o_star.size() != out)
      fail(fn, "concepts[{}].o_star has {} entries but W is out x in = {}x{}", c, k.o_star.size(), out, in);
    if (!k.i_star.allFinite()) fail(fn, "concepts[{}].i_star ({} entries) has a NaN or infinity", c, in);
    if (!k.o_star.allFinite()) fail(fn, "concepts[{}].o_star ({} entries) has a NaN or infinity", c, out);
    check_gate(fn, c, k.beta, k.tau);
    I.col(static_cast<Index>(c)) = k.i_star;
    O.col(static_cast<Index>(c)) = k.o_star;
  }

  // No concepts: the base projection. (Eigen's triangular solves and QR misbehave on empty
  // right-hand sides, so they are not called.)
  Vector<double> energy(0);
  ColMatrix<double> a(in, 0), basis(in, 0), dual(in, 0), projected(out, 0);
  if (m > 0) {
    // With A = L L^T: Z = L^-1 I*, energy_c = |z_c|^2 = i*_c^T A^-1 i*_c, A^-1 i*_c = L^-T z_c.
    const ColMatrix<double> Z = C.half_solve(I);
    energy = Z.colwise().squaredNorm().transpose();
    for (Index c = 0; c < m; ++c)
      if (!(energy(c) > 0) || !std::isfinite(energy(c)))
        fail(fn, "concepts[{}]: the energy i*^T C^-1 i* is {}; it must be positive and finite (is i_star zero?)",
             c, energy(c));
    a = C.half_solve_transposed(Z);
    for (Index c = 0; c < m; ++c) a.col(c) /= energy(c);
    const ColMatrix<double> b = weight_times_many(W, I);
    for (Index c = 0; c < m; ++c)
      if (!b.col(c).allFinite()) fail(fn, "concepts[{}]: W i* is not finite (W has a NaN or infinity?)", c);

    if (mode == MultiConcept::additive) {
      basis = I;
      dual = a;
      projected = b;
    } else {
      // C^-1-orthonormal basis of span{i*_c}: Q = orth(Z) (column-pivoted QR, numerical rank
      // r >= 1, as Z has a non-zero column), then u_k = L q_k, so that
      // u_j^T A^-1 u_k = q_j^T q_k = delta_jk, and A^-1 u_k = L^-T q_k.
      const Eigen::ColPivHouseholderQR<ColMatrix<double>> qr(Z);
      ColMatrix<double> Q = ColMatrix<double>::Identity(in, qr.rank());
      Q.applyOnTheLeft(qr.householderQ());
      const ColMatrix<double> L = C.matrix_l();
      basis = L.triangularView<Eigen::Lower>() * Q;
      dual = C.half_solve_transposed(Q);
      projected = weight_times_many(W, basis);
      if (!projected.allFinite()) fail(fn, "W u_k is not finite (W has a NaN or infinity?)");
    }
  }
  RowMatrix<float> lora_a = dual.transpose().cast<float>();
  RowMatrix<float> lora_b = (-projected).cast<float>();
  if (!lora_a.allFinite() || !lora_b.allFinite())
    fail(fn, "the low-rank term (rank {}, in {}, out {}) overflows fp32", basis.cols(), in, out);

  concepts_.assign(concepts.begin(), concepts.end());
  in_ = in;
  out_ = out;
  mode_ = mode;
  energy_ = std::move(energy);
  a_ = std::move(a);
  o_ = std::move(O);
  basis_ = std::move(basis);
  dual_ = std::move(dual);
  projected_ = std::move(projected);
  lora_a_ = std::move(lora_a);
  lora_b_ = std::move(lora_b);
}

template <SupportedScalar TW>
Perfusion Perfusion::merge(WeightView<const TW> W, const linalg::SpdFactor& C,
                           std::span<const Perfusion* const> modules, MultiConcept mode) {
  constexpr const char* fn = "lowrank::edit::Perfusion::merge";
  std::vector<PerfusionConcept> all;
  for (std::size_t j = 0; j < modules.size(); ++j) {
    const Perfusion* p = modules[j];
    if (p == nullptr) fail(fn, "modules[{}] is a null pointer", j);
    if (p->in_ != W.in_features() || p->out_ != W.out_features())
      fail(fn, "modules[{}] was prepared for out x in = {}x{} but W is out x in = {}x{}", j, p->out_, p->in_,
           W.out_features(), W.in_features());
    all.insert(all.end(), p->concepts_.begin(), p->concepts_.end());
  }
  return Perfusion(W, C, std::span<const PerfusionConcept>(all), mode);
}

void Perfusion::check_weight(const char* fn, Index out, Index in) const {
  if (out != out_ || in != in_)
    fail(fn, "W is out x in = {}x{} but the edit was prepared for out x in = {}x{}", out, in, out_, in_);
}

void Perfusion::set_gate(Index c, double beta, double tau) {
  constexpr const char* fn = "lowrank::edit::Perfusion::set_gate";
  if (c < 0 || c >= concepts()) fail(fn, "concept {} is out of range: there are {} concepts", c, concepts());
  check_gate(fn, static_cast<std::size_t>(c), beta, tau);
  concepts_[static_cast<std::size_t>(c)].beta = beta;
  concepts_[static_cast<std::size_t>(c)].tau = tau;
}

double Perfusion::beta(Index c) const {
  if (c < 0 || c >= concepts())
    fail("lowrank::edit::Perfusion::beta", "concept {} is out of range: there are {} concepts", c, concepts());
  return concepts_[static_cast<std::size_t>(c)].beta;
}

double Perfusion::tau(Index c) const {
  if (c < 0 || c >= concepts())
    fail("lowrank::edit::Perfusion::tau", "concept {} is out of range: there are {} concepts", c, concepts());
  return concepts_[static_cast<std::size_t>(c)].tau;
}

Vector<double> Perfusion::similarity(const Eigen::Ref<const Vector<double>>& e) const {
  if (e.size() != in_)
    fail("lowrank::edit::Perfusion::similarity", "e has {} entries but the edit has {} input features", e.size(),
         in_);
  return a_.transpose() * e;
}

template <SupportedScalar TW>
Vector<double> Perfusion::output(WeightView<const TW> W, const Eigen::Ref<const Vector<double>>& e) const {
  constexpr const char* fn = "lowrank::edit::Perfusion::output";
  check_weight(fn, W.out_features(), W.in_features());
  check_weight_view(fn, W);
  if (e.size() != in_) fail(fn, "e has {} entries but the edit has {} input features", e.size(), in_);
  Vector<double> y = weight_times_many(W, e);
  if (rank() > 0) y -= projected_ * (dual_.transpose() * e);
  const Vector<double> s = a_.transpose() * e;
  for (Index c = 0; c < concepts(); ++c) {
    const PerfusionConcept& k = concepts_[static_cast<std::size_t>(c)];
    y += sigmoid((s(c) - k.beta) / k.tau) * o_.col(c);
  }
  return y;
}

template <SupportedScalar TW>
void Perfusion::forward(MatrixView<const float> X, WeightView<const TW> W, MatrixView<float> Y,
                        const LoraForwardOptions& options) const {
  constexpr const char* fn = "lowrank::edit::Perfusion::forward";
  check_weight(fn, W.out_features(), W.in_features());
  if (X.cols != in_) fail(fn, "X is {}x{} but the edit has {} input features (X is tokens x in)", X.rows, X.cols, in_);
  if (Y.rows != X.rows || Y.cols != out_)
    fail(fn, "Y is {}x{} but must be tokens x out = {}x{}", Y.rows, Y.cols, X.rows, out_);
  // Validates everything else (strides, null pointers, overlaps) before writing Y.
  const LoraTerm term{MatrixView<const float>(view(lora_a_)), MatrixView<const float>(view(lora_b_)), 1.0};
  lora_forward(X, W, std::span<const LoraTerm>(&term, rank() > 0 ? 1 : 0), Y, options);
  const Index m = concepts();
  if (m == 0) return;
  Vector<double> inv_tau(m), beta(m), g(m);
  for (Index c = 0; c < m; ++c) {
    inv_tau(c) = 1.0 / concepts_[static_cast<std::size_t>(c)].tau;
    beta(c) = concepts_[static_cast<std::size_t>(c)].beta;
  }
  for (Index t = 0; t < X.rows; ++t) {
    for (Index c = 0; c < m; ++c) {
      double s = 0;
      for (Index i = 0; i < in_; ++i) s += static_cast<double>(X(t, i)) * a_(i, c);
      g(c) = sigmoid((s - beta(c)) * inv_tau(c));
    }
    for (Index o = 0; o < out_; ++o) {
      double add = 0;
      for (Index c = 0; c < m; ++c) add += g(c) * o_(o, c);
      Y(t, o) = static_cast<float>(static_cast<double>(Y(t, o)) + add);
    }
  }
}

#define LOWRANK_INSTANTIATE(TW)                                                                                   \
  template Vector<double> lock_key<TW>(WeightView<const TW>, const Eigen::Ref<const Vector<double>>&);          \
  template Perfusion::Perfusion(WeightView<const TW>, const linalg::SpdFactor&, std::span<const PerfusionConcept>, \
                                MultiConcept);                                                                    \
  template Perfusion Perfusion::merge<TW>(WeightView<const TW>, const linalg::SpdFactor&,                         \
                                          std::span<const Perfusion* const>, MultiConcept);                       \
  template Vector<double> Perfusion::output<TW>(WeightView<const TW>, const Eigen::Ref<const Vector<double>>&)    \
      const;                                                                                                      \
  template void Perfusion::forward<TW>(MatrixView<const float>, WeightView<const TW>, MatrixView<float>,          \
                                       const LoraForwardOptions&) const;
LOWRANK_INSTANTIATE(double)
LOWRANK_INSTANTIATE(float)
LOWRANK_INSTANTIATE(bf16)
LOWRANK_INSTANTIATE(f16)
#undef LOWRANK_INSTANTIATE

}  // namespace edit

LOWRANK_END_NAMESPACE
