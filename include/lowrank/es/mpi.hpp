/// \file
/// Distributed EGGROLL over MPI (component `lowrank::mpi`, CMake option `LOWRANK_ENABLE_MPI`):
/// every rank holds the whole model and the same `es::Population`, evaluates a contiguous slice of
/// the population, and the ranks exchange fitness scalars only. Since every member's noise is
/// regenerated from (seed, parameter, noise epoch, noise index) and `Population::tell` is bitwise
/// deterministic given the full fitness vector, every rank then applies the identical update.
///
/// \code
/// const es::MemberRange mine = es::member_range(rank, size, N, 2);   // whole antithetic pairs
/// const es::Generation gen = pop.ask();
/// for (std::int64_t i = mine.begin; i < mine.end; ++i) local[i - mine.begin] = evaluate(pop, gen, i);
/// es::allgather_fitness(MPI_COMM_WORLD, local, full);               // N doubles on every rank
/// pop.tell(gen, full, params);                                       // identical on every rank
/// \endcode
///
/// Not part of the umbrella header `lowrank/lowrank.hpp` (it includes `<mpi.h>`).
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>

#include <mpi.h>

#include "lowrank/core/config.hpp"
#include "lowrank/es/eggroll.hpp"

LOWRANK_BEGIN_NAMESPACE

namespace es {

/// The members `[begin, end)` of one rank.
struct MemberRange {
  std::int64_t begin = 0;
  std::int64_t end = 0;
  [[nodiscard]] constexpr std::int64_t size() const noexcept { return end - begin; }
  friend constexpr bool operator==(const MemberRange&, const MemberRange&) = default;
};

/// Rank `rank`'s slice of a population of `population` members split over `size` ranks:
/// contiguous, disjoint, in rank order, covering `[0, population)`. The population is cut into
/// `ceil(population / align)` blocks of `align` members (the last may be shorter); the last
/// `blocks % size` ranks get one block more than the others; as the short block is the last
/// rank's, slice sizes differ by at most `align`. `align = 2` keeps antithetic
/// pairs (`Antithetic::interleaved`) on one rank, so a pair's noise is generated once. With fewer
/// blocks than ranks, the first `size - blocks` ranks get an empty slice.
/// \throws Error if `size < 1`, `rank` is outside `[0, size)`, `population < 0` or `align < 1`.
[[nodiscard]] MemberRange member_range(int rank, int size, std::int64_t population, std::int64_t align = 1);

/// Collective over `comm`: gathers every rank's fitness values into `full` (the whole population,
/// indexed by global member id) on every rank, with `MPI_Allgatherv` of doubles. Rank q's `local`
/// values fill `full` after those of ranks 0 .. q-1, so the slices must be contiguous and in rank
/// order (as `member_range` gives); their sizes may differ (they are exchanged first, one
/// `MPI_Allgather` of a 64-bit count). `local` may be the rank's own part of `full` (in place).
/// Only fitness scalars travel: N doubles in all.
/// \throws Error on every rank (full unchanged) if the local sizes do not add up to `full.size()`
///   or exceed MPI's int counts; `std::runtime_error` if an MPI call returns an error (with the
///   default error handler MPI aborts instead).
void allgather_fitness(MPI_Comm comm, std::span<const double> local, std::span<double> full);

/// Collective over `comm`: true on every rank iff every rank passed the same number of bytes with
/// the same values (rank 0's bytes are broadcast in chunks of at most 1 MiB and compared). For
/// checking that replicated parameters have stayed bit-identical.
[[nodiscard]] bool same_on_all_ranks(MPI_Comm comm, std::span<const std::byte> bytes);

/// `same_on_all_ranks` over the elements of every parameter (row by row, any strides), in order:
/// true on every rank iff all ranks hold bitwise the same parameter values and shapes.
[[nodiscard]] bool parameters_agree(MPI_Comm comm, std::span<const ParamRef> params);

}  // namespace es

LOWRANK_END_NAMESPACE
