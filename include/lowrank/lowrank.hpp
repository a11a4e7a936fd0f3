/// \file
/// Umbrella header: every public lowrank header.
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
#include "lowrank/version.hpp"
