// rank_update against (1) a naive float64 reference with error bounds derived from the unit
// roundoff, and (2) a bit-exact emulation of the documented per-element arithmetic
// (acc = W(i,j); acc = fma(alpha*U(i,k), V(j,k), acc) for k = 0..r-1; round once), on every
// compiled-and-supported target, every storage type, awkward shapes and strides.
#include <gtest/gtest.h>

#include <bit>
#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "lowrank/lowrank.hpp"
#include "test_util.hpp"

namespace {

using namespace lowrank_test;
using lowrank::MatrixView;
using lowrank::Target;

bool supported(Target t) { return (lowrank::supported_targets() & static_cast<std::uint32_t>(t)) != 0; }

class RankUpdate : public ::testing::TestWithParam<Target> {
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
  bool fused() const { return GetParam() != Target::scalar; }
};

template <class T>
using C = lowrank::compute_t<T>;

template <class T>
C<T> to_c(T x) {
  return static_cast<C<T>>(x);
}

// The documented arithmetic of one element, in the compute type.
template <class TW, class TF>
C<TW> emulate_element(const MatrixView<const TW>& w, const MatrixView<const TF>& u, const MatrixView<const TF>& v,
                      double alpha, Index i, Index j, bool fused) {
  using CT = C<TW>;
  CT acc = to_c(w(i, j));
  for (Index k = 0; k < u.cols; ++k) {
    const CT a = static_cast<CT>(alpha * to_double(u(i, k)));
    const CT b = static_cast<CT>(to_double(v(j, k)));
    acc = fused ? std::fma(a, b, acc) : a * b + acc;  // this TU is built with -ffp-contract=off
  }
  return acc;
}

template <class T>
std::uint64_t bits_of(T x) {
  if constexpr (sizeof(T) == 8) return std::bit_cast<std::uint64_t>(x);
  if constexpr (sizeof(T) == 4) return std::bit_cast<std::uint32_t>(x);
  if constexpr (sizeof(T) == 2) return std::bit_cast<std::uint16_t>(x);
}

template <class TW, class TF>
void check_case(Index m, Index n, Index r, Order wo, Order uo, Order vo, double alpha, bool fused, std::mt19937_64& rng) {
  SCOPED_TRACE(testing::Message() << type_name<TW>() << " W, " << type_name<TF>() << " factors, " << m << "x" << n
                                  << " r=" << r << " W " << order_name(wo) << " U " << order_name(uo) << " V "
                                  << order_name(vo) << " alpha=" << alpha);
  auto w = make_matrix<TW>(m, n, wo, rng);
  auto u = make_matrix<TF>(m, r, uo, rng);
  auto v = make_matrix<TF>(n, r, vo, rng);
  const std::vector<TW> before = w.storage;
  const MatrixView<const TW> w0(before.data() + (w.view.data - w.storage.data()), m, n, w.view.row_stride,
                                w.view.col_stride);
  const MatrixView<const TF> uc = lowrank::detail::const_view(u.view);
  const MatrixView<const TF> vc = lowrank::detail::const_view(v.view);

  lowrank::rank_update(w.view, uc, vc, alpha);

  // Elements outside the view are untouched.
  std::vector<char> inside(w.storage.size(), 0);
  for (Index i = 0; i < m; ++i)
    for (Index j = 0; j < n; ++j) inside[static_cast<std::size_t>(&w.view(i, j) - w.storage.data())] = 1;
  for (std::size_t e = 0; e < w.storage.size(); ++e)
    if (!inside[e]) {
      ASSERT_EQ(bits_of(w.storage[e]), bits_of(before[e])) << "wrote outside the view at " << e;
    }

  const double uc_ = unit_roundoff<C<TW>>();
  const double us = std::is_same_v<TW, C<TW>> ? 0.0 : unit_roundoff<TW>();
  const double gamma = fused ? r + 2.0 : 2.0 * r + 2.0;
  for (Index i = 0; i < m; ++i)
    for (Index j = 0; j < n; ++j) {
      // (1) float64 reference with a rounding-error bound.
      double ref = to_double(w0(i, j)), magnitude = std::abs(ref);
      for (Index k = 0; k < r; ++k) {
        const double p = alpha * to_double(uc(i, k)) * to_double(vc(j, k));
        ref += p;
        magnitude += std::abs(p);
      }
      const double got = to_double(w.view(i, j));
      const double tol = gamma * uc_ * magnitude * (1 + us) + us * std::abs(ref) + (us > 0 ? 0x1.0p-24 : 0.0);
      ASSERT_LE(std::abs(got - ref), tol) << "at (" << i << ", " << j << "): got " << got << ", reference " << ref;
      // (2) bit-exact emulation, rounded into storage by Eigen's conversion.
      const TW expected = static_cast<TW>(emulate_element(w0, uc, vc, alpha, i, j, fused));
      ASSERT_EQ(bits_of(w.view(i, j)), bits_of(expected)) << "at (" << i << ", " << j << ")";
    }
}

struct Shape {
  Index m, n, r;
};
// 1x1, single rows/columns, primes, vector width +- 1 for 8/16/32 lanes, tall and wide, rank above
// the tile sizes.
const Shape kShapes[] = {{1, 1, 1},   {1, 17, 3},  {17, 1, 2},  {7, 13, 5},  {5, 7, 1},   {15, 33, 4},
                         {16, 31, 2}, {31, 16, 3}, {13, 65, 1}, {9, 97, 17}, {37, 29, 64}, {6, 16, 1},
                         {8, 32, 2},  {2, 300, 3}, {300, 2, 3}};
const Order kWOrders[] = {Order::row_major, Order::col_major, Order::padded_row, Order::padded_col,
                          Order::both_strided};

template <class TW, class TF>
void check_all_shapes(bool fused, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  for (const Shape& s : kShapes)
    for (Order wo : kWOrders) {
      check_case<TW, TF>(s.m, s.n, s.r, wo, Order::col_major, Order::padded_row, 0.75, fused, rng);
      if (testing::Test::HasFatalFailure()) return;
      check_case<TW, TF>(s.m, s.n, s.r, wo, Order::both_strided, Order::row_major, -1.5, fused, rng);
      if (testing::Test::HasFatalFailure()) return;
    }
}

TEST_P(RankUpdate, F64MatchesReference) { check_all_shapes<double, double>(fused(), 1); }
TEST_P(RankUpdate, F32MatchesReference) { check_all_shapes<float, float>(fused(), 2); }
TEST_P(RankUpdate, Bf16MatchesReference) { check_all_shapes<bf16, bf16>(fused(), 3); }
TEST_P(RankUpdate, F16MatchesReference) { check_all_shapes<f16, f16>(fused(), 4); }
TEST_P(RankUpdate, MixedFactorTypesMatchReference) {
  check_all_shapes<bf16, float>(fused(), 5);
  check_all_shapes<f16, float>(fused(), 6);
  check_all_shapes<float, double>(fused(), 7);
  check_all_shapes<double, float>(fused(), 8);
  check_all_shapes<float, bf16>(fused(), 9);
}

// Results are bitwise independent of the thread count (and so of how rows are split).
template <class TW>
void check_thread_independence(const lowrank::RankUpdateOptions& options) {
  for (Order wo : {Order::row_major, Order::col_major, Order::both_strided}) {
    SCOPED_TRACE(testing::Message() << type_name<TW>() << " W " << order_name(wo));
    std::mt19937_64 rng(11);
    auto w1 = make_matrix<TW>(203, 301, wo, rng);
    auto w2 = w1;
    w2.view.data = w2.storage.data() + (w1.view.data - w1.storage.data());
    auto u = make_matrix<float>(203, 5, Order::col_major, rng);
    auto v = make_matrix<float>(301, 5, Order::col_major, rng);
    lowrank::set_num_threads(1);
    lowrank::rank_update(w1.view, lowrank::detail::const_view(u.view), lowrank::detail::const_view(v.view), 0.3,
                         options);
    lowrank::set_num_threads(2);
    lowrank::rank_update(w2.view, lowrank::detail::const_view(u.view), lowrank::detail::const_view(v.view), 0.3,
                         options);
    ASSERT_EQ(0, std::memcmp(w1.storage.data(), w2.storage.data(), w1.storage.size() * sizeof(TW)));
  }
}

TEST_P(RankUpdate, ThreadCountDoesNotChangeBits) {
  check_thread_independence<double>({});
  check_thread_independence<float>({});
  check_thread_independence<bf16>({});
  check_thread_independence<f16>({});
  lowrank::RankUpdateOptions sr;
  sr.rounding = lowrank::Rounding::stochastic;
  sr.seed = 77;
  check_thread_independence<bf16>(sr);
  check_thread_independence<f16>(sr);
}

TEST_P(RankUpdate, WeightLayoutsAgree) {
  // The same out x in weight stored both ways gets the same update, bit for bit.
  std::mt19937_64 rng(12);
  const Index out = 23, in = 41, r = 6;
  auto w_out_in = make_matrix<float>(out, in, Order::row_major, rng);
  std::vector<float> stored_in_out(static_cast<std::size_t>(in * out));
  auto w_in_out = lowrank::row_major(stored_in_out.data(), in, out);
  for (Index i = 0; i < out; ++i)
    for (Index j = 0; j < in; ++j) w_in_out(j, i) = w_out_in.view(i, j);
  auto u = make_matrix<float>(out, r, Order::col_major, rng);
  auto v = make_matrix<float>(in, r, Order::col_major, rng);
  const auto uc = lowrank::detail::const_view(u.view);
  const auto vc = lowrank::detail::const_view(v.view);
  lowrank::rank_update(lowrank::WeightView<float>{w_out_in.view, lowrank::Layout::out_in}, uc, vc, -0.4);
  lowrank::rank_update(lowrank::WeightView<float>{w_in_out, lowrank::Layout::in_out}, uc, vc, -0.4);
  for (Index i = 0; i < out; ++i)
    for (Index j = 0; j < in; ++j) ASSERT_EQ(w_out_in.view(i, j), w_in_out(j, i)) << i << ", " << j;
}

TEST_P(RankUpdate, EigenObjectsAndBlocks) {
  Eigen::MatrixXf w = Eigen::MatrixXf::Random(40, 30);
  const Eigen::MatrixXf u = Eigen::MatrixXf::Random(40, 3);
  const Eigen::MatrixXf v = Eigen::MatrixXf::Random(30, 3);
  Eigen::MatrixXd expected = w.cast<double>() + 0.5 * u.cast<double>() * v.cast<double>().transpose();
  lowrank::rank_update(w, u, v, 0.5);
  EXPECT_LE((w.cast<double>() - expected).cwiseAbs().maxCoeff(), 1e-5);
  // A block of a row-major matrix, passed as a temporary.
  Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor> big = Eigen::MatrixXd::Random(50, 60);
  const Eigen::MatrixXd before = big;
  const Eigen::MatrixXd bu = Eigen::MatrixXd::Random(10, 2), bv = Eigen::MatrixXd::Random(20, 2);
  lowrank::rank_update(big.block(5, 7, 10, 20), bu, bv, 2.0);
  Eigen::MatrixXd expect_big = before;
  expect_big.block(5, 7, 10, 20) += 2.0 * bu * bv.transpose();
  EXPECT_LE((Eigen::MatrixXd(big) - expect_big).cwiseAbs().maxCoeff(), 1e-13);
}

TEST_P(RankUpdate, UpdateThenNegatedUpdateRestoresW) {
  std::mt19937_64 rng(13);
  auto w = make_matrix<double>(33, 47, Order::padded_row, rng);
  const auto original = w.storage;
  auto u = make_matrix<double>(33, 4, Order::col_major, rng);
  auto v = make_matrix<double>(47, 4, Order::col_major, rng);
  const auto uc = lowrank::detail::const_view(u.view), vc = lowrank::detail::const_view(v.view);
  lowrank::rank_update(w.view, uc, vc, 1.25);
  lowrank::rank_update(w.view, uc, vc, -1.25);
  for (std::size_t e = 0; e < original.size(); ++e) ASSERT_NEAR(w.storage[e], original[e], 64 * 0x1.0p-53 * 8);
}

TEST_P(RankUpdate, NaNPolicy) {
  // NaN in W or the factors propagates (also through bf16/fp16 storage); alpha == 0 reads nothing.
  std::vector<bf16> w(12, bf16(1.0f));
  w[5] = bf16(NAN);
  std::vector<float> u(3, 1.0f), v(4, 2.0f);
  u[2] = NAN;
  lowrank::rank_update(lowrank::row_major(w.data(), 3, 4), lowrank::MatrixView<const float>(u.data(), 3, 1, 1, 3),
                       lowrank::MatrixView<const float>(v.data(), 4, 1, 1, 4), 1.0);
  for (Index i = 0; i < 3; ++i)
    for (Index j = 0; j < 4; ++j) {
      const float x = static_cast<float>(w[static_cast<std::size_t>(i * 4 + j)]);
      if (i == 2 || (i == 1 && j == 1)) {
        EXPECT_TRUE(std::isnan(x)) << i << ", " << j;
      } else {
        EXPECT_EQ(x, 3.0f) << i << ", " << j;
      }
    }
  std::vector<float> w2(12, 1.0f);
  lowrank::rank_update(lowrank::row_major(w2.data(), 3, 4), lowrank::MatrixView<const float>(u.data(), 3, 1, 1, 3),
                       lowrank::MatrixView<const float>(v.data(), 4, 1, 1, 4), 0.0);
  for (float x : w2) EXPECT_EQ(x, 1.0f);
}

INSTANTIATE_TEST_SUITE_P(Targets, RankUpdate,
                         testing::Values(Target::scalar, Target::avx2, Target::avx2_128, Target::avx512),
                         [](const testing::TestParamInfo<Target>& info) {
                           return std::string(lowrank::to_string(info.param));
                         });

// ---- stochastic rounding ------------------------------------------------------------------------

template <class TW>
struct StochasticCase {
  float start;      // every element of W
  double delta;     // alpha * u * v, a fraction of the gap above or below `start`
  float low, high;  // the two representable neighbours of start + delta
};

template <class TW>
void check_unbiased(const StochasticCase<TW>& c, std::uint64_t seed) {
  SCOPED_TRACE(testing::Message() << type_name<TW>() << " start " << c.start << " delta " << c.delta);
  const Index m = 256, n = 256;
  std::vector<TW> w(static_cast<std::size_t>(m * n), TW(c.start));
  std::vector<float> ones_m(m, 1.0f), ones_n(n, 1.0f);
  lowrank::RankUpdateOptions options;
  options.rounding = lowrank::Rounding::stochastic;
  options.seed = seed;
  lowrank::rank_update(lowrank::row_major(w.data(), m, n), lowrank::MatrixView<const float>(ones_m.data(), m, 1, 1, m),
                       lowrank::MatrixView<const float>(ones_n.data(), n, 1, 1, n), c.delta, options);
  double sum = 0;
  int highs = 0;
  for (const TW& x : w) {
    const float f = static_cast<float>(x);
    ASSERT_TRUE(f == c.low || f == c.high) << f;
    highs += f == c.high;
    sum += f;
  }
  const double exact = static_cast<double>(c.start) + c.delta;
  const double p = (exact - c.low) / (static_cast<double>(c.high) - c.low);
  const double count = static_cast<double>(m * n);
  const double se = std::sqrt(p * (1 - p) / count);
  EXPECT_NEAR(highs / count, p, 5 * se);
  EXPECT_NEAR(sum / count, exact, 5 * se * (static_cast<double>(c.high) - c.low));
}

TEST(RankUpdateStochastic, IsUnbiasedForBf16AndF16) {
  const double b = 0x1.0p-7, h = 0x1.0p-10;  // ulp at 1 for bf16 and fp16
  check_unbiased<bf16>({1.0f, 0.3 * b, 1.0f, 1.0f + static_cast<float>(b)}, 1);
  check_unbiased<bf16>({1.0f, -0.3 * b, 1.0f - static_cast<float>(b / 2), 1.0f}, 2);
  check_unbiased<bf16>({-3.0f, 0.7 * 2 * b, -3.0f, -3.0f + static_cast<float>(2 * b)}, 3);
  check_unbiased<f16>({1.0f, 0.3 * h, 1.0f, 1.0f + static_cast<float>(h)}, 4);
  check_unbiased<f16>({1.0f, -0.45 * h, 1.0f - static_cast<float>(h / 2), 1.0f}, 5);
  check_unbiased<f16>({0.0f, 0.25 * 0x1.0p-24, 0.0f, 0x1.0p-24f}, 6);  // subnormal gap
  check_unbiased<f16>({1000.0f, 0.5 * 0.5, 1000.0f, 1000.5f}, 7);
}

TEST(RankUpdateStochastic, RoundingNearestEvenIsBiasedThere) {
  // The same update rounded to nearest never moves W: the reason stochastic rounding exists.
  std::vector<bf16> w(64, bf16(1.0f));
  std::vector<float> ones(64, 1.0f);
  lowrank::rank_update(lowrank::row_major(w.data(), 8, 8), lowrank::MatrixView<const float>(ones.data(), 8, 1, 1, 8),
                       lowrank::MatrixView<const float>(ones.data(), 8, 1, 1, 8), 0.3 * 0x1.0p-7);
  for (const bf16& x : w) EXPECT_EQ(static_cast<float>(x), 1.0f);
}

TEST(RankUpdateStochastic, SeedsAndStreamsSelectThePattern) {
  auto run = [](std::uint64_t seed, std::uint64_t stream) {
    std::vector<bf16> w(64 * 64, bf16(1.0f));
    std::vector<float> ones(64, 1.0f);
    lowrank::RankUpdateOptions o{lowrank::Rounding::stochastic, seed, stream};
    lowrank::rank_update(lowrank::row_major(w.data(), 64, 64),
                         lowrank::MatrixView<const float>(ones.data(), 64, 1, 1, 64),
                         lowrank::MatrixView<const float>(ones.data(), 64, 1, 1, 64), 0.5 * 0x1.0p-7, o);
    std::vector<std::uint16_t> bits;
    for (auto x : w) bits.push_back(std::bit_cast<std::uint16_t>(x));
    return bits;
  };
  EXPECT_EQ(run(5, 0), run(5, 0));
  EXPECT_NE(run(5, 0), run(6, 0));
  EXPECT_NE(run(5, 0), run(5, 1));
}

TEST(RankUpdateStochastic, BlocksWithTheirOriginsMatchOneWholeCall) {
  // A weight updated row block by row block (as a streaming merge does), or column block by column
  // block in the Conv1D layout, gives bitwise the result of one call on the whole matrix.
  std::mt19937_64 rng(8);
  const Index out = 45, in = 70, r = 5;
  auto w = make_matrix<bf16>(out, in, Order::row_major, rng);
  auto u = make_matrix<float>(out, r, Order::row_major, rng);
  auto v = make_matrix<float>(in, r, Order::row_major, rng);
  const auto uc = lowrank::detail::const_view(u.view), vc = lowrank::detail::const_view(v.view);
  lowrank::RankUpdateOptions o{lowrank::Rounding::stochastic, 11, 4};
  std::vector<bf16> whole(static_cast<std::size_t>(out * in));
  for (Index i = 0; i < out; ++i)
    for (Index j = 0; j < in; ++j) whole[static_cast<std::size_t>(i * in + j)] = w.view(i, j);
  std::vector<bf16> rows = whole;
  lowrank::rank_update(lowrank::row_major(whole.data(), out, in), uc, vc, 0.7, o);

  for (Index i0 = 0; i0 < out; i0 += 7) {
    const Index h = std::min<Index>(7, out - i0);
    auto ob = o;
    ob.index_row0 = static_cast<std::uint64_t>(i0);
    lowrank::rank_update(lowrank::row_major(rows.data() + i0 * in, h, in),
                         lowrank::MatrixView<const float>(uc.data + i0 * uc.row_stride, h, r, uc.row_stride, uc.col_stride),
                         vc, 0.7, ob);
  }
  // Conv1D storage (in x out), updated in blocks of stored rows = column blocks of the out x in matrix.
  std::vector<bf16> t(static_cast<std::size_t>(in * out));
  for (Index i = 0; i < out; ++i)
    for (Index j = 0; j < in; ++j) t[static_cast<std::size_t>(j * out + i)] = w.view(i, j);
  for (Index j0 = 0; j0 < in; j0 += 16) {
    const Index h = std::min<Index>(16, in - j0);
    auto ob = o;
    ob.index_col0 = static_cast<std::uint64_t>(j0);
    ob.index_cols = static_cast<std::uint64_t>(in);
    const lowrank::WeightView<bf16> wv{lowrank::row_major(t.data() + j0 * out, h, out), lowrank::Layout::in_out};
    lowrank::rank_update(wv, uc,
                         lowrank::MatrixView<const float>(vc.data + j0 * vc.row_stride, h, r, vc.row_stride, vc.col_stride),
                         0.7, ob);
  }
  for (Index i = 0; i < out; ++i)
    for (Index j = 0; j < in; ++j) {
      const auto k = static_cast<std::size_t>(i * in + j);
      ASSERT_EQ(std::bit_cast<std::uint16_t>(rows[k]), std::bit_cast<std::uint16_t>(whole[k])) << i << ", " << j;
      ASSERT_EQ(std::bit_cast<std::uint16_t>(t[static_cast<std::size_t>(j * out + i)]),
                std::bit_cast<std::uint16_t>(whole[k]))
          << i << ", " << j;
    }
  auto bad = o;
  bad.index_cols = 10;
  EXPECT_THROW(lowrank::rank_update(lowrank::row_major(whole.data(), out, in), uc, vc, 0.7, bad), lowrank::Error);
}

TEST(RankUpdateStochastic, StaysWithinOneUlpOfTheExactResult) {
  std::mt19937_64 rng(21);
  for (Order wo : {Order::row_major, Order::col_major, Order::both_strided}) {
    auto w = make_matrix<f16>(37, 53, wo, rng);
    const auto before = w.storage;
    auto u = make_matrix<float>(37, 3, Order::col_major, rng);
    auto v = make_matrix<float>(53, 3, Order::row_major, rng);
    lowrank::RankUpdateOptions o{lowrank::Rounding::stochastic, 3, 0};
    lowrank::rank_update(w.view, lowrank::detail::const_view(u.view), lowrank::detail::const_view(v.view), 0.9, o);
    const lowrank::MatrixView<const f16> w0(before.data() + (w.view.data - w.storage.data()), 37, 53,
                                            w.view.row_stride, w.view.col_stride);
    for (Index i = 0; i < 37; ++i)
      for (Index j = 0; j < 53; ++j) {
        double ref = to_double(w0(i, j)), mag = std::abs(ref);
        for (Index k = 0; k < 3; ++k) {
          ref += 0.9 * u.view(i, k) * v.view(j, k);
          mag += std::abs(0.9 * u.view(i, k) * v.view(j, k));
        }
        const double ulp = std::max(std::ldexp(1.0, std::ilogb(std::abs(ref)) - 10), 0x1.0p-24);
        ASSERT_LE(std::abs(to_double(w.view(i, j)) - ref), 2 * ulp + 8 * 0x1.0p-24 * mag) << i << ", " << j;
      }
  }
}

// ---- bad input -----------------------------------------------------------------------------------

template <class F>
void expect_error_and_unchanged(const std::vector<float>& w, F&& call, std::initializer_list<const char*> fragments) {
  const std::vector<float> before = w;
  try {
    call();
    ADD_FAILURE() << "no lowrank::Error thrown";
  } catch (const lowrank::Error& e) {
    const std::string what = e.what();
    EXPECT_EQ(what.rfind("rank_update: ", 0), 0u) << what;
    for (const char* f : fragments) EXPECT_NE(what.find(f), std::string::npos) << "'" << f << "' not in: " << what;
  }
  EXPECT_EQ(w, before) << "W was modified";
}

TEST(RankUpdateErrors, ClearMessagesAndWUnchanged) {
  std::vector<float> w(5 * 6, 1.0f), u(4 * 2, 1.0f), v(6 * 3, 1.0f), good_u(5 * 2, 1.0f), good_v(6 * 2, 1.0f);
  const auto W = lowrank::row_major(w.data(), 5, 6);
  using CV = lowrank::MatrixView<const float>;
  expect_error_and_unchanged(
      w, [&] { lowrank::rank_update(W, CV(u.data(), 4, 2, 2, 1), CV(good_v.data(), 6, 2, 2, 1), 1.0); },
      {"U has 4 rows", "W is 5x6"});
  expect_error_and_unchanged(
      w, [&] { lowrank::rank_update(W, CV(good_u.data(), 5, 2, 2, 1), CV(v.data(), 5, 2, 2, 1), 1.0); },
      {"V has 5 rows", "W is 5x6"});
  expect_error_and_unchanged(
      w, [&] { lowrank::rank_update(W, CV(good_u.data(), 5, 2, 2, 1), CV(v.data(), 6, 3, 3, 1), 1.0); },
      {"U is 5x2", "V is 6x3"});
  expect_error_and_unchanged(
      w, [&] { lowrank::rank_update(W, CV(good_u.data(), 5, 0, 1, 1), CV(good_v.data(), 6, 0, 1, 1), 1.0); },
      {"rank is 0"});
  for (double bad : {std::nan(""), double(INFINITY), -double(INFINITY)}) {
    expect_error_and_unchanged(
        w, [&] { lowrank::rank_update(W, CV(good_u.data(), 5, 2, 2, 1), CV(good_v.data(), 6, 2, 2, 1), bad); },
        {"alpha is", "finite", "5x6"});
  }
  // U's memory inside W's.
  expect_error_and_unchanged(
      w, [&] { lowrank::rank_update(W, CV(w.data() + 3, 5, 2, 2, 1), CV(good_v.data(), 6, 2, 2, 1), 1.0); },
      {"overlaps U", "5x6"});
  expect_error_and_unchanged(
      w, [&] { lowrank::rank_update(W, CV(good_u.data(), 5, 2, 2, 1), CV(w.data() + 20, 6, 2, 2, 1), 1.0); },
      {"overlaps V"});
  expect_error_and_unchanged(
      w, [&] { lowrank::rank_update(W, CV(nullptr, 5, 2, 2, 1), CV(good_v.data(), 6, 2, 2, 1), 1.0); },
      {"U is 5x2", "null"});
  expect_error_and_unchanged(
      w,
      [&] {
        lowrank::rank_update(lowrank::MatrixView<float>(w.data(), 5, 6, -6, 1), CV(good_u.data(), 5, 2, 2, 1),
                             CV(good_v.data(), 6, 2, 2, 1), 1.0);
      },
      {"strides (-6, 1)", "positive"});
  expect_error_and_unchanged(
      w,
      [&] {
        lowrank::rank_update(lowrank::MatrixView<float>(w.data(), 5, 6, 2, 1), CV(good_u.data(), 5, 2, 2, 1),
                             CV(good_v.data(), 6, 2, 2, 1), 1.0);
      },
      {"overlapping elements"});
}

TEST(RankUpdateErrors, EmptyWIsANoOpButShapesAreStillChecked) {
  std::vector<float> u(2, 1.0f), v(2, 1.0f);
  using CV = lowrank::MatrixView<const float>;
  lowrank::rank_update(lowrank::MatrixView<float>(nullptr, 0, 2, 2, 1), CV(nullptr, 0, 1, 1, 1), CV(v.data(), 2, 1, 1, 1),
                       1.0);
  EXPECT_THROW(lowrank::rank_update(lowrank::MatrixView<float>(nullptr, 0, 2, 2, 1), CV(u.data(), 2, 1, 1, 1),
                                    CV(v.data(), 2, 1, 1, 1), 1.0),
               lowrank::Error);
}

}  // namespace
