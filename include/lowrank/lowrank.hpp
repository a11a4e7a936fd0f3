/// \file
/// Umbrella header: every public header of the `lowrank` library target (core, kernels, linalg,
/// adapt). The `lowrank::io` component has its own headers under `lowrank/io/`.
#pragma once

#include "lowrank/core/config.hpp"
#include "lowrank/core/error.hpp"
#include "lowrank/core/layout.hpp"
#include "lowrank/core/matrix.hpp"
#include "lowrank/core/philox.hpp"
#include "lowrank/core/scalar.hpp"
#include "lowrank/core/threading.hpp"
#include "lowrank/core/view.hpp"
#include "lowrank/kernels/lora_forward.hpp"
#include "lowrank/kernels/rank_update.hpp"
#include "lowrank/kernels/targets.hpp"
#include "lowrank/linalg/ipca.hpp"
#include "lowrank/linalg/subspace.hpp"
#include "lowrank/linalg/svd.hpp"
#include "lowrank/adapt/combine.hpp"
#include "lowrank/adapt/eva.hpp"
#include "lowrank/adapt/init.hpp"
#include "lowrank/adapt/lora.hpp"
#include "lowrank/adapt/variants.hpp"
#include "lowrank/version.hpp"
