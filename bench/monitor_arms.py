#!/usr/bin/env python3
"""Where the monitor's overhead on step time comes from: the CPU test job of bench/monitor_bench.py run under
several monitor settings ("arms") side by side, to split the A/B of monitor_bench.py's overhead phase.

Arms (any subset, --arms):
  off        no monitor (the peer every other arm is compared with)
  on         monitor and clients as shipped (monitor tick 0.1 s, monitor.run_queue=auto)
  on_rq      as on, with monitor.run_queue=on (run-queue reads around every collective)
  on_norq    as on, with monitor.run_queue=off (no run-queue reads)
  on_tick1   as on, with the monitor's engine ticking once a second instead of 10 times
  idle       the monitor process runs (tick 0.1 s) but the job does not connect to it

Protocol
--------
--rounds rounds; in each, every arm runs once, the order rotated by one arm per round (so no arm always follows
another). A run is monitor_bench.py's overhead run: wait for a quiet machine (up to --quiet-wait s), start the
monitor (if the arm has one), run --steps steps of the job (--ranks 4: TP 2 x DP 2 on 2 emulated nodes, as monitor_bench.py;
--ranks 2: TP 2 on one node), take the median step_time_s of its metrics file without the first 50 steps.
Reported per arm: the median over rounds of those medians, and each round's ratio to that round's `off` run with
their median; the peer is `off` in the same rounds. Machine: the one it runs on (named in the JSON).

    python3 bench/monitor_arms.py [--ranks 2|4] [--rounds 8] [--arms off on on_rq ...] [--bin build/bin]
                                  [--out bench/results/monitor_arms_cpu.json]
"""
import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import monitor_bench as mb  # noqa: E402  (the job, the runner, quiet waits and metrics reading)

ARMS = {  # arm -> (monitor tick in s or None for no monitor, job connects, monitor.run_queue)
    "off": (None, False, None),
    "on": (0.1, True, "auto"),
    "on_rq": (0.1, True, "on"),
    "on_norq": (0.1, True, "off"),
    "on_tick1": (1.0, True, "auto"),
    "idle": (0.1, False, None),
}


def run_arm(rn, arm, steps):
    tick, connect, run_queue = ARMS[arm]
    rec = mb.overhead_run(rn, steps, tick is not None, name=arm, monitor_args=["--tick-s", str(tick)] if tick else (),
                          job_args=["--run-queue", run_queue] if run_queue else (), connect=connect)
    return rec["median_step_time_s"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ranks", type=int, choices=(2, 4), default=2)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--steps", type=int, default=6000)
    ap.add_argument("--arms", nargs="+", default=["off", "on", "on_rq"], choices=list(ARMS))
    ap.add_argument("--quiet-wait", type=float, default=30.0)
    ap.add_argument("--bin", default=os.path.join(mb.ROOT, "build", "bin"))
    ap.add_argument("--out", default=os.path.join(mb.ROOT, "bench", "results", "monitor_arms_cpu.json"))
    a = ap.parse_args()
    if "off" not in a.arms:
        a.arms.insert(0, "off")
    work = tempfile.mkdtemp(prefix="loom-monarms.")
    bindir = os.path.join(work, "bin")
    os.makedirs(bindir)
    for tool in ("loom", "gpt-train"):
        shutil.copy2(os.path.join(a.bin, tool), os.path.join(bindir, tool))
    if a.ranks == 2:  # one node of two TP ranks
        mb.LAYOUT[:] = ["--tp", "2", "--ranks-per-node", "2"]
    rn = mb.Runner(bindir, work, False, ranks=a.ranks)
    rn.quiet_wait_s = a.quiet_wait
    mach = mb.machine()
    mb.log(f"monitor arms: {a.arms}, {a.ranks} ranks, {a.rounds} rounds of {a.steps} steps; {mach['cpu']}, "
           f"{mach['cores']} cores")
    started = time.time()
    res = {arm: [] for arm in a.arms}
    try:
        for rnd in range(a.rounds):
            k = rnd % len(a.arms)
            for arm in a.arms[k:] + a.arms[:k]:
                res[arm].append(run_arm(rn, arm, a.steps))
                mb.log(f"  round {rnd + 1} {arm}: median step {res[arm][-1] * 1e3:.3f} ms")
    finally:
        rn.cleanup()
        shutil.rmtree(work, ignore_errors=True)
    arms = {}
    for arm in a.arms:
        paired = [x / y - 1 for x, y in zip(res[arm], res["off"])]
        arms[arm] = {"median_step_s": statistics.median(res[arm]), "round_medians_s": res[arm],
                     "paired_vs_off": paired, "median_paired_vs_off": statistics.median(paired),
                     "vs_off": statistics.median(res[arm]) / statistics.median(res["off"]) - 1}
        mb.log(f"{arm:9s} median step {arms[arm]['median_step_s'] * 1e3:.3f} ms, {arms[arm]['vs_off'] * 100:+.1f} % "
               f"against off (paired rounds: median {arms[arm]['median_paired_vs_off'] * 100:+.1f} %; "
               + " ".join(f"{x * 100:+.1f}" for x in paired) + ")")
    mb.write_json(a.out, {"benchmark": "monitor_arms", "device": "cpu", "machine": mach,
                          "command": "python3 " + " ".join([os.path.relpath(__file__, mb.ROOT)] + sys.argv[1:]),
                          "protocol": __doc__.split("Protocol\n--------\n", 1)[1].split("\n\n")[0],
                          "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "duration_s": round(time.time() - started, 1),
                          "ranks": a.ranks, "layout": mb.LAYOUT, "model": " ".join(mb.SMALL), "steps": a.steps,
                          "skip_steps": mb.SKIP, "arms": arms})
    mb.log(f"wrote {a.out}")


if __name__ == "__main__":
    main()
