#!/usr/bin/env python3
"""Monitor benchmark (issue 7): randomised fault-injection trials against `loom monitor`, on CPU ranks or GPUs.

Protocol
--------
Job: the SMALL model of tests/e2e/lib.sh (dim 64, 2 layers, seq 32, batch 8; in-memory snapshots every step,
nothing persisted), --ranks ranks, TP --tp x DP ranks/tp (rank = dp_rank * tp + tp_rank), on nodes of
--ranks-per-node ranks (a TP group inside one node), one mpirun at a time; every run has its own --snapshot-job
(a reused one would resume from old snapshots) and its own monitor job id and token. Environment:
OMPI_MCA_btl_vader_single_copy_mechanism=none, LOOM_PERSIST_EVERY=0, LOOM_LOG_LEVEL=warn, and per --device:
- cpu (the default): 4 ranks, TP 2 x DP 2 on 2 emulated nodes (--ranks-per-node 2) unless told otherwise;
  LOOM_THREADS=1 (one CPU thread per rank: what the 2-core VM gives them anyway; on a larger host the tiny model
  gains nothing from more), LOOM_DEVICE=cpu (CPU ranks also on a GPU machine: NCCL refuses ranks sharing a GPU).
- cuda: gpt-train --device cuda, one GPU per rank (the trainer picks it by the rank's place on the machine);
  --ranks defaults to the GPUs `nvidia-smi -L` lists (at least 2), --tp to 2, --ranks-per-node to --ranks (one
  real node: with 2 ranks TP 2 needs one node). LOOM_THREADS and LOOM_DEVICE are not set (the trainer's default
  CPU threads: the host's cores / its ranks). The TP and DP groups run on NCCL (ranks sharing a GPU would get
  the host-staged MPI communicator instead: the bench warns when --ranks exceeds the GPUs). NCCL's collectives
  are traced per collective, closed from CUDA events (no transfer-level data), so a slow link reaches the
  monitor only through the link probes (monitor.link_probe=auto, the default: after every step, one round of
  1 MiB point-to-point transfers per TP and DP group, only in a monitored job; docs/monitor.md "Link probes"),
  and an injected slow_link holds the sender's stream before each of its point-to-point sends (the probes').
  hang_comm is implemented for the host (MPI) ring only (docs/monitor.md, Fault injection), so --kinds leaves
  it out by default.
The result records device, ranks, tp, ranks_per_node, the kinds, the hostname and, on cuda, the GPUs
(`nvidia-smi -L`).

0. Isolation: the bench runs private copies of build/bin/{loom,gpt-train} (a rebuild of the checkout during the
   bench cannot mix versions). Before every run it waits (up to --quiet-wait s) until other work uses < 0.5 of
   the cores over 1-2 s, and while a run goes it samples, every 0.2 s, whether any process that is not this
   bench's is running; both are recorded per run (other_busy_cores, other_work_seen = fraction of the samples,
   other_work = their names). Only one job runs at a time.
1. Calibration.
   a. Step rate: one monitored fault-free run of --calib-steps steps; steps/s over the steps after the first 50,
      from the rank-0 metrics file (`elapsed_s`). The fault step of the trials is drawn uniformly from the steps
      that land 3-8 s after the first step at that rate.
   b. Slow link (only when --kinds has slow_link): for one TP pair (0 -> its TP ring neighbour) and one DP pair
      (0 -> its DP ring neighbour), those that exist (4 ranks TP 2: 0 -> 1 and 0 -> 2; 2 ranks TP 2: 0 -> 1
      only), and each candidate delay (--link-delays, ms), a 550-step run with `--fault-kind slow_link` at step
      300; on cpu without a monitor, on cuda with one that does not stop the job at a verdict (the probes that
      carry the delay run only in a monitored job); slowdown = time per step after the injection / time per
      step before it − 1 (time per step from `elapsed_s`, steps 50..300 against 310..550). The trials draw
      their delay uniformly from the candidates whose measured slowdown is >= 10 % on every calibrated pair.
2. Injected trials: --trials per kind of --kinds (default crash, hang, hang_comm, slow, slow_link on cpu; the
   same without hang_comm on cuda), in a seeded random order, each with a random rank (0..ranks-1) and fault
   step; slow: --fault-slowdown stratified over [0.1, 0.4] (trial i of N
   uniform in the i-th of N equal parts, so the smallest slowdowns are always tried), injected at a time
   (--fault-after-s uniform in [30, 38] s) rather than a step: the monitor learns each rank's baseline deviation
   in its first ~25 s and a slowdown already present then is part of the baseline; slow_link: peer = the
   rank's TP ring neighbour (same dp_rank, tp_rank + 1 mod tp) or DP ring neighbour (same tp_rank, dp_rank + 1
   mod dp), a coin flip where both exist, else the one that does (4 ranks TP 2: TP pairs {0,1},{2,3}, DP pairs
   {0,2},{1,3}; 2 ranks TP 2: 0 -> 1 or 1 -> 0). The monitor runs with
   --exit-on-verdict; the trial ends at the first verdict or 90 s after the injection (the trainer's log line
   "fault injection: ... at unix time T"). Recorded: detected, correct (kind: crash->crash, hang/hang_comm->hang,
   slow->slow_rank, slow_link->slow_link; culprit: ranks == [R] for crash/hang/slow, link == {src: R, dst: peer}
   for slow_link, link.src == R for hang_comm), latency = detected_at − T. A verdict reached before the
   injection is a false positive (and the fault counts as missed). For slow and slow_link trials the slowdown
   actually injected is measured in the trial itself (time per step before vs after the injection, rank 0).
3. Fault-free trials: --fault-free runs of --fault-free-s seconds each under the monitor; any verdict is a false
   positive. The monitor is stopped before the job (so stopping the job is not a crash).
4. precision = correct verdicts / all verdicts (false positives and wrong kinds or culprits included);
   recall = correct verdicts / injected faults. Latency p50/p90 per kind over the correct verdicts (linear
   interpolation between order statistics); crash_p90_s = crash, hang_p90_s = hang + hang_comm, slow_p90_s =
   slow + slow_link.
5. Overhead: the same run (--overhead-steps steps, snapshots as default) with the monitor on and off,
   alternating on/off for --overhead-rounds rounds; per run the median `step_time_s` of rank 0 excluding the
   first 50 steps; overhead = median over the on-runs / median over the off-runs − 1 (the paired per-round
   ratios are reported too, as is the same figure from time per step by `elapsed_s`). The ring collectives and
   their link timing are always on (they are the communicator); monitor on adds the client's heartbeat thread and
   the trace shipping, the run-queue reads around each collective (monitor.run_queue=auto: while the ranks wait
   for a CPU, as on these 2 cores), plus the monitor process itself on the same 2 cores. The paired rounds scatter by several percent on a loaded host, more than the 1 % goal, so the
   overhead is also counted bottom-up (overhead_bottom_up): over the monitor-on runs, the CPU time of the monitor
   process and of the ranks' client threads (named loom-monitor; sampled every 0.2 s from /proc) against the
   ranks' other CPU time, plus trace_cost's added ns per collective (a TraceRing begin/end pair with the
   run-queue reads against one without, same run) × the collectives per step the monitor saw / the median step
   (an upper bound where auto has switched the reads off).
   On cuda, monitor on also adds the link probes (GPU and link time: in the A/B only). trace_cost's term is
   host-side there (the record's begin/end on the issuing thread; labelled so). The records of NCCL calls are
   closed from CUDA events by each NCCL communicator's watcher thread (named loom-cuda-trace,
   parallel/cuda/device_trace_timer.cc), which runs with the monitor off too: overhead_bottom_up does not
   include its CPU time (it counts the monitor process and the threads named loom-monitor only). The bench
   samples those threads as well and reports their CPU time (device_trace_cpu_s, kept out of the ranks' other
   CPU time on cuda), its share (device_trace_share) and overhead_bottom_up_with_device_trace (the sum).

Usage: python3 bench/monitor_bench.py [--device cpu|cuda] [--ranks N] [--tp T] [--ranks-per-node R]
                                      [--kinds KIND ...] [--trials N] [--fault-free N] [--quick] [--seed S]
                                      [--out bench/results/monitor_cpu.json | monitor_gpu.json on cuda]
                                      [--only-overhead | --skip-overhead] [--bin DIR]
Standard library only. Progress goes to stdout, one line per trial, and a table at the end; after every trial the
trials so far are written to <out without .json>.partial.json (removed when the full result is written), so an
interrupted run leaves them with its command.
"""
import argparse
import json
import math
import os
import platform
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

SMALL = ["--dim", "64", "--n-layers", "2", "--n-heads", "4", "--ffn-hidden", "128", "--seq-len", "32",
         "--vocab-size", "256", "--batch-size", "8", "--eval-batches", "0", "--log-level", "warn",
         "--persist-every", "0", "--snapshot-idle-timeout", "20"]
LAYOUT = ["--tp", "2", "--ranks-per-node", "2"]  # the CPU default (bench/monitor_arms.py sets and uses it too)
KINDS = ["crash", "hang", "hang_comm", "slow", "slow_link"]
GPU_KINDS = [k for k in KINDS if k != "hang_comm"]  # hang_comm is injected into the host (MPI) ring only
EXPECTED = {"crash": "crash", "hang": "hang", "hang_comm": "hang", "slow": "slow_rank", "slow_link": "slow_link"}
VERDICT_TIMEOUT_S = 90.0
INJECT_WINDOW_S = (3.0, 8.0)
SLOW_AFTER_S = (30.0, 38.0)  # slow: after the monitor's baseline windows (start-up + 4 × 5 s)
MIN_SLOWDOWN = 0.10
SKIP = 50  # warm-up steps excluded from step-time figures


PROTOCOL = __doc__.split("Protocol\n--------\n", 1)[1].split("\nUsage:")[0].strip()


# ---- layout: ranks, their ring neighbours, the pairs to calibrate (pure; rank = dp_rank * tp + tp_rank) --------

def tp_peer(rank, ranks, tp):
    """The rank's TP ring neighbour (same dp_rank, tp_rank + 1 mod tp); None when tp == 1."""
    if tp < 2:
        return None
    return rank - rank % tp + (rank % tp + 1) % tp


def dp_peer(rank, ranks, tp):
    """The rank's DP ring neighbour (same tp_rank, dp_rank + 1 mod dp); None when dp == 1."""
    if ranks // tp < 2:
        return None
    return (rank + tp) % ranks


def ring_peers(rank, ranks, tp):
    """{"tp": peer, "dp": peer} for the kinds of ring neighbour that exist, TP first."""
    out = {}
    for ring, peer in (("tp", tp_peer(rank, ranks, tp)), ("dp", dp_peer(rank, ranks, tp))):
        if peer is not None:
            out[ring] = peer
    return out


def calibration_pairs(ranks, tp):
    """[(ring, src, dst)]: one TP pair and one DP pair from rank 0, where they exist (4 ranks TP 2: 0 -> 1, 0 -> 2)."""
    return [(ring, 0, peer) for ring, peer in ring_peers(0, ranks, tp).items()]


def check_layout(ranks, tp, ranks_per_node):
    """None, or what is wrong with the layout."""
    if ranks < 2:
        return f"--ranks must be >= 2 (got {ranks})"
    if tp < 1 or ranks % tp:
        return f"--tp {tp} does not divide --ranks {ranks}"
    if ranks_per_node < 1 or ranks % ranks_per_node:
        return f"--ranks-per-node {ranks_per_node} does not divide --ranks {ranks}"
    if ranks_per_node % tp:
        return f"a TP group of {tp} ranks must sit inside one node of --ranks-per-node {ranks_per_node}"
    return None


def draw_specs(rng, kinds, trials, ranks, tp, lo_step, hi_step, delays):
    """The injected trials, shuffled: per kind (in KINDS order), `trials` specs with a random rank and fault step
    (step 2 of the protocol). With the CPU defaults this draws what the 4-rank bench always drew for a seed."""
    specs = []
    for kind in [k for k in KINDS if k in kinds]:
        for i in range(trials):
            s = {"kind": kind, "rank": rng.randrange(ranks), "step": rng.randint(lo_step, hi_step)}
            if kind == "slow":  # stratified: trial i draws from the i-th of `trials` equal parts of [0.1, 0.4]
                s["slowdown"] = round(0.1 + 0.3 * (i + rng.random()) / trials, 3)
                s["after_s"] = round(rng.uniform(*SLOW_AFTER_S), 1)
                s["step"] = 0  # the first step after after_s (recorded as injected_step)
            if kind == "slow_link":
                peers = ring_peers(s["rank"], ranks, tp)
                s["ring"] = rng.choice(list(peers))
                s["peer"] = peers[s["ring"]]
                s["delay_ms"] = rng.choice(delays)
            specs.append(s)
    rng.shuffle(specs)
    return specs


def describe_layout(device, ranks, ranks_per_node):
    nodes = ranks // ranks_per_node
    if device == "cpu":
        return f"({ranks} ranks, {nodes} emulated node{'s' if nodes != 1 else ''})"
    return f"({ranks} ranks, one GPU each, {'one node' if nodes == 1 else f'{nodes} emulated nodes'})"


def gpu_list():
    """`nvidia-smi -L` lines without their UUIDs ("GPU 0: NVIDIA H100 80GB HBM3"); [] when it fails."""
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [re.sub(r"\s*\(UUID:.*\)\s*$", "", line).strip() for line in out.splitlines() if line.startswith("GPU ")]


def write_json(path, result):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")


def setup_fields(a):
    """What the result records of the run's setup: device, layout, kinds, host (and the GPUs on cuda)."""
    out = {"device": a.device, "ranks": a.ranks, "tp": a.tp, "ranks_per_node": a.ranks_per_node, "kinds": a.kinds,
           "hostname": socket.gethostname()}
    if a.device == "cuda":
        out["gpus"] = a.gpus
        if "CUDA_VISIBLE_DEVICES" in os.environ:
            out["cuda_visible_devices"] = os.environ["CUDA_VISIBLE_DEVICES"]
    return out


def write_partial(a, path, trials, fault_free, calibration):
    write_json(path, {"benchmark": "monitor", "partial": True, **setup_fields(a),
                      "command": "python3 " + " ".join([os.path.relpath(__file__, ROOT)] + sys.argv[1:]),
                      "git_head": a.git, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                      "calibration": {k: v for k, v in calibration.items() if k != "verdicts"},
                      "trials": trials, "fault_free": fault_free})


def log(msg):
    print(msg, flush=True)


def pct(xs, q):
    """q-quantile (0..1) by linear interpolation between order statistics; None for no samples."""
    xs = sorted(xs)
    if not xs:
        return None
    if len(xs) == 1:
        return xs[0]
    pos = q * (len(xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def machine():
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cpu": model, "cores": os.cpu_count(), "kernel": platform.release(), "host": platform.node()}


def loadavg():
    try:
        return float(open("/proc/loadavg").read().split()[0])
    except (OSError, ValueError):
        return None


def busy_cores(interval=1.0):
    """Cores busy over `interval` (from /proc/stat); between trials nothing of this bench runs, so this is the
    load of other work on the machine."""
    def sample():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        idle = v[3] + (v[4] if len(v) > 4 else 0)
        return sum(v[:8]), idle
    t0, i0 = sample()
    time.sleep(interval)
    t1, i1 = sample()
    if t1 == t0:
        return 0.0
    return (os.cpu_count() or 1) * (1 - (i1 - i0) / (t1 - t0))


def wait_quiet(max_wait_s, threshold=0.5):
    """Waits (up to max_wait_s) until other work uses less than `threshold` cores; returns (busy, waited_s)."""
    t0 = time.time()
    busy = busy_cores()
    while busy >= threshold and time.time() - t0 < max_wait_s:
        busy = busy_cores(2.0)
    return round(busy, 2), round(time.time() - t0, 1)


class Runner:
    """Starts monitors and jobs of `ranks` ranks (4 unless told), and cleans up after them (only the processes it started).
    device "cpu": CPU ranks (LOOM_DEVICE=cpu, LOOM_THREADS=1); "cuda": gpt-train --device cuda, neither variable set.
    layout: the trainer's --tp/--ranks-per-node flags; None = the module's LAYOUT, read at each start."""

    def __init__(self, bindir, work, keep, ranks=4, device="cpu", layout=None, tp=2):
        self.bindir = bindir
        self.ranks = ranks
        self.device = device
        self.layout = layout
        self.tp = tp
        self.work = work
        self.keep = keep
        self.uid = os.getuid()
        self.tag = f"mb{os.getpid()}"
        self.count = 0
        self.env = dict(os.environ)
        self.env.update({"OMPI_MCA_btl_vader_single_copy_mechanism": "none", "LOOM_PERSIST_EVERY": "0",
                         "LOOM_LOG_LEVEL": "warn", "LOOM_CACHE_DIR": os.path.join(work, "cache")})
        if device == "cpu":
            self.env.update({"LOOM_THREADS": "1", "LOOM_DEVICE": "cpu"})
        self.mpirun = ["mpirun", "--oversubscribe", "--allow-run-as-root"]
        if "LD_LIBRARY_PATH" in self.env:  # the GPU machine's runtime libraries (.device/env.sh)
            self.mpirun += ["-x", "LD_LIBRARY_PATH"]
        self.quiet_wait_s = 0.0
        self.active_monitors, self.active_jobs = [], []  # what cleanup() stops when the bench is interrupted

    def cleanup(self):
        for p in self.active_monitors:
            self.stop_monitor(p)
        for p, job in self.active_jobs:
            self.stop_job(p, job)

    def new_dir(self, name):
        self.count += 1
        d = os.path.join(self.work, f"{self.count:03d}-{name}")
        os.makedirs(d)
        return d, f"{self.tag}n{self.count}"

    def start_monitor(self, d, job, exit_on_verdict=True, extra=()):
        port_file = os.path.join(d, "port")
        cmd = [os.path.join(self.bindir, "loom"), "monitor", "--job", job, "--token", "tok" + job, "--port", "0",
               "--port-file", port_file, "--verdict-dir", os.path.join(d, "v")] + list(extra)
        if exit_on_verdict:
            cmd.append("--exit-on-verdict")
        p = subprocess.Popen(cmd, stdout=open(os.path.join(d, "monitor.log"), "w"), stderr=subprocess.STDOUT,
                             env=self.env, cwd=d)
        self.active_monitors.append(p)
        for _ in range(200):
            if os.path.exists(port_file) and open(port_file).read().strip():
                return p, int(open(port_file).read().strip())
            if p.poll() is not None:
                break
            time.sleep(0.05)
        self.stop_monitor(p)
        raise RuntimeError(f"the monitor did not start: {open(os.path.join(d, 'monitor.log')).read()}")

    def stop_monitor(self, p):
        if p in self.active_monitors:
            self.active_monitors.remove(p)
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        return p.returncode

    def start_job(self, d, job, steps, extra, port=None, metrics=True):
        cmd = self.mpirun + ["-np", str(self.ranks), os.path.join(self.bindir, "gpt-train")] + SMALL + ["--steps", str(steps)]
        cmd += (LAYOUT if self.layout is None else self.layout) + ["--snapshot-job", "s" + job]
        if self.device == "cuda":
            cmd += ["--device", "cuda"]
        if metrics:
            cmd += ["--metrics-file", os.path.join(d, "metrics.jsonl")]
        if port is not None:
            cmd += ["--monitor", f"127.0.0.1:{port}", "--monitor-job", job, "--monitor-token", "tok" + job]
        cmd += extra
        with open(os.path.join(d, "cmd.txt"), "w") as f:
            f.write(" ".join(cmd) + "\n")
        p = subprocess.Popen(cmd, stdout=open(os.path.join(d, "run.log"), "w"), stderr=subprocess.STDOUT,
                             env=self.env, cwd=d, start_new_session=True)
        self.active_jobs.append((p, job))
        return p

    def stop_job(self, p, job):
        """SIGTERM to mpirun's session (it forwards to the ranks), SIGKILL after 10 s; then the ranks and snapshot
        daemons of this job that are left (found by this job's unique id in their command line)."""
        if (p, job) in self.active_jobs:
            self.active_jobs.remove((p, job))
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait()
        snap = "s" + job
        for pid in self._pids_with(snap):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        lockdir = f"/tmp/loom-{self.uid}"
        if os.path.isdir(lockdir):
            for n in os.listdir(lockdir):
                if n.startswith(snap + "-node") and n.endswith(".sock.lock"):
                    try:
                        pid = int(open(os.path.join(lockdir, n)).read().strip())
                        os.kill(pid, signal.SIGKILL)
                    except (OSError, ValueError):
                        pass
        for n in os.listdir("/dev/shm"):
            if n.startswith(f"loom-{self.uid}-{snap}-r"):
                try:
                    os.unlink(os.path.join("/dev/shm", n))
                except OSError:
                    pass

    def foreign_running(self):
        """Names of running (state R) processes that are not this bench's (no run id of it in their command
        line): other work competing for the 2 cores while a trial runs."""
        out = []
        me = str(os.getpid())
        tag = self.tag.encode()
        for n in os.listdir("/proc"):
            if not n.isdigit() or n == me:
                continue
            try:
                stat = open(f"/proc/{n}/stat", "rb").read()
                state = stat[stat.rindex(b")") + 2:stat.rindex(b")") + 3]
                if state != b"R":
                    continue
                argv = open(f"/proc/{n}/cmdline", "rb").read()
            except (OSError, ValueError):
                continue
            if not argv or tag in argv:
                continue  # kernel threads have no command line
            out.append(os.path.basename(argv.split(b"\0")[0].decode(errors="replace")))
        return out

    def wait_job(self, p, timeout_s, stop=None, sample=None):
        """Polls until p exits (or stop() says so, or timeout_s), calling sample() at every poll; returns the
        fraction of polls that saw other work running and the names seen."""
        t0 = time.time()
        seen, hits, polls = set(), 0, 0
        while p.poll() is None and time.time() - t0 < timeout_s and not (stop and stop()):
            if sample:
                sample()
            f = self.foreign_running()
            polls += 1
            if f:
                hits += 1
                seen.update(f)
            time.sleep(0.2)
        return (round(hits / polls, 3) if polls else 0.0), sorted(seen)

    @staticmethod
    def _pids_with(token):
        """Processes whose argv has `token` as one whole argument (this job's unique snapshot job id)."""
        out = []
        for n in os.listdir("/proc"):
            if not n.isdigit():
                continue
            try:
                argv = open(f"/proc/{n}/cmdline", "rb").read().split(b"\0")
            except OSError:
                continue
            if token.encode() in argv:
                out.append(int(n))
        return out


def read_metrics(path):
    rows = []
    if not os.path.exists(path):
        return rows
    for line in open(path):
        if line.startswith('{"step"'):
            try:
                rows.append(json.loads(line))
            except ValueError:
                pass  # a line cut off by the kill
    return rows


def time_per_step(rows, lo, hi):
    """Mean wall time per step over steps lo..hi (rank 0's elapsed_s), None when too few."""
    sel = [r for r in rows if lo <= r["step"] <= hi]
    if len(sel) < 20:
        return None
    return (sel[-1]["elapsed_s"] - sel[0]["elapsed_s"]) / (sel[-1]["step"] - sel[0]["step"])


def injection_field(run_log, pattern):
    """Group 1 of `pattern` in the trainer's "fault injection: ..." log line, or None."""
    try:
        text = open(run_log, errors="replace").read()
    except OSError:
        return None
    m = re.search(r"fault injection: " + pattern, text)
    return m.group(1) if m else None


def injection_time(run_log):
    t = injection_field(run_log, r".* at unix time ([0-9.]+)")
    return float(t) if t is not None else None


def injection_step(run_log):
    """The step a fault hit at ("... from step N ..." / "... after step N ...")."""
    n = injection_field(run_log, r".*(?:from|after) step ([0-9]+)")
    return int(n) if n is not None else None


def read_verdicts(vdir):
    out = []
    if os.path.isdir(vdir):
        for n in sorted(os.listdir(vdir)):
            if n.startswith("verdict-") and n.endswith(".json"):
                try:
                    out.append(json.load(open(os.path.join(vdir, n))))
                except ValueError:
                    pass
    return out


def slowdown_in_run(rows, step):
    before = time_per_step(rows, SKIP, step)
    after_rows = [r for r in rows if r["step"] > step + 10]
    after = time_per_step(rows, step + 10, after_rows[-1]["step"]) if after_rows else None
    if before is None or after is None:
        return None, before, after
    return after / before - 1, before, after


# ---- calibration ------------------------------------------------------------------------------------------------

def calibrate_rate(rn, steps):
    d, job = rn.new_dir("calib-rate")
    busy, _ = wait_quiet(rn.quiet_wait_s)
    mon, port = rn.start_monitor(d, job, exit_on_verdict=False)
    t0 = time.time()
    p = rn.start_job(d, job, steps, [], port=port)
    foreign, names = rn.wait_job(p, 300)
    wall = time.time() - t0
    rn.stop_monitor(mon)
    rn.stop_job(p, job)
    rows = read_metrics(os.path.join(d, "metrics.jsonl"))
    if not rn.keep:
        shutil.rmtree(d, ignore_errors=True)
    tps = time_per_step(rows, SKIP, steps)
    if tps is None:
        raise RuntimeError(f"calibration run made too few steps ({len(rows)}); see {d}/run.log")
    verdicts = read_verdicts(os.path.join(d, "v"))
    return {"steps": steps, "steps_per_s": 1.0 / tps, "first_step_elapsed_s": rows[0]["elapsed_s"],
            "wall_s": wall, "other_busy_cores": busy, "other_work_seen": foreign, "other_work": names,
            "median_step_time_s": statistics.median(r["step_time_s"] for r in rows[SKIP:]),
            "verdicts": verdicts}


def calibrate_links(rn, delays, at=300, steps_after=250):
    """Step 1b over calibration_pairs(): on cpu without a monitor; on cuda with one (not stopping at a verdict),
    since only a monitored job runs the link probes, the only point-to-point sends an NCCL job makes."""
    out = []
    monitored = rn.device == "cuda"
    for pair, src, dst in calibration_pairs(rn.ranks, rn.tp):
        for dms in delays:
            d, job = rn.new_dir(f"calib-link-{pair}-{dms}")
            busy, _ = wait_quiet(rn.quiet_wait_s)
            mon, port = rn.start_monitor(d, job, exit_on_verdict=False) if monitored else (None, None)
            p = rn.start_job(d, job, at + steps_after, ["--fault-kind", "slow_link", "--fault-rank", str(src), "--fault-step",
                                              str(at), "--fault-peer", str(dst), "--fault-delay-ms", str(dms)],
                             port=port)
            foreign, names = rn.wait_job(p, 300)
            if mon is not None:
                rn.stop_monitor(mon)
            rn.stop_job(p, job)
            rows = read_metrics(os.path.join(d, "metrics.jsonl"))
            if not rn.keep and rows:
                shutil.rmtree(d, ignore_errors=True)
            s, before, after = slowdown_in_run(rows, at)
            out.append({"pair": pair, "src": src, "dst": dst, "delay_ms": dms, "slowdown": s,
                        "time_per_step_before_s": before, "time_per_step_after_s": after, "other_busy_cores": busy,
                        "other_work_seen": foreign, "other_work": names})
            if monitored:
                out[-1]["monitored"] = True
            log(f"  calib slow_link {pair} {src}->{dst} delay {dms} ms: slowdown "
                f"{'n/a' if s is None else f'{s * 100:.0f} %'}")
    return out


# ---- trials -------------------------------------------------------------------------------------------------------

def judge(kind, rank, peer, v):
    if v.get("kind") != EXPECTED[kind]:
        return False
    link = v.get("link")
    if kind == "slow_link":
        return link == {"src": rank, "dst": peer}
    if kind == "hang_comm":
        return link is not None and link.get("src") == rank
    return v.get("ranks") == [rank]


def injected_trial(rn, spec):
    kind, rank, step = spec["kind"], spec["rank"], spec["step"]
    d, job = rn.new_dir(f"{kind}-r{rank}")
    extra = ["--fault-kind", kind, "--fault-rank", str(rank), "--fault-step", str(step)]
    if kind == "slow":
        extra += ["--fault-slowdown", f"{spec['slowdown']:.3f}", "--fault-after-s", str(spec["after_s"])]
    if kind == "slow_link":
        extra += ["--fault-peer", str(spec["peer"]), "--fault-delay-ms", str(spec["delay_ms"])]
    busy, waited = wait_quiet(rn.quiet_wait_s)
    load0 = loadavg()
    mon, port = rn.start_monitor(d, job)
    t0 = time.time()
    p = rn.start_job(d, job, 10_000_000, extra, port=port)
    inject = None
    seen, hits, polls = set(), 0, 0
    while True:
        time.sleep(0.2)
        f = rn.foreign_running()
        polls += 1
        if f:
            hits += 1
            seen.update(f)
        if inject is None:
            inject = injection_time(os.path.join(d, "run.log"))
        if mon.poll() is not None:
            break
        now = time.time()
        if inject is not None and now > inject + VERDICT_TIMEOUT_S:
            break
        if inject is None and now > t0 + 180:
            break
    rn.stop_monitor(mon)
    rn.stop_job(p, job)
    if inject is None:
        inject = injection_time(os.path.join(d, "run.log"))
    verdicts = read_verdicts(os.path.join(d, "v"))
    v = verdicts[0] if verdicts else None
    rec = dict(spec)
    rec.update({"dir": os.path.basename(d), "injected_at": inject, "load_avg_1m": load0, "other_busy_cores": busy,
                "waited_for_quiet_s": waited, "other_work_seen": round(hits / polls, 3) if polls else 0.0,
                "other_work": sorted(seen), "verdict": None,
                "detected": False, "correct": False, "false_positive": False, "latency_s": None})
    if v is not None:
        rec["verdict"] = {k: v.get(k) for k in ("kind", "ranks", "link", "node", "onset", "detected_at", "summary")}
        if inject is None or v["detected_at"] < inject:
            rec["false_positive"] = True  # named before the fault existed
        else:
            rec["detected"] = True
            rec["latency_s"] = v["detected_at"] - inject
            rec["correct"] = judge(kind, rank, spec.get("peer"), v)
    if kind in ("slow", "slow_link"):
        rows = read_metrics(os.path.join(d, "metrics.jsonl"))
        rec["injected_step"] = injection_step(os.path.join(d, "run.log"))
        s, before, after = slowdown_in_run(rows, rec["injected_step"] if rec["injected_step"] is not None else step)
        rec["measured_slowdown"] = s
        rec["time_per_step_before_s"] = before
        rec["time_per_step_after_s"] = after
    if not rn.keep and rec["correct"]:
        shutil.rmtree(d, ignore_errors=True)
    return rec


def fault_free_trial(rn, seconds):
    d, job = rn.new_dir("fault-free")
    busy, waited = wait_quiet(rn.quiet_wait_s)
    load0 = loadavg()
    mon, port = rn.start_monitor(d, job)
    p = rn.start_job(d, job, 10_000_000, [], port=port)
    t0 = time.time()
    foreign, names = rn.wait_job(p, seconds, stop=lambda: mon.poll() is not None)
    job_alive = p.poll() is None
    rn.stop_monitor(mon)  # first, so that stopping the job is not seen as a crash
    rn.stop_job(p, job)
    verdicts = read_verdicts(os.path.join(d, "v"))
    rows = read_metrics(os.path.join(d, "metrics.jsonl"))
    rec = {"kind": "none", "dir": os.path.basename(d), "seconds": round(time.time() - t0, 1),
           "steps": rows[-1]["step"] if rows else 0, "job_alive_at_end": job_alive, "load_avg_1m": load0,
           "other_busy_cores": busy, "waited_for_quiet_s": waited, "other_work_seen": foreign, "other_work": names,
           "verdicts": [{k: v.get(k) for k in ("kind", "ranks", "link", "summary")} for v in verdicts],
           "false_positive": bool(verdicts)}
    if not rn.keep and not verdicts and job_alive:
        shutil.rmtree(d, ignore_errors=True)
    return rec


def cpu_s(path):
    """utime + stime of a /proc .../stat file, in seconds; None when it is gone."""
    try:
        st = open(path, "rb").read()
    except OSError:
        return None
    f = st[st.rindex(b")") + 2:].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


DEVICE_TRACE_THREAD = "loom-cuda-trace"  # the NCCL communicators' CUDA-event watcher (parallel/cuda/device_trace_timer.cc)


class CpuSampler:
    """The newest CPU times seen of the monitor process, of the ranks (gpt-train processes of the job) and of
    their monitor-client threads (named loom-monitor), and on cuda of their device-timing watcher threads (named
    loom-cuda-trace): cumulative counters, so the last sample before a process exits is its total (to within one
    0.2 s poll)."""

    def __init__(self, rn, job, monitor_pid, port=None):
        self.rn, self.job, self.monitor_pid, self.port = rn, job, monitor_pid, port
        self.monitor, self.ranks, self.clients = 0.0, {}, {}
        self.device_trace = {} if getattr(rn, "device", "cpu") == "cuda" else None
        self.calls, self.per_step = 0, {}  # rank -> collectives per step, from the monitor while the job runs

    def __call__(self):
        self.calls += 1
        # One status read ~2 s in (retried every ~2 s until every rank reported): the counters are cumulative, and
        # each request wakes the monitor inside the run being timed. A finished rank's counters read 0.
        if self.port and len(self.per_step) < self.rn.ranks and self.calls % 10 == 0:
            st = status_json(self.port)
            for r in (st or {}).get("ranks", []):
                if r.get("step") and r.get("completed"):
                    self.per_step[r["rank"]] = r["completed"] / r["step"]
        if self.monitor_pid:
            self.monitor = cpu_s(f"/proc/{self.monitor_pid}/stat") or self.monitor
        for pid in self.rn._pids_with("s" + self.job):
            try:
                if open(f"/proc/{pid}/comm").read().strip() != "gpt-train":
                    continue  # mpirun, snapshot daemons
                tids = os.listdir(f"/proc/{pid}/task")
            except OSError:
                continue
            self.ranks[pid] = cpu_s(f"/proc/{pid}/stat") or self.ranks.get(pid, 0.0)
            for tid in tids:
                try:
                    name = open(f"/proc/{pid}/task/{tid}/comm").read().strip()
                    if name == "loom-monitor":
                        self.clients[tid] = cpu_s(f"/proc/{pid}/task/{tid}/stat") or self.clients.get(tid, 0.0)
                    elif name == DEVICE_TRACE_THREAD and self.device_trace is not None:
                        self.device_trace[tid] = (cpu_s(f"/proc/{pid}/task/{tid}/stat")
                                                  or self.device_trace.get(tid, 0.0))
                except OSError:
                    pass

    def result(self):
        out = {"monitor_cpu_s": self.monitor, "ranks_cpu_s": sum(self.ranks.values()),
               "client_threads_cpu_s": sum(self.clients.values()), "ranks_seen": len(self.ranks),
               "client_threads_seen": len(self.clients)}
        if self.device_trace is not None:
            out["device_trace_threads_cpu_s"] = sum(self.device_trace.values())
            out["device_trace_threads_seen"] = len(self.device_trace)
        return out


def status_json(port):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/status.json", timeout=5) as r:
            return json.loads(r.read().decode())
    except (OSError, ValueError):
        return None


def overhead_run(rn, steps, monitor, name=None, monitor_args=(), job_args=(), connect=True):
    """One timed run of the job, with a monitor (started with monitor_args; the job connects to it unless
    connect is False) or without; job_args go to the trainer."""
    d, job = rn.new_dir(name or "overhead-" + ("on" if monitor else "off"))
    busy, waited = wait_quiet(rn.quiet_wait_s)
    mon, port = (rn.start_monitor(d, job, False, monitor_args) if monitor else (None, None))
    load0 = loadavg()
    p = rn.start_job(d, job, steps, list(job_args), port=port if connect else None)
    sampler = CpuSampler(rn, job, mon.pid if mon is not None else None, port)
    foreign, names = rn.wait_job(p, 300, sample=sampler)
    if mon is not None:
        sampler()
        rn.stop_monitor(mon)
    rn.stop_job(p, job)
    rows = read_metrics(os.path.join(d, "metrics.jsonl"))
    verdicts = read_verdicts(os.path.join(d, "v"))
    if len(rows) < steps:
        raise RuntimeError(f"overhead run stopped at {len(rows)} of {steps} steps; see {d}/run.log")
    rec = {"monitor": monitor, "median_step_time_s": statistics.median(r["step_time_s"] for r in rows[SKIP:]),
           "time_per_step_s": time_per_step(rows, SKIP + 1, steps), "load_avg_1m": load0,
           "other_busy_cores": busy, "waited_for_quiet_s": waited, "other_work_seen": foreign, "other_work": names,
           "verdicts": len(verdicts), "cpu": sampler.result()}
    if sampler.per_step:
        rec["collectives_per_step"] = statistics.median(sampler.per_step.values())
    if not rn.keep:
        shutil.rmtree(d, ignore_errors=True)
    return rec


def overhead_phase(a, rn):
    log(f"overhead: {a.overhead_rounds} rounds of {a.overhead_steps} steps, monitor on/off alternating")
    runs = []
    for rnd in range(a.overhead_rounds):
        for mon in (True, False):
            r = overhead_run(rn, a.overhead_steps, mon)
            r["round"] = rnd
            runs.append(r)
            log(f"  round {rnd + 1} monitor {'on ' if mon else 'off'}: median step "
                f"{r['median_step_time_s'] * 1e3:.3f} ms, time per step {r['time_per_step_s'] * 1e3:.3f} ms"
                f"  [other work seen {r['other_work_seen'] * 100:.0f} %]")
    on = [r for r in runs if r["monitor"]]
    off = [r for r in runs if not r["monitor"]]
    med_on = statistics.median(r["median_step_time_s"] for r in on)
    med_off = statistics.median(r["median_step_time_s"] for r in off)
    tps_on = statistics.median(r["time_per_step_s"] for r in on)
    tps_off = statistics.median(r["time_per_step_s"] for r in off)
    paired = [a_["median_step_time_s"] / b_["median_step_time_s"] - 1 for a_, b_ in zip(on, off)]
    # Bottom-up: what the monitor adds, in CPU time, against the ranks' own CPU time (on saturated cores every
    # CPU second of the monitor is taken from the ranks; with idle cores it is an upper bound), plus the added
    # cost per collective on the training thread (trace_cost) × collectives per step / step time.
    bottom_up = None
    tc = os.path.join(rn.bindir, "trace_cost")
    per_call = None
    if os.access(tc, os.X_OK):
        try:
            per_call = json.loads(subprocess.run([tc], capture_output=True, text=True, timeout=120).stdout)
        except (OSError, ValueError, subprocess.TimeoutExpired):
            pass  # the bottom-up figure then lacks the per-collective part
    cps = [r["collectives_per_step"] for r in on if r.get("collectives_per_step")]
    mon_cpu = sum(r["cpu"]["monitor_cpu_s"] + r["cpu"]["client_threads_cpu_s"] for r in on)
    # On cuda the NCCL communicators' watcher threads (loom-cuda-trace) run with the monitor off too: kept out of
    # both sides of cpu_share and reported on their own.
    dev_cpu = sum(r["cpu"].get("device_trace_threads_cpu_s", 0.0) for r in on)
    rank_cpu = sum(r["cpu"]["ranks_cpu_s"] - r["cpu"]["client_threads_cpu_s"] for r in on) - dev_cpu
    if rank_cpu > 0:
        bottom_up = {"monitor_and_client_cpu_s": mon_cpu, "training_cpu_s": rank_cpu,
                     "cpu_share": mon_cpu / rank_cpu,
                     "collectives_per_step": statistics.median(cps) if cps else None,
                     "trace_cost": per_call}
        if rn.device == "cuda":
            bottom_up["per_collective_cost"] = ("host-side: trace_cost's TraceRing begin/end on the issuing thread; "
                                                "NCCL records are closed by the loom-cuda-trace watcher threads")
            bottom_up["device_trace_cpu_s"] = dev_cpu
            bottom_up["device_trace_cpu_s_monitor_off"] = sum(r["cpu"].get("device_trace_threads_cpu_s", 0.0)
                                                              for r in off)
            bottom_up["device_trace_share"] = dev_cpu / rank_cpu
        if per_call and cps:
            bottom_up["per_collective_share"] = (per_call["added_ns"] * 1e-9 * statistics.median(cps) / med_on)
            bottom_up["overhead_bottom_up"] = bottom_up["cpu_share"] + bottom_up["per_collective_share"]
            if rn.device == "cuda":
                bottom_up["overhead_bottom_up_with_device_trace"] = (bottom_up["overhead_bottom_up"]
                                                                     + bottom_up["device_trace_share"])
    overhead = {"steps": a.overhead_steps, "rounds": a.overhead_rounds, "skip_steps": SKIP,
                "median_step_time_on_s": med_on, "median_step_time_off_s": med_off,
                "overhead": med_on / med_off - 1, "paired_overheads": paired,
                "time_per_step_on_s": tps_on, "time_per_step_off_s": tps_off,
                "overhead_time_per_step": tps_on / tps_off - 1, "bottom_up": bottom_up, "runs": runs}
    return overhead


def bottom_up_figure(overhead):
    b = overhead and overhead.get("bottom_up")
    return b.get("overhead_bottom_up") if b else None


def overhead_goals(overhead):
    """The < 1 % goal judged on the A/B step times and, separately, on the bottom-up count."""
    bu = bottom_up_figure(overhead)
    return {"overhead_lt_1pct": overhead is not None and overhead["overhead"] < 0.01,
            "overhead_bottom_up_lt_1pct": bu is not None and bu < 0.01}


def log_overhead(overhead):
    log(f"overhead: median step on {overhead['median_step_time_on_s'] * 1e3:.3f} ms, off "
        f"{overhead['median_step_time_off_s'] * 1e3:.3f} ms -> {overhead['overhead'] * 100:+.2f} % "
        f"(time per step: {overhead['overhead_time_per_step'] * 100:+.2f} %; paired rounds "
        + ", ".join(f"{x * 100:+.1f}" for x in overhead["paired_overheads"]) + " %)")
    b = overhead.get("bottom_up")
    if b:
        per = b.get("per_collective_share")
        host = " host-side" if "device_trace_cpu_s" in b else ""
        log(f"  bottom-up: monitor + client threads {b['monitor_and_client_cpu_s']:.2f} CPU s against "
            f"{b['training_cpu_s']:.1f} of training ({b['cpu_share'] * 100:.2f} %)"
            + (f"; {b['trace_cost']['added_ns']:.0f} ns{host} per collective x {b['collectives_per_step']:.1f} per step "
               f"({per * 100:.2f} %) -> {b['overhead_bottom_up'] * 100:.2f} %" if per is not None else
               "; per-collective cost not measured (no trace_cost in --bin)"))
        if host:
            log(f"  device-timing watcher threads ({DEVICE_TRACE_THREAD}, not in the figure above; they run with the "
                f"monitor off too): {b['device_trace_cpu_s']:.2f} CPU s on, {b['device_trace_cpu_s_monitor_off']:.2f} "
                f"off ({b['device_trace_share'] * 100:.2f} % of training)")


# ---- summary ----------------------------------------------------------------------------------------------------

def summarise(trials, fault_free, kinds=KINDS):
    per_kind = {}
    for kind in kinds:
        ts = [t for t in trials if t["kind"] == kind]
        lat = [t["latency_s"] for t in ts if t["correct"]]
        per_kind[kind] = {"injected": len(ts), "verdicts": sum(1 for t in ts if t["verdict"] is not None),
                          "detected": sum(t["detected"] for t in ts), "correct": len(lat),
                          "recall": len(lat) / len(ts) if ts else None,
                          "p50_s": pct(lat, 0.5), "p90_s": pct(lat, 0.9), "max_s": max(lat) if lat else None}
        if kind in ("slow", "slow_link"):
            sd = [t["measured_slowdown"] for t in ts if t.get("measured_slowdown") is not None]
            per_kind[kind]["measured_slowdown_min"] = min(sd) if sd else None
            per_kind[kind]["measured_slowdown_median"] = statistics.median(sd) if sd else None
    def buckets(kind, key):
        """Trials of `kind` grouped by key(trial): injected, correct, latencies, measured slowdowns."""
        out = {}
        for t in trials:
            if t["kind"] != kind:
                continue
            b = out.setdefault(key(t), {"injected": 0, "correct": 0, "latency_s": [], "measured_slowdown": []})
            b["injected"] += 1
            b["correct"] += t["correct"]
            if t["correct"]:
                b["latency_s"].append(round(t["latency_s"], 2))
            if t.get("measured_slowdown") is not None:
                b["measured_slowdown"].append(round(t["measured_slowdown"], 3))
        return out

    def slowdown_band(t):
        lo = min(3, int(t["slowdown"] * 10))  # 0.1-0.2, 0.2-0.3, 0.3-0.4
        return f"{lo / 10:.1f}-{(lo + 1) / 10:.1f}"

    by_delay = buckets("slow_link", lambda t: f"{t['delay_ms']}ms-{t['ring']}")
    by_slowdown = buckets("slow", slowdown_band)
    n_verdicts = sum(1 for t in trials if t["verdict"] is not None) + sum(len(f["verdicts"]) for f in fault_free)
    n_correct = sum(t["correct"] for t in trials)
    fp = sum(1 for t in trials if t["false_positive"]) + sum(len(f["verdicts"]) for f in fault_free)
    wrong = sum(1 for t in trials if t["detected"] and not t["correct"])

    def lat(kinds):
        return [t["latency_s"] for t in trials if t["kind"] in kinds and t["correct"]]

    return {
        "per_kind": per_kind,
        "slow_link_by_delay_and_ring": dict(sorted(by_delay.items())),
        "slow_by_requested_slowdown": dict(sorted(by_slowdown.items())),
        "verdicts": n_verdicts, "correct_verdicts": n_correct, "false_positives": fp, "wrong_verdicts": wrong,
        "injected": len(trials),
        "precision": n_correct / n_verdicts if n_verdicts else None,
        "recall": n_correct / len(trials) if trials else None,
        "crash_p50_s": pct(lat({"crash"}), 0.5), "crash_p90_s": pct(lat({"crash"}), 0.9),
        "hang_p50_s": pct(lat({"hang", "hang_comm"}), 0.5), "hang_p90_s": pct(lat({"hang", "hang_comm"}), 0.9),
        "slow_p50_s": pct(lat({"slow", "slow_link"}), 0.5), "slow_p90_s": pct(lat({"slow", "slow_link"}), 0.9),
        "slow_max_s": max(lat({"slow", "slow_link"}), default=None),
    }


def fmt(x, unit="", nd=2):
    if x is None:
        return "-"
    return f"{x:.{nd}f}{unit}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                    help="cpu: CPU ranks (LOOM_DEVICE=cpu, LOOM_THREADS=1); cuda: one GPU per rank (gpt-train "
                         "--device cuda, NCCL)")
    ap.add_argument("--ranks", type=int, default=None,
                    help="ranks (default 4 on cpu; on cuda the GPUs `nvidia-smi -L` lists, at least 2)")
    ap.add_argument("--tp", type=int, default=2, help="tensor-parallel size (default 2); DP = ranks / tp")
    ap.add_argument("--ranks-per-node", type=int, default=None,
                    help="ranks per (emulated) node (default 2 on cpu; on cuda --ranks: one node)")
    ap.add_argument("--kinds", nargs="+", choices=KINDS, default=None,
                    help="fault kinds to inject (default all five on cpu; on cuda all but hang_comm, which is "
                         "injected into the host ring only)")
    ap.add_argument("--trials", type=int, default=6, help="injected trials per fault kind (default 6)")
    ap.add_argument("--fault-free", type=int, default=3, help="fault-free trials (default 3)")
    ap.add_argument("--fault-free-s", type=float, default=75.0, help="length of a fault-free trial (s)")
    ap.add_argument("--quick", action="store_true", help="1 trial per kind, 1 short fault-free, 2 overhead rounds")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--out", default=None,
                    help="result JSON (default bench/results/monitor_cpu.json; on cuda monitor_gpu.json)")
    ap.add_argument("--bin", default=os.path.join(ROOT, "build", "bin"))
    ap.add_argument("--calib-steps", type=int, default=2000)
    ap.add_argument("--link-delays", type=float, nargs="+", default=[0.1, 0.2, 0.5, 1.0],
                    help="candidate slow_link delays (ms) to calibrate")
    ap.add_argument("--overhead-rounds", type=int, default=5)
    ap.add_argument("--overhead-steps", type=int, default=3000)
    ap.add_argument("--skip-overhead", action="store_true")
    ap.add_argument("--only-overhead", action="store_true", help="step 5 only (no calibration, no trials)")
    ap.add_argument("--quiet-wait", type=float, default=120.0,
                    help="before each run, wait up to this long for other work to use < 0.5 cores (recorded)")
    ap.add_argument("--keep", action="store_true", help="keep every trial's folder (failed ones are always kept)")
    a = ap.parse_args()
    if a.quick:
        a.trials, a.fault_free, a.fault_free_s, a.overhead_rounds = 1, 1, 60.0, 2
    a.gpus = []
    if a.device == "cuda":
        a.gpus = gpu_list()
        if not a.gpus:
            sys.exit("--device cuda: `nvidia-smi -L` lists no GPU")
    if a.ranks is None:
        a.ranks = 4 if a.device == "cpu" else max(2, len(a.gpus))
    if a.ranks_per_node is None:
        a.ranks_per_node = 2 if a.device == "cpu" else a.ranks
    bad = check_layout(a.ranks, a.tp, a.ranks_per_node)
    if bad:
        sys.exit(bad)
    a.kinds = [k for k in KINDS if k in (a.kinds or (KINDS if a.device == "cpu" else GPU_KINDS))]
    if a.out is None:
        a.out = os.path.join(ROOT, "bench", "results", "monitor_cpu.json" if a.device == "cpu" else "monitor_gpu.json")
    if a.device == "cuda" and a.ranks > len(a.gpus):
        log(f"warning: {a.ranks} ranks on {len(a.gpus)} GPU(s): ranks share GPUs, so their groups run on the "
            "host-staged MPI communicator, not NCCL")
    if a.device == "cuda" and "hang_comm" in a.kinds:
        log("warning: hang_comm is injected into the host (MPI) ring only; on NCCL it is expected to be missed")
    for tool in ("loom", "gpt-train"):
        if not os.access(os.path.join(a.bin, tool), os.X_OK):
            sys.exit(f"{os.path.join(a.bin, tool)} not found; build first (cmake --build build)")
    work = tempfile.mkdtemp(prefix="loom-monbench.")
    # Private copies of the binaries, so that a rebuild of the checkout during the bench cannot mix versions
    # (gpt-train starts the `loom` next to itself as the snapshot daemon).
    bindir = os.path.join(work, "bin")
    os.makedirs(bindir)
    a.binaries = {}
    for tool in ("loom", "gpt-train", "trace_cost"):
        src = os.path.join(a.bin, tool)
        if tool == "trace_cost" and not os.access(src, os.X_OK):
            continue  # optional: the bottom-up overhead then lacks the per-collective part
        shutil.copy2(src, os.path.join(bindir, tool))
        a.binaries[tool] = {"path": src, "mtime": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(os.path.getmtime(src)))}
    try:
        a.git = subprocess.run(["git", "-C", ROOT, "log", "-1", "--format=%h %s"], capture_output=True, text=True,
                               timeout=10).stdout.strip()[:120]
    except (OSError, subprocess.SubprocessError):
        a.git = None
    rn = Runner(bindir, work, a.keep, ranks=a.ranks, device=a.device, tp=a.tp,
                layout=["--tp", str(a.tp), "--ranks-per-node", str(a.ranks_per_node)])
    rn.quiet_wait_s = a.quiet_wait

    def on_term(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    try:
        bench(a, rn, work)
    except KeyboardInterrupt:
        log(f"interrupted; stopping the current run (trial folders kept in {work})")
        sys.exit(130)
    finally:
        rn.cleanup()


def bench(a, rn, work):
    rng = random.Random(a.seed)
    started = time.time()
    mach = machine()
    log(f"monitor bench: {mach['cpu']}, {mach['cores']} cores; work folder {work}; load {loadavg()}")
    model = " ".join(SMALL + rn.layout) + " " + describe_layout(a.device, a.ranks, a.ranks_per_node)
    if a.device == "cuda":
        log(f"  device cuda: {a.ranks} ranks, TP {a.tp} x DP {a.ranks // a.tp}, {a.ranks_per_node} per node; "
            f"kinds {' '.join(a.kinds)}; GPUs: {'; '.join(a.gpus)}")
    if a.only_overhead:
        overhead = overhead_phase(a, rn)
        result = {"benchmark": "monitor", **setup_fields(a), "machine": mach,
                  "command": "python3 " + " ".join([os.path.relpath(__file__, ROOT)] + sys.argv[1:]),
                  "protocol": "step 5 of: " + PROTOCOL, "git_head": a.git, "binaries": a.binaries,
                  "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "duration_s": round(time.time() - started, 1),
                  "model": model,
                  "overhead": overhead["overhead"], "overhead_bottom_up": bottom_up_figure(overhead),
                  "overhead_detail": overhead, "goals": overhead_goals(overhead)}
        write_json(a.out, result)
        log_overhead(overhead)
        log(f"wrote {a.out}")
        return

    log("calibration: step rate (monitored, fault-free)")
    rate = calibrate_rate(rn, a.calib_steps)
    sps = rate["steps_per_s"]
    lo_step, hi_step = int(INJECT_WINDOW_S[0] * sps), int(INJECT_WINDOW_S[1] * sps)
    log(f"  {sps:.0f} steps/s (median step {rate['median_step_time_s'] * 1e3:.2f} ms); fault steps "
        f"{lo_step}..{hi_step}; verdicts in the calibration run: {len(rate['verdicts'])}")
    links, ok = [], []
    if "slow_link" in a.kinds:
        log("calibration: slow_link delay vs step slowdown "
            + ("(no monitor)" if a.device == "cpu" else "(monitored: the link probes carry the delay)"))
        links = calibrate_links(rn, a.link_delays)
        ok = [dms for dms in a.link_delays
              if all(c["slowdown"] is not None and c["slowdown"] >= MIN_SLOWDOWN for c in links if c["delay_ms"] == dms)]
        if not ok:
            ok = [max(a.link_delays)]
            n_pairs = len(calibration_pairs(a.ranks, a.tp))
            log(f"  no candidate delay gave >= {MIN_SLOWDOWN * 100:.0f} % on "
                f"{'both pairs' if n_pairs == 2 else 'the calibrated pair'}; using {ok[0]} ms")
        log(f"  trial delays drawn from {ok} ms")

    specs = draw_specs(rng, a.kinds, a.trials, a.ranks, a.tp, lo_step, hi_step, ok)
    # Fault-free trials spread among the injected ones.
    order = [("inj", s) for s in specs]
    for i in range(a.fault_free):
        order.insert(round((i + 1) * len(order) / (a.fault_free + 1)), ("free", None))

    trials, fault_free = [], []
    # Progress after every trial, so an interrupted run leaves its trials with the command that made them.
    partial_path = os.path.splitext(a.out)[0] + ".partial.json"
    for i, (what, s) in enumerate(order):
        t0 = time.time()
        if what == "free":
            r = fault_free_trial(rn, a.fault_free_s)
            fault_free.append(r)
            write_partial(a, partial_path, trials, fault_free, {"rate": rate, "slow_link": links})
            log(f"[{i + 1}/{len(order)}] fault-free {r['seconds']:.0f} s, {r['steps']} steps: "
                f"{'FALSE POSITIVE ' + str(r['verdicts']) if r['verdicts'] else 'no verdict'}"
                f"{'' if r['job_alive_at_end'] else ' (the job died!)'}  [other work seen {r['other_work_seen'] * 100:.0f} %]")
            continue
        r = injected_trial(rn, s)
        trials.append(r)
        what_s = f"{s['kind']} rank {s['rank']} step {s['step']}"
        if s["kind"] == "slow":
            what_s += f" +{s['slowdown'] * 100:.0f} %"
        if s["kind"] == "slow_link":
            what_s += f" -> {s['peer']} ({s['ring']}) {s['delay_ms']} ms"
        if r.get("measured_slowdown") is not None:
            what_s += f" (measured +{r['measured_slowdown'] * 100:.0f} %)"
        v = r["verdict"]
        if v is None:
            res = "MISSED (no verdict)" if r["injected_at"] else "NOT INJECTED"
        else:
            vs = f"{v['kind']} ranks {v['ranks']}" + (f" link {v['link']['src']}->{v['link']['dst']}" if v.get("link") else "")
            if r["false_positive"]:
                res = f"FALSE POSITIVE before the injection: {vs}"
            else:
                res = f"{'ok' if r['correct'] else 'WRONG'} {vs} after {r['latency_s']:.2f} s"
        log(f"[{i + 1}/{len(order)}] {what_s}: {res}  [{time.time() - t0:.0f} s; other work seen {r['other_work_seen'] * 100:.0f} %]")
        write_partial(a, partial_path, trials, fault_free, {"rate": rate, "slow_link": links})

    overhead = None if a.skip_overhead else overhead_phase(a, rn)

    summ = summarise(trials, fault_free, a.kinds)
    total = time.time() - started
    goals = {
        "crash_p90_le_2s": summ["crash_p90_s"] is not None and summ["crash_p90_s"] <= 2.0,
        "hang_p90_le_10s": summ["hang_p90_s"] is not None and summ["hang_p90_s"] <= 10.0,
        "slow_named_within_60s": summ["slow_max_s"] is not None and summ["slow_max_s"] <= 60.0
        and all(summ["per_kind"][k]["correct"] == summ["per_kind"][k]["injected"]
                for k in ("slow", "slow_link") if k in summ["per_kind"]),
        "precision_ge_0.95": summ["precision"] is not None and summ["precision"] >= 0.95,
        "recall_ge_0.95": summ["recall"] is not None and summ["recall"] >= 0.95,
        **overhead_goals(overhead),
    }
    result = {
        "benchmark": "monitor",
        **setup_fields(a),
        "machine": mach,
        "command": "python3 " + " ".join([os.path.relpath(__file__, ROOT)] + sys.argv[1:]),
        "protocol": PROTOCOL,
        "seed": a.seed,
        "binaries": a.binaries,
        "git_head": a.git,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "duration_s": round(total, 1),
        "model": model,
        "calibration": {"rate": {k: v for k, v in rate.items() if k != "verdicts"},
                        "rate_run_verdicts": rate["verdicts"], "fault_step_range": [lo_step, hi_step],
                        "slow_link": links, "slow_link_trial_delays_ms": ok},
        "precision": summ["precision"], "recall": summ["recall"],
        "crash_p90_s": summ["crash_p90_s"], "hang_p90_s": summ["hang_p90_s"], "slow_p90_s": summ["slow_p90_s"],
        "overhead": overhead["overhead"] if overhead else None,
        "overhead_bottom_up": bottom_up_figure(overhead),
        "summary": summ,
        "overhead_detail": overhead,
        "goals": goals,
        "trials": trials,
        "fault_free": fault_free,
        "work_folder": work,
    }
    write_json(a.out, result)
    if os.path.exists(partial_path):
        os.remove(partial_path)

    log("")
    log(f"{'kind':<10} {'injected':>8} {'verdicts':>8} {'correct':>7} {'recall':>6} {'p50 s':>7} {'p90 s':>7} {'max s':>7}")
    for k in a.kinds:
        pk = summ["per_kind"][k]
        log(f"{k:<10} {pk['injected']:>8} {pk['verdicts']:>8} {pk['correct']:>7} {fmt(pk['recall']):>6} "
            f"{fmt(pk['p50_s']):>7} {fmt(pk['p90_s']):>7} {fmt(pk['max_s']):>7}")
    for name, table in (("slow_link by delay/ring", summ["slow_link_by_delay_and_ring"]),
                        ("slow by requested slowdown", summ["slow_by_requested_slowdown"])):
        for key, b in table.items():
            log(f"  {name} {key}: {b['correct']}/{b['injected']} named; measured slowdown {b['measured_slowdown']}; "
                f"latency {b['latency_s']}")
    log(f"fault-free: {len(fault_free)} runs, {sum(len(f['verdicts']) for f in fault_free)} verdicts")
    log(f"precision {fmt(summ['precision'], nd=3)} ({summ['correct_verdicts']}/{summ['verdicts']}), recall "
        f"{fmt(summ['recall'], nd=3)} ({summ['correct_verdicts']}/{summ['injected']}); p90: crash "
        f"{fmt(summ['crash_p90_s'], ' s')}, hang {fmt(summ['hang_p90_s'], ' s')}, slow {fmt(summ['slow_p90_s'], ' s')}")
    if overhead:
        log_overhead(overhead)
    log("goals: " + ", ".join(f"{k} {'met' if v else 'NOT met'}" for k, v in goals.items()))
    log(f"{total / 60:.1f} min; wrote {a.out}")
    if not a.keep:
        # Keep the folders of the failed trials (they were not removed above); drop the shared cache.
        shutil.rmtree(os.path.join(work, "cache"), ignore_errors=True)
        shutil.rmtree(os.path.join(work, "bin"), ignore_errors=True)
        if not os.listdir(work):
            os.rmdir(work)


if __name__ == "__main__":
    main()
