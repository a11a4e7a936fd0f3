// Cart-pole balanced by a small MLP policy trained with EGGROLL evolution strategies
// (lowrank::es::Population): no gradients, only episode returns.
//
//   example_es_cartpole [--quick] [--csv PATH] [--svg PATH] [--seed N] [--threads T]
//
// 1. The environment: the classic cart-pole of Barto, Sutton and Anderson with the constants and
//    rules of Gym's CartPole-v1, written here: gravity 9.8, cart mass 1.0, pole mass 0.1, pole
//    half-length 0.5, force +-10, tau 0.02 s, explicit Euler; the episode ends when |x| > 2.4 or
//    |theta| > 12 degrees, or after 500 steps; reward 1 per step (so the return is the number of
//    steps survived, at most 500); the initial state is uniform in [-0.05, 0.05]^4, drawn from
//    lowrank::RandomStream, so every run of the example gives the same numbers.
// 2. The policy: 4 -> 32 (tanh) -> 2, action = argmax (push left or right). The two weight
//    matrices are `ParamKind::low_rank` (rank-1 EGGROLL noise), the biases `ParamKind::dense`.
// 3. A generation: every member of the population runs one episode in its own environment, all in
//    lockstep: at each step, row t of the input batch is the observation of the t-th member still
//    running, and one `es::population_forward` per layer evaluates the whole batch with each row's
//    own perturbation (the shared base GEMM plus a rank-1 term per row). Antithetic pairs start
//    from the same initial state (common random numbers). `Population::tell` takes the returns.
// 4. After every generation the current mean policy (unperturbed) runs 100 fresh evaluation
//    episodes. Stopping rule: CartPole-v1's solving threshold, an average return >= 475 over 100
//    consecutive episodes.
//
// Prints the fitness curve (per generation: mean and max return of the population, the evaluation
// average), writes a CSV (generation, mean, max, eval, seconds) and an SVG plot of the curves.
// --quick: a small population for a few generations (the ctest smoke run); it fails unless the
// evaluation return improves.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <numbers>
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

// ---- the environment (Gym CartPole-v1) ----------------------------------------------------------

struct CartPole {
  static constexpr double gravity = 9.8, mass_cart = 1.0, mass_pole = 0.1, half_length = 0.5, force_mag = 10.0,
                          tau = 0.02;
  static constexpr double total_mass = mass_cart + mass_pole, pole_mass_length = mass_pole * half_length;
  static constexpr double x_limit = 2.4, theta_limit = 12 * 2 * std::numbers::pi / 360;
  static constexpr int max_steps = 500;

  double x = 0, x_dot = 0, theta = 0, theta_dot = 0;
  int steps = 0;
  bool done = false;

  // Initial state uniform in [-0.05, 0.05]: uniforms `4 episode .. 4 episode + 3` of the stream.
  void reset(const lowrank::RandomStream& rng, std::uint64_t episode) {
    double s[4];
    for (int j = 0; j < 4; ++j) s[j] = -0.05 + 0.1 * double(rng.uniform(4 * episode + std::uint64_t(j)));
    x = s[0], x_dot = s[1], theta = s[2], theta_dot = s[3];
    steps = 0;
    done = false;
  }

  void observe(float* obs) const {
    obs[0] = float(x), obs[1] = float(x_dot), obs[2] = float(theta), obs[3] = float(theta_dot);
  }

  // One step with action 0 (push left) or 1 (push right); reward 1 (also on the terminal step).
  void step(int action) {
    const double force = action == 1 ? force_mag : -force_mag;
    const double c = std::cos(theta), s = std::sin(theta);
    const double temp = (force + pole_mass_length * theta_dot * theta_dot * s) / total_mass;
    const double theta_acc =
        (gravity * s - c * temp) / (half_length * (4.0 / 3.0 - mass_pole * c * c / total_mass));
    const double x_acc = temp - pole_mass_length * theta_acc * c / total_mass;
    x += tau * x_dot;
    x_dot += tau * x_acc;
    theta += tau * theta_dot;
    theta_dot += tau * theta_acc;
    ++steps;
    done = x < -x_limit || x > x_limit || theta < -theta_limit || theta > theta_limit || steps >= max_steps;
  }
};

// ---- the policy -----------------------------------------------------------------------------------

constexpr Index obs_dim = 4, n_actions = 2;

struct Policy {
  FMat W1, b1, W2, b2;  // W1 hidden x 4, b1 hidden x 1, W2 2 x hidden, b2 2 x 1 (out x in)

  explicit Policy(Index hidden, std::uint64_t seed)
      : W1(hidden, obs_dim), b1(FMat::Zero(hidden, 1)), W2(FMat::Zero(n_actions, hidden)), b2(FMat::Zero(n_actions, 1)) {
    // W1 normal / sqrt(fan in), from the example's own stream (not the ES noise). W2 and the biases
    // start at zero: the initial policy always pushes left (return about 9), so every bit of
    // balancing is learned, whatever the seed.
    const lowrank::RandomStream rng(seed, 0xC0FFEE);
    std::uint64_t k = 0;
    for (Index i = 0; i < W1.rows(); ++i)
      for (Index j = 0; j < W1.cols(); ++j) W1(i, j) = rng.normal(k++) / std::sqrt(float(obs_dim));
  }

  std::vector<es::ParamSpec> specs() const {
    return {{"W1", es::ParamKind::low_rank, W1.rows(), W1.cols()},
            {"b1", es::ParamKind::dense, b1.rows(), 1},
            {"W2", es::ParamKind::low_rank, W2.rows(), W2.cols()},
            {"b2", es::ParamKind::dense, b2.rows(), 1}};
  }
  std::vector<es::ParamRef> refs() {
    return {{lowrank::view(W1)}, {lowrank::view(b1)}, {lowrank::view(W2)}, {lowrank::view(b2)}};
  }
};

int argmax_action(const FMat& logits, Index row) { return logits(row, 1) > logits(row, 0) ? 1 : 0; }

// One generation: every member runs one episode; antithetic partners share the initial state.
// Returns the episode returns, indexed by member.
std::vector<double> run_population(const Policy& policy, const es::Population& pop, const es::Generation& gen,
                                   std::uint64_t seed) {
  const std::int64_t N = gen.population;
  const Index hidden = policy.W1.rows();
  const es::EggrollConfig& cfg = pop.config();
  const es::Perturbation p1 = pop.perturbation(0, gen), p2 = pop.perturbation(2, gen);

  // Per-member biases (dense noise): N x hidden and N x 2, built once per generation.
  FMat b1(N, hidden), b2(N, n_actions);
  for (std::int64_t i = 0; i < N; ++i) {
    pop.perturbed(1, gen, i, lowrank::view(policy.b1), lowrank::row_major(b1.row(i).data(), hidden, 1));
    pop.perturbed(3, gen, i, lowrank::view(policy.b2), lowrank::row_major(b2.row(i).data(), n_actions, 1));
  }

  const lowrank::RandomStream rng(seed, 2 * gen.epoch);  // training episodes of this generation
  std::vector<CartPole> env(static_cast<std::size_t>(N));
  for (std::int64_t i = 0; i < N; ++i)
    env[std::size_t(i)].reset(rng, es::member_noise(i, N, cfg.antithetic).index);

  std::vector<std::int64_t> alive(static_cast<std::size_t>(N));
  for (std::int64_t i = 0; i < N; ++i) alive[std::size_t(i)] = i;
  FMat X(N, obs_dim), H(N, hidden), Y(N, n_actions);
  while (!alive.empty()) {
    const Index n = Index(alive.size());
    for (Index t = 0; t < n; ++t) env[std::size_t(alive[std::size_t(t)])].observe(X.row(t).data());
    auto Xv = lowrank::row_major<const float>(X.data(), n, obs_dim);
    auto Hv = lowrank::row_major(H.data(), n, hidden);
    es::population_forward(Xv, lowrank::weight(std::as_const(policy.W1), Layout::out_in), p1, alive, Hv);
    for (Index t = 0; t < n; ++t)
      H.row(t) = (H.row(t) + b1.row(alive[std::size_t(t)])).array().tanh().matrix();
    es::population_forward(lowrank::row_major<const float>(H.data(), n, hidden),
                           lowrank::weight(std::as_const(policy.W2), Layout::out_in), p2, alive,
                           lowrank::row_major(Y.data(), n, n_actions));
    std::size_t kept = 0;
    for (Index t = 0; t < n; ++t) {
      const std::int64_t member = alive[std::size_t(t)];
      Y.row(t) += b2.row(member);
      CartPole& e = env[std::size_t(member)];
      e.step(argmax_action(Y, t));
      if (!e.done) alive[kept++] = member;
    }
    alive.resize(kept);
  }
  std::vector<double> returns(static_cast<std::size_t>(N));
  for (std::int64_t i = 0; i < N; ++i) returns[std::size_t(i)] = env[std::size_t(i)].steps;
  return returns;
}

// The mean policy (no perturbation) on `episodes` fresh episodes, all in lockstep; the average return.
double evaluate(const Policy& policy, int episodes, const lowrank::RandomStream& rng) {
  const Index hidden = policy.W1.rows();
  std::vector<CartPole> env(static_cast<std::size_t>(episodes));
  for (int e = 0; e < episodes; ++e) env[std::size_t(e)].reset(rng, std::uint64_t(e));
  std::vector<int> alive(static_cast<std::size_t>(episodes));
  for (int e = 0; e < episodes; ++e) alive[std::size_t(e)] = e;
  FMat X(episodes, obs_dim), H(episodes, hidden), Y(episodes, n_actions);
  lowrank::LoraForwardOptions o1, o2;
  o1.bias = policy.b1.data();
  o2.bias = policy.b2.data();
  while (!alive.empty()) {
    const Index n = Index(alive.size());
    for (Index t = 0; t < n; ++t) env[std::size_t(alive[std::size_t(t)])].observe(X.row(t).data());
    lowrank::linear_forward(lowrank::row_major<const float>(X.data(), n, obs_dim),
                            lowrank::weight(std::as_const(policy.W1), Layout::out_in),
                            lowrank::row_major(H.data(), n, hidden), o1);
    H.topRows(n) = H.topRows(n).array().tanh().matrix();
    lowrank::linear_forward(lowrank::row_major<const float>(H.data(), n, hidden),
                            lowrank::weight(std::as_const(policy.W2), Layout::out_in),
                            lowrank::row_major(Y.data(), n, n_actions), o2);
    std::size_t kept = 0;
    for (Index t = 0; t < n; ++t) {
      CartPole& e = env[std::size_t(alive[std::size_t(t)])];
      e.step(argmax_action(Y, t));
      if (!e.done) alive[kept++] = alive[std::size_t(t)];
    }
    alive.resize(kept);
  }
  double total = 0;
  for (const CartPole& e : env) total += e.steps;
  return total / episodes;
}

struct Row {
  int generation;
  double mean, max, eval, seconds;
};

void write_csv(const std::string& path, const std::vector<Row>& rows) {
  std::ofstream f(path);
  f << "generation,mean,max,eval,seconds\n";
  for (const Row& r : rows) f << fmt::format("{},{:.3f},{:.0f},{:.2f},{:.3f}\n", r.generation, r.mean, r.max, r.eval, r.seconds);
}

// Return against generation: population mean, population max, evaluation average; the 475 line.
void write_svg(const std::string& path, const std::vector<Row>& rows) {
  const double w = 720, h = 420, left = 55, right = 150, top = 20, bottom = 45;
  const double xhi = std::max<double>(1, rows.empty() ? 1 : rows.back().generation), ylo = 0, yhi = 500;
  auto px = [&](double g) { return left + (w - left - right) * g / xhi; };
  auto py = [&](double v) { return top + (h - top - bottom) * (yhi - v) / (yhi - ylo); };
  std::ofstream f(path);
  f << fmt::format(R"(<svg xmlns="http://www.w3.org/2000/svg" width="{}" height="{}" font-family="sans-serif" font-size="12">)", w, h)
    << "\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n";
  for (int v = 0; v <= 500; v += 100) {
    f << fmt::format(R"(<line x1="{}" y1="{:.1f}" x2="{}" y2="{:.1f}" stroke="#ddd"/><text x="{}" y="{:.1f}" text-anchor="end">{}</text>)",
                     left, py(v), w - right, py(v), left - 5, py(v) + 4, v)
      << "\n";
  }
  // About 8 ticks at 1, 2 or 5 times a power of ten generations.
  const double raw = xhi / 8, mag = std::pow(10, std::floor(std::log10(std::max(raw, 1.0))));
  const double step = std::max(1.0, mag * (raw <= mag ? 1 : raw <= 2 * mag ? 2 : raw <= 5 * mag ? 5 : 10));
  for (double g = 0; g <= xhi + 1e-9; g += step) {
    f << fmt::format(R"(<line x1="{:.1f}" y1="{}" x2="{:.1f}" y2="{}" stroke="#eee"/><text x="{:.1f}" y="{}" text-anchor="middle">{}</text>)",
                     px(g), top, px(g), h - bottom, px(g), h - bottom + 15, g)
      << "\n";
  }
  f << fmt::format(R"(<line x1="{}" y1="{:.1f}" x2="{}" y2="{:.1f}" stroke="#888" stroke-dasharray="6,4"/>)", left, py(475),
                   w - right, py(475))
    << "\n";
  f << fmt::format(R"(<text x="{}" y="{}" text-anchor="middle">generation (return per episode, CartPole-v1, solved at 475)</text>)",
                   (left + w - right) / 2, h - 8)
    << "\n";
  struct Series {
    const char* name;
    const char* color;
    double Row::*value;
  };
  const Series series[] = {{"population mean", "#1f77b4", &Row::mean},
                           {"population max", "#2ca02c", &Row::max},
                           {"eval (100 ep.)", "#d62728", &Row::eval}};
  int k = 0;
  for (const Series& s : series) {
    f << "<polyline fill=\"none\" stroke-width=\"2\" stroke=\"" << s.color << "\" points=\"";
    for (const Row& r : rows) f << fmt::format("{:.1f},{:.1f} ", px(r.generation), py(r.*s.value));
    f << "\"/>\n";
    f << fmt::format(R"(<text x="{}" y="{}" fill="{}">{}</text>)", w - right + 10, top + 20 + 18 * k, s.color, s.name) << "\n";
    ++k;
  }
  f << "</svg>\n";
}

}  // namespace

int main(int argc, char** argv) {
  std::string csv = "es_cartpole.csv", svg = "es_cartpole.svg";
  bool quick = false;
  std::uint64_t seed = 1;
  // One thread unless --threads: the batches are a few dozen rows of a 32-wide layer, too small to
  // share, and idle OpenMP threads spinning on a busy 2-core machine made generations 10x slower.
  lowrank::set_num_threads(1);
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--csv" && i + 1 < argc) {
      csv = argv[++i];
    } else if (a == "--svg" && i + 1 < argc) {
      svg = argv[++i];
    } else if (a == "--seed" && i + 1 < argc) {
      seed = std::stoull(argv[++i]);
    } else if (a == "--threads" && i + 1 < argc) {
      lowrank::set_num_threads(std::stoi(argv[++i]));
    } else if (a == "--quick") {  // a short smoke run (the test suite runs this in Debug builds)
      quick = true;
    } else {
      fmt::print(stderr, "usage: {} [--quick] [--csv PATH] [--svg PATH] [--seed N] [--threads T]\n", argv[0]);
      return 2;
    }
  }

  // Hyper-parameters (one setting, not tuned per seed).
  const Index hidden = 32;
  es::EggrollConfig cfg;
  cfg.population = quick ? 32 : 64;
  cfg.rank = 1;
  cfg.sigma = 0.1;
  cfg.seed = seed;
  cfg.antithetic = es::Antithetic::interleaved;
  cfg.shaping.shaping = es::Shaping::centered_ranks;
  cfg.scale = es::UpdateScale::gradient;
  cfg.optimizer.kind = es::EsOptimizer::Kind::adam;
  cfg.optimizer.lr = 0.05;
  const int max_generations = quick ? 6 : 300;
  const int eval_episodes = quick ? 20 : 100;
  const double threshold = 475;
  const double time_limit = 120;  // seconds: the issue's "within two minutes"

  Policy policy(hidden, seed);
  es::Population pop(cfg, policy.specs());
  std::vector<es::ParamRef> refs = policy.refs();

  fmt::print("CartPole-v1, policy 4-{}-2 (tanh), EGGROLL rank {}, population {}, sigma {}, Adam lr {}, {} threads\n",
             hidden, cfg.rank, cfg.population, cfg.sigma, cfg.optimizer.lr, lowrank::num_threads());
  fmt::print("{:>5} {:>9} {:>6} {:>12} {:>8}\n", "gen", "mean", "max", "eval(" + std::to_string(eval_episodes) + ")", "seconds");

  const auto t0 = Clock::now();
  std::vector<Row> rows;
  // Evaluation episodes use odd streams, training generations even ones: never the same episodes.
  const double eval0 = evaluate(policy, eval_episodes, lowrank::RandomStream(seed, 1));
  fmt::print("{:>5} {:>9} {:>6} {:>12.2f} {:>8.2f}\n", "init", "", "", eval0, seconds_since(t0));
  int solved_at = -1;
  double best_eval = eval0;
  for (int g = 1; g <= max_generations; ++g) {
    const es::Generation gen = pop.ask();
    const std::vector<double> returns = run_population(policy, pop, gen, seed);
    const es::TellResult told = pop.tell(gen, returns, refs);
    const double eval = evaluate(policy, eval_episodes, lowrank::RandomStream(seed, 2 * gen.epoch + 3));
    best_eval = std::max(best_eval, eval);
    rows.push_back({g, told.mean_fitness, told.max_fitness, eval, seconds_since(t0)});
    fmt::print("{:>5} {:>9.2f} {:>6.0f} {:>12.2f} {:>8.2f}\n", g, told.mean_fitness, told.max_fitness, eval,
               rows.back().seconds);
    std::fflush(stdout);
    if (!quick && eval >= threshold) {
      solved_at = g;
      break;
    }
    if (!quick && rows.back().seconds > time_limit) break;
  }
  const double total = seconds_since(t0);
  write_csv(csv, rows);
  write_svg(svg, rows);
  fmt::print("wrote {} and {}\n", csv, svg);

  if (quick) {
    // Smoke test: the mean policy must have improved on the initial one.
    const bool improved = best_eval > eval0;
    fmt::print("quick run: evaluation return {:.2f} -> best {:.2f} ({}) in {:.2f} s\n", eval0, best_eval,
               improved ? "improved" : "NOT improved", total);
    return improved ? 0 : 1;
  }
  if (solved_at < 0) {
    fmt::print("not solved: no evaluation average >= {} within {} generations / {:.0f} s ({:.1f} s used)\n", threshold,
               rows.size(), time_limit, total);
    return 1;
  }
  fmt::print("solved: average return {:.2f} >= {} over {} evaluation episodes after {} generations, {:.2f} s\n",
             rows.back().eval, threshold, eval_episodes, solved_at, total);
  return 0;
}
