/// \file
/// EGGROLL evolution strategies (Sarkar et al., "Evolution Strategies at the Hyperscale", 2025):
/// rank-r perturbations regenerated from keys, the batched perturbed forward, fitness shaping, the
/// update as one GEMM over the population, and an ask/tell `Population`.
///
/// Conventions (each a parameter, see `EggrollConfig`):
/// - member i perturbs a matrix parameter by `eps_i = sign_i E_k`, `E_k = A_k B_k^T / sqrt(r)`,
///   with `k, sign_i = member_noise(i, N, antithetic)` (es/noise.hpp); the evaluated weight is
///   `W + sigma eps_i`;
/// - a vector parameter (or a matrix marked `ParamKind::dense`) gets full-rank noise
///   `eps_i = sign_i z_k`, z standard normal of the parameter's size;
/// - the update direction is `G = c sum_i f_i eps_i` with shaped fitness f and `c` from `UpdateScale`;
///   the optimizer ascends G for `Objective::maximize` (descends for `minimize`).
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "lowrank/core/config.hpp"
#include "lowrank/core/scalar.hpp"
#include "lowrank/core/view.hpp"
#include "lowrank/es/noise.hpp"
#include "lowrank/optim/adam.hpp"

LOWRANK_BEGIN_NAMESPACE

namespace es {

// ---- noise ------------------------------------------------------------------------------------

/// The perturbation of one matrix parameter in one generation.
struct Perturbation {
  NoiseKey key;                                   ///< seed, parameter id, noise epoch
  int rank = 1;                                   ///< r >= 1
  double sigma = 0;                               ///< > 0, finite
  std::int64_t population = 0;                    ///< N >= 1 (even with antithetic sampling)
  Antithetic antithetic = Antithetic::interleaved;
};

/// Writes the factors of noise index `noise_index` for an `out x in` weight of rank r: `A`
/// (`out x r`) and `B` (`in x r`), row-major and contiguous (`out * r` and `in * r` floats).
/// Bitwise identical to `noise_normal` element by element on every target.
/// \throws Error if a size is negative, rank < 1, or `(in + out) r > max_stream_normals`.
void eggroll_factors(const NoiseKey& key, std::uint32_t noise_index, Index out, Index in, int rank, float* A,
                     float* B);

/// Writes `length` standard normals of the stream of (key, noise index) — the full-rank noise of a
/// vector (or dense) parameter, elements `0 .. length - 1`.
void dense_noise(const NoiseKey& key, std::uint32_t noise_index, std::int64_t length, float* z);

/// Writes member `member`'s signed perturbation `eps = sign A B^T / sqrt(r)` (`out x in`, any
/// strides) densely, for tests and small models (costs `out in r` flops; the forward and update
/// below never build it). \throws Error on bad shapes or member outside `[0, N)`.
void dense_perturbation(const Perturbation& p, std::int64_t member, MatrixView<float> eps);

// ---- forward ----------------------------------------------------------------------------------

/// Options of `population_forward`.
struct ForwardOptions {
  const float* bias = nullptr;  ///< `out` floats added to every row, or nullptr
  int max_threads = 0;          ///< 0: `num_threads()`; results do not depend on it
};

/// Batched perturbed forward of one linear layer: row t of X is evaluated by member `members[t]`,
/// \f$ Y_t = X_t W^\top + \mathrm{sign}\,\frac{\sigma}{\sqrt r} (X_t B_k) A_k^\top \f$ (+ bias),
/// i.e. `X_t (W + sigma eps_{members[t]})^T` without forming the perturbed weight.
///
/// The base `X W^T` is lowrank's `linear_forward` over the whole batch (one shared GEMM); the
/// low-rank term is generated per noise index (rows of the same index, e.g. an antithetic pair,
/// share one generation) in a per-thread buffer of `(in + out) r` floats and added as r dot
/// products and r AXPYs per row. Nothing of size `N x (in + out) r` is stored.
///
/// Arithmetic: `Y_t` is the base row with the bias (exactly `linear_forward`), then for j = 0..r-1
/// `c_j = fl(fl(sign sigma / sqrt(r)) * (X_t . B_k[:, j]))` (an fp32 dot product in the target's
/// vector lanes) and `Y_t += c_j A_k[:, j]` (fused multiply-adds on SIMD targets). For a given
/// target each row is bitwise independent of the thread count and of the other rows in the batch
/// (within one base path: see `lora_forward_gemm_tokens`); the noise itself is the same bits on
/// every target.
///
/// Allocation: buffers of the calling thread (the row order; `(in + out) r` floats of scratch per
/// thread, each its own allocation) that only grow; a warmed-up call does not allocate.
///
/// \param X        `tokens x in`, fp32, any strides
/// \param W        the base weight (fp32, bf16 or fp16 storage; either layout)
/// \param p        the perturbation of this weight this generation
/// \param members  `tokens` member ids in `[0, N)`, any order, repeats allowed
/// \param Y        `tokens x out`, overwritten; must not overlap the inputs
/// \throws Error (Y unchanged) on mismatched shapes, a member outside `[0, N)`, an invalid
///   perturbation (rank < 1, sigma not positive and finite, N < 1 or odd with antithetic pairs),
///   or overlapping memory; std::bad_alloc (Y unchanged) when its buffers cannot be allocated
///   (all of them, the threads' scratch included, are allocated before Y is written).
template <SupportedScalar TW>
void population_forward(MatrixView<const float> X, WeightView<const TW> W, const Perturbation& p,
                        std::span<const std::int64_t> members, MatrixView<float> Y, const ForwardOptions& options = {});

// ---- fitness shaping --------------------------------------------------------------------------

/// How raw fitness values become the weights of the update.
enum class Shaping {
  none,             ///< raw values
  z_score,          ///< `(f - mean) / sqrt(var + eps)`, population variance (EGGROLL's default)
  centered_ranks,   ///< `rank / (N - 1) - 1/2` in [-1/2, 1/2], ties get midranks (evosax, OpenAI ES)
  grouped_z_score,  ///< `(f - mean of its group) / sqrt(var of all N + eps)`; groups of `group_size`
                    ///< consecutive members (EGGROLL's LLM path, GRPO-like)
  antithetic_sign,  ///< pairs only: `+-sign(f_plus - f_minus) / 2` (EGG), so the pair weighs its
                    ///< noise by `sign(f_plus - f_minus)` in {-1, 0, 1}
};

/// Which way the optimizer moves.
enum class Objective {
  maximize,  ///< fitness is a reward (EGGROLL, OpenAI ES)
  minimize,  ///< fitness is a loss (evosax); handled by negating raw fitness before shaping
};

/// What `tell` and `shape_fitness` do with NaN or infinite raw fitness.
enum class NonFiniteFitness {
  error,  ///< throw `Error` naming the first such member; nothing changes
  worst,  ///< replace by the worst finite value of the generation (count reported); all non-finite is an error
};

/// Shaping parameters.
struct ShapingConfig {
  Shaping shaping = Shaping::z_score;
  Objective objective = Objective::maximize;
  std::int64_t group_size = 0;  ///< `grouped_z_score` only: divides N
  double eps = 1e-5;            ///< added to the variance (EGGROLL's 1e-5)
  NonFiniteFitness non_finite = NonFiniteFitness::error;
};

/// Shapes `raw` (N values) into `shaped` (N values; may alias `raw`), after negating for
/// `Objective::minimize` and applying the non-finite policy. `antithetic` is needed by
/// `antithetic_sign` only. \returns the number of non-finite values replaced.
/// \throws Error (shaped unchanged) on size mismatch, N == 0, a bad group size, `antithetic_sign`
///   without pairs, or non-finite values under `NonFiniteFitness::error`.
std::int64_t shape_fitness(std::span<const double> raw, const ShapingConfig& config, Antithetic antithetic,
                           std::span<double> shaped);

// ---- update -----------------------------------------------------------------------------------

/// Where `1 / (N sigma)` lives: the constant c in `G = c sum_i f_i eps_i`.
enum class UpdateScale {
  paper,     ///< c = 1 / N: paper Eq. 6, `M += (alpha / N) sum f_i E_i` with `1/sigma` in the rate
  gradient,  ///< c = 1 / (N sigma): the Gaussian-smoothing gradient estimate (OpenAI ES, shardes)
  official,  ///< c = sigma / sqrt(N): the official code, `lr sigma sqrt(N) (1/N) sum f_i eps_i`
};

/// The constant c of `UpdateScale` for N members and noise scale sigma.
[[nodiscard]] double update_scale(UpdateScale scale, std::int64_t population, double sigma) noexcept;

/// Options of the update contractions.
struct AggregateOptions {
  /// Noise indices generated per chunk (0: automatic, about 256 / r). Each chunk is one rank-update
  /// GEMM of rank `chunk * r`; the factors of a chunk are the only noise held (`chunk (in + out) r`
  /// floats). The result depends on the chunking (fp32 summation order), not on threads.
  std::int64_t chunk = 0;
  int max_threads = 0;  ///< 0: `num_threads()`; results do not depend on it
};

/// \f$ G \mathrel{+}= c \sum_i f_i\, \varepsilon_i \f$ for a matrix parameter (`out x in`, any
/// strides) as GEMMs over the population: members sharing a noise index are collapsed first
/// (`w_k = sum_{i -> k} sign_i f_i`, in fp64), then for each chunk of noise indices
/// `G += [a_1 A_1 | ... ] [B_1 | ... ]^T` with `a_k = fl(c w_k / sqrt(r))` (lowrank's
/// `rank_update`, fp32 accumulation). Noise indices with `w_k == 0` are skipped.
///
/// Determinism: bitwise independent of the thread count and identical on every target: the SIMD
/// targets' rank update adds the products in order with fused multiply-adds, and the scalar target
/// does the same with `std::fma` (a library call, so slow, on x86 builds without FMA instructions).
/// Allocation: O(N) scratch for the collapsed fitness per call; the chunk's factors live in
/// buffers of the calling thread that only grow, one slice per thread (on SIMD targets with a unit
/// column stride of G, each group of about 16 factor columns is scattered into the rank update's
/// packed operands: the chunk's whole U and V are never formed).
/// \throws Error (G unchanged) on `fitness.size() != N`, non-finite fitness or c, bad perturbation
///   parameters, or a G that is not `out x in` for the given shape; std::bad_alloc when its
///   buffers cannot be allocated, with G unchanged (they are allocated before G is first written;
///   one exception: with neither stride of G equal to 1, the rank update of a last, shorter chunk
///   may need a larger tile buffer after the earlier chunks were added).
void aggregate_update(const Perturbation& p, std::span<const double> fitness, double c, MatrixView<float> G,
                      const AggregateOptions& options = {});

/// The same for a vector (or dense) parameter of `g.size()` elements: `g += c sum_i f_i sign_i z_k`.
void aggregate_dense_update(const NoiseKey& key, std::int64_t population, Antithetic antithetic,
                            std::span<const double> fitness, double c, std::span<float> g,
                            const AggregateOptions& options = {});

// ---- ask / tell -------------------------------------------------------------------------------

/// How a parameter is perturbed.
enum class ParamKind {
  low_rank,  ///< rank-r EGGROLL noise (matrices)
  dense,     ///< full-rank Gaussian noise (vectors, biases, norms; or a matrix for OpenAI-style ES)
  frozen,    ///< not perturbed, not updated
};

/// One parameter of the model, registered with the `Population`. Its id (the noise key's layer)
/// is its position in the list, so two parameters of the same shape get independent noise.
struct ParamSpec {
  std::string name;
  ParamKind kind = ParamKind::low_rank;
  Index out = 0;  ///< rows of the `out x in` matrix; a vector has `in == 1` (or use `out == 1`)
  Index in = 1;
};

/// The optimizer that consumes G.
struct EsOptimizer {
  enum class Kind { sgd, adam } kind = Kind::sgd;
  double lr = 1e-2;
  optim::AdamConfig adam{};  ///< for `Kind::adam`
};

/// Everything that defines a run.
struct EggrollConfig {
  std::int64_t population = 0;  ///< N >= 1; even with antithetic sampling
  int rank = 1;                 ///< r >= 1 for low-rank parameters
  double sigma = 0.01;          ///< > 0
  std::uint64_t seed = 0;
  Antithetic antithetic = Antithetic::interleaved;
  std::uint32_t noise_reuse = 1;  ///< generations per noise epoch; 0: the same noise forever
  ShapingConfig shaping{};
  UpdateScale scale = UpdateScale::paper;
  EsOptimizer optimizer{};
  AggregateOptions aggregate{};
};

/// A generation handed out by `ask`: which epoch, and the perturbations to evaluate.
struct Generation {
  std::uint64_t epoch = 0;
  std::int64_t population = 0;
};

/// What `tell` did.
struct TellResult {
  double mean_fitness = 0;     ///< raw, finite values only
  double max_fitness = 0;      ///< raw (best for maximize), finite values only
  double min_fitness = 0;
  std::int64_t replaced = 0;   ///< non-finite values replaced (`NonFiniteFitness::worst`)
  double update_norm = 0;      ///< Frobenius norm of G (before the optimizer), over all parameters
};

/// Caller memory of one parameter, in registration order, given to `tell`.
struct ParamRef {
  MatrixView<float> value;  ///< `out x in` as registered (a vector: `out x 1` or `1 x in` both accepted)
};

/// Ask/tell EGGROLL over a list of parameters. The object holds the configuration, the epoch, the
/// optimizer state (Adam moments) and one fp32 `G` buffer per updated parameter, allocated once;
/// it never holds the model. Every member's noise is regenerated from (seed, parameter id, noise
/// epoch, noise index), so ranks or threads that evaluate different members agree on everything.
///
/// Determinism: the same seed, configuration and fitness values give bitwise the same parameters on
/// any thread count, on any evaluation order or split of the population (the fitness vector is
/// indexed by global member id), and on every target (see `aggregate_update`). Fitness values are
/// the caller's: rows of `population_forward` are bitwise independent of the batch only within one
/// base path (batches below or from `lora_forward_gemm_tokens` rows), so workers that must
/// reproduce a single-process run evaluate batches on the same side of that boundary.
class Population {
 public:
  /// \throws Error on an invalid configuration or parameter list (names the offending field).
  Population(EggrollConfig config, std::vector<ParamSpec> params);
  ~Population();
  Population(Population&&) noexcept;
  Population& operator=(Population&&) noexcept;

  [[nodiscard]] const EggrollConfig& config() const noexcept;
  [[nodiscard]] std::span<const ParamSpec> params() const noexcept;
  [[nodiscard]] std::uint64_t epoch() const noexcept;

  /// The generation to evaluate next (the current epoch). Asking twice gives the same generation.
  [[nodiscard]] Generation ask() const noexcept;

  /// The perturbation of low-rank parameter `param` in `generation`, for `population_forward`.
  /// \throws Error if `param` is out of range or not `ParamKind::low_rank`.
  [[nodiscard]] Perturbation perturbation(std::size_t param, const Generation& generation) const;

  /// Writes member `member`'s perturbed copy of parameter `param`: `out = base + sigma eps`
  /// (any kind: low-rank builds the dense perturbation; frozen copies base). Shapes as registered.
  void perturbed(std::size_t param, const Generation& generation, std::int64_t member, MatrixView<const float> base,
                 MatrixView<float> out) const;

  /// Shapes the fitness of `generation` (N values, indexed by global member id), builds every
  /// parameter's G, applies the optimizer to the caller's parameters and advances the epoch.
  /// \throws Error (parameters, state and epoch unchanged) if the generation is not the current
  ///   one, fitness has the wrong size or non-finite values under `NonFiniteFitness::error`, or a
  ///   parameter view has the wrong shape.
  TellResult tell(const Generation& generation, std::span<const double> fitness, std::span<const ParamRef> params);

 private:
  struct State;
  std::unique_ptr<State> state_;
};

}  // namespace es

LOWRANK_END_NAMESPACE
