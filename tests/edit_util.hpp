// Helpers shared by the statistics and editing tests: error expectations, random vectors and
// matrices, and key statistics with a realistic (non-isotropic, non-zero mean) distribution.
#pragma once

#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <string>

#include "lowrank/core/error.hpp"
#include "lowrank/core/matrix.hpp"
#include "lowrank/linalg/moments.hpp"
#include "lowrank/linalg/spd.hpp"
#include "reference_linalg.hpp"

namespace lowrank_test {

/// `call()` must throw `lowrank::Error` whose message contains `needle`.
template <class F>
void expect_error(F&& call, const std::string& needle) {
  try {
    call();
    ADD_FAILURE() << "no lowrank::Error; expected one mentioning \"" << needle << "\"";
  } catch (const lowrank::Error& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
  }
}

inline lowrank::Vector<double> random_vector(lowrank::Index n, std::mt19937_64& rng) {
  std::normal_distribution<double> normal;
  lowrank::Vector<double> v(n);
  for (auto& x : v) x = normal(rng);
  return v;
}

inline lowrank::ColMatrix<double> random_matrix(lowrank::Index r, lowrank::Index c, std::mt19937_64& rng) {
  std::normal_distribution<double> normal;
  lowrank::ColMatrix<double> m(r, c);
  for (lowrank::Index j = 0; j < c; ++j)
    for (lowrank::Index i = 0; i < r; ++i) m(i, j) = normal(rng);
  return m;
}

/// The uncentred second moment of 4 d keys with a decaying per-coordinate scale and a mean of 0.2
/// (more samples than dimensions: C is definite and the factor needs no ridge), its inverse by
/// full-pivoting LU (independent of the Cholesky factor), and its factor.
struct KeyStats {
  lowrank::ColMatrix<double> C;
  lowrank::ColMatrix<double> Cinv;
  lowrank::linalg::SpdFactor factor;
};

inline KeyStats make_key_stats(lowrank::Index d, std::mt19937_64& rng) {
  std::normal_distribution<double> normal;
  lowrank::RowMatrix<double> keys(4 * d, d);
  for (lowrank::Index t = 0; t < keys.rows(); ++t)
    for (lowrank::Index i = 0; i < d; ++i)
      keys(t, i) = normal(rng) * (1.0 + 2.0 * std::exp(-0.1 * static_cast<double>(i))) + 0.2;
  lowrank::linalg::SecondMoment m(d);
  m.add(keys);
  KeyStats s{m.moment(), {}, {}};
  s.Cinv = reference_inverse(s.C);
  s.factor = lowrank::linalg::SpdFactor(s.C);
  EXPECT_EQ(s.factor.escalations(), 0);
  return s;
}

}  // namespace lowrank_test
