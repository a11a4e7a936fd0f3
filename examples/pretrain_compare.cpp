// Pre-training one small character-level language model from scratch with six optimizers, at
// the same number of steps and on the same data order: full-rank AdamW, LoRA (frozen random W plus
// a trainable B A), ReLoRA (LoRA merged and restarted every cycle, Adam moments pruned, jagged
// cosine schedule), GaLore, FRUGAL and Online Subspace Descent.
//
//   example_pretrain_compare [--out DIR] [--text PATH] [--steps N] [--quick] [--threads N]
//                            [--only METHOD] [--lr METHOD=VALUE]...
//
// 1. Data: examples/data/alice29.txt (Alice's Adventures in Wonderland, public domain; see
//    examples/data/README.md), one token per character (73 symbols, newline included). The
//    first 90% of the text is the training set, the last 10% (from late in chapter XI to the
//    end) the held-out set. A window is `ctx` characters and the character that follows; the
//    training windows are shuffled once with a fixed Philox key, and every method reads the same
//    batches in the same order.
// 2. Model (fp32, gradients written out by hand and checked by finite differences in fp64 at
//    start-up): the embeddings of the `ctx` previous characters concatenated (16 x 32 = 512), then
//    `h1 = tanh(W1 x + b1)` (W1: 256 x 512), `h2 = relu(W2 h1 + b2)` (W2: 256 x 256),
//    `logits = Wo h2 + bo` (Wo: 72 x 256), softmax cross-entropy. W1 and W2 are the "projected"
//    matrices that each method treats its own way; the embedding, the biases and the output
//    layer get plain AdamW in every method, as GaLore's recipe does (it projects only the attention
//    and MLP matrices).
// 3. Methods on W1 and W2 (rank 64, a quarter of the width, for every low-rank method):
//    - AdamW: `optim::adam_step` on the full matrices;
//    - LoRA: W frozen at its random init, `W + s B A` with A kaiming-uniform and B = 0
//      (`adapt::init_default`), s = alpha / r = 0.25 (ReLoRA's default ratio), AdamW on A and B;
//    - ReLoRA: the same adapter (`adapt::relora_wrap`), merged into W and restarted every cycle
//      (`adapt::merge_and_reinit` at `optim::relora_merge_due`), A's and B's moments randomly
//      pruned to 0.1% (`optim::prune_moments`, the reference default), the learning rate on
//      `optim::jagged_cosine` (a short linear re-warmup after each restart); no full-rank warm
//      start, as in GaLore's Table 2;
//    - GaLore: `optim::SubspaceOptimizer` with `optim::galore_config(64)` (exact SVD every T
//      steps, scale 0.25, state kept across refreshes);
//    - FRUGAL: `optim::frugal_config(rows, cols, 0.25)` (the same rank, Adam in the subspace with
//      its state reset at each refresh, sign-SGD on the orthogonal complement);
//    - Online Subspace Descent: `optim::online_subspace_descent_config(64)` (GaLore's first SVD,
//      then the basis moves every step by AdamW on the online-PCA loss, lr_P = 1/T).
//    Everything but ReLoRA uses cosine with 10% linear warmup down to 10% of the peak
//    (`optim::cosine_with_warmup`); one peak learning rate per method, for all its parameters.
// 4. Output: a table (final training loss on a fixed sample of training windows, held-out loss on
//    every held-out window, optimizer-state bytes of W1/W2 and in total, training wall time without
//    the evaluations), DIR/pretrain_compare.csv (step, method, train loss = mean batch loss since
//    the previous point, eval loss on a fixed held-out sample) and DIR/pretrain_compare.svg (those
//    curves, drawn by this program).
//
// --quick: a smaller model (ctx 8, embedding 16, hidden 64, rank 16) for 60 steps, for the test
// suite. Both modes run the gradient check, and check that each method lowered the held-out loss
// and that a ReLoRA merge leaves the model's function unchanged.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iterator>
#include <map>
#include <optional>
#include <span>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include <Eigen/Core>
#include <fmt/format.h>

#include "lowrank/adapt/init.hpp"
#include "lowrank/adapt/lora.hpp"
#include "lowrank/adapt/relora.hpp"
#include "lowrank/core/philox.hpp"
#include "lowrank/core/threading.hpp"
#include "lowrank/core/view.hpp"
#include "lowrank/optim/adam.hpp"
#include "lowrank/optim/prune.hpp"
#include "lowrank/optim/schedule.hpp"
#include "lowrank/optim/subspace.hpp"

#ifndef LOWRANK_EXAMPLE_TEXT
#define LOWRANK_EXAMPLE_TEXT "examples/data/alice29.txt"
#endif

using lowrank::Index;
namespace adapt = lowrank::adapt;
namespace optim = lowrank::optim;

namespace {

using Clock = std::chrono::steady_clock;
double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

template <class T>
using Mat = lowrank::RowMatrix<T>;
template <class T>
using Vec = lowrank::Vector<T>;

// ---------------------------------------------------------------------------------------------
// The model

struct Dims {
  Index ctx = 16, emb = 32, hidden = 256, vocab = 0, rank = 64;
  [[nodiscard]] Index in() const { return ctx * emb; }
};

// Parameters, and gradients of the same shapes. A1/B1, A2/B2: the LoRA factors of W1 and W2
// (empty for the methods without adapters); the layer then computes `x (W + s B A)^T`.
template <class T>
struct Params {
  Mat<T> E, W1, W2, Wo;
  Vec<T> b1, b2, bo;
  Mat<T> A1, B1, A2, B2;
};

template <class T>
struct Work {
  Mat<T> X, H1, H2, P, U1, U2, dH, dZ, dB, dX;
};

// Mean cross-entropy of the windows `starts` (context text[s, s + ctx), target text[s + ctx]).
// With `g`, also the gradients: of W1 and W2 (`lora == false`) or of A1, B1, A2, B2 (`lora`,
// W1 and W2 frozen), and of E, the biases and Wo in both cases. Layer `z = x W^T + s (x A^T) B^T`
// with upstream dZ: dB = s dZ^T (x A^T), dA = s (dZ B)^T x, dx = dZ W + s (dZ B) A.
template <class T>
double forward_backward(const Params<T>& p, const Dims& d, std::span<const int> text, std::span<const Index> starts,
                        bool lora, double scaling, Params<T>* g, Work<T>& w) {
  const Index n = static_cast<Index>(starts.size());
  const T s = static_cast<T>(scaling);
  w.X.resize(n, d.in());
  for (Index b = 0; b < n; ++b)
    for (Index t = 0; t < d.ctx; ++t) w.X.row(b).segment(t * d.emb, d.emb) = p.E.row(text[starts[b] + t]);
  w.H1.noalias() = w.X * p.W1.transpose();
  if (lora) {
    w.U1.noalias() = w.X * p.A1.transpose();
    w.H1.noalias() += s * w.U1 * p.B1.transpose();
  }
  w.H1.rowwise() += p.b1.transpose();
  w.H1 = w.H1.array().tanh().matrix();
  w.H2.noalias() = w.H1 * p.W2.transpose();
  if (lora) {
    w.U2.noalias() = w.H1 * p.A2.transpose();
    w.H2.noalias() += s * w.U2 * p.B2.transpose();
  }
  w.H2.rowwise() += p.b2.transpose();
  w.H2 = w.H2.cwiseMax(T(0));
  w.P.noalias() = w.H2 * p.Wo.transpose();
  w.P.rowwise() += p.bo.transpose();
  double loss = 0;
  for (Index b = 0; b < n; ++b) {
    auto row = w.P.row(b);
    const T mx = row.maxCoeff();
    row = (row.array() - mx).exp().matrix();
    const T sum = row.sum();
    const int target = text[starts[b] + d.ctx];
    loss += std::log(static_cast<double>(sum)) - std::log(static_cast<double>(row(target)));
    row /= sum;  // softmax
  }
  loss /= static_cast<double>(n);
  if (g == nullptr) return loss;

  for (Index b = 0; b < n; ++b) w.P(b, text[starts[b] + d.ctx]) -= T(1);
  w.P /= static_cast<T>(n);  // dL/dlogits
  g->Wo.noalias() = w.P.transpose() * w.H2;
  g->bo = w.P.colwise().sum().transpose();
  w.dZ.noalias() = w.P * p.Wo;
  w.dZ = w.dZ.cwiseProduct((w.H2.array() > T(0)).template cast<T>().matrix());  // dL/dz2
  g->b2 = w.dZ.colwise().sum().transpose();
  w.dH.noalias() = w.dZ * p.W2;
  if (lora) {
    g->B2.noalias() = s * w.dZ.transpose() * w.U2;
    w.dB.noalias() = w.dZ * p.B2;
    g->A2.noalias() = s * w.dB.transpose() * w.H1;
    w.dH.noalias() += s * w.dB * p.A2;
  } else {
    g->W2.noalias() = w.dZ.transpose() * w.H1;
  }
  w.dZ = w.dH.cwiseProduct((T(1) - w.H1.array().square()).matrix());  // dL/dz1
  g->b1 = w.dZ.colwise().sum().transpose();
  w.dX.noalias() = w.dZ * p.W1;
  if (lora) {
    g->B1.noalias() = s * w.dZ.transpose() * w.U1;
    w.dB.noalias() = w.dZ * p.B1;
    g->A1.noalias() = s * w.dB.transpose() * w.X;
    w.dX.noalias() += s * w.dB * p.A1;
  } else {
    g->W1.noalias() = w.dZ.transpose() * w.X;
  }
  g->E.setZero(p.E.rows(), p.E.cols());
  for (Index b = 0; b < n; ++b)
    for (Index t = 0; t < d.ctx; ++t) g->E.row(text[starts[b] + t]) += w.dX.row(b).segment(t * d.emb, d.emb);
  return loss;
}

// Mean loss over many windows, in chunks.
double evaluate(const Params<float>& p, const Dims& d, std::span<const int> text, std::span<const Index> starts,
                bool lora, double scaling, Work<float>& w) {
  double total = 0;
  const std::size_t chunk = 512;
  for (std::size_t first = 0; first < starts.size(); first += chunk) {
    const auto part = starts.subspan(first, std::min(chunk, starts.size() - first));
    total += forward_backward<float>(p, d, text, part, lora, scaling, nullptr, w) * static_cast<double>(part.size());
  }
  return total / static_cast<double>(starts.size());
}

template <class T>
Mat<T> uniform_matrix(Index rows, Index cols, double bound, std::uint64_t stream) {
  const lowrank::RandomStream rng(20260, stream);
  Mat<T> m(rows, cols);
  for (Index i = 0; i < m.size(); ++i)
    m.data()[i] = static_cast<T>(bound * (2.0 * rng.uniform(static_cast<std::uint64_t>(i)) - 1.0));
  return m;
}

// torch's defaults: nn.Embedding N(0, 1); nn.Linear weight and bias U(-1/sqrt(in), 1/sqrt(in)).
Params<float> init_model(const Dims& d) {
  Params<float> p;
  const lowrank::RandomStream rng(20260, 0);
  p.E.resize(d.vocab, d.emb);
  for (Index i = 0; i < p.E.size(); ++i) p.E.data()[i] = rng.normal(static_cast<std::uint64_t>(i));
  const auto linear = [&](Mat<float>& W, Vec<float>& b, Index out, Index in, std::uint64_t stream) {
    const double bound = 1.0 / std::sqrt(static_cast<double>(in));
    W = uniform_matrix<float>(out, in, bound, stream);
    b = uniform_matrix<float>(out, 1, bound, stream + 1);
  };
  linear(p.W1, p.b1, d.hidden, d.in(), 1);
  linear(p.W2, p.b2, d.hidden, d.hidden, 3);
  linear(p.Wo, p.bo, d.vocab, d.hidden, 5);
  return p;
}

// ---------------------------------------------------------------------------------------------
// Gradient check: central differences in fp64 on a tiny model, dense and LoRA paths.

double gradient_check() {
  Dims d{.ctx = 3, .emb = 4, .hidden = 6, .vocab = 7, .rank = 2};
  const auto rnd = [](Index r, Index c, std::uint64_t stream) -> Mat<double> {
    return uniform_matrix<double>(r, c, 0.8, 100 + stream);
  };
  Params<double> p;
  p.E = rnd(d.vocab, d.emb, 0);
  p.W1 = rnd(d.hidden, d.in(), 1);
  p.W2 = rnd(d.hidden, d.hidden, 2);
  p.Wo = rnd(d.vocab, d.hidden, 3);
  p.b1 = rnd(d.hidden, 1, 4);
  p.b2 = rnd(d.hidden, 1, 5);
  p.bo = rnd(d.vocab, 1, 6);
  p.A1 = rnd(d.rank, d.in(), 7);
  p.B1 = rnd(d.hidden, d.rank, 8);  // non-zero, so that dA is tested too
  p.A2 = rnd(d.rank, d.hidden, 9);
  p.B2 = rnd(d.hidden, d.rank, 10);
  std::vector<int> text(40);
  const lowrank::RandomStream rng(7, 7);
  for (std::size_t i = 0; i < text.size(); ++i) text[i] = static_cast<int>(rng.uniform(i) * float(d.vocab)) % int(d.vocab);
  const std::vector<Index> starts = {0, 5, 11, 17, 23, 30, 36};
  Work<double> w;
  double worst = 0;
  for (bool lora : {false, true}) {
    const double s = 0.7;
    Params<double> g = p;
    forward_backward<double>(p, d, text, starts, lora, s, &g, w);
    std::vector<std::pair<Mat<double>*, const Mat<double>*>> mats = {{&p.E, &g.E}, {&p.Wo, &g.Wo}};
    if (lora) {
      mats.emplace_back(&p.A1, &g.A1);
      mats.emplace_back(&p.B1, &g.B1);
      mats.emplace_back(&p.A2, &g.A2);
      mats.emplace_back(&p.B2, &g.B2);
    } else {
      mats.emplace_back(&p.W1, &g.W1);
      mats.emplace_back(&p.W2, &g.W2);
    }
    std::vector<std::pair<Vec<double>*, const Vec<double>*>> vecs = {{&p.b1, &g.b1}, {&p.b2, &g.b2}, {&p.bo, &g.bo}};
    const auto check = [&](double* x, const double* grad, Index size) {
      double scale = 1e-12, err = 0;
      for (Index i = 0; i < size; ++i) {
        const double keep = x[i], h = 1e-5;
        x[i] = keep + h;
        const double up = forward_backward<double>(p, d, text, starts, lora, s, nullptr, w);
        x[i] = keep - h;
        const double down = forward_backward<double>(p, d, text, starts, lora, s, nullptr, w);
        x[i] = keep;
        const double numeric = (up - down) / (2 * h);
        err = std::max(err, std::abs(numeric - grad[i]));
        scale = std::max(scale, std::abs(numeric));
      }
      worst = std::max(worst, err / scale);
    };
    for (auto [x, gx] : mats) check(x->data(), gx->data(), x->size());
    for (auto [x, gx] : vecs) check(x->data(), gx->data(), x->size());
  }
  return worst;
}

// ---------------------------------------------------------------------------------------------
// Training

enum class Kind { adamw, lora, relora, galore, frugal, osd };

struct Method {
  std::string name;
  Kind kind;
  double lr;
};

struct Point {
  int step;
  double train, eval;
};

struct Result {
  std::string name;
  double lr = 0;
  double train = 0, eval = 0;
  std::size_t projected_bytes = 0, total_bytes = 0;
  double seconds = 0;
  std::string note;
  std::vector<Point> curve;
  double first_eval = 0;
  double merge_change = 0;  // ReLoRA: |loss after merge - loss before| on a fixed batch, worst case
};

struct Setup {
  Dims dims;
  std::vector<int> text;
  std::vector<Index> order;       // training windows, shuffled once
  std::vector<Index> eval_small;  // held-out sample for the curves
  std::vector<Index> eval_all;    // every held-out window
  std::vector<Index> train_sample;
  int steps = 1600;
  Index batch = 64;
  int warmup = 160;
  int eval_every = 80;
  std::int64_t gap = 200;          // GaLore/FRUGAL refresh period T (and OSD's 1/lr_P)
  std::int64_t relora_cycle = 400;  // ReLoRA merge/restart period
  std::int64_t relora_warmup = 40;  // ReLoRA re-warmup after each restart
  double lora_alpha = 16;          // s = alpha / r = 0.25 at r = 64
};

struct Plain {  // AdamW on one tensor
  optim::AdamState state;
};

const optim::AdamConfig kAdam{0.9, 0.999, 1e-8, optim::EpsConvention::torch, 0.0, optim::DecayPlacement::before_update, true};

template <class M>
void adamw(M& x, const M& g, optim::AdamState& st, double lr) {
  optim::adam_step(lowrank::view(x), lowrank::view(g), st, kAdam, lr);
}

Result train(const Method& method, const Setup& su) {
  const Dims& d = su.dims;
  Result res;
  res.name = method.name;
  res.lr = method.lr;
  Params<float> p = init_model(d);  // the same initial weights for every method
  Params<float> g = p;
  Work<float> w;
  const bool lora = method.kind == Kind::lora || method.kind == Kind::relora;
  double scaling = 0;
  if (lora) {
    const adapt::ReloraConfig rc{.rank = d.rank, .alpha = su.lora_alpha};
    auto a1 = adapt::relora_wrap<float>(d.hidden, d.in(), lowrank::Layout::out_in, rc, 11, 1);
    auto a2 = adapt::relora_wrap<float>(d.hidden, d.hidden, lowrank::Layout::out_in, rc, 11, 2);
    scaling = a1.scaling();
    p.A1 = std::move(a1.A);
    p.B1 = std::move(a1.B);
    p.A2 = std::move(a2.A);
    p.B2 = std::move(a2.B);
  }
  // AdamW states: E, Wo, b1, b2, bo in every method; W1, W2 (adamw) or A1, B1, A2, B2 (LoRA).
  optim::AdamState sE, sWo, sb1, sb2, sbo, s1, s2, sA1, sB1, sA2, sB2;
  std::optional<optim::SubspaceOptimizer> o1, o2;
  if (method.kind == Kind::galore || method.kind == Kind::frugal || method.kind == Kind::osd) {
    const auto config = [&](Index rows, Index cols) {
      optim::SubspaceConfig c;
      if (method.kind == Kind::galore) c = optim::galore_config(d.rank, optim::BasisMethod::exact_svd);
      if (method.kind == Kind::frugal) c = optim::frugal_config(rows, cols, 0.25, optim::BasisMethod::exact_svd);
      if (method.kind == Kind::osd) c = optim::online_subspace_descent_config(d.rank);
      c.update_gap = su.gap;
      return c;
    };
    o1.emplace(d.hidden, d.in(), config(d.hidden, d.in()));
    o2.emplace(d.hidden, d.hidden, config(d.hidden, d.hidden));
  }
  const optim::JaggedCosine jagged{.num_training_steps = su.steps,
                                   .first_warmup_steps = su.warmup,
                                   .restart_warmup_steps = su.relora_warmup,
                                   .cycle_length = su.relora_cycle,
                                   .min_lr_ratio = 0.1,
                                   .adjust_step = 0};

  std::vector<Index> batch(static_cast<std::size_t>(su.batch));
  const std::size_t n_order = su.order.size();
  double train_sum = 0;
  int train_count = 0, merges = 0;
  res.first_eval = evaluate(p, d, su.text, su.eval_small, lora, scaling, w);
  res.curve.push_back({0, std::log(double(d.vocab)), res.first_eval});
  double seconds = 0;
  Clock::time_point t0 = Clock::now();
  for (int step = 0; step < su.steps; ++step) {
    // As the reference (`torchrun_main.py`): the first merge comes after the first full cycle.
    if (method.kind == Kind::relora && step > su.relora_cycle && optim::relora_merge_due(step, 0, su.relora_cycle)) {
      // Merge into W and restart the adapters (the layer's function is unchanged), then prune the
      // adapters' Adam moments; the probe measures the change of the loss on one batch.
      const std::span<const Index> probe(su.eval_small.data(), std::min<std::size_t>(256, su.eval_small.size()));
      const double before = forward_backward<float>(p, d, su.text, probe, true, scaling, nullptr, w);
      int layer = 0;
      for (auto [W, A, B] : {std::tuple{&p.W1, &p.A1, &p.B1}, std::tuple{&p.W2, &p.A2, &p.B2}}) {
        adapt::LoraAdapter<float> a;
        a.A = std::move(*A);
        a.B = std::move(*B);
        a.alpha = su.lora_alpha;
        adapt::merge_and_reinit(lowrank::weight(*W, lowrank::Layout::out_in), a, 1000 + static_cast<std::uint64_t>(merges),
                                static_cast<std::uint64_t>(++layer));
        *A = std::move(a.A);
        *B = std::move(a.B);
      }
      const double after = forward_backward<float>(p, d, su.text, probe, true, scaling, nullptr, w);
      res.merge_change = std::max(res.merge_change, std::abs(after - before));
      std::uint64_t stream = 0;
      for (optim::AdamState* st : {&sA1, &sB1, &sA2, &sB2}) {
        (void)optim::prune_moments(*st, {.mode = optim::PruneMode::random,
                                         .ratio = 0.999,
                                         .seed = 77 + static_cast<std::uint64_t>(merges),
                                         .stream = stream++,
                                         .reset_step = false});
      }
      ++merges;
    }
    const double mult = method.kind == Kind::relora ? optim::jagged_cosine(jagged, step)
                                                    : optim::cosine_with_warmup(step, su.steps, su.warmup, 0.1);
    const double lr = method.lr * mult;
    for (std::size_t i = 0; i < batch.size(); ++i)
      batch[i] = su.order[(static_cast<std::size_t>(step) * batch.size() + i) % n_order];
    train_sum += forward_backward<float>(p, d, su.text, batch, lora, scaling, &g, w);
    ++train_count;

    adamw(p.E, g.E, sE, lr);
    adamw(p.Wo, g.Wo, sWo, lr);
    adamw(p.b1, g.b1, sb1, lr);
    adamw(p.b2, g.b2, sb2, lr);
    adamw(p.bo, g.bo, sbo, lr);
    switch (method.kind) {
      case Kind::adamw:
        adamw(p.W1, g.W1, s1, lr);
        adamw(p.W2, g.W2, s2, lr);
        break;
      case Kind::lora:
      case Kind::relora:
        adamw(p.A1, g.A1, sA1, lr);
        adamw(p.B1, g.B1, sB1, lr);
        adamw(p.A2, g.A2, sA2, lr);
        adamw(p.B2, g.B2, sB2, lr);
        break;
      default:
        (void)o1->step(lowrank::view(p.W1), lowrank::view(std::as_const(g.W1)), lr);
        (void)o2->step(lowrank::view(p.W2), lowrank::view(std::as_const(g.W2)), lr);
        break;
    }
    if ((step + 1) % su.eval_every == 0 || step + 1 == su.steps) {
      seconds += seconds_since(t0);
      const double ev = evaluate(p, d, su.text, su.eval_small, lora, scaling, w);
      res.curve.push_back({step + 1, train_sum / train_count, ev});
      train_sum = 0;
      train_count = 0;
      t0 = Clock::now();
    }
  }
  res.seconds = seconds;
  res.train = evaluate(p, d, su.text, su.train_sample, lora, scaling, w);
  res.eval = evaluate(p, d, su.text, su.eval_all, lora, scaling, w);
  const std::size_t common = sE.bytes() + sWo.bytes() + sb1.bytes() + sb2.bytes() + sbo.bytes();
  switch (method.kind) {
    case Kind::adamw:
      res.projected_bytes = s1.bytes() + s2.bytes();
      break;
    case Kind::lora:
    case Kind::relora:
      res.projected_bytes = sA1.bytes() + sB1.bytes() + sA2.bytes() + sB2.bytes();
      if (method.kind == Kind::relora) res.note = fmt::format("{} merges", merges);
      break;
    default:
      res.projected_bytes = o1->state_bytes() + o2->state_bytes();
      res.note = method.kind == Kind::osd ? "1 SVD, basis moves every step"
                                          : fmt::format("{} SVDs per matrix", o1->refreshes());
      break;
  }
  res.total_bytes = res.projected_bytes + common;
  return res;
}

// ---------------------------------------------------------------------------------------------
// Output

void write_svg(const std::string& path, const std::vector<Result>& results, int steps, double ceiling) {
  const double w = 760, h = 460, left = 60, right = 190, top = 20, bottom = 45;
  double lo = 1e300, hi = -1e300;
  for (const auto& r : results)
    for (const auto& pt : r.curve) {
      if (pt.step == 0) continue;
      lo = std::min({lo, pt.train, pt.eval});
      hi = std::max({hi, pt.train, pt.eval});
    }
  hi = std::min(hi, ceiling);
  lo = std::floor(lo * 4) / 4;
  hi = std::ceil(hi * 4) / 4;
  if (hi <= lo) hi = lo + 0.25;
  auto px = [&](double s) { return left + (w - left - right) * s / steps; };
  auto py = [&](double v) { return top + (h - top - bottom) * (hi - std::clamp(v, lo, hi)) / (hi - lo); };
  std::ofstream f(path);
  f << fmt::format(R"(<svg xmlns="http://www.w3.org/2000/svg" width="{}" height="{}" font-family="sans-serif" font-size="12">)", w, h)
    << "\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n";
  const double tick = (hi - lo) > 2 ? 0.5 : 0.25;
  for (double v = lo; v <= hi + 1e-9; v += tick)
    f << fmt::format(R"(<line x1="{}" y1="{:.1f}" x2="{}" y2="{:.1f}" stroke="#ddd"/><text x="{}" y="{:.1f}" text-anchor="end">{:.2f}</text>)",
                     left, py(v), w - right, py(v), left - 5, py(v) + 4, v)
      << "\n";
  for (int k = 0; k <= 4; ++k) {
    const double s = steps * k / 4.0;
    f << fmt::format(R"(<text x="{:.1f}" y="{}" text-anchor="middle">{:.0f}</text>)", px(s), h - bottom + 16, s) << "\n";
  }
  f << fmt::format(R"(<text x="{}" y="{}" text-anchor="middle">step (solid: held-out loss, dashed: training loss; nats per character)</text>)",
                   (left + w - right) / 2, h - 8)
    << "\n";
  const char* colors[] = {"#000000", "#1f77b4", "#9467bd", "#d62728", "#2ca02c", "#ff7f0e"};
  f << fmt::format(R"(<text x="{}" y="{}">final held-out loss</text>)", w - right + 10, top + 2) << "\n";
  int k = 0;
  for (const auto& r : results) {
    const char* c = colors[k % 6];
    for (int series = 0; series < 2; ++series) {
      f << "<polyline fill=\"none\" stroke-width=\"" << (series == 0 ? "2" : "1") << "\" stroke=\"" << c << "\""
        << (series == 1 ? " stroke-dasharray=\"4 3\"" : "") << " points=\"";
      for (const auto& pt : r.curve) {
        if (pt.step == 0) continue;
        f << fmt::format("{:.1f},{:.1f} ", px(pt.step), py(series == 0 ? pt.eval : pt.train));
      }
      f << "\"/>\n";
    }
    f << fmt::format(R"(<text x="{}" y="{}" fill="{}">{} ({:.3f})</text>)", w - right + 10, top + 20 + 18 * k, c, r.name, r.eval)
      << "\n";
    ++k;
  }
  f << "</svg>\n";
}

std::string bytes_str(std::size_t b) {
  return b >= 1 << 20 ? fmt::format("{:.2f} MiB", double(b) / (1 << 20)) : fmt::format("{:.1f} KiB", double(b) / 1024);
}

}  // namespace

int main(int argc, char** argv) {
  std::string out_dir = ".", text_path = LOWRANK_EXAMPLE_TEXT, only;
  bool quick = false;
  int steps = -1, threads = 1;
  std::map<std::string, double> lr_override;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--out" && i + 1 < argc) {
      out_dir = argv[++i];
    } else if (a == "--text" && i + 1 < argc) {
      text_path = argv[++i];
    } else if (a == "--steps" && i + 1 < argc) {
      steps = std::atoi(argv[++i]);
    } else if (a == "--threads" && i + 1 < argc) {
      threads = std::atoi(argv[++i]);
    } else if (a == "--only" && i + 1 < argc) {
      only = argv[++i];
    } else if (a == "--lr" && i + 1 < argc) {
      const std::string kv = argv[++i];
      const auto eq = kv.find('=');
      if (eq == std::string::npos) {
        fmt::print(stderr, "--lr takes METHOD=VALUE, got '{}'\n", kv);
        return 2;
      }
      lr_override[kv.substr(0, eq)] = std::atof(kv.c_str() + eq + 1);
    } else if (a == "--quick") {
      quick = true;
    } else {
      fmt::print(stderr,
                 "usage: {} [--out DIR] [--text PATH] [--steps N] [--quick] [--threads N] [--only METHOD] "
                 "[--lr METHOD=VALUE]...\n",
                 argv[0]);
      return 2;
    }
  }
  lowrank::set_num_threads(threads);
  // lowrank's compiled parts (the SVD, the subspace optimizer) call Eigen products, which Eigen
  // parallelises with OpenMP when lowrank is built with it; set_num_threads covers only lowrank's
  // own kernels, so Eigen gets the same count (on a busy machine idle OpenMP threads spin).
  Eigen::setNbThreads(threads);
  const auto t_start = Clock::now();

  // Gradient check of the hand-written backward pass (fp64, tiny model).
  const double grad_err = gradient_check();
  fmt::print("gradient check (central differences, fp64, dense and LoRA paths): max error {:.2e} of the largest "
             "gradient entry\n",
             grad_err);
  if (!(grad_err < 1e-6)) {
    fmt::print(stderr, "the hand-written gradients disagree with finite differences ({:.2e})\n", grad_err);
    return 1;
  }

  Setup su;
  if (quick) {
    su.dims = Dims{.ctx = 8, .emb = 16, .hidden = 64, .vocab = 0, .rank = 16};
    su.steps = 60;
    su.batch = 32;
    su.warmup = 6;
    su.eval_every = 10;
    su.gap = 20;
    su.relora_cycle = 20;
    su.relora_warmup = 5;
    su.lora_alpha = 4;
  }
  if (steps > 0) {
    su.steps = steps;
    su.warmup = std::max(1, steps / 10);
    su.eval_every = std::max(1, steps / 20);
    // keep N a multiple of the ReLoRA cycle (the schedule requires it): four cycles
    su.relora_cycle = std::max<std::int64_t>(2, steps / 4);
    if (steps % su.relora_cycle != 0) su.steps = static_cast<int>(su.relora_cycle * 4);
    su.relora_warmup = std::max<std::int64_t>(1, su.relora_cycle / 10);
    su.gap = std::max<std::int64_t>(1, steps / 10);
  }

  // Text -> tokens.
  std::string raw;
  {
    std::ifstream f(text_path, std::ios::binary);
    if (!f) {
      fmt::print(stderr, "cannot read {} (pass --text PATH)\n", text_path);
      return 1;
    }
    raw.assign(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
  }
  std::vector<int> code(256, -1);
  for (unsigned char c : raw) code[c] = 0;
  int vocab = 0;
  for (int& c : code)
    if (c == 0) c = vocab++;
  su.dims.vocab = vocab;
  su.text.reserve(raw.size());
  for (unsigned char c : raw) su.text.push_back(code[c]);
  const Index n = static_cast<Index>(su.text.size()), n_train = n * 9 / 10, ctx = su.dims.ctx;
  for (Index s = 0; s + ctx < n_train; ++s) su.order.push_back(s);
  for (Index s = n_train; s + ctx < n; ++s) su.eval_all.push_back(s);
  {  // Fisher-Yates with a fixed Philox key: one data order for every method.
    const lowrank::RandomStream rng(2024, 1);
    for (std::size_t i = su.order.size() - 1; i > 0; --i) {
      const auto j = static_cast<std::size_t>(double(rng.uniform(i)) * double(i + 1)) % (i + 1);
      std::swap(su.order[i], su.order[j]);
    }
  }
  const auto spaced = [](const std::vector<Index>& from, std::size_t count) {
    std::vector<Index> out;
    count = std::min(count, from.size());
    for (std::size_t i = 0; i < count; ++i) out.push_back(from[i * from.size() / count]);
    return out;
  };
  std::vector<Index> sorted_train = su.order;
  std::sort(sorted_train.begin(), sorted_train.end());
  su.eval_small = spaced(su.eval_all, quick ? 256 : 1024);
  su.train_sample = spaced(sorted_train, quick ? 512 : 8192);
  if (quick) su.eval_all = spaced(su.eval_all, 1024);

  const Dims& d = su.dims;
  fmt::print("text: {} ({} characters, {} symbols); {} training windows, {} held-out windows\n", text_path, n, vocab,
             su.order.size(), su.eval_all.size());
  fmt::print("model: {} chars x {} embedding -> {} (tanh) -> {} (relu) -> {}; W1 {}x{}, W2 {}x{}; rank {}\n", d.ctx, d.emb,
             d.hidden, d.hidden, vocab, d.hidden, d.in(), d.hidden, d.hidden, d.rank);
  fmt::print("{} steps of {} windows ({:.2f} epochs), warmup {}, T = {} (GaLore/FRUGAL/OSD), ReLoRA cycle {} with "
             "re-warmup {}; {} thread(s)\n\n",
             su.steps, su.batch, double(su.steps) * double(su.batch) / double(su.order.size()), su.warmup, su.gap,
             su.relora_cycle, su.relora_warmup, lowrank::num_threads());

  // Peak learning rates (tuned a little at the full size, see docs/examples.md).
  std::vector<Method> methods = {{"AdamW", Kind::adamw, 3e-3}, {"LoRA", Kind::lora, 1e-2},
                                 {"ReLoRA", Kind::relora, 3e-3}, {"GaLore", Kind::galore, 1e-2},
                                 {"FRUGAL", Kind::frugal, 3e-3}, {"OSD", Kind::osd, 1e-2}};
  if (!only.empty()) {
    std::erase_if(methods, [&](const Method& m) { return m.name != only; });
    if (methods.empty()) {
      fmt::print(stderr, "--only: no method named '{}'\n", only);
      return 2;
    }
  }
  for (auto& m : methods)
    if (auto it = lr_override.find(m.name); it != lr_override.end()) m.lr = it->second;

  std::vector<Result> results;
  for (const auto& m : methods) {
    results.push_back(train(m, su));
    const Result& r = results.back();
    fmt::print("  {:<7} lr {:<7.2g} train {:.4f}  held-out {:.4f}  {:6.2f} s\n", r.name, r.lr, r.train, r.eval, r.seconds);
    std::fflush(stdout);
  }

  fmt::print("\n{:<7} {:>8} {:>7} {:>9} {:>12} {:>12} {:>9}  {}\n", "method", "peak lr", "train", "held-out",
             "state W1,W2", "state total", "seconds", "");
  for (const auto& r : results)
    fmt::print("{:<7} {:>8.2g} {:>7.4f} {:>9.4f} {:>12} {:>12} {:>9.2f}  {}\n", r.name, r.lr, r.train, r.eval,
               bytes_str(r.projected_bytes), bytes_str(r.total_bytes), r.seconds, r.note);
  std::vector<const Result*> ranked;
  for (const auto& r : results) ranked.push_back(&r);
  std::sort(ranked.begin(), ranked.end(), [](const Result* a, const Result* b) { return a->eval < b->eval; });
  fmt::print("\nheld-out ordering (best first):");
  for (std::size_t i = 0; i < ranked.size(); ++i) fmt::print("{} {}", i == 0 ? "" : " <", ranked[i]->name);
  fmt::print("\n(loss in nats per character; uniform guessing is {:.3f})\n", std::log(double(vocab)));

  const std::string csv = out_dir + "/pretrain_compare.csv", svg = out_dir + "/pretrain_compare.svg";
  {
    std::ofstream f(csv);
    f << "step,method,train_loss,eval_loss\n";
    for (const auto& r : results)
      for (const auto& pt : r.curve) f << fmt::format("{},{},{:.6f},{:.6f}\n", pt.step, r.name, pt.train, pt.eval);
    if (!f) {
      fmt::print(stderr, "cannot write {}\n", csv);
      return 1;
    }
  }
  write_svg(svg, results, su.steps, std::log(double(vocab)));
  fmt::print("wrote {} and {} ({:.1f} s in all)\n", csv, svg, seconds_since(t_start));

  // Checks: every method learned something; a ReLoRA merge does not change the function.
  for (const auto& r : results) {
    if (!std::isfinite(r.eval) || !(r.eval < r.first_eval - 0.1)) {
      fmt::print(stderr, "{}: held-out loss {:.4f} did not fall below the initial {:.4f}\n", r.name, r.eval, r.first_eval);
      return 1;
    }
    if (!(r.merge_change < 1e-4)) {
      fmt::print(stderr, "{}: a merge changed the loss by {:.2e}\n", r.name, r.merge_change);
      return 1;
    }
  }
  return 0;
}
