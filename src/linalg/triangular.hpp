// Blocked triangular solves with many right-hand sides (defined in src/linalg/spd.cpp), for the
// library's own solvers: SpdFactor's solves and MEMIT's n x n system (src/edit/edit.cpp).
#pragma once

#include "lowrank/core/config.hpp"
#include "lowrank/core/view.hpp"

LOWRANK_BEGIN_NAMESPACE
namespace detail {

// In place, for X (m x n) row-major (col_stride == 1) or column-major (row_stride == 1):
//   transposed == false: X <- L^-1 X;  transposed == true: X <- L^-T X,
// where L is the lower triangle of the column-major m x m matrix at `L` (leading dimension ld).
// Each element is computed in a fixed order whatever the thread count and the layout of X.
void triangular_solve(const double* L, Index ld, Index m, MatrixView<double> X, bool transposed);

}  // namespace detail
LOWRANK_END_NAMESPACE
