/// \file
/// An edit log: a stack of factored edits applied to one weight, revertible in order, with an
/// optional snapshot of the original weight for a bit-exact restore.
#pragma once

#include <string>
#include <utility>
#include <vector>

#include "lowrank/core/config.hpp"
#include "lowrank/core/error.hpp"
#include "lowrank/core/scalar.hpp"
#include "lowrank/core/view.hpp"
#include "lowrank/edit/factored.hpp"

LOWRANK_BEGIN_NAMESPACE

namespace edit {

/// Options of `EditLog`.
struct EditLogOptions {
  /// Copy the weight when the log is created (out * in elements of its storage type), so that
  /// `restore()` puts back its exact bits. Without it, reverting subtracts the edits.
  bool snapshot = false;
  /// Rounding of every apply and revert (see `rank_update`).
  RankUpdateOptions rounding;
};

/// A stack of edits on one weight (which the log does not own: it must outlive the log).
///
/// `apply` adds an edit to the weight and pushes it; `revert_last` subtracts the last one and pops
/// it (last in, first out, as sequential editing requires: each edit was computed on the weight
/// edited by the ones before it). Revert bound: each apply and each revert rounds every element
/// once into the storage type, so after k edits applied and reverted the weight differs from the
/// original by at most `2 k u max_t |W_t(i, j)|` per element, with u the unit roundoff of the
/// storage type (2^-24 fp32, 2^-8 bf16, 2^-11 fp16, 2^-53 fp64) and `W_t` the intermediate
/// values. With a snapshot, `restore()` is bit-exact.
template <SupportedScalar TW>
  requires(!std::is_const_v<TW>)
class EditLog {
 public:
  explicit EditLog(WeightView<TW> weight, const EditLogOptions& options = {}) : weight_(weight), options_(options) {
    if (options.snapshot) {
      const MatrixView<TW> w = weight.as_out_in();
      snapshot_.reserve(static_cast<std::size_t>(w.rows * w.cols));
      for (Index o = 0; o < w.rows; ++o)
        for (Index i = 0; i < w.cols; ++i) snapshot_.push_back(w(o, i));
    }
  }

  /// Applies `edit` to the weight and pushes it (with an optional label).
  /// \throws Error (weight and log unchanged) as `edit::apply`.
  void apply(FactoredEdit edit, std::string label = {}) {
    edit::apply(weight_, edit, 1.0, options_.rounding);
    edits_.push_back(Entry{std::move(edit), std::move(label)});
  }

  /// Subtracts the last edit and pops it. \throws Error if the log is empty.
  void revert_last() {
    if (edits_.empty()) detail::fail("lowrank::edit::EditLog::revert_last", "the log is empty");
    edit::apply(weight_, edits_.back().edit, -1.0, options_.rounding);
    edits_.pop_back();
  }

  /// Reverts every edit, last first.
  void revert_all() {
    while (!edits_.empty()) revert_last();
  }

  /// Puts back the snapshot's bits and clears the log.
  /// \throws Error if the log was created without a snapshot.
  void restore() {
    if (!options_.snapshot) detail::fail("lowrank::edit::EditLog::restore", "the log was created without a snapshot");
    const MatrixView<TW> w = weight_.as_out_in();
    std::size_t e = 0;
    for (Index o = 0; o < w.rows; ++o)
      for (Index i = 0; i < w.cols; ++i) w(o, i) = snapshot_[e++];
    edits_.clear();
  }

  /// Edits on the stack.
  Index size() const { return static_cast<Index>(edits_.size()); }
  bool empty() const { return edits_.empty(); }
  const FactoredEdit& edit(Index i) const { return edits_.at(static_cast<std::size_t>(i)).edit; }
  const std::string& label(Index i) const { return edits_.at(static_cast<std::size_t>(i)).label; }
  bool has_snapshot() const { return options_.snapshot; }

  /// All edits on the stack as one factored edit (their factors side by side; rank = the sum of
  /// ranks): `dense()` is the total change `sum_i V_i U_i^T`.
  FactoredEdit combined() const {
    Index rank = 0;
    for (const Entry& e : edits_) rank += e.edit.rank();
    FactoredEdit all{ColMatrix<double>(weight_.in_features(), rank), ColMatrix<double>(weight_.out_features(), rank)};
    Index c = 0;
    for (const Entry& e : edits_) {
      all.U.middleCols(c, e.edit.rank()) = e.edit.U;
      all.V.middleCols(c, e.edit.rank()) = e.edit.V;
      c += e.edit.rank();
    }
    return all;
  }

 private:
  struct Entry {
    FactoredEdit edit;
    std::string label;
  };
  WeightView<TW> weight_;
  EditLogOptions options_;
  std::vector<TW> snapshot_;
  std::vector<Entry> edits_;
};

}  // namespace edit

LOWRANK_END_NAMESPACE
