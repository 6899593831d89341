// The one header a Loom user includes: tensors, ops, modules and layers (single-device and tensor-parallel),
// the optimizer, data, configuration, the finite-difference gradient checker for custom ops, the Session
// (MPI start-up and error reporting) and the Trainer.
#pragma once

#include "core/backend.h"
#include "core/config.h"
#include "core/context.h"
#include "core/data.h"
#include "core/error.h"
#include "core/gradcheck.h"
#include "core/layers.h"
#include "core/log.h"
#include "core/module.h"
#include "core/ops.h"
#include "core/optimizer.h"
#include "core/param_arena.h"
#include "core/rng.h"
#include "core/tensor.h"
#include "loom/session.h"
#include "loom/train_config.h"
#include "loom/trainer.h"
#include "parallel/communicator.h"
#include "parallel/process_groups.h"
#include "parallel/tp_layers.h"
#include "parallel/tp_ops.h"
