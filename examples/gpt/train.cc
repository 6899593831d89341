// gpt-train: trains the Llama-style GPT of model.h with data x tensor parallelism.
//
//   mpirun -np 2 build/bin/gpt-train --preset tiny --steps 200            # DP=2 on the embedded corpus
//   mpirun -np 4 build/bin/gpt-train --tp 2 --config my.toml --metrics-file m.jsonl
//   build/bin/gpt-train --help                                            # every key, flag and env variable
#include "examples/gpt/model.h"
#include "loom/loom.h"

int main(int argc, char** argv) {
  return loom::run_main(argc, argv, [&](loom::Session& session) {
    loom::Config cfg;
    gpt::GptConfig model_cfg;
    model_cfg.declare(cfg);
    loom::TrainConfig train;
    if (!session.start(cfg, train, argc, argv, [&](const loom::TrainConfig& t) { model_cfg.validate(t.tp); })) return;
    gpt::Gpt model(model_cfg, session.tp());
    loom::Trainer trainer(session, model);
    trainer.fit();
  });
}
