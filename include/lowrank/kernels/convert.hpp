/// \file
/// Element-wise conversion between storage types with the rounding of the rank update.
#pragma once

#include "lowrank/core/config.hpp"
#include "lowrank/core/scalar.hpp"
#include "lowrank/core/view.hpp"
#include "lowrank/kernels/rank_update.hpp"

LOWRANK_BEGIN_NAMESPACE

/// Options of `convert`: the same fields, with the same meaning, as `RankUpdateOptions`
/// (rounding, Philox key, and the index origin of this block for stochastic rounding), so that
/// "update in fp32, then convert" and "update in place" round with the same random bits.
using ConvertOptions = RankUpdateOptions;

/// `dst(i, j) = src(i, j)` converted to `TD`: exact when widening; rounded to nearest-even, or
/// stochastically on request, when narrowing to bf16/fp16 (element `(i, j)` uses the random bits
/// `bits((index_row0 + i) * index_cols + index_col0 + j)` of `RandomStream(seed, stream)`, as
/// `rank_update` does). fp64 to bf16/fp16 goes through fp32 (two roundings); fp64 to fp32 rounds
/// to nearest-even. \throws Error if the shapes differ or the views overlap.
template <SupportedScalar TD, SupportedScalar TS>
  requires(!std::is_const_v<TD>)
void convert(MatrixView<const TS> src, MatrixView<TD> dst, const ConvertOptions& options = {});

LOWRANK_END_NAMESPACE
