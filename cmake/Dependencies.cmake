# Finds every dependency the CMake way and records what was found for the summary.
set(MPI_CXX_SKIP_MPICXX ON)  # the deprecated C++ bindings warn under -Wextra
find_package(MPI REQUIRED COMPONENTS C CXX)
find_package(OpenMP REQUIRED COMPONENTS CXX)
find_package(Threads REQUIRED)
find_package(HDF5 REQUIRED COMPONENTS C)
find_package(Boost 1.74 REQUIRED)
find_package(tomlplusplus REQUIRED)
find_package(PkgConfig REQUIRED)
pkg_check_modules(ISAL REQUIRED IMPORTED_TARGET libisal)
pkg_check_modules(OPENBLAS REQUIRED IMPORTED_TARGET openblas)
if(LOOM_BUILD_TESTS)
  find_package(GTest REQUIRED)
endif()

# Python with torch for the reference tests: Debian's interpreter, whatever `python3` is first on PATH.
find_program(LOOM_PYTHON3 NAMES python3 PATHS /usr/bin NO_DEFAULT_PATH)
if(NOT LOOM_PYTHON3)
  find_program(LOOM_PYTHON3 NAMES python3)
endif()

# CUDA: AUTO turns it on when nvcc is found. The CUDA sources must compile on machines without a GPU.
set(LOOM_HAVE_CUDA OFF)
set(LOOM_HAVE_NCCL OFF)
if(NOT LOOM_CUDA STREQUAL "OFF")
  include(CheckLanguage)
  if(NOT CMAKE_CUDA_COMPILER AND EXISTS /usr/local/cuda/bin/nvcc)
    set(CMAKE_CUDA_COMPILER /usr/local/cuda/bin/nvcc)
  endif()
  check_language(CUDA)
  if(CMAKE_CUDA_COMPILER)
    if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES)
      set(CMAKE_CUDA_ARCHITECTURES 90)  # H100 / H200
    endif()
    enable_language(CUDA)
    find_package(CUDAToolkit REQUIRED)
    set(LOOM_HAVE_CUDA ON)
    find_path(NCCL_INCLUDE_DIR nccl.h
      HINTS $ENV{NCCL_HOME} $ENV{NCCL_ROOT} ${CUDAToolkit_INCLUDE_DIRS}
      PATH_SUFFIXES include)
    find_library(NCCL_LIBRARY NAMES nccl
      HINTS $ENV{NCCL_HOME} $ENV{NCCL_ROOT} ${CUDAToolkit_LIBRARY_ROOT} ${CUDAToolkit_LIBRARY_DIR}
      PATH_SUFFIXES lib lib64)
    if(NCCL_INCLUDE_DIR AND NCCL_LIBRARY)
      set(LOOM_HAVE_NCCL ON)
      add_library(loom_nccl INTERFACE)
      target_include_directories(loom_nccl INTERFACE ${NCCL_INCLUDE_DIR})
      target_link_libraries(loom_nccl INTERFACE ${NCCL_LIBRARY})
    endif()
  elseif(LOOM_CUDA STREQUAL "ON")
    message(FATAL_ERROR "LOOM_CUDA=ON but no CUDA compiler (nvcc) was found")
  endif()
endif()
