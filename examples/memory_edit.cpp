// Editing a linear associative memory: ROME one fact at a time, MEMIT in one batch, and naive
// gradient fine-tuning, compared on how well they write new facts (efficacy) and how much they
// disturb the old ones (specificity). With Perfusion's gated rank-1 edit when the library has it.
//
//   example_memory_edit [--csv PATH] [--svg PATH] [--quick]
//
// 1. The memory: a weight W (d_out x d_in, fp32, Layout::out_in) that stores key -> value pairs
//    `v = W0 k`. Keys have a non-isotropic distribution, `k = Q diag(s) g + mu` with g standard
//    normal, a decaying spectrum s, a random rotation Q and a mean mu (as MLP keys have), so the key
//    statistics matter. `C = E[k k^T]` is accumulated with `linalg::SecondMoment` over "background"
//    keys and factored once with `linalg::SpdFactor`.
// 2. New facts: keys from the same distribution with random target values v*.
// 3. Methods, for N = 1, 10, 100, 1000 facts (1 to 100 with --quick):
//    - ROME: `edit::rome` on one fact at a time, each computed on the weight already edited by the
//      previous ones and applied through an `edit::EditLog`;
//    - MEMIT: `edit::memit` on all N facts in one batch, `R = V* - W K`;
//    - fine-tuning: plain gradient descent on `0.5 mean_i ||W k_i - v*_i||^2` over the new facts
//      only (hand-written loop, fixed steps and learning rate): it never sees the old keys.
// 4. Metrics: efficacy = mean_i ||W' k_i - v*_i|| / ||v*_i|| over the edited facts (and the
//    fraction below 1e-2); specificity = mean_x ||(W' - W) x|| / ||W x|| over held-out background
//    keys x (not used for C): how much the outputs of stored keys moved.
//
// Prints the tables, writes the CSV (method, facts, efficacy, fraction, specificity, seconds) and an
// SVG plot of specificity against the number of facts, one line per method.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <random>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include <Eigen/Eigenvalues>
#include <Eigen/QR>
#include <fmt/format.h>

#include "lowrank/edit/factored.hpp"
#include "lowrank/edit/log.hpp"
#include "lowrank/edit/memit.hpp"
#include "lowrank/edit/rome.hpp"
#include "lowrank/kernels/lora_forward.hpp"
#include "lowrank/linalg/moments.hpp"
#include "lowrank/linalg/spd.hpp"

#if __has_include("lowrank/edit/perfusion.hpp")
#include "lowrank/edit/perfusion.hpp"
#define MEMORY_EDIT_HAS_PERFUSION 1
#else
#define MEMORY_EDIT_HAS_PERFUSION 0
#endif

using lowrank::Index;
using lowrank::Layout;
using DMat = lowrank::ColMatrix<double>;
using DVec = lowrank::Vector<double>;
using FMat = lowrank::RowMatrix<float>;
namespace edit = lowrank::edit;
namespace linalg = lowrank::linalg;

namespace {

using Clock = std::chrono::steady_clock;
double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

struct Sizes {
  Index d_in, d_out, background, held_out;
  std::vector<Index> facts;
  int gd_steps;
};

// Keys `k = mix g + mu` (columns), `mix = Q diag(s)`, drawn from one seeded generator.
class KeySource {
 public:
  KeySource(Index d, std::uint64_t seed) : rng_(seed), mix_(d, d), mean_(d) {
    const DMat gauss = normal(d, d);
    const DMat Q = Eigen::HouseholderQR<DMat>(gauss).householderQ();  // a random rotation
    for (Index j = 0; j < d; ++j) mix_.col(j) = Q.col(j) * (3.0 * std::pow(1.0 + double(j), -0.6));
    mean_ = 0.25 * normal(d, 1);
  }
  DMat normal(Index rows, Index cols) {
    DMat m(rows, cols);
    for (Index j = 0; j < cols; ++j)
      for (Index i = 0; i < rows; ++i) m(i, j) = gauss_(rng_);
    return m;
  }
  // n keys, one per column (d x n).
  DMat keys(Index n) {
    DMat k = mix_ * normal(mix_.cols(), n);
    k.colwise() += mean_;
    return k;
  }

 private:
  std::mt19937_64 rng_;
  std::normal_distribution<double> gauss_{0.0, 1.0};
  DMat mix_;
  DVec mean_;
};

// Keys stored as columns, fed to SecondMoment as rows (a transposed view, no copy).
lowrank::MatrixView<const double> as_rows(const DMat& keys) {
  return lowrank::MatrixView<const double>(lowrank::view(keys)).transposed();
}

struct Metrics {
  double efficacy = 0, below = 0, specificity = 0, seconds = 0;
};

// The edited weight against the base one, on the first n facts and on the held-out keys.
Metrics evaluate(const FMat& edited, const DMat& base, const DMat& K, const DMat& V, Index n, const DMat& X,
                 const DVec& base_norms) {
  const DMat We = edited.cast<double>();
  Metrics m;
  const DMat err = We * K.leftCols(n) - V.leftCols(n);
  for (Index i = 0; i < n; ++i) {
    const double e = err.col(i).norm() / V.col(i).norm();
    m.efficacy += e;
    m.below += e < 1e-2 ? 1 : 0;
  }
  m.efficacy /= double(n);
  m.below /= double(n);
  const DMat moved = (We - base) * X;
  for (Index j = 0; j < X.cols(); ++j) m.specificity += moved.col(j).norm() / base_norms(j);
  m.specificity /= double(X.cols());
  return m;
}

struct Row {
  std::string method;
  Index facts;
  Metrics m;
};

void write_svg(const std::string& path, const std::vector<Row>& rows, const std::vector<std::string>& methods) {
  const double w = 640, h = 400, left = 60, right = 170, top = 20, bottom = 45;
  double xlo = 1e300, xhi = -1e300, lo = 1e300, hi = -1e300;
  for (const Row& r : rows) {
    xlo = std::min(xlo, std::log10(double(r.facts)));
    xhi = std::max(xhi, std::log10(double(r.facts)));
    const double y = std::log10(std::max(r.m.specificity, 1e-12));
    lo = std::min(lo, y);
    hi = std::max(hi, y);
  }
  lo = std::floor(lo);
  hi = std::max(std::ceil(hi), lo + 1);
  if (xhi <= xlo) xhi = xlo + 1;
  auto px = [&](double facts) { return left + (w - left - right) * (std::log10(facts) - xlo) / (xhi - xlo); };
  auto py = [&](double v) { return top + (h - top - bottom) * (hi - std::log10(std::max(v, 1e-12))) / (hi - lo); };
  std::ofstream f(path);
  f << fmt::format(R"(<svg xmlns="http://www.w3.org/2000/svg" width="{}" height="{}" font-family="sans-serif" font-size="12">)", w, h)
    << "\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n";
  for (double d = lo; d <= hi; d += 1) {
    const double y = py(std::pow(10, d));
    f << fmt::format(R"(<line x1="{}" y1="{:.1f}" x2="{}" y2="{:.1f}" stroke="#ddd"/><text x="{}" y="{:.1f}" text-anchor="end">1e{}</text>)",
                     left, y, w - right, y, left - 5, y + 4, d)
      << "\n";
  }
  for (double d = std::ceil(xlo); d <= xhi; d += 1) {
    const double x = px(std::pow(10, d));
    f << fmt::format(R"(<line x1="{:.1f}" y1="{}" x2="{:.1f}" y2="{}" stroke="#ddd"/><text x="{:.1f}" y="{}" text-anchor="middle">{}</text>)",
                     x, top, x, h - bottom, x, h - bottom + 15, std::pow(10, d))
      << "\n";
  }
  f << fmt::format(R"(<text x="{}" y="{}" text-anchor="middle">facts edited (specificity: relative change of held-out outputs, log-log)</text>)",
                   (left + w - right) / 2, h - 8)
    << "\n";
  const char* colors[] = {"#1f77b4", "#d62728", "#2ca02c", "#9467bd"};
  int k = 0;
  for (const std::string& method : methods) {
    const char* color = colors[k % 4];
    f << "<polyline fill=\"none\" stroke-width=\"2\" stroke=\"" << color << "\" points=\"";
    for (const Row& r : rows)
      if (r.method == method) f << fmt::format("{:.1f},{:.1f} ", px(double(r.facts)), py(r.m.specificity));
    f << "\"/>\n";
    for (const Row& r : rows)
      if (r.method == method)
        f << fmt::format(R"(<circle cx="{:.1f}" cy="{:.1f}" r="3" fill="{}"/>)", px(double(r.facts)), py(r.m.specificity), color) << "\n";
    f << fmt::format(R"(<text x="{}" y="{}" fill="{}">{}</text>)", w - right + 10, top + 20 + 18 * k, color, method) << "\n";
    ++k;
  }
  f << "</svg>\n";
}

double sigmoid(double z) { return 1 / (1 + std::exp(-z)); }

}  // namespace

int main(int argc, char** argv) {
  std::string csv = "memory_edit.csv", svg = "memory_edit.svg";
  bool quick = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--csv" && i + 1 < argc) {
      csv = argv[++i];
    } else if (a == "--svg" && i + 1 < argc) {
      svg = argv[++i];
    } else if (a == "--quick") {  // a short smoke run (the test suite runs this in Debug builds)
      quick = true;
    } else {
      fmt::print(stderr, "usage: {} [--csv PATH] [--svg PATH] [--quick]\n", argv[0]);
      return 2;
    }
  }
  const Sizes sz = quick ? Sizes{128, 64, 2000, 200, {1, 10, 100}, 100} : Sizes{256, 128, 20000, 1000, {1, 10, 100, 1000}, 300};
  const Index n_max = sz.facts.back();
  const auto t_start = Clock::now();

  // --- The memory and its key statistics --------------------------------------------------------
  KeySource source(sz.d_in, 2026);
  const DMat W0 = source.normal(sz.d_out, sz.d_in) / std::sqrt(double(sz.d_in));
  const FMat W_base = W0.cast<float>();  // stores k -> W0 k (to fp32 rounding)
  const DMat W_base_d = W_base.cast<double>();

  linalg::SecondMoment stats(sz.d_in);
  for (Index done = 0; done < sz.background; done += 1000) {  // streamed in chunks, as from a dataset
    const DMat chunk = source.keys(std::min<Index>(1000, sz.background - done));
    stats.add(as_rows(chunk));
  }
  const DMat C = stats.moment();
  const linalg::SpdFactor factor(C);
  const DVec eig = Eigen::SelfAdjointEigenSolver<DMat>(C, Eigen::EigenvaluesOnly).eigenvalues();

  const DMat X = source.keys(sz.held_out);  // held-out stored keys (not in C)
  const DMat base_out = W_base_d * X;
  DVec base_norms(X.cols());
  for (Index j = 0; j < X.cols(); ++j) base_norms(j) = base_out.col(j).norm();
  const double value_rms = std::sqrt(base_out.squaredNorm() / double(base_out.size()));

  const DMat K = source.keys(n_max);                  // new facts: keys from the same distribution
  const DMat V = value_rms * source.normal(sz.d_out, n_max);  // with random targets of typical size

  fmt::print("memory: W {} x {} fp32 (Layout::out_in); keys k = Q diag(s) g + mu, s_j = 3 (1 + j)^-0.6\n", sz.d_out, sz.d_in);
  fmt::print("C = E[k k^T] from {} background keys (SecondMoment), eigenvalues {:.3g} .. {:.3g} (condition {:.3g}); "
             "SpdFactor extra ridge {:.3g}\n",
             stats.count(), eig(0), eig(eig.size() - 1), eig(eig.size() - 1) / eig(0), factor.extra_ridge());
  fmt::print("{} held-out keys for specificity; up to {} new facts with random targets (rms {:.3g} per entry)\n\n", X.cols(),
             n_max, value_rms);

  std::vector<Row> rows;
  auto wanted = [&](Index n) { return std::find(sz.facts.begin(), sz.facts.end(), n) != sz.facts.end(); };

  // --- ROME, one fact at a time on the edited weight ----------------------------------------------
  bool restored_exactly = false;
  double revert_drift = 0;
  {
    FMat W = W_base;
    edit::EditLogOptions log_options;
    log_options.snapshot = true;  // restore() puts back the exact bits
    edit::EditLog<float> log(lowrank::weight(W, Layout::out_in), log_options);
    const auto t0 = Clock::now();
    double eval_seconds = 0;
    for (Index i = 0; i < n_max; ++i) {
      edit::FactoredEdit e = edit::rome(K.col(i), K.col(i), V.col(i), lowrank::weight(std::as_const(W), Layout::out_in),
                                        nullptr, factor);
      log.apply(std::move(e), fmt::format("fact {}", i));
      if (wanted(i + 1)) {
        const auto te = Clock::now();
        Metrics m = evaluate(W, W_base_d, K, V, i + 1, X, base_norms);
        eval_seconds += seconds_since(te);
        m.seconds = seconds_since(t0) - eval_seconds;
        rows.push_back({"ROME (sequential)", i + 1, m});
      }
    }
    // Undo: subtracting the edits in reverse order leaves rounding; the snapshot restores the bits.
    log.revert_all();
    revert_drift = (W.cast<double>() - W_base_d).cwiseAbs().maxCoeff() / W_base_d.cwiseAbs().maxCoeff();
    log.restore();
    restored_exactly = (W.array() == W_base.array()).all();
  }

  // --- MEMIT, all N facts in one batch ------------------------------------------------------------
  // MEMIT minimises lambda tr(dW C dW^T) + sum_i ||W' k_i - v*_i||^2: lambda weighs the mean squared
  // disturbance of a stored key against the squared error of each new fact. A single fact keeps
  // the fraction lambda / (lambda + k^T C^-1 k) ~ lambda / (lambda + d_in) of its residual, so
  // lambda = 0.5 leaves about 2e-3 (4e-3 with --quick). MEMIT's own values (15000-20000 on a
  // normalised C) assume keys far outside the statistics; here every key is typical. The sweep
  // below shows the trade-off.
  const double lambda = 0.5;
  auto run_memit = [&](Index n, double lam) {
    FMat W = W_base;
    const auto t0 = Clock::now();
    const DMat R = V.leftCols(n) - W_base_d * K.leftCols(n);
    const edit::FactoredEdit e = edit::memit(K.leftCols(n), R, factor, lam);
    edit::apply(lowrank::weight(W, Layout::out_in), e);
    const double secs = seconds_since(t0);
    Metrics m = evaluate(W, W_base_d, K, V, n, X, base_norms);
    m.seconds = secs;
    return m;
  };
  for (Index n : sz.facts) rows.push_back({"MEMIT (one batch)", n, run_memit(n, lambda)});

  // --- Naive fine-tuning: gradient descent on the new facts only ----------------------------------
  // Loss 0.5 mean_i ||W k_i - v*_i||^2, gradient (W K - V) K^T / N = W H - B with H = K K^T / N and
  // B = V K^T / N (the same gradient, cheaper when N > d_in). The step 1 / tr(C) = 1 / E||k||^2 is
  // stable for any N (the largest eigenvalue of H is at most its trace, about tr(C)).
  const double lr = 1.0 / C.trace();
  for (Index n : sz.facts) {
    const auto t0 = Clock::now();
    DMat Wd = W_base_d;
    const auto Kn = K.leftCols(n);
    const auto Vn = V.leftCols(n);
    const double inv_n = 1.0 / double(n);
    if (n > sz.d_in) {
      const DMat H = Kn * Kn.transpose() * inv_n, B = Vn * Kn.transpose() * inv_n;
      for (int step = 0; step < sz.gd_steps; ++step) Wd -= lr * (Wd * H - B);
    } else {
      for (int step = 0; step < sz.gd_steps; ++step) {
        const DMat residual = Wd * Kn - Vn;  // d_out x n
        Wd -= (lr * inv_n) * residual * Kn.transpose();
      }
    }
    const FMat W = Wd.cast<float>();
    const double secs = seconds_since(t0);
    Metrics m = evaluate(W, W_base_d, K, V, n, X, base_norms);
    m.seconds = secs;
    rows.push_back({"fine-tune (GD)", n, m});
  }

  const std::vector<std::string> methods = {"ROME (sequential)", "MEMIT (one batch)", "fine-tune (GD)"};
  fmt::print("MEMIT: lambda = {} on C = E[k k^T]; fine-tune: {} gradient-descent steps, lr = 1/tr(C) = {:.3g}\n", lambda,
             sz.gd_steps, lr);
  fmt::print("efficacy = mean ||W' k - v*|| / ||v*|| over the edited facts; specificity = mean ||(W' - W) x|| / ||W x|| "
             "over {} held-out keys;\nseconds: time of the edit (ROME: cumulative over the sequence; fine-tune: all steps)\n\n",
             X.cols());
  fmt::print("{:<18} {:>6} {:>10} {:>8} {:>12} {:>9}\n", "method", "facts", "efficacy", "<1e-2", "specificity", "seconds");
  for (const std::string& method : methods)
    for (const Row& r : rows)
      if (r.method == method)
        fmt::print("{:<18} {:>6} {:>10.2e} {:>7.1f}% {:>12.2e} {:>9.4f}\n", r.method, r.facts, r.m.efficacy, 100 * r.m.below,
                   r.m.specificity, r.m.seconds);
  fmt::print("\nfine-tuning fits the new facts only and ignores the old keys, so it moves their outputs along the\n"
             "directions of the new keys (which every key shares); ROME and MEMIT change W only along C^-1 k,\n"
             "which weighs the directions the stored keys vary least in. With more facts than key\n"
             "dimensions ({}) no method can write them all without overwriting the memory.\n",
             sz.d_in);
  fmt::print("ROME log: {} edits reverted in reverse order leave max |W - W0| / max |W0| = {:.2e}; the snapshot restores "
             "W {}\n",
             n_max, revert_drift, restored_exactly ? "bit-exactly" : "NOT bit-exactly");

  // --- MEMIT's lambda: efficacy against specificity ------------------------------------------------
  const Index n_sweep = quick ? 10 : 100;
  fmt::print("\nMEMIT lambda sweep, {} facts in one batch:\n{:>10} {:>10} {:>8} {:>12}\n", n_sweep, "lambda", "efficacy", "<1e-2",
             "specificity");
  std::vector<double> lambdas = {1e-3, 1e-2, 0.1, 0.5, 1, 10, 100, 1000};
  lambdas.push_back(double(stats.count()));  // lambda C = sum of k k^T: plain least squares over all pairs
  for (double lam : lambdas) {
    const Metrics m = run_memit(n_sweep, lam);
    fmt::print("{:>10.3g} {:>10.2e} {:>7.1f}% {:>12.2e}\n", lam, m.efficacy, 100 * m.below, m.specificity);
  }
  fmt::print("(lambda = {} is the least-squares fit of all {} stored pairs plus the new ones, each weighted 1)\n",
             stats.count(), stats.count());

#if MEMORY_EDIT_HAS_PERFUSION
  // --- Perfusion: a gated rank-1 edit for one concept ---------------------------------------------
  {
    const DMat concept_key = source.keys(1);
    const DMat concept_out = value_rms * source.normal(sz.d_out, 1);
    std::vector<edit::PerfusionConcept> targets(1);
    targets[0].i_star = concept_key.col(0);
    targets[0].o_star = concept_out.col(0);
    edit::Perfusion perfusion(lowrank::weight(W_base, Layout::out_in), factor,
                              std::span<const edit::PerfusionConcept>(targets));
    const FMat Xf = X.transpose().cast<float>();  // held-out keys as rows
    FMat Y0(Xf.rows(), sz.d_out), Y(Xf.rows(), sz.d_out);
    lowrank::linear_forward(lowrank::view(std::as_const(Xf)), lowrank::weight(W_base, Layout::out_in), lowrank::view(Y0));
    auto leak_of = [&](const FMat& out) {
      double leak = 0;
      for (Index t = 0; t < out.rows(); ++t) leak += (out.row(t) - Y0.row(t)).cast<double>().norm() / Y0.row(t).cast<double>().norm();
      return leak / double(out.rows());
    };
    std::vector<double> sims(static_cast<std::size_t>(X.cols()));
    for (Index j = 0; j < X.cols(); ++j) sims[static_cast<std::size_t>(j)] = perfusion.similarity(X.col(j))(0);
    double mean_abs_s = 0;
    for (double s : sims) mean_abs_s += std::abs(s);
    mean_abs_s /= double(sims.size());

    fmt::print("\nPerfusion, one concept (a new key i*, a random o*): out(e) = W (e - s(e) i*) + sigmoid((s(e) - beta) / tau) o*,\n"
               "s(e) = e^T C^-1 i* / (i*^T C^-1 i*); held-out keys have mean |s| = {:.3f}\n",
               mean_abs_s);
    fmt::print("{:>5} {:>5} {:>10} {:>13} {:>12} {:>12}\n", "beta", "tau", "gate(i*)", "|out-o*|/|o*|", "mean gate", "leak");
    for (double beta : {0.5, 0.6, 0.7, 0.75, 0.8}) {
      for (double tau : {0.05, 0.1, 0.15}) {
        perfusion.set_gate(0, beta, tau);
        const DVec at_key = perfusion.output(lowrank::weight(W_base, Layout::out_in), targets[0].i_star);
        const double err = (at_key - targets[0].o_star).norm() / targets[0].o_star.norm();
        double mean_gate = 0;
        for (double s : sims) mean_gate += sigmoid((s - beta) / tau);
        mean_gate /= double(sims.size());
        perfusion.forward(lowrank::view(std::as_const(Xf)), lowrank::weight(W_base, Layout::out_in), lowrank::view(Y));
        fmt::print("{:>5.2f} {:>5.2f} {:>10.4f} {:>13.2e} {:>12.2e} {:>12.2e}\n", beta, tau, sigmoid((1 - beta) / tau), err,
                   mean_gate, leak_of(Y));
      }
    }
    // The same concept as a ROME edit (the gate replaced by s(e)): exact at i*, linear leak.
    FMat Wr = W_base;
    edit::apply(lowrank::weight(Wr, Layout::out_in),
                edit::rome(targets[0].i_star, targets[0].i_star, targets[0].o_star,
                           lowrank::weight(W_base, Layout::out_in), nullptr, factor));
    const Metrics rm = evaluate(Wr, W_base_d, concept_key, concept_out, 1, X, base_norms);
    fmt::print("{:>11} {:>10} {:>13.2e} {:>12} {:>12.2e}\n", "ROME", "(linear)", rm.efficacy, "-", rm.specificity);
    fmt::print("out(i*) = gate(i*) o*, so the error at the key is 1 - gate; the leak on held-out keys is mostly the\n"
               "key-locking term -s(e) W i* (the gate there is ~0), the same order as ROME's s(e) (o* - W i*).\n");
  }
#else
  fmt::print("\n(Perfusion: lowrank/edit/perfusion.hpp is not available in this build; table skipped)\n");
#endif

  // --- Outputs ----------------------------------------------------------------------------------------
  {
    std::ofstream f(csv);
    f << "method,facts,efficacy,fraction_below_1e-2,specificity,seconds\n";
    for (const Row& r : rows)
      f << fmt::format("{},{},{:.6e},{:.4f},{:.6e},{:.6e}\n", r.method, r.facts, r.m.efficacy, r.m.below, r.m.specificity,
                       r.m.seconds);
    if (!f) {
      fmt::print(stderr, "cannot write {}\n", csv);
      return 1;
    }
  }
  write_svg(svg, rows, methods);
  fmt::print("\nwrote {} and {} ({:.2f} s in all)\n", csv, svg, seconds_since(t_start));

  // Checks: a single ROME edit is exact, a single MEMIT edit nearly so, the log restores the bits.
  for (const Row& r : rows) {
    if (!std::isfinite(r.m.efficacy) || !std::isfinite(r.m.specificity)) {
      fmt::print(stderr, "{} with {} facts: non-finite metrics\n", r.method, r.facts);
      return 1;
    }
    if (r.facts == 1 && r.method == methods[0] && !(r.m.efficacy < 1e-4)) {
      fmt::print(stderr, "ROME did not write a single fact: efficacy {:.2e}\n", r.m.efficacy);
      return 1;
    }
    if (r.facts == 1 && r.method == methods[1] && !(r.m.efficacy < 1e-2)) {
      fmt::print(stderr, "MEMIT did not write a single fact: efficacy {:.2e}\n", r.m.efficacy);
      return 1;
    }
  }
  // ROME's update is the one of least mean squared disturbance tr(dW C dW^T) over the key
  // distribution; fine-tuning one fact converges to the least Frobenius-norm one.
  const auto spec_at_one = [&](const std::string& method) {
    for (const Row& r : rows)
      if (r.method == method && r.facts == 1) return r.m.specificity;
    return 0.0;
  };
  if (!(spec_at_one(methods[0]) < spec_at_one(methods[2]))) {
    fmt::print(stderr, "one ROME edit disturbed the held-out keys more than fine-tuning one fact\n");
    return 1;
  }
  if (!restored_exactly) {
    fmt::print(stderr, "EditLog::restore did not restore the weight bit-exactly\n");
    return 1;
  }
  return 0;
}
