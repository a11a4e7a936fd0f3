/// \file
/// MoRA: one square trainable matrix `M` (`r_hat x r_hat`) between a non-parameterised
/// compression `f_comp` (`in -> r_hat`) and decompression `f_decomp` (`r_hat -> out`):
/// `h = W_0 x + f_decomp(M f_comp(x))`. The operators of the official code's `mora_type`s 1, 2, 3,
/// 4 and 6 (`kongds/MoRA`, `peft-mora/src/peft/tuners/lora/layer.py::_apply_mora`), in operator
/// form and as the equivalent dense `out x in` delta. Conventions:
/// `../shared/reference/adapters.md` section 5.2.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <utility>
#include <vector>

#include <Eigen/Core>

#include "lowrank/adapt/variants_detail.hpp"
#include "lowrank/core/config.hpp"
#include "lowrank/core/error.hpp"
#include "lowrank/core/layout.hpp"
#include "lowrank/core/matrix.hpp"
#include "lowrank/core/view.hpp"
#include "lowrank/kernels/rank_update.hpp"

LOWRANK_BEGIN_NAMESPACE

namespace adapt {

/// MoRA's compression/decompression pair (`mora_type` in the official code; truncation and the
/// pure reshape of the paper are not implemented there, nor here). Below `x` has `in` entries,
/// `c = f_comp(x)` has `r_hat` (type 6: `nb * r_hat`), `y = f_decomp(z)` has `out`.
enum class MoraType : int {
  /// Type 1 ("sharing", recommended for large r): `c_j = sum_{b} xp[b r_hat + j]`, with `x` padded
  /// cyclically with its own first features to `xp` of length `nb r_hat`, `nb = ceil(in / r_hat)`
  /// (so feature `i` feeds `i mod r_hat`, and also `(in + i) mod r_hat` if `in + i < nb r_hat`);
  /// decompression tiles: `y_i = z_{i mod r_hat}`.
  sharing = 1,
  /// Type 2: contiguous-segment sums (the first `in mod r_hat` segments have
  /// `floor(in / r_hat) + 1` features, the rest `floor(in / r_hat)`); decompression repeats each
  /// `z_k` in place (`repeat_interleave`) with the same segment sizes over `out`.
  segment_interleave = 2,
  /// Type 3: contiguous-segment sums as type 2; tiled decompression as type 1.
  segment_tile = 3,
  /// Type 4: cyclic sums as type 1; repeat-interleave decompression as type 2.
  cyclic_interleave = 4,
  /// Type 6 (RoPE, recommended for small r; `r_hat` even): `xp` as type 1, cut into `nb` blocks of
  /// `r_hat`; block `b` is rotated RoPE-style, pairs `(j, j + r_hat/2)` by the angle `b theta_j`,
  /// `theta_j = 10000^(-2j / r_hat)`; `M` is applied to each block, the blocks are flattened
  /// (`nb r_hat` values) and truncated to `out`, or tiled if shorter.
  rope = 6,
};

/// MoRA's square size `r_hat = floor(sqrt((in + out) r) + 0.5)`, the same parameter count as a
/// rank-r LoRA; type 6 rounds it down to an even number. Example: in = out = 4096, r = 8 gives 256.
/// \throws Error if `out`, `in` or `r` is < 1, or type 6 gives `r_hat < 2`.
[[nodiscard]] inline Index mora_rank(Index out, Index in, Index r, MoraType type) {
  constexpr const char* fn = "lowrank::adapt::mora_rank";
  if (out < 1 || in < 1 || r < 1) lowrank::detail::fail(fn, "out = {}, in = {}, r = {} must all be >= 1", out, in, r);
  auto rh = static_cast<Index>(std::floor(std::sqrt(static_cast<double>(in + out) * static_cast<double>(r)) + 0.5));
  if (type == MoraType::rope) {
    rh = rh / 2 * 2;
    if (rh < 2) lowrank::detail::fail(fn, "type 6 (rope) needs an even r_hat >= 2; out = {}, in = {}, r = {} give {}", out, in, r, rh);
  }
  return rh;
}

/// A MoRA adapter on an `out x in` base weight. `M` is zero-initialised (`dW = 0`), the scaling
/// is 1 (`lora_alpha` is unused by MoRA).
///
/// \tparam T factor precision, `float` or `double`
template <class T = float>
struct MoraAdapter {
  RowMatrix<T> M;                    ///< `r_hat x r_hat`, trainable; `z = M c`
  Index out = 0;                     ///< output features
  Index in = 0;                      ///< input features
  MoraType type = MoraType::sharing; ///< compression/decompression pair
  Layout layout = Layout::out_in;    ///< layout of the base weight this adapter belongs to

  /// `r_hat` (the size of M).
  [[nodiscard]] Index rank() const noexcept { return M.rows(); }
  /// Input features.
  [[nodiscard]] Index in_features() const noexcept { return in; }
  /// Output features.
  [[nodiscard]] Index out_features() const noexcept { return out; }
};

namespace variants_detail {

inline bool valid_mora_type(MoraType t) {
  switch (t) {
    case MoraType::sharing:
    case MoraType::segment_interleave:
    case MoraType::segment_tile:
    case MoraType::cyclic_interleave:
    case MoraType::rope: return true;
  }
  return false;
}

inline bool mora_cyclic_in(MoraType t) {
  return t == MoraType::sharing || t == MoraType::cyclic_interleave || t == MoraType::rope;
}

/// Validates (out, in, r_hat, type); the cyclic padding of types 1, 4, 6 needs `in >= r_hat`
/// (the reference pads with `x[:pad]`, which is too short otherwise).
inline void check_mora_dims(const char* fn, Index out, Index in, Index rh, MoraType type) {
  if (!valid_mora_type(type)) lowrank::detail::fail(fn, "unknown MoRA type {}", static_cast<int>(type));
  if (out < 1 || in < 1) lowrank::detail::fail(fn, "out = {} and in = {} must be >= 1", out, in);
  if (rh < 1) lowrank::detail::fail(fn, "M is {}x{}: r_hat must be >= 1", rh, rh);
  if (type == MoraType::rope && rh % 2 != 0) lowrank::detail::fail(fn, "type 6 (rope) needs an even r_hat, M is {}x{}", rh, rh);
  if (mora_cyclic_in(type) && in < rh)
    lowrank::detail::fail(fn, "type {} pads x cyclically and needs in >= r_hat; in = {}, r_hat = {}", static_cast<int>(type), in, rh);
}

template <class T>
void check_mora(const char* fn, const MoraAdapter<T>& a) {
  if (a.M.rows() != a.M.cols()) lowrank::detail::fail(fn, "M is {}x{} but must be square", a.M.rows(), a.M.cols());
  check_mora_dims(fn, a.out, a.in, a.M.rows(), a.type);
}

/// Number of r_hat-blocks of the cyclically padded input.
inline Index mora_blocks(Index in, Index rh) { return (in + rh - 1) / rh; }

/// Compressed index of input feature `j` for types 2 and 3 (contiguous segments).
inline Index mora_segment_of(Index j, Index n, Index rh) {
  const Index nr = n / rh, mr = nr + 1, m = n - rh * nr;
  return j < m * mr ? j / mr : m + (j - m * mr) / nr;
}

/// Rotation angle table of type 6: `cs[b][j] = (cos(b theta_j), sin(b theta_j))`, fp64.
inline std::vector<std::pair<double, double>> mora_rope_table(Index nb, Index rh) {
  const Index h = rh / 2;
  std::vector<std::pair<double, double>> t(static_cast<std::size_t>(nb * h));
  for (Index b = 0; b < nb; ++b)
    for (Index j = 0; j < h; ++j) {
      const double theta = std::pow(10000.0, -2.0 * static_cast<double>(j) / static_cast<double>(rh));
      const double ang = static_cast<double>(b) * theta;
      t[static_cast<std::size_t>(b * h + j)] = {std::cos(ang), std::sin(ang)};
    }
  return t;
}

}  // namespace variants_detail

/// A zero-initialised MoRA adapter: `r_hat = mora_rank(out, in, r, type)`, `M = 0`.
/// \throws Error if the sizes are invalid or types 1, 4, 6 get `in < r_hat`.
template <class T = float>
[[nodiscard]] MoraAdapter<T> init_mora(Index out, Index in, Index r, MoraType type, Layout layout = Layout::out_in) {
  constexpr const char* fn = "lowrank::adapt::init_mora";
  if (!variants_detail::valid_mora_type(type)) lowrank::detail::fail(fn, "unknown MoRA type {}", static_cast<int>(type));
  const Index rh = mora_rank(out, in, r, type);
  variants_detail::check_mora_dims(fn, out, in, rh, type);
  MoraAdapter<T> a;
  a.M = RowMatrix<T>::Zero(rh, rh);
  a.out = out;
  a.in = in;
  a.type = type;
  a.layout = layout;
  return a;
}

/// Operator form of the adapter branch, `f_decomp(M f_comp(x))` for each row `x` of `X`
/// (`tokens x in`), giving `tokens x out`, computed in precision `T` (the type-6 rotation table
/// in fp64, rounded to `T`). Cost: `tokens (in + out + 2 r_hat^2)` flops for types 1-4, `nb` times
/// the `M` part for type 6 (`nb = ceil(in / r_hat)`).
/// \throws Error if `X` has the wrong number of columns or the adapter is inconsistent.
template <class T, class DX>
[[nodiscard]] RowMatrix<T> adapter_output(const MoraAdapter<T>& a, const Eigen::MatrixBase<DX>& X) {
  constexpr const char* fn = "lowrank::adapt::adapter_output(MoraAdapter)";
  variants_detail::check_mora(fn, a);
  variants_detail::check_input(fn, X, a.in);
  const Index rh = a.M.rows(), in = a.in, out = a.out, tokens = X.rows();
  const Index nb = variants_detail::mora_blocks(in, rh), padded = nb * rh;
  const bool rope = a.type == MoraType::rope;
  const auto table = rope ? variants_detail::mora_rope_table(nb, rh) : std::vector<std::pair<double, double>>{};
  RowMatrix<T> Y(tokens, out);
  Eigen::Matrix<T, Eigen::Dynamic, 1> xp(padded), c, z;
  for (Index t = 0; t < tokens; ++t) {
    // f_comp
    if (variants_detail::mora_cyclic_in(a.type))
      for (Index q = 0; q < padded; ++q) xp(q) = static_cast<T>(X(t, q < in ? q : q - in));
    if (a.type == MoraType::sharing || a.type == MoraType::cyclic_interleave) {
      c = Eigen::Matrix<T, Eigen::Dynamic, 1>::Zero(rh);
      for (Index b = 0; b < nb; ++b) c += xp.segment(b * rh, rh);
    } else if (a.type == MoraType::segment_interleave || a.type == MoraType::segment_tile) {
      c = Eigen::Matrix<T, Eigen::Dynamic, 1>::Zero(rh);
      const Index nr = in / rh, mr = nr + 1, m = in - rh * nr;
      for (Index k = 0; k < rh; ++k) {
        const Index start = k < m ? k * mr : m * mr + (k - m) * nr;
        const Index len = k < m ? mr : nr;
        for (Index q = start; q < start + len; ++q) c(k) += static_cast<T>(X(t, q));
      }
    } else {  // rope: rotate each block
      c.resize(padded);
      const Index h = rh / 2;
      for (Index b = 0; b < nb; ++b)
        for (Index k = 0; k < rh; ++k) {
          const auto [cs, sn] = table[static_cast<std::size_t>(b * h + (k % h))];
          const T v = xp(b * rh + k);
          const T partner = k < h ? -xp(b * rh + k + h) : xp(b * rh + k - h);
          c(b * rh + k) = v * static_cast<T>(cs) + partner * static_cast<T>(sn);
        }
    }
    // M
    if (!rope) {
      z = a.M * c;
    } else {
      z.resize(padded);
      for (Index b = 0; b < nb; ++b) z.segment(b * rh, rh) = a.M * c.segment(b * rh, rh);
    }
    // f_decomp
    if (a.type == MoraType::sharing || a.type == MoraType::segment_tile) {
      for (Index i = 0; i < out; ++i) Y(t, i) = z(i % rh);
    } else if (a.type == MoraType::segment_interleave || a.type == MoraType::cyclic_interleave) {
      for (Index i = 0; i < out; ++i) Y(t, i) = z(variants_detail::mora_segment_of(i, out, rh));
    } else {
      for (Index i = 0; i < out; ++i) Y(t, i) = z(i % padded);
    }
  }
  return Y;
}

/// Dense delta `dW` (`out x in` in operator terms; returned in the base layout) such that
/// `dW x = f_decomp(M f_comp(x))` for every `x`: built from the operators' index maps (types
/// 1-4: `dW(i, j) = sum_{k in comp(j)} M(dec(i), k)`; type 6: the same with the block's rotation
/// folded into `M`), in fp64, rounded to `T`. Cost: `O(out in + in r_hat)`.
/// \throws Error if the adapter is inconsistent.
template <class T>
[[nodiscard]] RowMatrix<T> dense_delta(const MoraAdapter<T>& a) {
  constexpr const char* fn = "lowrank::adapt::dense_delta(MoraAdapter)";
  variants_detail::check_mora(fn, a);
  const Index rh = a.M.rows(), in = a.in, out = a.out;
  const Index nb = variants_detail::mora_blocks(in, rh), padded = nb * rh;
  const RowMatrix<double> M = a.M.template cast<double>();
  RowMatrix<double> d = RowMatrix<double>::Zero(out, in);
  if (a.type != MoraType::rope) {
    std::vector<Index> dec(static_cast<std::size_t>(out));
    for (Index i = 0; i < out; ++i)
      dec[static_cast<std::size_t>(i)] =
          (a.type == MoraType::sharing || a.type == MoraType::segment_tile) ? i % rh : variants_detail::mora_segment_of(i, out, rh);
    for (Index j = 0; j < in; ++j) {
      Index ks[2];
      int nk = 0;
      if (variants_detail::mora_cyclic_in(a.type)) {
        ks[nk++] = j % rh;
        if (in + j < padded) ks[nk++] = (in + j) % rh;
      } else {
        ks[nk++] = variants_detail::mora_segment_of(j, in, rh);
      }
      for (Index i = 0; i < out; ++i)
        for (int q = 0; q < nk; ++q) d(i, j) += M(dec[static_cast<std::size_t>(i)], ks[q]);
    }
  } else {
    // MR[b] = M R_b, with R_b the rotation of block b: column kq of R_b has cos at kq and
    // +sin at kq + h (kq < h), or cos at kq and -sin at kq - h (kq >= h).
    const Index h = rh / 2;
    const auto table = variants_detail::mora_rope_table(nb, rh);
    std::vector<RowMatrix<double>> MR(static_cast<std::size_t>(nb));
    for (Index b = 0; b < nb; ++b) {
      RowMatrix<double>& mr = MR[static_cast<std::size_t>(b)];
      mr.resize(rh, rh);
      for (Index kq = 0; kq < rh; ++kq) {
        const auto [cs, sn] = table[static_cast<std::size_t>(b * h + kq % h)];
        if (kq < h)
          mr.col(kq) = M.col(kq) * cs + M.col(kq + h) * sn;
        else
          mr.col(kq) = M.col(kq) * cs - M.col(kq - h) * sn;
      }
    }
    for (Index j = 0; j < in; ++j) {
      Index qs[2];
      int nq = 0;
      qs[nq++] = j;
      if (in + j < padded) qs[nq++] = in + j;
      for (Index i = 0; i < out; ++i) {
        const Index p = i % padded, b = p / rh, k = p % rh;
        for (int n = 0; n < nq; ++n)
          if (qs[n] / rh == b) d(i, j) += MR[static_cast<std::size_t>(b)](k, qs[n] % rh);
      }
    }
  }
  return variants_detail::in_layout<T>(d.template cast<T>(), a.layout);
}

/// Full forward `X W^T + f_decomp(M f_comp(x)) (+ bias)` row by row, precision `T`.
/// \throws Error on shape mismatch.
template <SupportedScalar TW, class T, class DX>
[[nodiscard]] RowMatrix<T> forward(WeightView<TW> W, const MoraAdapter<T>& a, const Eigen::MatrixBase<DX>& X,
                                   const T* bias = nullptr) {
  constexpr const char* fn = "lowrank::adapt::forward(MoraAdapter)";
  variants_detail::check_mora(fn, a);
  variants_detail::check_weight_shape(fn, "W", W, a.out, a.in);
  variants_detail::check_input(fn, X, a.in);
  RowMatrix<T> Y = variants_detail::base_output<T>(W, X) + adapter_output(a, X);
  if (bias != nullptr)
    for (Index i = 0; i < Y.rows(); ++i)
      for (Index j = 0; j < Y.cols(); ++j) Y(i, j) += bias[j];
  return Y;
}

/// Merges the dense delta into `W` (MoRA merges like LoRA): `W + dW` formed in fp64 from the stored
/// value and rounded once into storage (fp64 -> bf16/fp16 through fp32, as `convert`).
/// \throws Error (W unchanged) on shape mismatch.
template <SupportedScalar TW, class T>
void merge(WeightView<TW> W, const MoraAdapter<T>& a, const RankUpdateOptions& options = {}) {
  constexpr const char* fn = "lowrank::adapt::merge(MoraAdapter)";
  variants_detail::check_mora(fn, a);
  variants_detail::check_weight_shape(fn, "W", W, a.out, a.in);
  MoraAdapter<double> a64{a.M.template cast<double>(), a.out, a.in, a.type, Layout::out_in};
  variants_detail::add_dense(W, dense_delta(a64), 1.0, options);
}

/// Removes the dense delta from `W` (the negated `merge`). \throws Error (W unchanged) on shape mismatch.
template <SupportedScalar TW, class T>
void unmerge(WeightView<TW> W, const MoraAdapter<T>& a, const RankUpdateOptions& options = {}) {
  constexpr const char* fn = "lowrank::adapt::unmerge(MoraAdapter)";
  variants_detail::check_mora(fn, a);
  variants_detail::check_weight_shape(fn, "W", W, a.out, a.in);
  MoraAdapter<double> a64{a.M.template cast<double>(), a.out, a.in, a.type, Layout::out_in};
  variants_detail::add_dense(W, dense_delta(a64), -1.0, options);
}

}  // namespace adapt

LOWRANK_END_NAMESPACE
