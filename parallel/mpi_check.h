// LOOM_MPI_CHECK: the one way Loom calls MPI; include MPI through this header. A call that does not return
// MPI_SUCCESS becomes a loom::Error (kComm) naming the call and carrying MPI's own description of the error.
//
//   LOOM_MPI_CHECK(MPI_Comm_dup(parent, &comm));
//
// Assumes the communicator has MPI_ERRORS_RETURN as its error handler (MpiCommunicator and ProcessGroups set
// it on every communicator they create); under MPI's default, MPI_ERRORS_ARE_FATAL, MPI aborts the job before
// the call returns and this check never runs.
#pragma once

// Loom uses MPI's C API only. Skipping the deprecated C++ bindings keeps their -Wextra warnings out of every
// file that includes MPI through here.
#ifndef OMPI_SKIP_MPICXX
#define OMPI_SKIP_MPICXX 1
#endif
#ifndef MPICH_SKIP_MPICXX
#define MPICH_SKIP_MPICXX 1
#endif
#include <mpi.h>

#include <string>

#include "core/error.h"

namespace loom::detail {

inline std::string mpi_error_string(int code) {
  char text[MPI_MAX_ERROR_STRING];
  int len = 0;
  if (MPI_Error_string(code, text, &len) != MPI_SUCCESS) return "MPI error code " + std::to_string(code);
  return std::string(text, static_cast<size_t>(len)) + " (code " + std::to_string(code) + ")";
}

}  // namespace loom::detail

#define LOOM_MPI_CHECK(expr)                                                                     \
  do {                                                                                           \
    int loom_mpi_rc_ = (expr);                                                                   \
    if (loom_mpi_rc_ != MPI_SUCCESS)                                                             \
      LOOM_THROW(kComm, #expr << " failed: " << ::loom::detail::mpi_error_string(loom_mpi_rc_)); \
  } while (0)
