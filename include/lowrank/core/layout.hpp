/// \file
/// `Layout`: which index of a stored weight matrix is the output dimension.
#pragma once

#include <string_view>

#include "lowrank/core/config.hpp"

LOWRANK_BEGIN_NAMESPACE

/// How a weight matrix stores a linear map from `in` features to `out` features.
///
/// Never guessed from a shape: square matrices are ambiguous, and reference implementations of
/// ROME and GaLore carry bugs from guessing.
enum class Layout {
  out_in,  ///< rows are outputs, columns inputs: torch `nn.Linear.weight` (`out x in`).
  in_out,  ///< rows are inputs, columns outputs: GPT-2 `Conv1D.weight` (`in x out`).
};

/// "out_in" or "in_out".
constexpr std::string_view to_string(Layout layout) noexcept {
  return layout == Layout::out_in ? "out_in" : "in_out";
}

LOWRANK_END_NAMESPACE
