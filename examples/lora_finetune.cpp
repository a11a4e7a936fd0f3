// Adapting a small trained network to a new task with LoRA, trained by hand-written gradients, and
// comparing three initialisations: PEFT's default (kaiming-uniform A, B = 0), PiSSA (the top
// singular triplets of W move into the adapter, W keeps the residual) and EVA (A = principal
// directions of the layer inputs on the new task, B = 0, with EVA's rank redistribution).
//
//   example_lora_finetune [--out DIR] [--steps N] [--quick]
//
// 1. "Pre-training": a 2-layer tanh MLP (32 -> 64 -> 16) is trained with full gradients (Adam)
//    on task A, a teacher network, from inputs that live mostly in an 8-dimensional subspace.
// 2. Task B is the teacher with a low-rank change in both layers. The pre-trained network is
//    adapted with rank-4 LoRA on both layers (only A and B train, Adam, same learning rate for all
//    inits); the loss on held-out task-B data is recorded every few steps.
// 3. Each adapter is merged into its layer's weight (`adapt::merge`) and the merged network's
//    outputs are compared with the adapted (unmerged) forward, which runs through the fused
//    kernel `lowrank::lora_forward`.
//
// Prints a table, writes DIR/lora_finetune.csv (step, loss per init) and DIR/lora_finetune.svg
// (the loss curves).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include "lowrank/adapt/eva.hpp"
#include "lowrank/adapt/init.hpp"
#include "lowrank/adapt/lora.hpp"
#include "lowrank/core/philox.hpp"
#include "lowrank/kernels/lora_forward.hpp"

using lowrank::Index;
using Mat = lowrank::RowMatrix<float>;
using Vec = lowrank::Vector<float>;
namespace adapt = lowrank::adapt;

namespace {

constexpr Index kIn = 32, kHidden = 64, kOut = 16, kLatent = 8, kRank = 4;

Mat gaussian(Index rows, Index cols, std::uint64_t stream, double stddev) {
  const lowrank::RandomStream rng(2026, stream);
  Mat m(rows, cols);
  for (Index i = 0; i < rows * cols; ++i) m.data()[i] = static_cast<float>(stddev * rng.normal(static_cast<std::uint64_t>(i)));
  return m;
}

// One dense layer, optionally with a LoRA adapter.
struct Layer {
  Mat W;  // out x in (nn.Linear layout)
  Vec b;
  std::optional<adapt::LoraAdapter<float>> lora;

  // Y = X W^T + b + s (X A^T) B^T through the fused kernel.
  [[nodiscard]] Mat forward(const Mat& X) const {
    Mat Y(X.rows(), W.rows());
    const lowrank::LoraForwardOptions options{.bias = b.data()};
    auto w = lowrank::weight(W, lowrank::Layout::out_in);
    if (lora) {
      lowrank::lora_forward(lowrank::view(X), w, lowrank::view(lora->A), lowrank::view(lora->B), lora->scaling(),
                            lowrank::view(Y), options);
    } else {
      lowrank::linear_forward(lowrank::view(X), w, lowrank::view(Y), options);
    }
    return Y;
  }
};

struct Network {
  Layer l1, l2;
  struct Cache {
    Mat h, y;
  };
  [[nodiscard]] Cache forward(const Mat& X) const {
    Cache c;
    c.h = l1.forward(X).array().tanh().matrix();
    c.y = l2.forward(c.h);
    return c;
  }
};

double mse(const Mat& y, const Mat& t) { return 0.5 * (y - t).squaredNorm() / static_cast<double>(y.rows()); }

// Adam over a list of parameter blocks.
struct Adam {
  double lr, b1 = 0.9, b2 = 0.999, eps = 1e-8;
  int t = 0;
  std::vector<Mat> m, v;
  explicit Adam(double lr_) : lr(lr_) {}
  void step(const std::vector<Mat*>& params, const std::vector<Mat>& grads) {
    if (m.empty()) {
      for (const Mat* p : params) {
        m.push_back(Mat::Zero(p->rows(), p->cols()));
        v.push_back(Mat::Zero(p->rows(), p->cols()));
      }
    }
    ++t;
    const double c1 = 1 - std::pow(b1, t), c2 = 1 - std::pow(b2, t);
    for (std::size_t k = 0; k < params.size(); ++k) {
      m[k] = b1 * m[k] + (1 - b1) * grads[k];
      v[k] = b2 * v[k] + (1 - b2) * grads[k].cwiseProduct(grads[k]);
      params[k]->array() -= static_cast<float>(lr) * ((m[k].array() / c1) / ((v[k].array() / c2).sqrt() + eps));
    }
  }
};

struct Task {
  Mat x_train, y_train, x_test, y_test;
};

// Inputs on a kLatent-dimensional subspace plus a little isotropic noise; targets from a teacher.
Task make_task(const Network& teacher, Index n_train, Index n_test, std::uint64_t stream) {
  const Mat basis = gaussian(kLatent, kIn, 1, 1.0 / std::sqrt(double(kLatent)));
  auto inputs = [&](Index n, std::uint64_t s) -> Mat {
    return gaussian(n, kLatent, s, 1.0) * basis + gaussian(n, kIn, s + 1, 0.05);
  };
  Task task;
  task.x_train = inputs(n_train, stream);
  task.x_test = inputs(n_test, stream + 2);
  task.y_train = teacher.forward(task.x_train).y;
  task.y_test = teacher.forward(task.x_test).y;
  return task;
}

Mat rows(const Mat& m, Index first, Index count) { return m.middleRows(first, count); }

// Full-parameter training (the "pre-training" on task A).
void pretrain(Network& net, const Task& task, int steps, Index batch) {
  Adam adam(3e-3);
  for (int step = 0; step < steps; ++step) {
    const Index first = (step * batch) % (task.x_train.rows() - batch + 1);
    const Mat X = rows(task.x_train, first, batch), T = rows(task.y_train, first, batch);
    const auto c = net.forward(X);
    const Mat dy = (c.y - T) / static_cast<float>(batch);
    const Mat dW2 = dy.transpose() * c.h;
    const Mat db2 = dy.colwise().sum().transpose();
    const Mat dz = (dy * net.l2.W).cwiseProduct((1 - c.h.array().square()).matrix());
    const Mat dW1 = dz.transpose() * X;
    const Mat db1 = dz.colwise().sum().transpose();
    Mat b1 = net.l1.b, b2 = net.l2.b;
    adam.step({&net.l1.W, &b1, &net.l2.W, &b2}, {dW1, db1, dW2, db2});
    net.l1.b = b1;
    net.l2.b = b2;
  }
}

// Gradients of the adapters only (the base W and b are frozen), by hand:
//   layer y = x W^T + b + s (x A^T) B^T with upstream gradient dY:
//   dB = s dY^T (x A^T),  dA = s (dY B)^T x,  dx = dY W + s (dY B) A.
void lora_step(Network& net, Adam& adam, const Mat& X, const Mat& T) {
  const auto c = net.forward(X);
  const Mat dy = (c.y - T) / static_cast<float>(X.rows());
  std::vector<Mat*> params;
  std::vector<Mat> grads;
  Mat dh = dy * net.l2.W;
  if (auto& a = net.l2.lora) {
    const float s = static_cast<float>(a->scaling());
    const Mat dyB = dy * a->B;
    grads.push_back(s * dy.transpose() * (c.h * a->A.transpose()));
    grads.push_back(s * dyB.transpose() * c.h);
    params.push_back(&a->B);
    params.push_back(&a->A);
    dh += s * dyB * a->A;
  }
  if (auto& a = net.l1.lora) {
    const float s = static_cast<float>(a->scaling());
    const Mat dz = dh.cwiseProduct((1 - c.h.array().square()).matrix());
    const Mat dzB = dz * a->B;
    grads.push_back(s * dz.transpose() * (X * a->A.transpose()));
    grads.push_back(s * dzB.transpose() * X);
    params.push_back(&a->B);
    params.push_back(&a->A);
  }
  adam.step(params, grads);
}

// EVA: feed the layer inputs of task-B batches (computed with adapters off) until converged.
void init_eva(Network& net, const Task& task, Index batch) {
  adapt::Eva<double> eva({{"l1", kIn, kRank, double(kRank)}, {"l2", kHidden, kRank, double(kRank)}});
  Index first = 0;
  const auto result = eva.run([&](adapt::Eva<double>& e) {
    const Mat X = rows(task.x_train, first, batch);
    first = (first + batch) % (task.x_train.rows() - batch + 1);
    const Mat h = net.forward(X).h;
    if (e.wants(0)) e.feed(0, X.cast<double>());
    if (e.wants(1)) e.feed(1, h.cast<double>());
  });
  fmt::print("EVA: {} steps, converged {}; ranks", result.steps, result.converged);
  Layer* layers[] = {&net.l1, &net.l2};
  for (std::size_t l = 0; l < 2; ++l) {
    const auto& r = result.layers[l];
    fmt::print(" {}={}", r.name, r.rank);
    if (r.rank == 0) {
      layers[l]->lora.reset();  // EVA drops the adapter of this layer
      continue;
    }
    adapt::LoraAdapter<float> a;
    a.A = r.A.cast<float>();
    a.B = Mat::Zero(layers[l]->W.rows(), r.rank);
    a.alpha = r.alpha;
    layers[l]->lora = std::move(a);
  }
  fmt::print(" (budget {})\n", result.rank_budget);
}

void write_svg(const std::string& path, const std::vector<int>& steps, const std::map<std::string, std::vector<double>>& curves) {
  const double w = 640, h = 400, left = 60, right = 150, top = 20, bottom = 40;
  double lo = 1e300, hi = -1e300;
  for (const auto& [_, c] : curves)
    for (double v : c) {
      lo = std::min(lo, std::log10(v));
      hi = std::max(hi, std::log10(v));
    }
  lo = std::floor(lo);
  hi = std::ceil(hi);
  const double smax = steps.back();
  auto px = [&](double s) { return left + (w - left - right) * s / smax; };
  auto py = [&](double v) { return top + (h - top - bottom) * (hi - std::log10(v)) / (hi - lo); };
  std::ofstream f(path);
  f << fmt::format(R"(<svg xmlns="http://www.w3.org/2000/svg" width="{}" height="{}" font-family="sans-serif" font-size="12">)", w, h)
    << "\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n";
  for (double d = lo; d <= hi; d += 1) {
    f << fmt::format(R"(<line x1="{}" y1="{:.1f}" x2="{}" y2="{:.1f}" stroke="#ddd"/><text x="{}" y="{:.1f}" text-anchor="end">1e{}</text>)",
                     left, py(std::pow(10, d)), w - right, py(std::pow(10, d)), left - 5, py(std::pow(10, d)) + 4, d)
      << "\n";
  }
  f << fmt::format(R"(<text x="{}" y="{}" text-anchor="middle">LoRA training step (test MSE, log scale)</text>)", (left + w - right) / 2, h - 8) << "\n";
  const char* colors[] = {"#1f77b4", "#d62728", "#2ca02c", "#9467bd"};
  int k = 0;
  for (const auto& [name, c] : curves) {
    f << "<polyline fill=\"none\" stroke-width=\"2\" stroke=\"" << colors[k % 4] << "\" points=\"";
    for (std::size_t i = 0; i < c.size(); ++i) f << fmt::format("{:.1f},{:.1f} ", px(steps[i]), py(c[i]));
    f << "\"/>\n"
      << fmt::format(R"(<text x="{}" y="{}" fill="{}">{}</text>)", w - right + 10, top + 20 + 18 * k, colors[k % 4], name) << "\n";
    ++k;
  }
  f << "</svg>\n";
}

}  // namespace

int main(int argc, char** argv) {
  std::string out_dir = ".";
  int steps = 400;
  int pre_steps = 3000;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--out" && i + 1 < argc) {
      out_dir = argv[++i];
    } else if (a == "--steps" && i + 1 < argc) {
      steps = std::atoi(argv[++i]);
    } else if (a == "--quick") {  // a short smoke run (the test suite runs this in Debug builds)
      steps = 40;
      pre_steps = 200;
    } else {
      fmt::print(stderr, "usage: {} [--out DIR] [--steps N] [--quick]\n", argv[0]);
      return 2;
    }
  }
  if (steps < 1) steps = 1;
  const Index batch = 128;

  // Teachers: task A, and task B = task A with a rank-2 change in each layer.
  Network teacher_a{{gaussian(kHidden, kIn, 10, 1.0 / std::sqrt(double(kLatent))), Vec::Zero(kHidden), {}},
                    {gaussian(kOut, kHidden, 11, 1.0 / std::sqrt(double(kHidden))), Vec::Zero(kOut), {}}};
  Network teacher_b = teacher_a;
  teacher_b.l1.W += gaussian(kHidden, 2, 12, 0.5) * gaussian(2, kIn, 13, 0.5);
  teacher_b.l2.W += gaussian(kOut, 2, 14, 0.3) * gaussian(2, kHidden, 15, 0.3);
  const Task task_a = make_task(teacher_a, 4096, 1024, 100);
  const Task task_b = make_task(teacher_b, 4096, 1024, 200);

  Network base{{gaussian(kHidden, kIn, 20, 1.0 / std::sqrt(double(kIn))), Vec::Zero(kHidden), {}},
               {gaussian(kOut, kHidden, 21, 1.0 / std::sqrt(double(kHidden))), Vec::Zero(kOut), {}}};
  pretrain(base, task_a, pre_steps, batch);
  fmt::print("pre-trained on task A: test MSE {:.3e} on A, {:.3e} on B\n\n", mse(base.forward(task_a.x_test).y, task_a.y_test),
             mse(base.forward(task_b.x_test).y, task_b.y_test));

  const std::vector<std::string> inits = {"default", "pissa", "eva"};
  const double alpha = kRank;  // scaling alpha / r = 1, as PiSSA's paper and LoRA-SB's scripts use
  const int every = std::max(1, steps / 20);
  std::vector<int> recorded;
  std::map<std::string, std::vector<double>> curves;
  std::map<std::string, double> merge_error;
  for (const auto& init : inits) {
    Network net = base;
    if (init == "default") {
      net.l1.lora = adapt::init_default<float>(kHidden, kIn, kRank, alpha, lowrank::Layout::out_in, 7, 1);
      net.l2.lora = adapt::init_default<float>(kOut, kHidden, kRank, alpha, lowrank::Layout::out_in, 7, 2);
    } else if (init == "pissa") {  // W becomes the residual: the step-0 output is unchanged
      net.l1.lora = adapt::init_pissa<float>(lowrank::weight(net.l1.W, lowrank::Layout::out_in), kRank, alpha);
      net.l2.lora = adapt::init_pissa<float>(lowrank::weight(net.l2.W, lowrank::Layout::out_in), kRank, alpha);
    } else {
      init_eva(net, task_b, batch);
    }
    Adam adam(3e-3);
    auto& curve = curves[init];
    for (int step = 0; step <= steps; ++step) {
      if (step % every == 0 || step == steps) {
        curve.push_back(mse(net.forward(task_b.x_test).y, task_b.y_test));
        if (init == inits.front()) recorded.push_back(step);
      }
      if (step == steps) break;
      const Index first = (Index(step) * batch) % (task_b.x_train.rows() - batch + 1);
      lora_step(net, adam, rows(task_b.x_train, first, batch), rows(task_b.y_train, first, batch));
    }
    // Merge into the (residual) base weights; the merged network runs without adapters.
    const Mat before = net.forward(task_b.x_test).y;
    Network merged = net;
    for (Layer* l : {&merged.l1, &merged.l2}) {
      if (l->lora) adapt::merge(lowrank::weight(l->W, lowrank::Layout::out_in), *l->lora);
      l->lora.reset();
    }
    const Mat after = merged.forward(task_b.x_test).y;
    merge_error[init] = (after - before).cwiseAbs().maxCoeff() / before.cwiseAbs().maxCoeff();
  }

  fmt::print("\ntask-B test MSE after k LoRA steps (rank {}, Adam lr 3e-3, batch {}):\n{:>6}", kRank, batch, "step");
  for (const auto& init : inits) fmt::print(" {:>10}", init);
  fmt::print("\n");
  for (std::size_t i = 0; i < recorded.size(); ++i) {
    if (i % 4 != 0 && i + 1 != recorded.size()) continue;
    fmt::print("{:>6}", recorded[i]);
    for (const auto& init : inits) fmt::print(" {:>10.3e}", curves[init][i]);
    fmt::print("\n");
  }
  fmt::print("\nmerging: max |merged - adapted| / max |adapted| over the test outputs:\n");
  for (const auto& init : inits) fmt::print("  {:<8} {:.2e}\n", init, merge_error[init]);

  const std::string csv = out_dir + "/lora_finetune.csv", svg = out_dir + "/lora_finetune.svg";
  {
    std::ofstream f(csv);
    f << "step," << fmt::format("{}", fmt::join(inits, ",")) << "\n";
    for (std::size_t i = 0; i < recorded.size(); ++i) {
      f << recorded[i];
      for (const auto& init : inits) f << fmt::format(",{:.6e}", curves[init][i]);
      f << "\n";
    }
    if (!f) {
      fmt::print(stderr, "cannot write {}\n", csv);
      return 1;
    }
  }
  write_svg(svg, recorded, curves);
  fmt::print("\nwrote {} and {}\n", csv, svg);

  // The merged network must reproduce the adapted one (fp32 merge: a few ulps).
  for (const auto& [init, err] : merge_error) {
    if (!(err < 1e-5)) {
      fmt::print(stderr, "merging changed the outputs of '{}' by {:.2e}\n", init, err);
      return 1;
    }
  }
  return 0;
}
