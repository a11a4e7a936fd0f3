// lora_forward against a naive float64 reference with error bounds derived from the unit roundoff,
// and against the oracles of adapters.md section 11 (fused forward = forward with the merged
// weight; several adapters = their sum; a mixed batch = the single-adapter forwards of its
// sub-batches, no-adapter rows = the base), on every compiled-and-supported target, every weight
// storage type, both layouts, strided views and awkward shapes.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <span>
#include <string>
#include <vector>

#include "lowrank/core/error.hpp"
#include "lowrank/core/threading.hpp"
#include "lowrank/kernels/lora_forward.hpp"
#include "lowrank/kernels/targets.hpp"
#include "test_util.hpp"

namespace {

using namespace lowrank_test;
using lowrank::Layout;
using lowrank::LoraForwardOptions;
using lowrank::LoraTerm;
using lowrank::MatrixView;
using lowrank::Target;
using lowrank::WeightView;

bool supported(Target t) { return (lowrank::supported_targets() & static_cast<std::uint32_t>(t)) != 0; }

class LoraForward : public ::testing::TestWithParam<Target> {
 protected:
  void SetUp() override {
    if (!supported(GetParam())) {
      GTEST_SKIP() << "target " << lowrank::to_string(GetParam()) << " is not supported on this CPU";
    }
    lowrank::force_target(GetParam());
  }
  void TearDown() override {
    lowrank::reset_target();
    lowrank::set_num_threads(0);
  }
};

template <class T>
MatrixView<const T> cv(const MatrixView<T>& v) {
  return {v.data, v.rows, v.cols, v.row_stride, v.col_stride};
}

// A weight `out x in` stored in `layout` with storage order `order`.
template <class TW>
struct Weight {
  Strided<TW> m;
  WeightView<const TW> view() const { return {cv(m.view), layout}; }
  Layout layout;
  double at(Index o, Index i) const { return to_double(layout == Layout::out_in ? m.view(o, i) : m.view(i, o)); }
};

template <class TW>
Weight<TW> make_weight(Index out, Index in, Layout layout, Order order, std::mt19937_64& rng) {
  return {layout == Layout::out_in ? make_matrix<TW>(out, in, order, rng) : make_matrix<TW>(in, out, order, rng),
          layout};
}

struct Term {
  Strided<float> a, b;
  double scale;
  LoraTerm view() const { return {cv(a.view), cv(b.view), scale}; }
};

Term make_term(Index out, Index in, Index r, double scale, Order ao, Order bo, std::mt19937_64& rng) {
  return {make_matrix<float>(r, in, ao, rng), make_matrix<float>(out, r, bo, rng), scale};
}

// Float64 reference of one element and the magnitude that bounds its rounding error.
struct Ref {
  double value, magnitude;
};

template <class TW>
Ref reference(const MatrixView<float>& x, const Weight<TW>& w, const std::vector<const Term*>& terms, const float* bias,
              Index t, Index o) {
  const Index in = x.cols;
  double y = 0, mag = 0;
  for (Index i = 0; i < in; ++i) {
    const double p = to_double(x(t, i)) * w.at(o, i);
    y += p, mag += std::abs(p);
  }
  for (const Term* term : terms) {
    for (Index k = 0; k < term->a.view.rows; ++k) {
      double xa = 0, xa_mag = 0;
      for (Index i = 0; i < in; ++i) {
        const double p = to_double(x(t, i)) * to_double(term->a.view(k, i));
        xa += p, xa_mag += std::abs(p);
      }
      const double b = to_double(term->b.view(o, k));
      y += term->scale * xa * b;
      mag += std::abs(term->scale) * (xa_mag + std::abs(xa)) * std::abs(b);
    }
  }
  if (bias != nullptr) y += bias[o], mag += std::abs(bias[o]);
  return {y, mag};
}

// Every element within c u (in + R + 4) magnitude of the float64 reference (fp32 accumulation of
// in + R products, T rounded twice, bias added last). With `adapter`, token t uses only
// terms[adapter[t]] (none for -1).
template <class TW>
void expect_near_reference(const MatrixView<float>& y, const MatrixView<float>& x, const Weight<TW>& w,
                           const std::vector<const Term*>& terms, const float* bias,
                           const std::vector<std::int32_t>* adapter = nullptr) {
  const Index in = x.cols;
  Index rank = 0;
  for (const Term* term : terms) rank += term->a.view.rows;
  const double gamma = static_cast<double>(in + rank + 4) * 0x1.0p-24;
  // W and X widened to double once (converting per product dominated the tests' time under the
  // sanitizers).
  std::vector<double> wd(static_cast<std::size_t>(y.cols * in)), xd(static_cast<std::size_t>(y.rows * in));
  for (Index o = 0; o < y.cols; ++o)
    for (Index i = 0; i < in; ++i) wd[static_cast<std::size_t>(o * in + i)] = w.at(o, i);
  for (Index t = 0; t < y.rows; ++t)
    for (Index i = 0; i < in; ++i) xd[static_cast<std::size_t>(t * in + i)] = to_double(x(t, i));
  // X A_j^T and its magnitude, per term, token and rank index.
  std::vector<std::vector<double>> xa(terms.size()), xa_mag(terms.size());
  for (std::size_t j = 0; j < terms.size(); ++j) {
    const auto& av = terms[j]->a.view;
    xa[j].assign(static_cast<std::size_t>(y.rows * av.rows), 0.0);
    xa_mag[j].assign(xa[j].size(), 0.0);
    for (Index t = 0; t < y.rows; ++t)
      for (Index k = 0; k < av.rows; ++k)
        for (Index i = 0; i < in; ++i) {
          const double p = xd[static_cast<std::size_t>(t * in + i)] * to_double(av(k, i));
          xa[j][static_cast<std::size_t>(t * av.rows + k)] += p;
          xa_mag[j][static_cast<std::size_t>(t * av.rows + k)] += std::abs(p);
        }
  }
  for (Index t = 0; t < y.rows; ++t)
    for (Index o = 0; o < y.cols; ++o) {
      double ref = 0, mag = 0;
      const double* wo = wd.data() + o * in;
      const double* xt = xd.data() + t * in;
      for (Index i = 0; i < in; ++i) {
        const double p = xt[i] * wo[i];
        ref += p, mag += std::abs(p);
      }
      for (std::size_t j = 0; j < terms.size(); ++j) {
        if (adapter != nullptr && (*adapter)[static_cast<std::size_t>(t)] != static_cast<std::int32_t>(j)) continue;
        const Term& term = *terms[j];
        for (Index k = 0; k < term.a.view.rows; ++k) {
          const std::size_t e = static_cast<std::size_t>(t * term.a.view.rows + k);
          const double b = to_double(term.b.view(o, k));
          ref += term.scale * xa[j][e] * b;
          mag += std::abs(term.scale) * (xa_mag[j][e] + std::abs(xa[j][e])) * std::abs(b);
        }
      }
      if (bias != nullptr) ref += bias[o], mag += std::abs(bias[o]);
      const double got = y(t, o);
      ASSERT_LE(std::abs(got - ref), gamma * mag + 1e-30)
          << "at (" << t << ", " << o << "): got " << got << ", reference " << ref;
    }
}

Strided<float> make_output(Index tokens, Index out, Order order, std::mt19937_64& rng) {
  return make_matrix<float>(tokens, out, order, rng);
}

struct Shape {
  Index tokens, in, out, r;
};
// One token, tails of every vector width (4, 8, 16), more tokens than a token block (16), more
// outputs than an axpy column block (256), rank 1 and a rank above the lane counts.
const Shape kShapes[] = {{1, 1, 1, 1},  {1, 7, 5, 2},    {3, 17, 9, 3},  {2, 33, 13, 16}, {17, 9, 19, 5},
                         {4, 16, 24, 4}, {5, 40, 7, 17}, {1, 65, 31, 1}, {17, 23, 261, 3},
                         {18, 523, 10, 2},   // several k chunks (256) with a tail
                         // The GEMM path (from lora_forward_gemm_tokens): ragged token panels
                         // (MR 3, 4, 6, 8), ragged output panels (NR 4, 16, 32), k chunks with a
                         // tail, more outputs than a column block (64).
                         {70, 523, 37, 3},   {64, 9, 150, 16},
                         // GEMM path: fewer than 4 inputs (X packed by its k tail only), and
                         // inputs a multiple of 512 (a full last chunk, then the extra columns).
                         {66, 3, 40, 2},     {64, 1024, 20, 2}};

template <class TW>
void check_reference(std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  const Order w_orders[] = {Order::row_major, Order::col_major, Order::padded_row, Order::both_strided};
  for (const Shape& s : kShapes)
    for (Layout layout : {Layout::out_in, Layout::in_out})
      for (Order wo : w_orders) {
        SCOPED_TRACE(testing::Message() << type_name<TW>() << " W " << lowrank::to_string(layout) << " "
                                        << order_name(wo) << ", tokens " << s.tokens << " in " << s.in << " out "
                                        << s.out << " r " << s.r);
        const Weight<TW> w = make_weight<TW>(s.out, s.in, layout, wo, rng);
        const Order xo = wo == Order::padded_row ? Order::col_major : Order::padded_row;
        const auto x = make_matrix<float>(s.tokens, s.in, xo, rng);
        const Term term = make_term(s.out, s.in, s.r, 0.7, Order::row_major,
                                    wo == Order::col_major ? Order::col_major : Order::row_major, rng);
        std::vector<float> bias(static_cast<std::size_t>(s.out));
        for (auto& b : bias) b = static_cast<float>(std::normal_distribution<double>()(rng));
        // Y row-major without bias, then with a bias in a padded row-major Y (the GEMM path's
        // case) and in a column-major one (the one-pass kernel's strided stores).
        for (Order yo : {Order::row_major, Order::padded_row, Order::padded_col}) {
          const bool with_bias = yo != Order::row_major;
          auto y = make_output(s.tokens, s.out, yo, rng);
          const std::vector<float> before = y.storage;
          LoraForwardOptions options;
          options.bias = with_bias ? bias.data() : nullptr;
          lowrank::lora_forward(cv(x.view), w.view(), cv(term.a.view), cv(term.b.view), term.scale, y.view, options);
          // Nothing outside Y's view is written.
          std::vector<char> inside(y.storage.size(), 0);
          for (Index t = 0; t < s.tokens; ++t)
            for (Index o = 0; o < s.out; ++o) inside[static_cast<std::size_t>(&y.view(t, o) - y.storage.data())] = 1;
          for (std::size_t e = 0; e < y.storage.size(); ++e)
            if (!inside[e]) {
              ASSERT_EQ(std::memcmp(&y.storage[e], &before[e], sizeof(float)), 0) << "wrote at " << e;
            }
          expect_near_reference(y.view, x.view, w, {&term}, options.bias);
          if (testing::Test::HasFatalFailure()) return;
        }
      }
}

TEST_P(LoraForward, F32MatchesReference) { check_reference<float>(1); }
TEST_P(LoraForward, Bf16MatchesReference) { check_reference<bf16>(2); }
TEST_P(LoraForward, F16MatchesReference) { check_reference<f16>(3); }
TEST_P(LoraForward, F64MatchesReference) { check_reference<double>(4); }

// Oracle: the fused forward equals the base forward with the merged weight W + s B A (merged in
// float64, rounded to fp32), to the rounding of both.
TEST_P(LoraForward, EqualsMergedForward) {
  std::mt19937_64 rng(5);
  for (Layout layout : {Layout::out_in, Layout::in_out})
    for (const Shape& s : kShapes) {
      SCOPED_TRACE(testing::Message() << lowrank::to_string(layout) << " tokens " << s.tokens << " in " << s.in
                                      << " out " << s.out << " r " << s.r);
      const Weight<float> w = make_weight<float>(s.out, s.in, layout, Order::row_major, rng);
      const auto x = make_matrix<float>(s.tokens, s.in, Order::row_major, rng);
      const Term term = make_term(s.out, s.in, s.r, 1.3, Order::row_major, Order::row_major, rng);
      Weight<float> merged = w;
      merged.m.view.data = merged.m.storage.data() + (w.m.view.data - w.m.storage.data());
      for (Index o = 0; o < s.out; ++o)
        for (Index i = 0; i < s.in; ++i) {
          double d = w.at(o, i);
          for (Index k = 0; k < s.r; ++k) d += term.scale * term.b.view(o, k) * double{term.a.view(k, i)};
          (layout == Layout::out_in ? merged.m.view(o, i) : merged.m.view(i, o)) = static_cast<float>(d);
        }
      auto fused = make_output(s.tokens, s.out, Order::row_major, rng);
      auto base = make_output(s.tokens, s.out, Order::row_major, rng);
      lowrank::lora_forward(cv(x.view), w.view(), cv(term.a.view), cv(term.b.view), term.scale, fused.view);
      lowrank::linear_forward(cv(x.view), merged.view(), base.view);
      const double u = 0x1.0p-24;
      for (Index t = 0; t < s.tokens; ++t)
        for (Index o = 0; o < s.out; ++o) {
          const Ref ref = reference(x.view, w, {&term}, nullptr, t, o);
          double merged_mag = 0;
          for (Index i = 0; i < s.in; ++i) merged_mag += std::abs(double{x.view(t, i)} * merged.at(o, i));
          const double tol = (s.in + s.r + 4) * u * ref.magnitude + (s.in + 2) * u * merged_mag;
          ASSERT_NEAR(fused.view(t, o), base.view(t, o), tol) << "at (" << t << ", " << o << ")";
        }
    }
}

// Oracle: several adapters in one pass equal the sum of their terms (float64 reference), with
// different ranks (one of them zero) and strided factors.
TEST_P(LoraForward, MultiAdapterEqualsSum) {
  std::mt19937_64 rng(6);
  for (Layout layout : {Layout::out_in, Layout::in_out})
    for (Index tokens : {1, 3, 17}) {
      SCOPED_TRACE(testing::Message() << lowrank::to_string(layout) << " tokens " << tokens);
      const Index in = 29, out = 37;
      const Weight<bf16> w = make_weight<bf16>(out, in, layout, Order::row_major, rng);
      const auto x = make_matrix<float>(tokens, in, Order::row_major, rng);
      const Term t1 = make_term(out, in, 3, 0.5, Order::row_major, Order::row_major, rng);
      const Term t2 = make_term(out, in, 17, -2.0, Order::col_major, Order::both_strided, rng);
      const Term t3 = make_term(out, in, 0, 1.0, Order::row_major, Order::row_major, rng);
      const Term t4 = make_term(out, in, 1, 0.25, Order::padded_row, Order::col_major, rng);
      const LoraTerm terms[] = {t1.view(), t2.view(), t3.view(), t4.view()};
      std::vector<float> bias(static_cast<std::size_t>(out), 0.5f);
      LoraForwardOptions options;
      options.bias = bias.data();
      auto y = make_output(tokens, out, Order::col_major, rng);
      lowrank::lora_forward(cv(x.view), w.view(), std::span<const LoraTerm>(terms), y.view, options);
      expect_near_reference(y.view, x.view, w, {&t1, &t2, &t3, &t4}, bias.data());
      // No terms: the base forward.
      lowrank::lora_forward(cv(x.view), w.view(), std::span<const LoraTerm>(), y.view, options);
      expect_near_reference(y.view, x.view, w, {}, bias.data());
    }
}

// Oracle: each sub-batch of a mixed batch equals the single-adapter forward of its adapter, and
// rows without an adapter equal the base forward (exactly: the kernel's per-element arithmetic does
// not depend on the rest of the batch).
template <class TW>
void check_mixed(Layout layout, Order wo, std::uint64_t seed, Index tokens = 19) {
  SCOPED_TRACE(testing::Message() << type_name<TW>() << " " << lowrank::to_string(layout) << " " << order_name(wo)
                                  << " tokens " << tokens);
  std::mt19937_64 rng(seed);
  const Index in = 35, out = 27;
  const Weight<TW> w = make_weight<TW>(out, in, layout, wo, rng);
  const auto x = make_matrix<float>(tokens, in, Order::padded_row, rng);
  const Term t0 = make_term(out, in, 4, 0.5, Order::row_major, Order::row_major, rng);
  const Term t1 = make_term(out, in, 19, -1.5, Order::row_major, Order::col_major, rng);
  const Term t2 = make_term(out, in, 2, 3.0, Order::col_major, Order::row_major, rng);
  const LoraTerm terms[] = {t0.view(), t1.view(), t2.view()};
  std::vector<std::int32_t> adapter(static_cast<std::size_t>(tokens));
  for (std::size_t t = 0; t < adapter.size(); ++t) adapter[t] = static_cast<std::int32_t>(t * 7 % 5) - 1;  // -1..3
  for (auto& a : adapter)
    if (a == 3) a = 1;
  std::vector<float> bias(static_cast<std::size_t>(out));
  for (auto& b : bias) b = static_cast<float>(std::normal_distribution<double>()(rng));
  LoraForwardOptions options;
  options.bias = bias.data();
  auto y = make_output(tokens, out, Order::row_major, rng);
  lowrank::lora_forward_mixed(cv(x.view), w.view(), std::span<const LoraTerm>(terms), adapter, y.view, options);
  expect_near_reference(y.view, x.view, w, {&t0, &t1, &t2}, bias.data(), &adapter);

  for (std::int32_t j = -1; j < 3; ++j) {
    auto single = make_output(tokens, out, Order::row_major, rng);
    if (j < 0) {
      lowrank::linear_forward(cv(x.view), w.view(), single.view, options);
    } else {
      const LoraTerm& term = terms[j];
      lowrank::lora_forward(cv(x.view), w.view(), term.A, term.B, term.scale, single.view, options);
    }
    for (Index t = 0; t < tokens; ++t) {
      if (adapter[static_cast<std::size_t>(t)] != j) continue;
      for (Index o = 0; o < out; ++o) ASSERT_EQ(y.view(t, o), single.view(t, o)) << "adapter " << j << " at (" << t << ", " << o << ")";
    }
  }
}

TEST_P(LoraForward, MixedBatchEqualsSubBatches) {
  check_mixed<float>(Layout::out_in, Order::row_major, 7);
  check_mixed<float>(Layout::in_out, Order::row_major, 8);
  check_mixed<bf16>(Layout::out_in, Order::padded_row, 9);
  check_mixed<f16>(Layout::in_out, Order::padded_row, 10);
  check_mixed<float>(Layout::out_in, Order::both_strided, 11);
  check_mixed<double>(Layout::out_in, Order::row_major, 12);
  // The GEMM path.
  check_mixed<float>(Layout::out_in, Order::row_major, 14, 80);
  check_mixed<bf16>(Layout::in_out, Order::row_major, 15, 80);
}

// A token gives the same bits alone or in any batch, with any thread count.
template <class TW>
void check_batch_and_thread_independence(Layout layout) {
  SCOPED_TRACE(testing::Message() << type_name<TW>() << " " << lowrank::to_string(layout));
  std::mt19937_64 rng(13);
  const Index tokens = 17, in = 67, out = 261;  // above the size at which the kernel threads
  const Weight<TW> w = make_weight<TW>(out, in, layout, Order::row_major, rng);
  // X rows 4 KiB apart: the kernels copy such X (L1 set aliasing); a lone token is not copied.
  std::vector<float> xbuf(static_cast<std::size_t>(tokens * 1024));
  for (auto& v : xbuf) v = static_cast<float>(std::normal_distribution<double>()(rng));
  Strided<float> x{std::move(xbuf), {}};
  x.view = MatrixView<float>(x.storage.data(), tokens, in, 1024, 1);
  const Term term = make_term(out, in, 5, 0.9, Order::row_major, Order::row_major, rng);
  auto y1 = make_output(tokens, out, Order::row_major, rng);
  auto y2 = make_output(tokens, out, Order::row_major, rng);
  lowrank::set_num_threads(1);
  lowrank::lora_forward(cv(x.view), w.view(), cv(term.a.view), cv(term.b.view), term.scale, y1.view);
  lowrank::set_num_threads(2);
  lowrank::lora_forward(cv(x.view), w.view(), cv(term.a.view), cv(term.b.view), term.scale, y2.view);
  ASSERT_EQ(0, std::memcmp(y1.view.data, y2.view.data, static_cast<std::size_t>(tokens * out) * sizeof(float)));
  for (Index t : {0, 5, 16}) {
    auto one = make_output(1, out, Order::row_major, rng);
    const MatrixView<const float> xt(&x.view(t, 0), 1, in, 1024, 1);
    lowrank::lora_forward(xt, w.view(), cv(term.a.view), cv(term.b.view), term.scale, one.view);
    ASSERT_EQ(0, std::memcmp(&one.view(0, 0), &y1.view(t, 0), static_cast<std::size_t>(out) * sizeof(float)))
        << "token " << t;
  }
}

TEST_P(LoraForward, ResultsIndependentOfBatchAndThreads) {
  check_batch_and_thread_independence<float>(Layout::out_in);
  check_batch_and_thread_independence<float>(Layout::in_out);
  check_batch_and_thread_independence<bf16>(Layout::out_in);
  check_batch_and_thread_independence<f16>(Layout::in_out);
}

// The GEMM path (batches from lora_forward_gemm_tokens): a token gives the same bits in any such
// batch and with any thread count; with an `in x out` weight also the same bits as alone (both
// paths accumulate in index order); with an `out x in` weight alone it agrees to rounding (the
// one-pass kernel accumulates in vector lanes).
template <class TW>
void check_gemm_batches(Layout layout) {
  SCOPED_TRACE(testing::Message() << type_name<TW>() << " " << lowrank::to_string(layout));
  std::mt19937_64 rng(16);
  const Index tokens = 100, in = 300, out = 261, r = 7;
  const Index small = lowrank::lora_forward_gemm_tokens;
  ASSERT_LE(small + 10, tokens);
  const Weight<TW> w = make_weight<TW>(out, in, layout, Order::row_major, rng);
  const auto x = make_matrix<float>(tokens, in, Order::row_major, rng);
  const Term term = make_term(out, in, r, 0.9, Order::row_major, Order::row_major, rng);
  std::vector<float> bias(static_cast<std::size_t>(out));
  for (auto& b : bias) b = static_cast<float>(std::normal_distribution<double>()(rng));
  LoraForwardOptions options;
  options.bias = bias.data();
  auto forward = [&](Index t0, Index count, int threads) {
    lowrank::set_num_threads(threads);
    auto y = make_output(count, out, Order::row_major, rng);
    const MatrixView<const float> xs(&x.view(t0, 0), count, in, x.view.row_stride, x.view.col_stride);
    lowrank::lora_forward(xs, w.view(), cv(term.a.view), cv(term.b.view), term.scale, y.view, options);
    return y;
  };
  const auto all1 = forward(0, tokens, 1);
  expect_near_reference(all1.view, x.view, w, {&term}, bias.data());
  const auto all2 = forward(0, tokens, 2);
  const auto head = forward(0, small, 2);                  // tokens [0, small)
  const auto tail = forward(tokens - small, small, 1);     // tokens [tokens - small, tokens)
  for (Index t = 0; t < tokens; ++t)
    for (Index o = 0; o < out; ++o) {
      ASSERT_EQ(all1.view(t, o), all2.view(t, o)) << "threads, at (" << t << ", " << o << ")";
      if (t < small) {
        ASSERT_EQ(all1.view(t, o), head.view(t, o)) << "batch head, at (" << t << ", " << o << ")";
      }
      if (t >= tokens - small) {
        ASSERT_EQ(all1.view(t, o), tail.view(t - (tokens - small), o)) << "batch tail, at (" << t << ", " << o << ")";
      }
    }
  for (Index t : {0, 57, 99}) {
    const auto one = forward(t, 1, 1);
    for (Index o = 0; o < out; ++o) {
      if (layout == Layout::in_out) {
        ASSERT_EQ(one.view(0, o), all1.view(t, o)) << "alone, at (" << t << ", " << o << ")";
      } else {
        ASSERT_NEAR(one.view(0, o), all1.view(t, o), 1e-4 * (1 + std::abs(all1.view(t, o))))
            << "alone, at (" << t << ", " << o << ")";
      }
    }
  }
}

TEST_P(LoraForward, GemmPathIndependentOfBatchAndThreads) {
  check_gemm_batches<float>(Layout::out_in);
  check_gemm_batches<float>(Layout::in_out);
  check_gemm_batches<bf16>(Layout::out_in);
  check_gemm_batches<f16>(Layout::in_out);
}

// Every element's chain starts from +0 (as from a zeroed Y; the GEMM path's first depth chunk
// does not read Y): products that are all -0 (X = -0, W > 0) give +0 = +0 + -0 + ..., where a
// chain started from -0 would stay -0; on the dot, axpy and GEMM paths alike.
TEST_P(LoraForward, NegativeZeroProductsGivePositiveZero) {
  std::mt19937_64 rng(17);
  std::uniform_real_distribution<float> positive(0.5f, 2.0f);
  for (const Index tokens : {Index{1}, Index{5}, lowrank::lora_forward_gemm_tokens + 7}) {
    for (const Layout layout : {Layout::out_in, Layout::in_out}) {
      SCOPED_TRACE(testing::Message() << "tokens " << tokens << " " << lowrank::to_string(layout));
      const Index in = 37, out = 29;
      std::vector<float> w(static_cast<std::size_t>(in * out));
      for (auto& v : w) v = positive(rng);
      const WeightView<const float> wv{layout == Layout::out_in ? lowrank::row_major<const float>(w.data(), out, in)
                                                                : lowrank::row_major<const float>(w.data(), in, out),
                                       layout};
      std::vector<float> x(static_cast<std::size_t>(tokens * in), -0.0f);
      std::vector<float> y(static_cast<std::size_t>(tokens * out), -1.0f);
      lowrank::linear_forward(lowrank::row_major<const float>(x.data(), tokens, in), wv,
                              lowrank::row_major(y.data(), tokens, out));
      for (std::size_t i = 0; i < y.size(); ++i) {
        ASSERT_EQ(y[i], 0.0f) << "at " << i;
        ASSERT_FALSE(std::signbit(y[i])) << "-0 at " << i;
      }
    }
  }
}

TEST_P(LoraForward, EmptyShapes) {
  std::mt19937_64 rng(14);
  // in == 0: Y = bias.
  std::vector<float> w(6), a(2), b(6), bias{1, 2, 3}, y(6, 9.0f);
  std::vector<float> x(1);
  lowrank::LoraForwardOptions options;
  options.bias = bias.data();
  lowrank::lora_forward(lowrank::row_major<const float>(x.data(), 2, 0), WeightView<const float>{lowrank::row_major<const float>(w.data(), 3, 0), Layout::out_in},
                        lowrank::row_major<const float>(a.data(), 2, 0), lowrank::row_major<const float>(b.data(), 3, 2), 1.0,
                        lowrank::row_major(y.data(), 2, 3), options);
  EXPECT_EQ(y, (std::vector<float>{1, 2, 3, 1, 2, 3}));
  // tokens == 0 and out == 0: nothing to do, nothing written.
  lowrank::lora_forward(lowrank::row_major<const float>(x.data(), 0, 2), WeightView<const float>{lowrank::row_major<const float>(w.data(), 3, 2), Layout::out_in},
                        lowrank::row_major<const float>(a.data(), 1, 2), lowrank::row_major<const float>(b.data(), 3, 1), 1.0,
                        lowrank::row_major(y.data(), 0, 3));
  EXPECT_EQ(y[0], 1.0f);
}

// ---- errors: message names the function and argument; Y unchanged -------------------------------

template <class F>
void expect_error(F&& f, const std::string& needle, const std::vector<float>& y, const std::vector<float>& before) {
  try {
    f();
    ADD_FAILURE() << "no error; expected one mentioning '" << needle << "'";
  } catch (const lowrank::Error& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
  }
  EXPECT_EQ(y, before);
}

TEST(LoraForwardErrors, BadInputThrowsAndLeavesYUnchanged) {
  const Index tokens = 3, in = 5, out = 4, r = 2;
  std::vector<float> x(tokens * in, 1.0f), w(out * in, 1.0f), a(r * in, 1.0f), b(out * r, 1.0f);
  std::vector<float> y(tokens * out, 7.0f);
  const std::vector<float> before = y;
  const auto X = lowrank::row_major<const float>(x.data(), tokens, in);
  const WeightView<const float> W{lowrank::row_major<const float>(w.data(), out, in), Layout::out_in};
  const auto A = lowrank::row_major<const float>(a.data(), r, in);
  const auto B = lowrank::row_major<const float>(b.data(), out, r);
  const auto Y = lowrank::row_major(y.data(), tokens, out);

  expect_error([&] { lowrank::lora_forward(X, WeightView<const float>{W.matrix, Layout::in_out}, A, B, 1.0, Y); },
               "lora_forward: X is 3x5 but W (4x5, in_out) has 4 input features", y, before);
  expect_error([&] { lowrank::lora_forward(X, W, A, B, 1.0, lowrank::row_major(y.data(), tokens, out - 1)); },
               "Y is 3x3 but must be tokens x out = 3x4", y, before);
  expect_error([&] { lowrank::lora_forward(X, W, lowrank::row_major<const float>(a.data(), r, in - 1), B, 1.0, Y); },
               "terms[0].A is 2x4", y, before);
  expect_error([&] { lowrank::lora_forward(X, W, A, lowrank::row_major<const float>(b.data(), out - 1, r), 1.0, Y); },
               "terms[0].B is 3x2", y, before);
  expect_error([&] { lowrank::lora_forward(X, W, A, lowrank::row_major<const float>(b.data(), out, 1), 1.0, Y); },
               "the rank) differ", y, before);
  expect_error([&] { lowrank::lora_forward(X, W, A, B, std::nan(""), Y); }, "terms[0].scale is nan", y, before);
  expect_error([&] { lowrank::lora_forward(X, W, A, B, 1.0, MatrixView<float>(y.data(), tokens, out, 1, 1)); },
               "Y (3x4, strides 1, 1) has overlapping elements", y, before);
  expect_error([&] { lowrank::lora_forward(X, W, A, B, 1.0, MatrixView<float>(y.data(), tokens, out, -4, 1)); },
               "strides must be positive", y, before);
  expect_error([&] { lowrank::lora_forward(X, W, A, B, 1.0, MatrixView<float>(nullptr, tokens, out, out, 1)); },
               "Y is 3x4 but its data pointer is null", y, before);
  // Aliasing: Y over X, W, A, B, bias.
  std::vector<float> big(200, 1.0f);
  const std::vector<float> big_before = big;
  const auto Yb = lowrank::row_major(big.data() + 100, tokens, out);
  expect_error([&] { lowrank::lora_forward(lowrank::row_major<const float>(big.data() + 98, tokens, in), W, A, B, 1.0, Yb); },
               "Y's memory (3x4) overlaps X's", big, big_before);
  expect_error([&] {
    lowrank::lora_forward(X, WeightView<const float>{lowrank::row_major<const float>(big.data() + 110, out, in), Layout::out_in}, A, B, 1.0, Yb);
  }, "overlaps W's", big, big_before);
  expect_error([&] { lowrank::lora_forward(X, W, lowrank::row_major<const float>(big.data() + 95, r, in), B, 1.0, Yb); },
               "overlaps terms[0].A's", big, big_before);
  expect_error([&] { lowrank::lora_forward(X, W, A, lowrank::row_major<const float>(big.data() + 111, out, r), 1.0, Yb); },
               "overlaps terms[0].B's", big, big_before);
  LoraForwardOptions options;
  options.bias = big.data() + 99;
  expect_error([&] { lowrank::lora_forward(X, W, A, B, 1.0, Yb, options); }, "overlaps the bias", big, big_before);
  // Mixed batches: adapter count and indices.
  const LoraTerm terms[] = {{A, B, 1.0}};
  std::vector<std::int32_t> adapter{0, -1};
  expect_error([&] { lowrank::lora_forward_mixed(X, W, std::span<const LoraTerm>(terms), adapter, Y); },
               "lora_forward_mixed: adapter has 2 entries but X is 3x5", y, before);
  adapter = {0, 1, -1};
  expect_error([&] { lowrank::lora_forward_mixed(X, W, std::span<const LoraTerm>(terms), adapter, Y); },
               "adapter[1] is 1", y, before);
  adapter = {0, -2, -1};
  expect_error([&] { lowrank::lora_forward_mixed(X, W, std::span<const LoraTerm>(terms), adapter, Y); },
               "adapter[1] is -2", y, before);
}

std::vector<Target> all_targets() { return {Target::scalar, Target::avx2, Target::avx2_128, Target::avx512}; }

INSTANTIATE_TEST_SUITE_P(Targets, LoraForward, ::testing::ValuesIn(all_targets()),
                         [](const testing::TestParamInfo<Target>& info) {
                           return std::string(lowrank::to_string(info.param));
                         });

}  // namespace
