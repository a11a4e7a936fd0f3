/// \file
/// LoRA variants (component "variants"): one include for
/// - `lora_xs.hpp`: LoRA-XS / LoRA-SB core `W + s B R A` (only `R` trains), `grad_R`,
///   `init_lora_xs`, `init_lora_sb`;
/// - `singlora.hpp`: SingLoRA `W + (alpha/r) u(t) A[:out] A[:in]^T` with ramp-up;
/// - `mora.hpp`: MoRA square `M` with the compression/decompression operators of types 1-4 and 6;
/// - `dora.hpp`: DoRA magnitude vector, forward, merge/unmerge with the cached norm;
/// - `selector.hpp`: incremental rank-1 sums with a selector vector and a frozen prefix.
/// All live in `lowrank::adapt`; formulas and test oracles in `../shared/reference/adapters.md`.
#pragma once

#include "lowrank/adapt/dora.hpp"
#include "lowrank/adapt/lora_xs.hpp"
#include "lowrank/adapt/mora.hpp"
#include "lowrank/adapt/selector.hpp"
#include "lowrank/adapt/singlora.hpp"
