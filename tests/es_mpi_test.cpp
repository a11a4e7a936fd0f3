// Distributed EGGROLL (lowrank::mpi), run by ctest under `mpirun -np 2`: every rank evaluates its
// slice of the population, the ranks exchange fitness values only (`es::allgather_fitness`), and
// every rank calls `Population::tell` with the full vector. Checks, after every generation:
//   1. the parameters are bitwise identical on all ranks (`es::parameters_agree`, which broadcasts
//      rank 0's bytes and compares);
//   2. they are bitwise equal to a single-process run of the same seed computed on each rank
//      without any communication (whole population in one batch);
//   3. the gathered fitness vector equals the single-process one bitwise.
// Plus `member_range` properties, `allgather_fitness` in place and with unequal slices, its
// collective error on mismatched sizes, and a negative control (a flipped bit on one rank must
// be detected). Exit status 0 only if everything holds on every rank.
//
// Plain main (no GoogleTest): one process per rank, one verdict reduced over the ranks.
#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include <fmt/format.h>
#include <mpi.h>

#include "lowrank/core/error.hpp"
#include "lowrank/core/matrix.hpp"
#include "lowrank/core/philox.hpp"
#include "lowrank/es/eggroll.hpp"
#include "lowrank/es/mpi.hpp"
#include "lowrank/kernels/lora_forward.hpp"

using lowrank::Index;
using lowrank::Layout;
using FMat = lowrank::RowMatrix<float>;
namespace es = lowrank::es;

namespace {

int g_rank = 0, g_size = 1, g_failures = 0;

void check(bool ok, const std::string& what) {
  if (!ok) {
    ++g_failures;
    std::fprintf(stderr, "[rank %d] FAILED: %s\n", g_rank, what.c_str());
  }
}

// Batch rows per member. From `lowrank::lora_forward_gemm_tokens` (64) rows, a row of the
// population forward has the same bits in any batch, so a rank's slice (here >= 64 rows) and the
// single-process batch of the whole population give the same fitness values.
constexpr Index rows_per_member = 64;
constexpr Index d_in = 8, d_hidden = 16, d_out = 3;

struct Model {
  FMat W1, b1, W2, b2;
  Model() : W1(d_hidden, d_in), b1(d_hidden, 1), W2(d_out, d_hidden), b2(d_out, 1) {
    const lowrank::RandomStream rng(11, 0);
    std::uint64_t k = 0;
    for (FMat* m : {&W1, &b1, &W2, &b2})
      for (Index i = 0; i < m->rows(); ++i)
        for (Index j = 0; j < m->cols(); ++j) (*m)(i, j) = 0.5f * rng.normal(k++);
  }
  std::vector<es::ParamRef> refs() {
    return {{lowrank::view(W1)}, {lowrank::view(b1)}, {lowrank::view(W2)}, {lowrank::view(b2)}};
  }
  std::vector<float> flat() const {
    std::vector<float> v;
    for (const FMat* m : {&W1, &b1, &W2, &b2}) v.insert(v.end(), m->data(), m->data() + m->size());
    return v;
  }
};

std::vector<es::ParamSpec> specs() {
  return {{"W1", es::ParamKind::low_rank, d_hidden, d_in},
          {"b1", es::ParamKind::dense, d_hidden, 1},
          {"W2", es::ParamKind::low_rank, d_out, d_hidden},
          {"b2", es::ParamKind::dense, d_out, 1}};
}

// The task: fit a fixed random target from fixed inputs (the same on every rank).
struct Task {
  FMat X, T;
  Task() : X(rows_per_member, d_in), T(rows_per_member, d_out) {
    const lowrank::RandomStream rng(12, 0);
    std::uint64_t k = 0;
    for (Index i = 0; i < X.rows(); ++i)
      for (Index j = 0; j < X.cols(); ++j) X(i, j) = rng.normal(k++);
    for (Index i = 0; i < T.rows(); ++i)
      for (Index j = 0; j < T.cols(); ++j) T(i, j) = std::sin(float(i + 3 * j));
  }
};

// Loss of members [begin, end) of the current generation, in one population_forward batch per layer.
std::vector<double> evaluate(const Model& m, const es::Population& pop, const es::Generation& gen, const Task& task,
                             std::int64_t begin, std::int64_t end) {
  const std::int64_t n = end - begin;
  std::vector<double> loss(static_cast<std::size_t>(n));
  if (n == 0) return loss;
  const Index rows = n * rows_per_member;
  FMat X(rows, d_in), H(rows, d_hidden), Y(rows, d_out), b1(d_hidden, 1), b2(d_out, 1);
  std::vector<std::int64_t> members(static_cast<std::size_t>(rows));
  for (std::int64_t i = 0; i < n; ++i) {
    X.middleRows(i * rows_per_member, rows_per_member) = task.X;
    for (Index t = 0; t < rows_per_member; ++t) members[static_cast<std::size_t>(i * rows_per_member + t)] = begin + i;
  }
  es::population_forward(lowrank::view(std::as_const(X)), lowrank::weight(m.W1, Layout::out_in),
                         pop.perturbation(0, gen), members, lowrank::view(H));
  for (std::int64_t i = 0; i < n; ++i) {
    pop.perturbed(1, gen, begin + i, lowrank::view(m.b1), lowrank::view(b1));
    auto block = H.middleRows(i * rows_per_member, rows_per_member);
    block = (block.rowwise() + b1.col(0).transpose()).array().tanh().matrix();
  }
  es::population_forward(lowrank::view(std::as_const(H)), lowrank::weight(m.W2, Layout::out_in),
                         pop.perturbation(2, gen), members, lowrank::view(Y));
  for (std::int64_t i = 0; i < n; ++i) {
    pop.perturbed(3, gen, begin + i, lowrank::view(m.b2), lowrank::view(b2));
    double s = 0;
    for (Index t = 0; t < rows_per_member; ++t)
      for (Index j = 0; j < d_out; ++j) {
        const double d = double(Y(i * rows_per_member + t, j) + b2(j, 0)) - double(task.T(t, j));
        s += d * d;
      }
    loss[static_cast<std::size_t>(i)] = s / double(rows_per_member * d_out);
  }
  return loss;
}

bool bitwise_equal(std::span<const double> a, std::span<const double> b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(double)) == 0;
}

std::uint64_t fnv1a(std::span<const float> v) {
  std::uint64_t h = 1469598103934665603ull;
  for (const float x : v) {
    const auto bits = std::bit_cast<std::uint32_t>(x);
    for (int b = 0; b < 4; ++b) h = (h ^ ((bits >> (8 * b)) & 0xffu)) * 1099511628211ull;
  }
  return h;
}

// One configuration: `generations` generations distributed and single-process side by side.
void run_case(const char* name, es::EggrollConfig cfg, std::int64_t align, int generations) {
  Model dist, ref;
  es::Population pop_dist(cfg, specs()), pop_ref(cfg, specs());
  std::vector<es::ParamRef> dist_refs = dist.refs(), ref_refs = ref.refs();
  const Task task;
  const std::int64_t N = cfg.population;
  const es::MemberRange mine = es::member_range(g_rank, g_size, N, align);
  std::vector<double> full(static_cast<std::size_t>(N));
  double first_loss = 0, last_loss = 0;
  for (int g = 0; g < generations; ++g) {
    const es::Generation gen = pop_dist.ask();
    const std::vector<double> local = evaluate(dist, pop_dist, gen, task, mine.begin, mine.end);
    es::allgather_fitness(MPI_COMM_WORLD, local, full);
    const es::TellResult told = pop_dist.tell(gen, full, dist_refs);

    // The single-process run: the whole population in one batch, no communication.
    const es::Generation gen_ref = pop_ref.ask();
    const std::vector<double> all = evaluate(ref, pop_ref, gen_ref, task, 0, N);
    pop_ref.tell(gen_ref, all, ref_refs);

    check(bitwise_equal(full, all), fmt::format("{} gen {}: gathered fitness differs from the single-process one", name, g));
    check(es::parameters_agree(MPI_COMM_WORLD, dist_refs), fmt::format("{} gen {}: parameters differ across ranks", name, g));
    const std::vector<float> a = dist.flat(), b = ref.flat();
    check(std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0,
          fmt::format("{} gen {}: parameters differ from the single-process run", name, g));
    check(told.update_norm > 0 && std::isfinite(told.update_norm), fmt::format("{} gen {}: no update", name, g));
    if (g == 0) first_loss = told.mean_fitness;
    last_loss = told.mean_fitness;
  }
  if (g_rank == 0)
    std::printf("%s: N = %lld, %d ranks (rank 0: members [%lld, %lld)), %d generations, mean loss %.4f -> %.4f, "
                "parameter hash %016llx\n",
                name, static_cast<long long>(N), g_size, static_cast<long long>(mine.begin),
                static_cast<long long>(mine.end), generations, first_loss, last_loss,
                static_cast<unsigned long long>(fnv1a(dist.flat())));

  // Negative control: one flipped bit on the last rank must be seen by every rank.
  if (g_size > 1) {
    float& w = dist.W2(0, 0);
    const float saved = w;
    if (g_rank == g_size - 1) w = std::bit_cast<float>(std::bit_cast<std::uint32_t>(w) ^ 1u);
    check(!es::parameters_agree(MPI_COMM_WORLD, dist_refs), fmt::format("{}: a flipped bit went unnoticed", name));
    w = saved;
    check(es::parameters_agree(MPI_COMM_WORLD, dist_refs), fmt::format("{}: restored parameters disagree", name));
  }
}

void test_member_range() {
  for (int size = 1; size <= 5; ++size)
    for (std::int64_t N = 0; N <= 13; ++N)
      for (std::int64_t align = 1; align <= 3; ++align) {
        std::int64_t next = 0, largest = 0, smallest = N;
        for (int r = 0; r < size; ++r) {
          const es::MemberRange m = es::member_range(r, size, N, align);
          check(m.begin == next && m.end >= m.begin, fmt::format("member_range({}, {}, {}, {}) not contiguous", r, size, N, align));
          check(m.begin % align == 0 || m.begin == N, fmt::format("member_range({}, {}, {}, {}) not aligned", r, size, N, align));
          next = m.end;
          largest = std::max(largest, m.size());
          smallest = std::min(smallest, m.size());
        }
        check(next == N, fmt::format("member_range(*, {}, {}, {}) does not cover [0, N)", size, N, align));
        check(largest - smallest <= align, fmt::format("member_range(*, {}, {}, {}) unbalanced", size, N, align));
      }
  bool threw = false;
  try {
    (void)es::member_range(2, 2, 10);
  } catch (const lowrank::Error&) {
    threw = true;
  }
  check(threw, "member_range(rank == size) did not throw");
}

void test_allgather() {
  // Unequal slices (rank r holds r + 1 values, value = global index), in place and not.
  const std::int64_t total = std::int64_t(g_size) * (g_size + 1) / 2;
  const std::int64_t begin = std::int64_t(g_rank) * (g_rank + 1) / 2;
  std::vector<double> local(static_cast<std::size_t>(g_rank + 1)), full(static_cast<std::size_t>(total), -1.0);
  for (std::size_t i = 0; i < local.size(); ++i) local[i] = double(begin) + double(i);
  es::allgather_fitness(MPI_COMM_WORLD, local, full);
  bool ok = true;
  for (std::int64_t i = 0; i < total; ++i) ok = ok && full[static_cast<std::size_t>(i)] == double(i);
  check(ok, "allgather_fitness: wrong values");
  std::vector<double> inplace(static_cast<std::size_t>(total), -1.0);
  std::copy(local.begin(), local.end(), inplace.begin() + begin);
  es::allgather_fitness(MPI_COMM_WORLD, std::span<const double>(inplace.data() + begin, local.size()), inplace);
  check(inplace == full, "allgather_fitness in place: wrong values");

  // Sizes that do not add up: every rank throws, full unchanged.
  std::vector<double> wrong(static_cast<std::size_t>(total + 1), 7.0);
  bool threw = false;
  try {
    es::allgather_fitness(MPI_COMM_WORLD, local, wrong);
  } catch (const lowrank::Error& e) {
    threw = std::string(e.what()).find("allgather_fitness") != std::string::npos;
  }
  check(threw, "allgather_fitness: size mismatch did not throw");
  check(wrong == std::vector<double>(static_cast<std::size_t>(total + 1), 7.0), "allgather_fitness: full changed on error");
}

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  MPI_Comm_rank(MPI_COMM_WORLD, &g_rank);
  MPI_Comm_size(MPI_COMM_WORLD, &g_size);
  try {
    test_member_range();
    test_allgather();

    es::EggrollConfig a;  // interleaved pairs kept on one rank (align 2), Adam, z-score, rank 2
    a.population = 10;
    a.rank = 2;
    a.sigma = 0.05;
    a.seed = 2026;
    a.antithetic = es::Antithetic::interleaved;
    a.shaping.objective = es::Objective::minimize;
    a.optimizer.kind = es::EsOptimizer::Kind::adam;
    a.optimizer.lr = 0.02;
    run_case("interleaved/adam", a, 2, 5);

    es::EggrollConfig b;  // no antithetic sampling, odd N, slices of any size, SGD, centred ranks
    b.population = 7;
    b.rank = 1;
    b.sigma = 0.1;
    b.seed = 7;
    b.antithetic = es::Antithetic::none;
    b.shaping.shaping = es::Shaping::centered_ranks;
    b.shaping.objective = es::Objective::minimize;
    b.scale = es::UpdateScale::gradient;
    b.optimizer.lr = 0.05;
    run_case("none/sgd", b, 1, 4);

    es::EggrollConfig c = a;  // halves layout, pairs split across ranks
    c.antithetic = es::Antithetic::halves;
    c.population = 12;
    c.noise_reuse = 2;
    run_case("halves/reuse2", c, 1, 4);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "[rank %d] exception: %s\n", g_rank, e.what());
    MPI_Abort(MPI_COMM_WORLD, 2);
  }
  int failures = 0;
  MPI_Allreduce(&g_failures, &failures, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
  if (g_rank == 0)
    std::printf("%s: %d failed checks over %d ranks\n", failures == 0 ? "PASSED" : "FAILED", failures, g_size);
  MPI_Finalize();
  return failures == 0 ? 0 : 1;
}
