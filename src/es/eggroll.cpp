// EGGROLL: factors, population forward, fitness shaping, update contraction, ask/tell.
#include "lowrank/es/eggroll.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <utility>
#include <vector>

#if defined(LOWRANK_HAVE_OPENMP)
#include <omp.h>
#endif

#include "../core/aligned_vector.hpp"
#include "../cpu/es_kernels_api.hpp"
#include "../cpu/rank_update_packed.hpp"
#include "../cpu/view_checks-inl.hpp"
#include "lowrank/core/error.hpp"
#include "lowrank/core/threading.hpp"
#include "lowrank/kernels/lora_forward.hpp"
#include "lowrank/kernels/rank_update.hpp"

LOWRANK_BEGIN_NAMESPACE

namespace detail {
const EsKernels& es_kernels(Target target) {
  switch (target) {
#if defined(LOWRANK_HAVE_AVX2)
    case Target::avx2:
    case Target::avx2_128:
    case Target::avx512:  // AVX-512 CPUs run the AVX2 body (the normals are the same bits anyway)
      return es_kernels_avx2;
#endif
    default: return es_kernels_scalar;
  }
}
}  // namespace detail

namespace es {
namespace {

using detail::fail;

int thread_count(int max_threads) {
  const int t = num_threads();
  return max_threads > 0 ? std::min(max_threads, t) : t;
}

// Threads only when there is work for them: below about 64k generated normals (plus row terms) a
// parallel region costs more than it saves (measured on the cart-pole example).
constexpr double kThreadedWork = 65536.0;

int thread_count_for(double work, int max_threads) { return work >= kThreadedWork ? thread_count(max_threads) : 1; }

void check_perturbation(const char* fn, const Perturbation& p) {
  if (p.rank < 1) fail(fn, "rank is {}; it must be at least 1", p.rank);
  if (!(std::isfinite(p.sigma) && p.sigma > 0)) fail(fn, "sigma is {}; it must be positive and finite", p.sigma);
  if (p.population < 1) fail(fn, "population is {}; it must be at least 1", p.population);
  if (p.antithetic != Antithetic::none && p.population % 2 != 0) {
    fail(fn, "population is {} with antithetic sampling; it must be even (members are pairs)", p.population);
  }
  if (p.population > (std::int64_t{1} << 32)) fail(fn, "population is {}; at most 2^32 members", p.population);
}

void check_stream(const char* fn, Index out, Index in, int rank) {
  if (out < 0 || in < 0) fail(fn, "the weight is {}x{}; sizes must be non-negative", out, in);
  if (rank < 1) fail(fn, "rank is {}; it must be at least 1", rank);
  const double normals = (static_cast<double>(out) + static_cast<double>(in)) * rank;
  if (normals > static_cast<double>(max_stream_normals)) {
    fail(fn, "(in + out) * rank = ({} + {}) * {} normals exceeds the stream's 2^34", in, out, rank);
  }
}

// Normals [first, first + count) of the stream of (key, index) into out.
void fill_normals(const detail::EsKernels& k, const NoiseKey& key, std::uint32_t index, std::uint64_t first,
                  std::uint64_t count, float* out) {
  std::uint64_t e = first;
  const std::uint64_t end = first + count;
  // Leading partial block.
  while (e < end && e % 4 != 0) *out++ = noise_normal(key, index, e++);
  const std::uint64_t blocks = (end - e) / 4;
  if (blocks > 0) {
    k.normals(key, index, static_cast<std::uint32_t>(e / 4), blocks, out);
    out += 4 * blocks;
    e += 4 * blocks;
  }
  while (e < end) *out++ = noise_normal(key, index, e++);
}

// Buffers that only grow (cache-line aligned: the update packs the kernels' operands into them).
using detail::grow;

// The calling thread's buffers of the entry points (grow only: warmed-up calls do not allocate).
// Every buffer a parallel region uses is allocated before the region, on the calling thread: an
// allocation failure then throws std::bad_alloc to the caller (an exception leaving an OpenMP
// region would terminate the program). Per-thread scratch: one buffer per thread slot, each its
// own allocation (the largest single allocation does not grow with the thread count).
struct CallBuffers {
  std::vector<std::pair<std::uint32_t, Index>> order;
  std::vector<std::size_t> starts;
  detail::AlignedVector<float> u, v;
  std::vector<detail::AlignedVector<float>> slots;
  std::vector<float*> slot_ptr;
};
thread_local CallBuffers tls_call;

// n rounded up to a multiple of 16 floats (64 bytes).
std::size_t pad16(std::size_t n) { return (n + 15) / 16 * 16; }

// The calling thread's slot in the current parallel region (0 outside one, or without OpenMP).
int thread_slot() {
#if defined(LOWRANK_HAVE_OPENMP)
  return omp_get_thread_num();
#else
  return 0;
#endif
}

// Scratch of `floats` floats for each thread slot of a region of `threads` threads (one slot
// without OpenMP: the loops run serially); slot i at [i], for the thread with thread_slot() == i.
float* const* scratch_slots(int threads, std::size_t floats) {
#if defined(LOWRANK_HAVE_OPENMP)
  const auto slots = static_cast<std::size_t>(std::max(1, threads));
#else
  (void)threads;
  const std::size_t slots = 1;
#endif
  CallBuffers& cb = tls_call;
  if (cb.slots.size() < slots) cb.slots.resize(slots);
  if (cb.slot_ptr.size() < slots) cb.slot_ptr.resize(slots);
  for (std::size_t i = 0; i < slots; ++i) cb.slot_ptr[i] = grow(cb.slots[i], floats);
  return cb.slot_ptr.data();
}

// One thread's scratch for the population forward: the stream, the transposed factors, and copies
// of a strided row of X and of Y.
struct ForwardScratch {
  float *stream, *bt, *at, *x, *y;
};

// Floats of a ForwardScratch for the given shapes; `carve` lays one out from `base`.
struct ForwardScratchLayout {
  std::size_t stream = 0, bt = 0, at = 0, x = 0, y = 0;
  std::size_t total() const { return stream + bt + at + x + y; }
  ForwardScratch carve(float* base) const {
    return {base, base + stream, base + stream + bt, base + stream + bt + at, base + stream + bt + at + x};
  }
};

ForwardScratchLayout forward_scratch_layout(Index out, Index in, int r, bool x_copy, bool y_copy) {
  const std::size_t n_b = static_cast<std::size_t>(in) * r, n_a = static_cast<std::size_t>(out) * r;
  ForwardScratchLayout l;
  if (r != 4) l.stream = pad16(n_b + n_a);
  if (r != 1) l.bt = pad16(n_b), l.at = pad16(n_a);
  if (x_copy) l.x = pad16(static_cast<std::size_t>(in));
  if (y_copy) l.y = pad16(static_cast<std::size_t>(out));
  return l;
}

// Factors of noise index `index` into the scratch (stream order: B then A, row-major), and their
// transposes bt (r x in) and at (r x out); for r == 1 the transposes are the stream itself.
void factors_transposed(const detail::EsKernels& k, const NoiseKey& key, std::uint32_t index, Index out, Index in,
                        int r, const ForwardScratch& sc, const float*& bt, const float*& at) {
  const std::size_t n_b = static_cast<std::size_t>(in) * r, n_a = static_cast<std::size_t>(out) * r;
  if (r == 4) {  // generated transposed directly
    k.factors_t4(key, index, in, out, sc.bt, in, sc.at, out);
    bt = sc.bt;
    at = sc.at;
    return;
  }
  float* s = sc.stream;
  fill_normals(k, key, index, 0, n_b + n_a, s);
  if (r == 1) {
    bt = s;
    at = s + n_b;
    return;
  }
  float* b = sc.bt;
  float* a = sc.at;
  for (Index i = 0; i < in; ++i)
    for (int j = 0; j < r; ++j) b[static_cast<std::size_t>(j) * in + i] = s[static_cast<std::size_t>(i) * r + j];
  for (Index i = 0; i < out; ++i)
    for (int j = 0; j < r; ++j) a[static_cast<std::size_t>(j) * out + i] = s[n_b + static_cast<std::size_t>(i) * r + j];
  bt = b;
  at = a;
}

// Collapses fitness onto noise indices: w[k] = sum over members i with index k of sign_i f_i.
std::vector<double> collapse(std::span<const double> fitness, std::int64_t population, Antithetic antithetic) {
  std::vector<double> w(static_cast<std::size_t>(noise_count(population, antithetic)), 0.0);
  for (std::int64_t i = 0; i < population; ++i) {
    const MemberNoise mn = member_noise(i, population, antithetic);
    w[mn.index] += static_cast<double>(mn.sign) * fitness[static_cast<std::size_t>(i)];
  }
  return w;
}

void check_fitness_values(const char* fn, std::span<const double> fitness, std::int64_t population) {
  if (static_cast<std::int64_t>(fitness.size()) != population) {
    fail(fn, "fitness has {} values for a population of {}", fitness.size(), population);
  }
  for (std::size_t i = 0; i < fitness.size(); ++i) {
    if (!std::isfinite(fitness[i])) fail(fn, "fitness of member {} is {}; shaped fitness must be finite", i, fitness[i]);
  }
}

std::int64_t default_chunk(int rank) { return std::max<std::int64_t>(1, 256 / rank); }

}  // namespace

// ---- noise ------------------------------------------------------------------------------------

void eggroll_factors(const NoiseKey& key, std::uint32_t noise_index, Index out, Index in, int rank, float* A,
                     float* B) {
  constexpr const char* fn = "eggroll_factors";
  check_stream(fn, out, in, rank);
  if ((out > 0 && A == nullptr) || (in > 0 && B == nullptr)) fail(fn, "A or B is null for a {}x{} weight", out, in);
  const auto& k = detail::es_kernels(active_target());
  const std::uint64_t n_b = static_cast<std::uint64_t>(in) * rank;
  fill_normals(k, key, noise_index, 0, n_b, B);
  fill_normals(k, key, noise_index, n_b, static_cast<std::uint64_t>(out) * rank, A);
}

void dense_noise(const NoiseKey& key, std::uint32_t noise_index, std::int64_t length, float* z) {
  constexpr const char* fn = "dense_noise";
  if (length < 0 || static_cast<std::uint64_t>(length) > max_stream_normals) {
    fail(fn, "length is {}; it must be in [0, 2^34]", length);
  }
  if (length > 0 && z == nullptr) fail(fn, "z is null for {} values", length);
  fill_normals(detail::es_kernels(active_target()), key, noise_index, 0, static_cast<std::uint64_t>(length), z);
}

void dense_perturbation(const Perturbation& p, std::int64_t member, MatrixView<float> eps) {
  constexpr const char* fn = "dense_perturbation";
  check_perturbation(fn, p);
  detail::check_view(fn, "eps", eps);
  if (member < 0 || member >= p.population) fail(fn, "member {} is outside [0, {})", member, p.population);
  if (detail::self_overlapping(eps)) fail(fn, "eps ({}x{}) has overlapping elements", eps.rows, eps.cols);
  check_stream(fn, eps.rows, eps.cols, p.rank);
  const MemberNoise mn = member_noise(member, p.population, p.antithetic);
  const Index out = eps.rows, in = eps.cols;
  const int r = p.rank;
  std::vector<float> a(static_cast<std::size_t>(out) * r), b(static_cast<std::size_t>(in) * r);
  eggroll_factors(p.key, mn.index, out, in, r, a.data(), b.data());
  const double coef = static_cast<double>(mn.sign) / std::sqrt(static_cast<double>(r));
  for (Index i = 0; i < out; ++i) {
    for (Index j = 0; j < in; ++j) {
      double acc = 0;
      for (int c = 0; c < r; ++c) {
        acc += static_cast<double>(a[static_cast<std::size_t>(i) * r + c]) * b[static_cast<std::size_t>(j) * r + c];
      }
      eps(i, j) = static_cast<float>(coef * acc);
    }
  }
}

// ---- forward ----------------------------------------------------------------------------------

template <SupportedScalar TW>
void population_forward(MatrixView<const float> X, WeightView<const TW> W, const Perturbation& p,
                        std::span<const std::int64_t> members, MatrixView<float> Y, const ForwardOptions& options) {
  constexpr const char* fn = "population_forward";
  check_perturbation(fn, p);
  detail::check_view(fn, "X", X);
  detail::check_view(fn, "W", W.matrix);
  detail::check_view(fn, "Y", Y);
  const Index out = W.out_features(), in = W.in_features(), tokens = X.rows;
  if (X.cols != in) fail(fn, "X is {}x{} but W ({}, {}x{}) has {} inputs", X.rows, X.cols, to_string(W.layout), W.matrix.rows, W.matrix.cols, in);
  if (Y.rows != tokens || Y.cols != out) fail(fn, "Y is {}x{}; it must be {}x{} (tokens x out)", Y.rows, Y.cols, tokens, out);
  if (static_cast<Index>(members.size()) != tokens) {
    fail(fn, "members has {} entries for {} rows of X", members.size(), tokens);
  }
  for (std::size_t t = 0; t < members.size(); ++t) {
    if (members[t] < 0 || members[t] >= p.population) {
      fail(fn, "members[{}] = {} is outside [0, {})", t, members[t], p.population);
    }
  }
  check_stream(fn, out, in, p.rank);
  if (detail::self_overlapping(Y)) fail(fn, "Y ({}x{}) has overlapping elements", Y.rows, Y.cols);
  if (detail::spans_overlap(Y, X)) fail(fn, "Y's memory ({}x{}) overlaps X's ({}x{})", Y.rows, Y.cols, X.rows, X.cols);
  if (detail::spans_overlap(Y, W.matrix)) fail(fn, "Y's memory ({}x{}) overlaps W's", Y.rows, Y.cols);
  if (tokens == 0 || out == 0) return;

  // Rows grouped by noise index (each group generates its factors once), and the parallel
  // region's scratch, before Y is written: an allocation that fails leaves Y unchanged.
  std::vector<std::pair<std::uint32_t, Index>>& order = tls_call.order;
  order.resize(static_cast<std::size_t>(tokens));
  for (Index t = 0; t < tokens; ++t) {
    order[static_cast<std::size_t>(t)] = {member_noise(members[static_cast<std::size_t>(t)], p.population, p.antithetic).index, t};
  }
  std::sort(order.begin(), order.end());
  std::vector<std::size_t>& starts = tls_call.starts;
  starts.clear();
  for (std::size_t g = 0; g < order.size(); ++g) {
    if (g == 0 || order[g].first != order[g - 1].first) starts.push_back(g);
  }
  starts.push_back(order.size());
  const auto groups = static_cast<std::int64_t>(starts.size() - 1);
  const auto& k = detail::es_kernels(active_target());
  const double base_scale = p.sigma / std::sqrt(static_cast<double>(p.rank));
  const int threads = thread_count_for(static_cast<double>(groups + tokens) * static_cast<double>(in + out) * p.rank,
                                       options.max_threads);
  const bool x_unit = X.col_stride == 1, y_unit = Y.col_stride == 1;

  const ForwardScratchLayout layout = forward_scratch_layout(out, in, p.rank, !x_unit, !y_unit);
  float* const* const scratch = scratch_slots(threads, layout.total());

  // The shared base GEMM (validates the rest, e.g. the bias).
  linear_forward(X, W, Y, LoraForwardOptions{options.bias, options.max_threads});
  if (in == 0) return;

#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (threads > 1 && groups > 1)
  for (std::int64_t g = 0; g < groups; ++g) {
    const ForwardScratch sc = layout.carve(scratch[thread_slot()]);
    const std::size_t first = starts[static_cast<std::size_t>(g)], last = starts[static_cast<std::size_t>(g) + 1];
    const std::uint32_t index = order[first].first;
    if (p.rank == 4 && k.row_terms_t4 != nullptr && x_unit && y_unit && last - first <= detail::kMaxFusedRows) {
      // The group's rows in one pass over freshly generated factors (bitwise the path below).
      const float* xs[detail::kMaxFusedRows];
      float* ys[detail::kMaxFusedRows];
      float scales[detail::kMaxFusedRows];
      int rows = 0;
      for (std::size_t q = first; q < last; ++q, ++rows) {
        const Index t = order[q].second;
        const MemberNoise mn = member_noise(members[static_cast<std::size_t>(t)], p.population, p.antithetic);
        xs[rows] = &X(t, 0);
        ys[rows] = &Y(t, 0);
        scales[rows] = static_cast<float>(static_cast<double>(mn.sign) * base_scale);
      }
      k.row_terms_t4(p.key, index, in, out, rows, xs, ys, scales);
      continue;
    }
    const float *bt = nullptr, *at = nullptr;
    factors_transposed(k, p.key, index, out, in, p.rank, sc, bt, at);
    for (std::size_t q = first; q < last; ++q) {
      const Index t = order[q].second;
      const MemberNoise mn = member_noise(members[static_cast<std::size_t>(t)], p.population, p.antithetic);
      const auto scale = static_cast<float>(static_cast<double>(mn.sign) * base_scale);
      const float* x = &X(t, 0);
      if (!x_unit) {
        for (Index i = 0; i < in; ++i) sc.x[i] = X(t, i);
        x = sc.x;
      }
      float* y = &Y(t, 0);
      if (!y_unit) {
        y = sc.y;
        for (Index o = 0; o < out; ++o) y[o] = Y(t, o);
      }
      k.row_term(x, bt, at, in, out, p.rank, scale, y);
      if (!y_unit) {
        for (Index o = 0; o < out; ++o) Y(t, o) = y[o];
      }
    }
  }
}

template void population_forward<float>(MatrixView<const float>, WeightView<const float>, const Perturbation&,
                                        std::span<const std::int64_t>, MatrixView<float>, const ForwardOptions&);
template void population_forward<bf16>(MatrixView<const float>, WeightView<const bf16>, const Perturbation&,
                                       std::span<const std::int64_t>, MatrixView<float>, const ForwardOptions&);
template void population_forward<f16>(MatrixView<const float>, WeightView<const f16>, const Perturbation&,
                                      std::span<const std::int64_t>, MatrixView<float>, const ForwardOptions&);

// ---- fitness shaping --------------------------------------------------------------------------

std::int64_t shape_fitness(std::span<const double> raw, const ShapingConfig& config, Antithetic antithetic,
                           std::span<double> shaped) {
  constexpr const char* fn = "shape_fitness";
  const auto n = static_cast<std::int64_t>(raw.size());
  if (n == 0) fail(fn, "no fitness values (population 0)");
  if (shaped.size() != raw.size()) fail(fn, "shaped has {} values for {} raw values", shaped.size(), raw.size());
  if (!(std::isfinite(config.eps) && config.eps >= 0)) fail(fn, "eps is {}; it must be finite and >= 0", config.eps);
  if (config.shaping == Shaping::grouped_z_score &&
      (config.group_size < 1 || n % config.group_size != 0)) {
    fail(fn, "group_size is {}; it must be >= 1 and divide the population {}", config.group_size, n);
  }
  if (config.shaping == Shaping::antithetic_sign && (antithetic == Antithetic::none || n % 2 != 0)) {
    fail(fn, "antithetic_sign shaping needs antithetic pairs (population {}, antithetic {})", n,
         antithetic == Antithetic::none ? "none" : "on");
  }
  // Negate for minimisation; find non-finite values.
  std::vector<double> f(raw.begin(), raw.end());
  if (config.objective == Objective::minimize) {
    for (double& v : f) v = -v;
  }
  std::int64_t replaced = 0;
  double worst = INFINITY;
  std::int64_t first_bad = -1;
  for (std::int64_t i = 0; i < n; ++i) {
    if (std::isfinite(f[static_cast<std::size_t>(i)])) {
      worst = std::min(worst, f[static_cast<std::size_t>(i)]);
    } else if (first_bad < 0) {
      first_bad = i;
    }
  }
  if (first_bad >= 0) {
    if (config.non_finite == NonFiniteFitness::error) {
      fail(fn, "fitness of member {} is {} (population {}); pass NonFiniteFitness::worst to replace non-finite values",
           first_bad, raw[static_cast<std::size_t>(first_bad)], n);
    }
    if (!std::isfinite(worst)) fail(fn, "all {} fitness values are non-finite", n);
    for (double& v : f) {
      if (!std::isfinite(v)) v = worst, ++replaced;
    }
  }
  const auto mean_of = [](const double* p, std::int64_t count) {
    double s = 0;
    for (std::int64_t i = 0; i < count; ++i) s += p[i];
    return s / static_cast<double>(count);
  };
  switch (config.shaping) {
    case Shaping::none: break;
    case Shaping::z_score:
    case Shaping::grouped_z_score: {
      const double mean = mean_of(f.data(), n);
      double var = 0;
      for (double v : f) var += (v - mean) * (v - mean);
      var /= static_cast<double>(n);
      const double inv = 1.0 / std::sqrt(var + config.eps);
      if (config.shaping == Shaping::z_score) {
        for (double& v : f) v = (v - mean) * inv;
      } else {
        for (std::int64_t g0 = 0; g0 < n; g0 += config.group_size) {
          const double gm = mean_of(f.data() + g0, config.group_size);
          for (std::int64_t i = g0; i < g0 + config.group_size; ++i) f[static_cast<std::size_t>(i)] = (f[static_cast<std::size_t>(i)] - gm) * inv;
        }
      }
      break;
    }
    case Shaping::centered_ranks: {
      std::vector<std::int64_t> idx(static_cast<std::size_t>(n));
      std::iota(idx.begin(), idx.end(), std::int64_t{0});
      std::stable_sort(idx.begin(), idx.end(), [&](std::int64_t a, std::int64_t b) {
        return f[static_cast<std::size_t>(a)] < f[static_cast<std::size_t>(b)];
      });
      std::vector<double> out(static_cast<std::size_t>(n));
      for (std::int64_t lo = 0; lo < n;) {
        std::int64_t hi = lo + 1;
        while (hi < n && f[static_cast<std::size_t>(idx[static_cast<std::size_t>(hi)])] == f[static_cast<std::size_t>(idx[static_cast<std::size_t>(lo)])]) ++hi;
        const double midrank = 0.5 * static_cast<double>(lo + hi - 1);
        const double value = n > 1 ? midrank / static_cast<double>(n - 1) - 0.5 : 0.0;
        for (std::int64_t q = lo; q < hi; ++q) out[static_cast<std::size_t>(idx[static_cast<std::size_t>(q)])] = value;
        lo = hi;
      }
      f = std::move(out);
      break;
    }
    case Shaping::antithetic_sign: {
      std::vector<double> out(static_cast<std::size_t>(n), 0.0);
      const std::int64_t pairs = n / 2;
      for (std::int64_t k = 0; k < pairs; ++k) {
        const std::int64_t plus = antithetic == Antithetic::interleaved ? 2 * k : k;
        const std::int64_t minus = antithetic == Antithetic::interleaved ? 2 * k + 1 : k + pairs;
        const double d = f[static_cast<std::size_t>(plus)] - f[static_cast<std::size_t>(minus)];
        const double s = d > 0 ? 0.5 : (d < 0 ? -0.5 : 0.0);
        out[static_cast<std::size_t>(plus)] = s;
        out[static_cast<std::size_t>(minus)] = -s;
      }
      f = std::move(out);
      break;
    }
  }
  std::copy(f.begin(), f.end(), shaped.begin());
  return replaced;
}

// ---- update -----------------------------------------------------------------------------------

double update_scale(UpdateScale scale, std::int64_t population, double sigma) noexcept {
  const auto n = static_cast<double>(population);
  switch (scale) {
    case UpdateScale::gradient: return 1.0 / (n * sigma);
    case UpdateScale::official: return sigma / std::sqrt(n);
    case UpdateScale::paper:
    default: return 1.0 / n;
  }
}

namespace {

// Columns [k0, k0 + kn) of a packed operand (panels of `width` rows: packed[(p depth + k) width + i]
// holds row p width + i of column k, rows past `length` zero) from kn columns of `length` floats,
// `ld` apart. W > 0 fixes the width at compile time (the micro-tiles' 3, 6, 8, 16, 32: the
// copies become vector moves); W == 0 takes it from `width`.
template <int W>
void scatter_packed_w(float* packed, Index depth, Index width, const float* cols, Index length, Index ld, Index k0,
                      Index kn) {
  const Index w = W > 0 ? W : width;
  const Index full = length / w;
  for (Index p = 0; p < full; ++p) {
    float* dst = packed + (p * depth + k0) * w;
    for (Index k = 0; k < kn; ++k)
      for (Index i = 0; i < w; ++i) dst[k * w + i] = cols[k * ld + p * w + i];
  }
  if (full * w < length) {
    const Index rows = length - full * w;
    float* dst = packed + (full * depth + k0) * w;
    for (Index k = 0; k < kn; ++k)
      for (Index i = 0; i < w; ++i) dst[k * w + i] = i < rows ? cols[k * ld + full * w + i] : 0.0f;
  }
}

void scatter_packed(float* packed, Index depth, Index width, const float* cols, Index length, Index ld, Index k0,
                    Index kn) {
  switch (width) {
    case 3: return scatter_packed_w<3>(packed, depth, width, cols, length, ld, k0, kn);
    case 6: return scatter_packed_w<6>(packed, depth, width, cols, length, ld, k0, kn);
    case 8: return scatter_packed_w<8>(packed, depth, width, cols, length, ld, k0, kn);
    case 16: return scatter_packed_w<16>(packed, depth, width, cols, length, ld, k0, kn);
    case 32: return scatter_packed_w<32>(packed, depth, width, cols, length, ld, k0, kn);
    default: return scatter_packed_w<0>(packed, depth, width, cols, length, ld, k0, kn);
  }
}

}  // namespace

void aggregate_update(const Perturbation& p, std::span<const double> fitness, double c, MatrixView<float> G,
                      const AggregateOptions& options) {
  constexpr const char* fn = "aggregate_update";
  check_perturbation(fn, p);
  detail::check_view(fn, "G", G);
  if (detail::self_overlapping(G)) fail(fn, "G ({}x{}) has overlapping elements", G.rows, G.cols);
  check_fitness_values(fn, fitness, p.population);
  if (!std::isfinite(c)) fail(fn, "c is {}; it must be finite", c);
  if (options.chunk < 0) fail(fn, "chunk is {}; it must be >= 0", options.chunk);
  const Index out = G.rows, in = G.cols;
  check_stream(fn, out, in, p.rank);
  if (G.empty() || c == 0) return;

  const std::vector<double> w = collapse(fitness, p.population, p.antithetic);
  std::vector<std::uint32_t> active;
  for (std::size_t k = 0; k < w.size(); ++k) {
    if (w[k] != 0) active.push_back(static_cast<std::uint32_t>(k));
  }
  if (active.empty()) return;
  const int r = p.rank;
  const std::int64_t chunk = options.chunk > 0 ? options.chunk : default_chunk(r);
  const double coef = c / std::sqrt(static_cast<double>(r));
  const auto& kern = detail::es_kernels(active_target());
  const int threads =
      thread_count_for(static_cast<double>(active.size()) * static_cast<double>(in + out) * r, options.max_threads);
  const std::int64_t per = std::min<std::int64_t>(chunk, static_cast<std::int64_t>(active.size()));
  // The factors of noise index `index`, scaled: u = a_k A_k (out x r) and v = B_k (in x r), both
  // column-major (column j of u at u + j ldu, of v at v + j ldv); `stream` holds (in + out) r
  // floats of scratch when r is neither 1 nor 4.
  const std::size_t stream_size = r == 1 || r == 4 ? 0 : pad16(static_cast<std::size_t>(in + out) * r);
  auto factors = [&](std::uint32_t index, float* u, Index ldu, float* v, Index ldv, float* stream) {
    const auto a = static_cast<float>(coef * w[index]);
    const std::size_t n_b = static_cast<std::size_t>(in) * r;
    if (r == 1) {  // the stream is B then A: straight into V's and U's columns
      fill_normals(kern, p.key, index, 0, static_cast<std::uint64_t>(in), v);
      fill_normals(kern, p.key, index, static_cast<std::uint64_t>(in), static_cast<std::uint64_t>(out), u);
      for (Index i = 0; i < out; ++i) u[i] = a * u[i];
    } else if (r == 4) {  // generated transposed, straight into the columns
      kern.factors_t4(p.key, index, in, out, v, ldv, u, ldu);
      for (int j = 0; j < 4; ++j)
        for (Index i = 0; i < out; ++i) u[j * ldu + i] = a * u[j * ldu + i];
    } else {  // row-major factors: scatter their columns
      fill_normals(kern, p.key, index, 0, n_b + static_cast<std::uint64_t>(out) * r, stream);
      for (Index i = 0; i < in; ++i)
        for (int j = 0; j < r; ++j) v[j * ldv + i] = stream[static_cast<std::size_t>(i) * r + j];
      for (Index i = 0; i < out; ++i)
        for (int j = 0; j < r; ++j) u[j * ldu + i] = a * stream[n_b + static_cast<std::size_t>(i) * r + j];
    }
  };
  if (kern.update_fused == nullptr && G.col_stride == 1) {
    // SIMD targets, unit column stride: each group's factors are scattered into the rank
    // update's packed operands (U's columns in panels of MR rows, V's in blocks of NR rows), then
    // one rank_update_packed per chunk: the same bits as rank_update(G, U, V, 1) on the matrices
    // below, without forming the chunk's whole U and V and packing them again.
    // Groups of noise indices (about 16 columns of U and V each) per task: a panel's stretch for
    // the whole group is then one contiguous write (one column at a time wrote a few bytes into
    // every panel per column: 3% of the update, a TLB entry per panel).
    const std::int64_t group = std::max(1, 16 / r);
    // The group's columns 64 bytes more than a multiple of 64 bytes apart: at a multiple of 4 KiB
    // (any power-of-two length from 1024) the scatter's reads of one row from every column fall
    // into one L1 set and evict each other (measured: the scatter took 6% of a two-thread rank-4
    // update at d = 1024).
    const Index ldu = (out + 15) / 16 * 16 + 16, ldv = (in + 15) / 16 * 16 + 16;
    const std::size_t u_size = static_cast<std::size_t>(ldu) * r * group;
    const std::size_t v_size = static_cast<std::size_t>(ldv) * r * group;
    float* const* const scratch = scratch_slots(threads, u_size + v_size + stream_size);
    for (std::size_t c0 = 0; c0 < active.size(); c0 += static_cast<std::size_t>(per)) {
      const auto cnt =
          static_cast<std::int64_t>(std::min<std::size_t>(static_cast<std::size_t>(per), active.size() - c0));
      const Index depth = static_cast<Index>(cnt) * r;
      const detail::PackedOperands ops = detail::packed_operands(out, in, depth);
      const Index mr = ops.mr, nr = ops.nr;
      const std::int64_t groups = (cnt + group - 1) / group;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && groups > 1)
      for (std::int64_t gi = 0; gi < groups; ++gi) {
        const std::int64_t q0 = gi * group, qn = std::min(cnt, q0 + group) - q0;
        float* const u = scratch[thread_slot()];
        float* const v = u + u_size;
        for (std::int64_t q = 0; q < qn; ++q) {
          factors(active[c0 + static_cast<std::size_t>(q0 + q)], u + q * r * ldu, ldu, v + q * r * ldv, ldv,
                  v + v_size);
        }
        // Columns q r + j of the group: u + (q r + j) ldu and v + (q r + j) ldv.
        const Index k0 = static_cast<Index>(q0) * r, kn = static_cast<Index>(qn) * r;
        scatter_packed(ops.a, depth, mr, u, out, ldu, k0, kn);
        scatter_packed(ops.b, depth, nr, v, in, ldv, k0, kn);
      }
      detail::rank_update_packed(G, ops, options.max_threads);
    }
    return;
  }
  // U (out x per r) and V (in x per r), column-major: column q r + j holds a_k A_k[:, j] and B_k[:, j].
  float* const U = grow(tls_call.u, static_cast<std::size_t>(out) * per * r);
  float* const V = grow(tls_call.v, static_cast<std::size_t>(in) * per * r);
  float* const* const streams = scratch_slots(threads, stream_size);
  for (std::size_t c0 = 0; c0 < active.size(); c0 += static_cast<std::size_t>(per)) {
    const auto cnt = static_cast<std::int64_t>(std::min<std::size_t>(static_cast<std::size_t>(per), active.size() - c0));
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (threads > 1 && cnt > 1)
    for (std::int64_t q = 0; q < cnt; ++q) {
      factors(active[c0 + static_cast<std::size_t>(q)], U + q * r * out, out, V + q * r * in, in,
              streams[thread_slot()]);
    }
    const Index cols = static_cast<Index>(cnt) * r;
    if (kern.update_fused != nullptr) {
      // Scalar target: the same fused multiply-adds in the same order as rank_update's SIMD
      // targets, so the update is bitwise the same on every target.
      const Index block = 16;
      const Index blocks = (out + block - 1) / block;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && blocks > 1)
      for (Index bi = 0; bi < blocks; ++bi) {
        kern.update_fused(G.data, G.row_stride, G.col_stride, U, V, bi * block,
                          std::min(block, out - bi * block), out, in, cols);
      }
    } else {
      RankUpdateOptions ru;
      ru.max_threads = options.max_threads;
      rank_update(G, MatrixView<const float>(U, out, cols, 1, out), MatrixView<const float>(V, in, cols, 1, in), 1.0,
                  ru);
    }
  }
}

void aggregate_dense_update(const NoiseKey& key, std::int64_t population, Antithetic antithetic,
                            std::span<const double> fitness, double c, std::span<float> g,
                            const AggregateOptions& options) {
  constexpr const char* fn = "aggregate_dense_update";
  Perturbation p;
  p.key = key;
  p.population = population;
  p.antithetic = antithetic;
  p.sigma = 1;
  check_perturbation(fn, p);
  check_fitness_values(fn, fitness, population);
  if (!std::isfinite(c)) fail(fn, "c is {}; it must be finite", c);
  if (options.chunk < 0) fail(fn, "chunk is {}; it must be >= 0", options.chunk);
  if (g.size() > max_stream_normals) fail(fn, "g has {} values; at most 2^34", g.size());
  if (g.empty() || c == 0) return;
  const std::vector<double> w = collapse(fitness, population, antithetic);
  std::vector<std::uint32_t> active;
  for (std::size_t k = 0; k < w.size(); ++k) {
    if (w[k] != 0) active.push_back(static_cast<std::uint32_t>(k));
  }
  const auto len = static_cast<std::int64_t>(g.size());
  const std::int64_t per = std::min<std::int64_t>(options.chunk > 0 ? options.chunk : 64,
                                                  std::max<std::int64_t>(1, static_cast<std::int64_t>(active.size())));
  const auto& kern = detail::es_kernels(active_target());
  const int threads = thread_count(options.max_threads);
  std::vector<float> Z(static_cast<std::size_t>(per * len));
  std::vector<float> a(static_cast<std::size_t>(per));
  for (std::size_t c0 = 0; c0 < active.size(); c0 += static_cast<std::size_t>(per)) {
    const auto cnt = static_cast<std::int64_t>(std::min<std::size_t>(static_cast<std::size_t>(per), active.size() - c0));
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (threads > 1 && cnt > 1 && static_cast<double>(cnt * len) >= kThreadedWork)
    for (std::int64_t q = 0; q < cnt; ++q) {
      fill_normals(kern, key, active[c0 + static_cast<std::size_t>(q)], 0, static_cast<std::uint64_t>(len),
                   Z.data() + q * len);
    }
    for (std::int64_t q = 0; q < cnt; ++q) a[static_cast<std::size_t>(q)] = static_cast<float>(c * w[active[c0 + static_cast<std::size_t>(q)]]);
    // Each element sums its chunk in member order: independent of the thread count.
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && len >= 4096)
    for (std::int64_t e = 0; e < len; ++e) {
      float acc = g[static_cast<std::size_t>(e)];
      for (std::int64_t q = 0; q < cnt; ++q) {
        const float prod = a[static_cast<std::size_t>(q)] * Z[static_cast<std::size_t>(q * len + e)];
        acc = acc + prod;
      }
      g[static_cast<std::size_t>(e)] = acc;
    }
  }
}

// ---- ask / tell -------------------------------------------------------------------------------

struct Population::State {
  EggrollConfig config;
  std::vector<ParamSpec> params;
  std::uint64_t epoch = 0;
  std::vector<std::vector<float>> g;             // per parameter (empty for frozen)
  std::vector<optim::AdamState> adam;            // per parameter (empty for frozen or SGD)
};

namespace {
void check_config(const char* fn, const EggrollConfig& c, const std::vector<ParamSpec>& params) {
  Perturbation p;
  p.rank = c.rank;
  p.sigma = c.sigma;
  p.population = c.population;
  p.antithetic = c.antithetic;
  check_perturbation(fn, p);
  if (c.shaping.shaping == Shaping::grouped_z_score &&
      (c.shaping.group_size < 1 || c.population % c.shaping.group_size != 0)) {
    fail(fn, "shaping.group_size is {}; it must be >= 1 and divide the population {}", c.shaping.group_size, c.population);
  }
  if (c.shaping.shaping == Shaping::antithetic_sign && c.antithetic == Antithetic::none) {
    fail(fn, "antithetic_sign shaping needs antithetic sampling");
  }
  if (!(std::isfinite(c.shaping.eps) && c.shaping.eps >= 0)) fail(fn, "shaping.eps is {}; it must be finite and >= 0", c.shaping.eps);
  if (!(std::isfinite(c.optimizer.lr) && c.optimizer.lr >= 0)) fail(fn, "optimizer.lr is {}; it must be finite and >= 0", c.optimizer.lr);
  if (c.optimizer.kind == EsOptimizer::Kind::adam) optim::check_adam_config(fn, c.optimizer.adam);
  if (c.aggregate.chunk < 0) fail(fn, "aggregate.chunk is {}; it must be >= 0", c.aggregate.chunk);
  if (params.empty()) fail(fn, "no parameters");
  if (params.size() > 0xffffffffull) fail(fn, "{} parameters; at most 2^32", params.size());
  for (std::size_t i = 0; i < params.size(); ++i) {
    const ParamSpec& s = params[i];
    if (s.out < 1 || s.in < 1) fail(fn, "parameter {} ('{}') is {}x{}; sizes must be at least 1", i, s.name, s.out, s.in);
    if (s.kind == ParamKind::low_rank) check_stream(fn, s.out, s.in, c.rank);
    if (s.kind == ParamKind::dense && static_cast<double>(s.out) * static_cast<double>(s.in) > static_cast<double>(max_stream_normals)) {
      fail(fn, "parameter {} ('{}') has {}x{} values; at most 2^34", i, s.name, s.out, s.in);
    }
  }
}

// A parameter view as `out x in` (vectors may be passed as a row or a column).
MatrixView<float> as_registered(const char* fn, std::size_t i, const ParamSpec& s, MatrixView<float> v) {
  detail::check_view(fn, "parameter", v);
  if (v.rows == s.out && v.cols == s.in) return v;
  const bool vector = s.out == 1 || s.in == 1;
  if (vector && v.rows * v.cols == s.out * s.in && (v.rows == 1 || v.cols == 1)) {
    return v.rows == 1 ? MatrixView<float>(v.data, s.out, s.in, s.in * v.col_stride, v.col_stride)
                       : MatrixView<float>(v.data, s.out, s.in, s.in * v.row_stride, v.row_stride);
  }
  fail(fn, "parameter {} ('{}') is {}x{}; registered as {}x{}", i, s.name, v.rows, v.cols, s.out, s.in);
}
}  // namespace

Population::Population(EggrollConfig config, std::vector<ParamSpec> params) : state_(std::make_unique<State>()) {
  check_config("Population", config, params);
  state_->config = std::move(config);
  state_->params = std::move(params);
  state_->g.resize(state_->params.size());
  state_->adam.resize(state_->params.size());
  for (std::size_t i = 0; i < state_->params.size(); ++i) {
    const ParamSpec& s = state_->params[i];
    if (s.kind == ParamKind::frozen) continue;
    state_->g[i].assign(static_cast<std::size_t>(s.out * s.in), 0.0f);
    if (state_->config.optimizer.kind == EsOptimizer::Kind::adam) state_->adam[i] = optim::AdamState(s.out, s.in);
  }
}
Population::~Population() = default;
Population::Population(Population&&) noexcept = default;
Population& Population::operator=(Population&&) noexcept = default;

const EggrollConfig& Population::config() const noexcept { return state_->config; }
std::span<const ParamSpec> Population::params() const noexcept { return state_->params; }
std::uint64_t Population::epoch() const noexcept { return state_->epoch; }
Generation Population::ask() const noexcept { return {state_->epoch, state_->config.population}; }

Perturbation Population::perturbation(std::size_t param, const Generation& generation) const {
  constexpr const char* fn = "Population::perturbation";
  if (param >= state_->params.size()) fail(fn, "parameter {} of {}", param, state_->params.size());
  if (state_->params[param].kind != ParamKind::low_rank) {
    fail(fn, "parameter {} ('{}') is not low-rank", param, state_->params[param].name);
  }
  const EggrollConfig& c = state_->config;
  Perturbation p;
  p.key = NoiseKey{c.seed, static_cast<std::uint32_t>(param), noise_epoch(generation.epoch, c.noise_reuse)};
  p.rank = c.rank;
  p.sigma = c.sigma;
  p.population = c.population;
  p.antithetic = c.antithetic;
  return p;
}

void Population::perturbed(std::size_t param, const Generation& generation, std::int64_t member,
                           MatrixView<const float> base, MatrixView<float> out) const {
  constexpr const char* fn = "Population::perturbed";
  if (param >= state_->params.size()) fail(fn, "parameter {} of {}", param, state_->params.size());
  const ParamSpec& s = state_->params[param];
  const EggrollConfig& c = state_->config;
  if (member < 0 || member >= c.population) fail(fn, "member {} is outside [0, {})", member, c.population);
  detail::check_view(fn, "base", base);
  detail::check_view(fn, "out", out);
  const auto fits = [&](Index r, Index cc) { return (r == s.out && cc == s.in) || ((s.out == 1 || s.in == 1) && r * cc == s.out * s.in && (r == 1 || cc == 1)); };
  if (!fits(base.rows, base.cols) || out.rows != base.rows || out.cols != base.cols) {
    fail(fn, "parameter {} ('{}') is {}x{}; base is {}x{} and out {}x{}", param, s.name, s.out, s.in, base.rows,
         base.cols, out.rows, out.cols);
  }
  if (detail::self_overlapping(out)) fail(fn, "out ({}x{}) has overlapping elements", out.rows, out.cols);
  const Index rows = out.rows, cols = out.cols;
  switch (s.kind) {
    case ParamKind::frozen:
      for (Index i = 0; i < rows; ++i)
        for (Index j = 0; j < cols; ++j) out(i, j) = base(i, j);
      return;
    case ParamKind::dense: {
      const MemberNoise mn = member_noise(member, c.population, c.antithetic);
      const NoiseKey key{c.seed, static_cast<std::uint32_t>(param), noise_epoch(generation.epoch, c.noise_reuse)};
      std::vector<float> z(static_cast<std::size_t>(rows * cols));
      dense_noise(key, mn.index, rows * cols, z.data());
      const auto scale = static_cast<float>(static_cast<double>(mn.sign) * c.sigma);
      for (Index i = 0; i < rows; ++i)
        for (Index j = 0; j < cols; ++j) {
          const float prod = scale * z[static_cast<std::size_t>(i * cols + j)];
          out(i, j) = base(i, j) + prod;
        }
      return;
    }
    case ParamKind::low_rank: {
      std::vector<float> eps(static_cast<std::size_t>(rows * cols));
      dense_perturbation(perturbation(param, generation), member, MatrixView<float>(eps.data(), rows, cols, cols, 1));
      const auto sigma = static_cast<float>(c.sigma);
      for (Index i = 0; i < rows; ++i)
        for (Index j = 0; j < cols; ++j) {
          const float prod = sigma * eps[static_cast<std::size_t>(i * cols + j)];
          out(i, j) = base(i, j) + prod;
        }
      return;
    }
  }
}

TellResult Population::tell(const Generation& generation, std::span<const double> fitness,
                            std::span<const ParamRef> params) {
  constexpr const char* fn = "Population::tell";
  State& st = *state_;
  const EggrollConfig& c = st.config;
  if (generation.epoch != st.epoch || generation.population != c.population) {
    fail(fn, "generation (epoch {}, population {}) is not the current one (epoch {}, population {})", generation.epoch,
         generation.population, st.epoch, c.population);
  }
  if (static_cast<std::int64_t>(fitness.size()) != c.population) {
    fail(fn, "fitness has {} values for a population of {}", fitness.size(), c.population);
  }
  if (params.size() != st.params.size()) fail(fn, "{} parameter views for {} registered parameters", params.size(), st.params.size());
  std::vector<MatrixView<float>> views(params.size());
  for (std::size_t i = 0; i < params.size(); ++i) views[i] = as_registered(fn, i, st.params[i], params[i].value);
  for (std::size_t i = 0; i < views.size(); ++i) {
    if (detail::self_overlapping(views[i])) fail(fn, "parameter {} ('{}') has overlapping elements", i, st.params[i].name);
  }

  TellResult result;
  std::vector<double> shaped(fitness.size());
  result.replaced = shape_fitness(fitness, c.shaping, c.antithetic, shaped);  // throws before any change
  double sum = 0, lo = INFINITY, hi = -INFINITY;
  std::int64_t finite = 0;
  for (double f : fitness) {
    if (!std::isfinite(f)) continue;
    sum += f, lo = std::min(lo, f), hi = std::max(hi, f), ++finite;
  }
  result.mean_fitness = finite > 0 ? sum / static_cast<double>(finite) : NAN;
  result.min_fitness = lo;
  result.max_fitness = hi;

  const double scale = update_scale(c.scale, c.population, c.sigma);
  const std::uint32_t nep = noise_epoch(generation.epoch, c.noise_reuse);
  double norm2 = 0;
  for (std::size_t i = 0; i < st.params.size(); ++i) {
    const ParamSpec& s = st.params[i];
    if (s.kind == ParamKind::frozen) continue;
    std::vector<float>& g = st.g[i];
    std::fill(g.begin(), g.end(), 0.0f);
    const NoiseKey key{c.seed, static_cast<std::uint32_t>(i), nep};
    if (s.kind == ParamKind::low_rank) {
      aggregate_update(perturbation(i, generation), shaped, scale, MatrixView<float>(g.data(), s.out, s.in, s.in, 1),
                       c.aggregate);
    } else {
      aggregate_dense_update(key, c.population, c.antithetic, shaped, scale, g, c.aggregate);
    }
    for (float v : g) norm2 += static_cast<double>(v) * v;
    MatrixView<float> W = views[i];
    if (c.optimizer.kind == EsOptimizer::Kind::sgd) {
      const auto lr = static_cast<float>(c.optimizer.lr);
      for (Index r = 0; r < s.out; ++r)
        for (Index q = 0; q < s.in; ++q) {
          const float step = lr * g[static_cast<std::size_t>(r * s.in + q)];
          W(r, q) = W(r, q) + step;
        }
    } else {
      // Adam descends its gradient: hand it -G (an ascent direction of the shaped fitness).
      for (float& v : g) v = -v;
      optim::adam_step(W, MatrixView<const float>(g.data(), s.out, s.in, s.in, 1), st.adam[i], c.optimizer.adam,
                       c.optimizer.lr);
    }
  }
  result.update_norm = std::sqrt(norm2);
  ++st.epoch;
  return result;
}

}  // namespace es

LOWRANK_END_NAMESPACE
