// EGGROLL at ranks 1 and 4 against full-rank (OpenAI-style) evolution strategies on the same
// supervised task, with the same population, noise scale, optimizer and generation budget.
//
//   example_es_rank_compare [--quick] [--generations G] [--dims IN,HIDDEN,OUT,BATCH] [--population N]
//                           [--csv PATH] [--threads T]
//
// The task: regression onto a fixed random "teacher" MLP, in -> hidden (tanh) -> out. The student
// has the same architecture and its own random initialisation; the loss is the mean squared error
// over a fixed batch of Gaussian inputs, and the fitness to minimise is that loss
// (`Objective::minimize`). What is compared is the optimizer, so there is no held-out set (with
// more parameters than targets the student fits the batch, not the teacher).
//
// Methods (one `es::Population` each, same seed, N, sigma, Adam learning rate, shaping):
// - EGGROLL r = 1 and r = 4: the weight matrices are `ParamKind::low_rank`; a generation is
//   evaluated in one batch: every member's copy of the training batch is a block of rows of X and
//   `es::population_forward` applies the base GEMM once plus each row's rank-r term.
// - full-rank ES: the same matrices registered as `ParamKind::dense` (full-rank Gaussian noise, as
//   in OpenAI ES); every member's weights are materialised with `Population::perturbed` and run
//   through a plain `linear_forward`.
// Biases are `ParamKind::dense` in all three.
//
// Prints a table: method, milliseconds per generation (evaluation = ask + all members' forwards,
// update = tell), loss of the mean parameters after the budget and its ratio to the initial loss.
// --csv writes the loss curves. One thread by default (--threads T for more): the timings are
// the per-generation cost of each method, not of a thread pool on a shared machine.
// --quick: a smaller model for a few generations (the ctest smoke run); it fails unless every
// method lowers the loss.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include <fmt/format.h>

#include "lowrank/core/matrix.hpp"
#include "lowrank/core/philox.hpp"
#include "lowrank/core/threading.hpp"
#include "lowrank/core/view.hpp"
#include "lowrank/es/eggroll.hpp"
#include "lowrank/kernels/lora_forward.hpp"

using lowrank::Index;
using lowrank::Layout;
using FMat = lowrank::RowMatrix<float>;
namespace es = lowrank::es;

namespace {

using Clock = std::chrono::steady_clock;
double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

struct Sizes {
  Index in, hidden, out, batch;
};

// in -> hidden (tanh) -> out; weights out x in (nn.Linear), biases as column vectors.
struct Mlp {
  FMat W1, b1, W2, b2;

  Mlp(const Sizes& s, std::uint64_t seed)
      : W1(s.hidden, s.in), b1(s.hidden, 1), W2(s.out, s.hidden), b2(s.out, 1) {
    const lowrank::RandomStream rng(seed, 7);
    std::uint64_t k = 0;
    auto fill = [&](FMat& m, double scale) {
      for (Index i = 0; i < m.rows(); ++i)
        for (Index j = 0; j < m.cols(); ++j) m(i, j) = float(scale * rng.normal(k++));
    };
    fill(W1, 1 / std::sqrt(double(s.in)));
    fill(b1, 0.1);
    fill(W2, 1 / std::sqrt(double(s.hidden)));
    fill(b2, 0.1);
  }

  std::vector<es::ParamRef> refs() {
    return {{lowrank::view(W1)}, {lowrank::view(b1)}, {lowrank::view(W2)}, {lowrank::view(b2)}};
  }
};

// Y = tanh(X W1^T + b1) W2^T + b2 for a batch (rows of X); H is scratch (batch x hidden).
void forward(const FMat& X, const FMat& W1, const FMat& b1, const FMat& W2, const FMat& b2, FMat& H, FMat& Y) {
  lowrank::LoraForwardOptions o1, o2;
  o1.bias = b1.data();
  o2.bias = b2.data();
  lowrank::linear_forward(lowrank::view(X), lowrank::weight(W1, Layout::out_in), lowrank::view(H), o1);
  H = H.array().tanh().matrix();
  lowrank::linear_forward(lowrank::view(std::as_const(H)), lowrank::weight(W2, Layout::out_in), lowrank::view(Y), o2);
}

// Mean squared error (mean over rows and outputs), in double.
double mse(const FMat& Y, const FMat& T, Index row0 = 0) {
  double s = 0;
  for (Index i = 0; i < T.rows(); ++i)
    for (Index j = 0; j < T.cols(); ++j) {
      const double d = double(Y(row0 + i, j)) - double(T(i, j));
      s += d * d;
    }
  return s / double(T.size());
}

double loss_of(const Mlp& m, const FMat& X, const FMat& T) {
  FMat H(X.rows(), m.W1.rows()), Y(X.rows(), m.W2.rows());
  forward(X, m.W1, m.b1, m.W2, m.b2, H, Y);
  return mse(Y, T);
}

enum class Method { eggroll, full_rank };

struct Result {
  std::string name;
  double eval_ms = 0, update_ms = 0, loss = 0;
  std::vector<double> curve;  // loss of the mean parameters after each generation
};

Result run(const std::string& name, Method method, int rank, const Sizes& s, int generations, const FMat& X,
           const FMat& T, const es::EggrollConfig& base_cfg) {
  Mlp student(s, 2);
  es::EggrollConfig cfg = base_cfg;
  cfg.rank = rank;
  const es::ParamKind matrix_kind = method == Method::eggroll ? es::ParamKind::low_rank : es::ParamKind::dense;
  es::Population pop(cfg, {{"W1", matrix_kind, s.hidden, s.in},
                           {"b1", es::ParamKind::dense, s.hidden, 1},
                           {"W2", matrix_kind, s.out, s.hidden},
                           {"b2", es::ParamKind::dense, s.out, 1}});
  std::vector<es::ParamRef> refs = student.refs();
  const std::int64_t N = cfg.population;
  const Index B = s.batch;

  // EGGROLL: the training batch repeated once per member (member i owns rows [i B, (i + 1) B)).
  FMat Xall, Hall, Yall, b1all, b2all;
  std::vector<std::int64_t> members;
  if (method == Method::eggroll) {
    Xall.resize(N * B, s.in);
    for (std::int64_t i = 0; i < N; ++i) Xall.middleRows(i * B, B) = X;
    Hall.resize(N * B, s.hidden);
    Yall.resize(N * B, s.out);
    b1all.resize(N, s.hidden);
    b2all.resize(N, s.out);
    members.resize(static_cast<std::size_t>(N * B));
    for (std::int64_t t = 0; t < N * B; ++t) members[static_cast<std::size_t>(t)] = t / B;
  }
  // Full rank: one member's materialised parameters at a time.
  FMat W1p(s.hidden, s.in), b1p(s.hidden, 1), W2p(s.out, s.hidden), b2p(s.out, 1), H(B, s.hidden), Y(B, s.out);

  Result r;
  r.name = name;
  std::vector<double> fitness(static_cast<std::size_t>(N));
  for (int g = 0; g < generations; ++g) {
    const auto t0 = Clock::now();
    const es::Generation gen = pop.ask();
    if (method == Method::eggroll) {
      for (std::int64_t i = 0; i < N; ++i) {
        pop.perturbed(1, gen, i, lowrank::view(student.b1), lowrank::row_major(b1all.row(i).data(), s.hidden, 1));
        pop.perturbed(3, gen, i, lowrank::view(student.b2), lowrank::row_major(b2all.row(i).data(), s.out, 1));
      }
      es::population_forward(lowrank::view(std::as_const(Xall)), lowrank::weight(std::as_const(student.W1), Layout::out_in),
                             pop.perturbation(0, gen), members, lowrank::view(Hall));
      for (std::int64_t i = 0; i < N; ++i)
        Hall.middleRows(i * B, B) = (Hall.middleRows(i * B, B).rowwise() + b1all.row(i)).array().tanh().matrix();
      es::population_forward(lowrank::view(std::as_const(Hall)), lowrank::weight(std::as_const(student.W2), Layout::out_in),
                             pop.perturbation(2, gen), members, lowrank::view(Yall));
      for (std::int64_t i = 0; i < N; ++i) {
        Yall.middleRows(i * B, B).rowwise() += b2all.row(i);
        fitness[static_cast<std::size_t>(i)] = mse(Yall, T, i * B);
      }
    } else {
      for (std::int64_t i = 0; i < N; ++i) {
        pop.perturbed(0, gen, i, lowrank::view(student.W1), lowrank::view(W1p));
        pop.perturbed(1, gen, i, lowrank::view(student.b1), lowrank::view(b1p));
        pop.perturbed(2, gen, i, lowrank::view(student.W2), lowrank::view(W2p));
        pop.perturbed(3, gen, i, lowrank::view(student.b2), lowrank::view(b2p));
        forward(X, W1p, b1p, W2p, b2p, H, Y);
        fitness[static_cast<std::size_t>(i)] = mse(Y, T);
      }
    }
    const auto t1 = Clock::now();
    pop.tell(gen, fitness, refs);
    r.eval_ms += 1e3 * std::chrono::duration<double>(t1 - t0).count();
    r.update_ms += 1e3 * seconds_since(t1);
    r.curve.push_back(loss_of(student, X, T));
  }
  r.eval_ms /= generations;
  r.update_ms /= generations;
  r.loss = r.curve.back();
  return r;
}

FMat gaussian(Index rows, Index cols, std::uint64_t seed, std::uint64_t stream) {
  const lowrank::RandomStream rng(seed, stream);
  FMat m(rows, cols);
  std::uint64_t k = 0;
  for (Index i = 0; i < rows; ++i)
    for (Index j = 0; j < cols; ++j) m(i, j) = rng.normal(k++);
  return m;
}

}  // namespace

int main(int argc, char** argv) {
  bool quick = false;
  int generations = -1;
  std::string csv, dims;
  std::int64_t population = 0;
  double lr = 0, sigma = 0;
  lowrank::set_num_threads(1);
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--quick") {  // a short smoke run (the test suite runs this in Debug builds)
      quick = true;
    } else if (a == "--generations" && i + 1 < argc) {
      generations = std::stoi(argv[++i]);
    } else if (a == "--dims" && i + 1 < argc) {  // in,hidden,out,batch
      dims = argv[++i];
    } else if (a == "--lr" && i + 1 < argc) {
      lr = std::stod(argv[++i]);
    } else if (a == "--sigma" && i + 1 < argc) {
      sigma = std::stod(argv[++i]);
    } else if (a == "--population" && i + 1 < argc) {
      population = std::stoll(argv[++i]);
    } else if (a == "--csv" && i + 1 < argc) {
      csv = argv[++i];
    } else if (a == "--threads" && i + 1 < argc) {
      lowrank::set_num_threads(std::stoi(argv[++i]));
    } else {
      fmt::print(stderr,
                 "usage: {} [--quick] [--generations G] [--dims IN,HIDDEN,OUT,BATCH] [--population N] [--csv PATH] "
                 "[--threads T]\n",
                 argv[0]);
      return 2;
    }
  }
  Sizes s = quick ? Sizes{16, 32, 4, 16} : Sizes{128, 256, 16, 32};
  if (!dims.empty() && std::sscanf(dims.c_str(), "%td,%td,%td,%td", &s.in, &s.hidden, &s.out, &s.batch) != 4) {
    fmt::print(stderr, "--dims wants in,hidden,out,batch\n");
    return 2;
  }
  if (generations < 0) generations = quick ? 15 : 300;

  es::EggrollConfig cfg;
  cfg.population = population > 0 ? population : quick ? 16 : 64;
  cfg.sigma = sigma > 0 ? sigma : 0.01;
  cfg.seed = 42;
  cfg.antithetic = es::Antithetic::interleaved;
  cfg.shaping.shaping = es::Shaping::z_score;
  cfg.shaping.objective = es::Objective::minimize;
  cfg.scale = es::UpdateScale::gradient;
  cfg.optimizer.kind = es::EsOptimizer::Kind::adam;
  cfg.optimizer.lr = lr > 0 ? lr : 0.003;

  // The teacher and the batch.
  const Mlp teacher(s, 1);
  const FMat X = gaussian(s.batch, s.in, 3, 0);
  FMat T(s.batch, s.out);
  {
    FMat H(s.batch, s.hidden);
    forward(X, teacher.W1, teacher.b1, teacher.W2, teacher.b2, H, T);
  }
  const Mlp init(s, 2);
  const double loss0 = loss_of(init, X, T);
  const Index n_params = s.hidden * s.in + s.hidden + s.out * s.hidden + s.out;
  fmt::print("teacher-student regression {}-{}-{} ({} parameters), batch {}; ES population {}, sigma {}, Adam lr {}, "
             "{} generations, {} threads\n",
             s.in, s.hidden, s.out, n_params, s.batch, cfg.population, cfg.sigma, cfg.optimizer.lr, generations,
             lowrank::num_threads());
  fmt::print("initial loss {:.5f}\n\n", loss0);

  std::vector<Result> results;
  results.push_back(run("EGGROLL r=1", Method::eggroll, 1, s, generations, X, T, cfg));
  results.push_back(run("EGGROLL r=4", Method::eggroll, 4, s, generations, X, T, cfg));
  results.push_back(run("full-rank ES", Method::full_rank, 1, s, generations, X, T, cfg));

  fmt::print("{:<14} {:>10} {:>10} {:>10} {:>12} {:>10}\n", "method", "eval ms", "update ms", "ms/gen", "final loss",
             "loss/init");
  bool all_improved = true;
  for (const Result& r : results) {
    fmt::print("{:<14} {:>10.2f} {:>10.2f} {:>10.2f} {:>12.3e} {:>10.2e}\n", r.name, r.eval_ms, r.update_ms,
               r.eval_ms + r.update_ms, r.loss, r.loss / loss0);
    all_improved = all_improved && r.loss < loss0;
  }

  if (!csv.empty()) {
    std::ofstream f(csv);
    f << "generation";
    for (const Result& r : results) f << ',' << r.name;
    f << '\n';
    for (int g = 0; g < generations; ++g) {
      f << g + 1;
      for (const Result& r : results) f << fmt::format(",{:.6g}", r.curve[static_cast<std::size_t>(g)]);
      f << '\n';
    }
    fmt::print("\nwrote {}\n", csv);
  }
  if (!all_improved) {
    fmt::print("a method did not lower the loss\n");
    return 1;
  }
  return 0;
}
