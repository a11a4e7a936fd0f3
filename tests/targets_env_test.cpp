// Run by ctest with LOWRANK_TARGET set (see tests/CMakeLists.txt): the variable picks the target
// on first use, and a bad value is a clear error.
#include <gtest/gtest.h>

#include <cstdlib>
#include <string>

#include "lowrank/lowrank.hpp"

TEST(TargetsEnv, VariableSelectsTheTarget) {
  const char* env = std::getenv("LOWRANK_TARGET");
  ASSERT_NE(env, nullptr) << "run with LOWRANK_TARGET set";
  const auto named = lowrank::parse_target(env);
  if (!named || !(lowrank::supported_targets() & static_cast<std::uint32_t>(*named))) {
    try {
      (void)lowrank::active_target();
      FAIL() << "no error for LOWRANK_TARGET=" << env;
    } catch (const lowrank::Error& e) {
      EXPECT_NE(std::string(e.what()).find("LOWRANK_TARGET"), std::string::npos) << e.what();
    }
    return;
  }
  EXPECT_EQ(lowrank::active_target(), *named);
  // The kernels run on it: a 1x1 update is exact on every target.
  float w = 1.0f, u = 2.0f, v = 3.0f;
  lowrank::rank_update(lowrank::row_major(&w, 1, 1), lowrank::MatrixView<const float>(&u, 1, 1, 1, 1),
                       lowrank::MatrixView<const float>(&v, 1, 1, 1, 1), 0.5);
  EXPECT_EQ(w, 4.0f);
}
