// Finite-difference gradient check, for Loom's own ops and for a user's CustomOp.
//
// For a function f of some f32 CPU input tensors, the checker forms L = sum(f(x) * R) with a fixed random R,
// takes dL/dx from the tape (one backward pass), and compares every checked element with the central
// difference (L(x + h e_i) - L(x - h e_i)) / 2h, summing L in double precision. It reports the worst error and
// the first mismatches, so a failing test says where.
//
//   auto report = loom::check_gradients(cpu, [&](loom::Ctx& c, const std::vector<loom::Tensor>& in) {
//     return loom::ops::apply(c, my_op, in);
//   }, {x, w});
//   EXPECT_TRUE(report.ok) << report.summary;
#pragma once

#include <functional>
#include <string>
#include <vector>

#include "core/context.h"

namespace loom {

struct GradCheckOptions {
  double step = 1e-2;  // h, relative to max(1, |x_i|)
  double rtol = 2e-2;  // |analytic - numeric| <= atol + rtol * max(|analytic|, |numeric|)
  double atol = 2e-3;
  int max_checks_per_input = 96;  // elements checked per input (spread evenly); all when the input is smaller
  uint64_t seed = 7;              // for R
  std::vector<bool> wrt;          // which inputs to differentiate (default: all f32 inputs)
};

struct GradCheckReport {
  bool ok = true;
  int checked = 0;
  double max_abs_error = 0;
  double max_rel_error = 0;
  std::string summary;  // one line, plus the first mismatches
};

using GradCheckFn = std::function<Tensor(Ctx&, const std::vector<Tensor>&)>;

// inputs are host f32 (or i32, never differentiated) tensors owned by the caller; they are perturbed in place
// and restored. The backend must be a CPU backend.
GradCheckReport check_gradients(Backend& cpu, const GradCheckFn& fn, const std::vector<Tensor>& inputs,
                                GradCheckOptions options = {});

}  // namespace loom
