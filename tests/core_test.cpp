#include <gtest/gtest.h>

#include <cstring>
#include <string>
#include <type_traits>

#include "lowrank/lowrank.hpp"

namespace {

TEST(Error, IsAnInvalidArgumentWithFunctionPrefix) {
  static_assert(std::is_base_of_v<std::invalid_argument, lowrank::Error>);
  try {
    lowrank::detail::fail("some_function", "U has {} rows, W is {}x{}", 3, 4, 5);
    FAIL() << "fail() returned";
  } catch (const std::invalid_argument& e) {
    EXPECT_STREQ(e.what(), "some_function: U has 3 rows, W is 4x5");
  }
}

TEST(Layout, Names) {
  EXPECT_EQ(lowrank::to_string(lowrank::Layout::out_in), "out_in");
  EXPECT_EQ(lowrank::to_string(lowrank::Layout::in_out), "in_out");
}

TEST(ScalarType, Names) {
  EXPECT_EQ(lowrank::to_string(lowrank::scalar_type_of<double>), "f64");
  EXPECT_EQ(lowrank::to_string(lowrank::scalar_type_of<float>), "f32");
  EXPECT_EQ(lowrank::to_string(lowrank::scalar_type_of<lowrank::bf16>), "bf16");
  EXPECT_EQ(lowrank::to_string(lowrank::scalar_type_of<const lowrank::f16>), "f16");
  static_assert(std::is_same_v<lowrank::compute_t<lowrank::bf16>, float>);
  static_assert(std::is_same_v<lowrank::compute_t<double>, double>);
  static_assert(!lowrank::SupportedScalar<int>);
}

TEST(MatrixView, AddressesElementsOfEigenObjects) {
  Eigen::MatrixXf col(5, 7);
  Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor> row(5, 7);
  col.setRandom();
  row = col;
  const auto vc = lowrank::view(col);
  const auto vr = lowrank::view(row);
  const auto block = lowrank::view(col.block(1, 2, 3, 4));
  const auto const_view = lowrank::view(std::as_const(col));
  static_assert(std::is_same_v<decltype(const_view), const lowrank::MatrixView<const float>>);
  EXPECT_EQ(vc.row_stride, 1);
  EXPECT_EQ(vc.col_stride, 5);
  EXPECT_EQ(vr.row_stride, 7);
  EXPECT_EQ(vr.col_stride, 1);
  for (Eigen::Index i = 0; i < 5; ++i)
    for (Eigen::Index j = 0; j < 7; ++j) {
      EXPECT_EQ(vc(i, j), col(i, j));
      EXPECT_EQ(vr(i, j), col(i, j));
      EXPECT_EQ(vc.transposed()(j, i), col(i, j));
    }
  EXPECT_EQ(block.rows, 3);
  EXPECT_EQ(block(2, 3), col(3, 5));
}

TEST(MatrixView, Factories) {
  float data[12] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11};
  const auto r = lowrank::row_major(data, 3, 4);
  const auto c = lowrank::col_major(data, 3, 4);
  const auto padded = lowrank::row_major(data, 2, 3, 5);
  EXPECT_EQ(r(1, 2), 6.0f);
  EXPECT_EQ(c(1, 2), 7.0f);
  EXPECT_EQ(padded(1, 2), 7.0f);
}

TEST(WeightView, OutInAndInOut) {
  Eigen::MatrixXd stored(3, 5);  // in_out: 3 inputs, 5 outputs
  stored.setRandom();
  const auto w = lowrank::weight(stored, lowrank::Layout::in_out);
  EXPECT_EQ(w.out_features(), 5);
  EXPECT_EQ(w.in_features(), 3);
  EXPECT_EQ(w.as_out_in()(4, 2), stored(2, 4));
}

TEST(Threading, KnobRoundTrips) {
  const int before = lowrank::num_threads();
  EXPECT_GE(before, 1);
  if (lowrank::has_openmp()) {
    lowrank::set_num_threads(1);
    EXPECT_EQ(lowrank::num_threads(), 1);
    lowrank::set_num_threads(0);
    EXPECT_EQ(lowrank::num_threads(), before);
  }
}

TEST(Targets, ScalarAlwaysCompiledAndSupported) {
  EXPECT_TRUE(lowrank::compiled_targets() & static_cast<std::uint32_t>(lowrank::Target::scalar));
  EXPECT_EQ(lowrank::supported_targets() & ~lowrank::compiled_targets(), 0u);
  for (auto t : {lowrank::Target::scalar, lowrank::Target::avx2, lowrank::Target::avx2_128, lowrank::Target::avx512}) {
    EXPECT_EQ(lowrank::parse_target(lowrank::to_string(t)), t);
  }
  EXPECT_FALSE(lowrank::parse_target("sse9").has_value());
}

TEST(Targets, ForcingAnUnsupportedTargetThrowsAndKeepsTheActiveOne) {
  const lowrank::Target before = lowrank::active_target();
  for (auto t : {lowrank::Target::avx2, lowrank::Target::avx2_128, lowrank::Target::avx512}) {
    if (lowrank::supported_targets() & static_cast<std::uint32_t>(t)) continue;
    EXPECT_THROW(lowrank::force_target(t), lowrank::Error);
    EXPECT_EQ(lowrank::active_target(), before);
  }
  lowrank::force_target(lowrank::Target::scalar);
  EXPECT_EQ(lowrank::active_target(), lowrank::Target::scalar);
  lowrank::reset_target();
}

}  // namespace
