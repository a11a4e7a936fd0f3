// The only place the version number lives; CMakeLists.txt parses it.
#pragma once

#define LOWRANK_VERSION_MAJOR 0
#define LOWRANK_VERSION_MINOR 1
#define LOWRANK_VERSION_PATCH 0
