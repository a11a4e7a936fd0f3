# Install rules: headers, the library, an exported target set, a package config and version file,
# plus a build-tree export so that a build directory can be used with find_package too.
include(GNUInstallDirs)
include(CMakePackageConfigHelpers)

set(LOWRANK_INSTALL_CMAKEDIR "${CMAKE_INSTALL_LIBDIR}/cmake/lowrank" CACHE STRING
    "Where lowrank's CMake package files are installed")

set(_lowrank_install_targets lowrank)
if(LOWRANK_BUILD_IO)
  list(APPEND _lowrank_install_targets lowrank_io)
endif()
if(LOWRANK_BUILD_TOOLS)
  install(TARGETS lowrank_tool RUNTIME DESTINATION ${CMAKE_INSTALL_BINDIR})
endif()
install(TARGETS ${_lowrank_install_targets} EXPORT lowrank-targets
  ARCHIVE DESTINATION ${CMAKE_INSTALL_LIBDIR}
  LIBRARY DESTINATION ${CMAKE_INSTALL_LIBDIR}
  RUNTIME DESTINATION ${CMAKE_INSTALL_BINDIR}
  INCLUDES DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})
install(DIRECTORY "${PROJECT_SOURCE_DIR}/include/lowrank" DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})

install(EXPORT lowrank-targets NAMESPACE lowrank:: DESTINATION ${LOWRANK_INSTALL_CMAKEDIR})
export(EXPORT lowrank-targets NAMESPACE lowrank:: FILE "${PROJECT_BINARY_DIR}/lowrank-targets.cmake")
# lowrank::mpi has its own export set: the package config loads it only when MPI is found, so a
# consumer without MPI can still use the rest of an MPI-enabled install.
if(LOWRANK_ENABLE_MPI)
  install(TARGETS lowrank_mpi EXPORT lowrank-mpi-targets
    ARCHIVE DESTINATION ${CMAKE_INSTALL_LIBDIR}
    LIBRARY DESTINATION ${CMAKE_INSTALL_LIBDIR}
    RUNTIME DESTINATION ${CMAKE_INSTALL_BINDIR}
    INCLUDES DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})
  install(EXPORT lowrank-mpi-targets NAMESPACE lowrank:: DESTINATION ${LOWRANK_INSTALL_CMAKEDIR})
  export(EXPORT lowrank-mpi-targets NAMESPACE lowrank:: FILE "${PROJECT_BINARY_DIR}/lowrank-mpi-targets.cmake")
endif()

# lowrank::cuda likewise (LOWRANK_ENABLE_CUDA): loaded by the package config when the consumer
# finds the CUDA toolkit (its static library links cudart, cuBLAS and cuSOLVER).
if(LOWRANK_ENABLE_CUDA)
  install(TARGETS lowrank_cuda EXPORT lowrank-cuda-targets
    ARCHIVE DESTINATION ${CMAKE_INSTALL_LIBDIR}
    LIBRARY DESTINATION ${CMAKE_INSTALL_LIBDIR}
    RUNTIME DESTINATION ${CMAKE_INSTALL_BINDIR}
    INCLUDES DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})
  install(EXPORT lowrank-cuda-targets NAMESPACE lowrank:: DESTINATION ${LOWRANK_INSTALL_CMAKEDIR})
  export(EXPORT lowrank-cuda-targets NAMESPACE lowrank:: FILE "${PROJECT_BINARY_DIR}/lowrank-cuda-targets.cmake")
endif()

configure_package_config_file("${PROJECT_SOURCE_DIR}/cmake/lowrank-config.cmake.in"
  "${PROJECT_BINARY_DIR}/lowrank-config.cmake"
  INSTALL_DESTINATION ${LOWRANK_INSTALL_CMAKEDIR})
# Before 1.0 the API may change between minor versions.
write_basic_package_version_file("${PROJECT_BINARY_DIR}/lowrank-config-version.cmake"
  COMPATIBILITY SameMinorVersion)
install(FILES "${PROJECT_BINARY_DIR}/lowrank-config.cmake" "${PROJECT_BINARY_DIR}/lowrank-config-version.cmake"
  DESTINATION ${LOWRANK_INSTALL_CMAKEDIR})
install(FILES "${PROJECT_SOURCE_DIR}/LICENSE" DESTINATION ${CMAKE_INSTALL_DATADIR}/doc/lowrank)
