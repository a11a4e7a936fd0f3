// Merging a LoRA adapter into a bf16 weight with lowrank::rank_update.
//
// PEFT stores a LoRA adapter of a torch nn.Linear (weight out x in) as lora_B (out x r) and
// lora_A (r x in); merging adds scale * B A to the weight, with scale = lora_alpha / r. That is a
// rank-r update W += scale * U V^T with U = B and V = A^T. The same weight stored as a GPT-2
// Conv1D (in x out) only changes the Layout.
#include <lowrank/lowrank.hpp>

#include <cmath>
#include <cstdio>
#include <random>

using RowMajorBf16 = Eigen::Matrix<lowrank::bf16, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using RowMajorF32 = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

int main() {
  const Eigen::Index out = 768, in = 512, r = 16;
  const double lora_alpha = 32, scale = lora_alpha / static_cast<double>(r);

  // A bf16 weight and small LoRA factors (what a fine-tune produces).
  std::mt19937 rng(0);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  RowMajorF32 w32(out, in);
  for (auto& x : w32.reshaped()) x = 0.02f * normal(rng);
  Eigen::MatrixXf lora_b(out, r), lora_a(r, in);
  for (auto& x : lora_b.reshaped()) x = 0.01f * normal(rng);
  for (auto& x : lora_a.reshaped()) x = 0.01f * normal(rng);
  RowMajorBf16 w = w32.cast<lowrank::bf16>();

  // Merge: torch-style weight (out x in), Layout::out_in; V = A^T is a view, not a copy.
  const Eigen::MatrixXf a_t = lora_a.transpose();
  lowrank::rank_update(lowrank::weight(w, lowrank::Layout::out_in), lowrank::view(std::as_const(lora_b)),
                       lowrank::view(a_t), scale);

  // Check against float64. Allowed error: half a bf16 ulp for the final rounding, plus the fp32
  // accumulation of r + 1 terms.
  const Eigen::MatrixXd w0 = w32.cast<lowrank::bf16>().cast<float>().cast<double>();
  const Eigen::MatrixXd reference = w0 + scale * lora_b.cast<double>() * lora_a.cast<double>();
  const Eigen::MatrixXd magnitude =
      w0.cwiseAbs() + scale * lora_b.cast<double>().cwiseAbs() * lora_a.cast<double>().cwiseAbs();
  double worst = 0;  // error / allowed error
  long off_by_one_ulp = 0;
  for (Eigen::Index i = 0; i < out; ++i)
    for (Eigen::Index j = 0; j < in; ++j) {
      const double got = static_cast<double>(static_cast<float>(w(i, j)));
      off_by_one_ulp += static_cast<float>(w(i, j)) != static_cast<float>(lowrank::bf16(static_cast<float>(reference(i, j))));
      const double half_ulp = std::ldexp(1.0, std::ilogb(std::abs(reference(i, j))) - 8);
      const double allowed = half_ulp + (static_cast<double>(r) + 2) * std::ldexp(1.0, -24) * magnitude(i, j);
      worst = std::max(worst, std::abs(got - reference(i, j)) / allowed);
    }
  std::printf("merged a rank-%ld LoRA (scale %.1f) into a %ldx%ld bf16 weight on target %s\n",
              static_cast<long>(r), scale, static_cast<long>(out), static_cast<long>(in),
              std::string(lowrank::to_string(lowrank::active_target())).c_str());
  std::printf("%ld of %ld elements differ from the correctly rounded float64 result (by one ulp, from fp32\n"
              "accumulation); every error is within the bound (half a bf16 ulp + fp32 accumulation error): %s\n",
              off_by_one_ulp, static_cast<long>(out * in), worst <= 1.0 ? "yes" : "NO");

  // The same weight stored GPT-2 style (in x out): only the layout changes, and the result is the
  // same bit for bit.
  RowMajorBf16 conv1d = w32.cast<lowrank::bf16>().transpose();
  lowrank::rank_update(lowrank::weight(conv1d, lowrank::Layout::in_out), lowrank::view(std::as_const(lora_b)),
                       lowrank::view(a_t), scale);
  const bool same = (conv1d.transpose().cast<float>().array() == w.cast<float>().array()).all();
  std::printf("Conv1D layout gives the same weight: %s\n", same ? "yes" : "NO");

  // Unmerge by the negated update: exact up to bf16 rounding of the merged weight.
  lowrank::rank_update(lowrank::weight(w, lowrank::Layout::out_in), lowrank::view(std::as_const(lora_b)),
                       lowrank::view(a_t), -scale);
  const double drift = (w.cast<float>() - w32.cast<lowrank::bf16>().cast<float>()).cwiseAbs().maxCoeff();
  std::printf("after unmerge, largest change from the original bf16 weight: %.2e\n", drift);

  // Mistakes are reported with shapes, and the weight is left as it was.
  try {
    lowrank::rank_update(lowrank::weight(w, lowrank::Layout::out_in), lowrank::view(std::as_const(lora_a)),
                         lowrank::view(a_t), scale);
  } catch (const lowrank::Error& e) {
    std::printf("wrong factor caught: %s\n", e.what());
  }
  return same && worst <= 1.0 ? 0 : 1;
}
