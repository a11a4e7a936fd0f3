#include "lowrank/es/mpi.hpp"

#include <algorithm>
#include <climits>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include <fmt/format.h>

#include "lowrank/core/error.hpp"

LOWRANK_BEGIN_NAMESPACE

namespace es {

namespace {

// MPI calls return an error code only under MPI_ERRORS_RETURN (the default handler aborts).
void check_mpi(int code, const char* function, const char* call) {
  if (code == MPI_SUCCESS) return;
  char text[MPI_MAX_ERROR_STRING];
  int length = 0;
  MPI_Error_string(code, text, &length);
  throw std::runtime_error(fmt::format("{}: {} failed: {}", function, call, std::string(text, std::size_t(length))));
}

}  // namespace

MemberRange member_range(int rank, int size, std::int64_t population, std::int64_t align) {
  if (size < 1) detail::fail("member_range", "size is {} (must be >= 1)", size);
  if (rank < 0 || rank >= size) detail::fail("member_range", "rank is {}, size {} (must be in [0, size))", rank, size);
  if (population < 0) detail::fail("member_range", "population is {} (must be >= 0)", population);
  if (align < 1) detail::fail("member_range", "align is {} (must be >= 1)", align);
  const std::int64_t blocks = population / align + (population % align != 0 ? 1 : 0);
  // The last `extra` ranks take one block more: the last rank also holds the short block, so
  // slice sizes differ by at most `align`.
  const std::int64_t base = blocks / size, extra = blocks % size, first_extra = size - extra;
  const std::int64_t first = rank * base + std::max<std::int64_t>(0, rank - first_extra);
  const std::int64_t count = base + (rank >= first_extra ? 1 : 0);
  return {std::min(first * align, population), std::min((first + count) * align, population)};
}

void allgather_fitness(MPI_Comm comm, std::span<const double> local, std::span<double> full) {
  int rank = 0, size = 0;
  check_mpi(MPI_Comm_rank(comm, &rank), "allgather_fitness", "MPI_Comm_rank");
  check_mpi(MPI_Comm_size(comm, &size), "allgather_fitness", "MPI_Comm_size");

  // Every rank learns every slice size, so all of them take the same decision below.
  const std::int64_t mine = static_cast<std::int64_t>(local.size());
  std::vector<std::int64_t> sizes(static_cast<std::size_t>(size));
  check_mpi(MPI_Allgather(&mine, 1, MPI_INT64_T, sizes.data(), 1, MPI_INT64_T, comm), "allgather_fitness",
            "MPI_Allgather");
  std::int64_t total = 0;
  for (const std::int64_t s : sizes) total += s;
  if (total != static_cast<std::int64_t>(full.size())) {
    detail::fail("allgather_fitness", "the {} ranks' slices hold {} values in all, full has {} (rank {} has {})", size,
                 total, full.size(), rank, mine);
  }
  if (total > INT_MAX) detail::fail("allgather_fitness", "{} values exceed MPI's int counts", total);

  std::vector<int> counts(static_cast<std::size_t>(size)), displs(static_cast<std::size_t>(size));
  int offset = 0;
  for (int q = 0; q < size; ++q) {
    counts[std::size_t(q)] = static_cast<int>(sizes[std::size_t(q)]);
    displs[std::size_t(q)] = offset;
    offset += counts[std::size_t(q)];
  }
  const double* own = full.data() + displs[std::size_t(rank)];
  const bool in_place = local.data() == own && !local.empty();
  if (!in_place && !local.empty()) {
    // Overlap that is not exactly the rank's own part would be read while being written.
    const double* lo = local.data();
    const double* hi = local.data() + local.size();
    if (hi > full.data() && lo < full.data() + full.size())
      detail::fail("allgather_fitness", "local overlaps full but is not this rank's part of it (offset {})",
                   displs[std::size_t(rank)]);
  }
  check_mpi(MPI_Allgatherv(in_place ? MPI_IN_PLACE : local.data(), counts[std::size_t(rank)], MPI_DOUBLE, full.data(),
                           counts.data(), displs.data(), MPI_DOUBLE, comm),
            "allgather_fitness", "MPI_Allgatherv");
}

bool same_on_all_ranks(MPI_Comm comm, std::span<const std::byte> bytes) {
  int rank = 0;
  check_mpi(MPI_Comm_rank(comm, &rank), "same_on_all_ranks", "MPI_Comm_rank");
  // Same length everywhere? (min and max of the length in one reduction: max of (n, -n).)
  const long long n = static_cast<long long>(bytes.size());
  long long ext[2] = {n, -n}, all[2] = {0, 0};
  check_mpi(MPI_Allreduce(ext, all, 2, MPI_LONG_LONG, MPI_MAX, comm), "same_on_all_ranks", "MPI_Allreduce");
  if (all[0] != -all[1]) return false;  // collective decision: every rank sees the same max and min

  constexpr std::size_t chunk = std::size_t{1} << 20;
  std::vector<std::byte> buffer(std::min(chunk, bytes.size()));
  int equal = 1;
  for (std::size_t at = 0; at < bytes.size(); at += chunk) {
    const std::size_t len = std::min(chunk, bytes.size() - at);
    if (rank == 0) std::memcpy(buffer.data(), bytes.data() + at, len);
    check_mpi(MPI_Bcast(buffer.data(), static_cast<int>(len), MPI_BYTE, 0, comm), "same_on_all_ranks", "MPI_Bcast");
    if (std::memcmp(buffer.data(), bytes.data() + at, len) != 0) equal = 0;
  }
  int all_equal = 0;
  check_mpi(MPI_Allreduce(&equal, &all_equal, 1, MPI_INT, MPI_LAND, comm), "same_on_all_ranks", "MPI_Allreduce");
  return all_equal != 0;
}

bool parameters_agree(MPI_Comm comm, std::span<const ParamRef> params) {
  // Shapes first, then the values row by row, packed into one buffer.
  std::vector<std::byte> bytes;
  auto append = [&bytes](const void* p, std::size_t n) {
    const auto* b = static_cast<const std::byte*>(p);
    bytes.insert(bytes.end(), b, b + n);
  };
  for (const ParamRef& p : params) {
    const std::int64_t shape[2] = {static_cast<std::int64_t>(p.value.rows), static_cast<std::int64_t>(p.value.cols)};
    append(shape, sizeof shape);
  }
  for (const ParamRef& p : params)
    for (Index i = 0; i < p.value.rows; ++i)
      for (Index j = 0; j < p.value.cols; ++j) append(&p.value(i, j), sizeof(float));
  return same_on_all_ranks(comm, bytes);
}

}  // namespace es

LOWRANK_END_NAMESPACE
