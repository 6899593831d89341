# cmake --install: headers (include/loom/<folder>/...), static libraries, the loom tool and example programs,
# and a CMake package so a user's project builds with find_package(Loom) and links Loom::loom.
include(CMakePackageConfigHelpers)
install(TARGETS loom_core loom_parallel loom_checkpoint loom_monitor loom_train loom_warnings EXPORT LoomTargets
        ARCHIVE DESTINATION ${CMAKE_INSTALL_LIBDIR} LIBRARY DESTINATION ${CMAKE_INSTALL_LIBDIR})
if(TARGET loom_nccl)
  install(TARGETS loom_nccl EXPORT LoomTargets)
endif()
install(TARGETS loom_cli gpt-train custom-model-train RUNTIME DESTINATION ${CMAKE_INSTALL_BINDIR})
foreach(dir core parallel checkpoint launch loom)
  install(DIRECTORY ${PROJECT_SOURCE_DIR}/${dir}/ DESTINATION ${CMAKE_INSTALL_INCLUDEDIR}/loom/${dir}
          FILES_MATCHING PATTERN "*.h" PATTERN "*.cuh")
endforeach()
install(EXPORT LoomTargets NAMESPACE Loom:: DESTINATION ${CMAKE_INSTALL_LIBDIR}/cmake/Loom)
configure_package_config_file(${PROJECT_SOURCE_DIR}/cmake/LoomConfig.cmake.in
  ${PROJECT_BINARY_DIR}/LoomConfig.cmake INSTALL_DESTINATION ${CMAKE_INSTALL_LIBDIR}/cmake/Loom)
write_basic_package_version_file(${PROJECT_BINARY_DIR}/LoomConfigVersion.cmake COMPATIBILITY SameMinorVersion)
install(FILES ${PROJECT_BINARY_DIR}/LoomConfig.cmake ${PROJECT_BINARY_DIR}/LoomConfigVersion.cmake
        DESTINATION ${CMAKE_INSTALL_LIBDIR}/cmake/Loom)
