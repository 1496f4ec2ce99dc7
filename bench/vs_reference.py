"""exvae and the authors' PyTorch code side by side, on this machine, in one run.

Usage:
  EXVAE_REF_SRC=~/ref/src EXVAE_REF_PYTHON=~/ref/venv/bin/python \\
      python bench/vs_reference.py [--quick] [--modes rat,exact,gaussian,eval]
                                   [--rounds R] [--threads T] [--pretrain_steps P]

The reference is the authors' code (github sajadn/Exemplar-VAE, the commit the
harness names) checked out in ``$EXVAE_REF_SRC`` and run by
``$EXVAE_REF_PYTHON`` (its venv's python) through the offline harness
``../shared/reference/driver.py`` (``$EXVAE_REF_DRIVER`` overrides the path);
bench/ref_worker.py keeps it running beside this process.  Both codes use the
genuine Fashion-MNIST, batch 100 and the paper's hyper-parameters (M = 25000
exemplars, k = 10 neighbours for RAT), and are timed in alternation: round r
times exvae, then the reference, on the same kind of work, so both see the same
background load; a ratio is the median of the per-round ratios.

For each training mode (rat, exact, gaussian):
  * per step: seconds per training step (exvae's jitted step; their
    ``train_one_epoch`` over a few batches);
  * per epoch: 500 steps + the epoch-start cache refresh (RAT) + the per-epoch
    validation pass as each code runs it (exvae: ``train_lib.validate``,
    10000 points against all 50000 exemplars, and its picture; theirs:
    ``evaluate_loss``); checkpoint writes are not counted in either.
Before timing, both codes train ``--pretrain_steps`` steps (RAT): the size of
the retrieved neighbourhood (and so the reference's cost per step, which
encodes only the distinct retrieved exemplars) depends on how far training
has gone; the distinct rows of both are printed.
``eval``: seconds per test point of the IWAE bound at S = 5000 against all
N = 50000 exemplars (exvae: ``evaluation.evaluate_split``; theirs:
``calculate_likelihood``), untrained models (the cost does not depend on
the parameter values), random binary test points.

Every line carries the load average; the float32 2048^3 matmul rate of XLA and
of torch are measured in the same run (alternated).  The last line is
``rat_speedup=<ref/exvae> exact_speedup=.. gaussian_speedup=.. eval_speedup=..``
(training: per epoch, training plus validation; evaluation: per test point;
nan for a mode not run).  The same figures go to ``--out``
(results/speed/vs_reference.json): the machine and both matmul rates, the
provenance, and one row per figure (:func:`summary`).  Without the
reference, this script says how to install it and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HARNESS_README = "../shared/reference/README.md"

MODES = ("rat", "exact", "gaussian", "eval")
# (steps per round, pretrain steps) for --quick and the full run.
QUICK = {
  "rounds": 3,
  "steps": {"rat": 10, "exact": 1, "gaussian": 30},
  "pretrain": 300,
  "val_rounds": 1,
  "eval_rounds": 2,
  "eval_points": (3, 1),
}
FULL = {
  "rounds": 5,
  "steps": {"rat": 50, "exact": 4, "gaussian": 200},
  "pretrain": 500,
  "val_rounds": 2,
  "eval_rounds": 3,
  "eval_points": (10, 2),
}


class ReferenceMissing(RuntimeError):
  pass


def find_reference() -> tuple[str, str, str]:
  """(python, src, driver) of the reference, or ReferenceMissing saying how to install it."""
  src = os.path.expanduser(os.environ.get("EXVAE_REF_SRC", ""))
  py = os.path.expanduser(os.environ.get("EXVAE_REF_PYTHON", ""))
  drv = os.path.expanduser(
    os.environ.get(
      "EXVAE_REF_DRIVER", os.path.join(os.path.dirname(ROOT), "shared", "reference", "driver.py")
    )
  )
  problems = []
  if not src or not os.path.isfile(os.path.join(src, "density_estimation.py")):
    problems.append(
      f"EXVAE_REF_SRC={src or '(unset)'} is not a checkout of the authors' code "
      "(no density_estimation.py)"
    )
  if not py or not os.access(py, os.X_OK):
    problems.append(f"EXVAE_REF_PYTHON={py or '(unset)'} is not an executable python")
  if not os.path.isfile(drv):
    problems.append(f"the harness {drv} is missing (set EXVAE_REF_DRIVER)")
  if problems:
    raise ReferenceMissing(
      "The reference implementation is not installed: " + "; ".join(problems) + ".\n"
      "To install it (once per machine, ~2 minutes; details in " + HARNESS_README + "):\n"
      "  1. git clone <github.com/sajadn/Exemplar-VAE> ~/ref/src && "
      "git -C ~/ref/src checkout 4dbd091\n"
      "  2. python3 -m venv ~/ref/venv && ~/ref/venv/bin/pip install torch==2.13.0 numpy scipy "
      "matplotlib   (no torchvision: the harness's shim replaces it)\n"
      "  3. export EXVAE_REF_SRC=~/ref/src EXVAE_REF_PYTHON=~/ref/venv/bin/python\n"
      "     (and EXVAE_REF_DRIVER=/path/to/driver.py if the harness is not at "
      "../shared/reference/driver.py)"
    )
  return py, src, drv


class Reference:
  """The reference, kept running in bench/ref_worker.py; one JSON command, one answer."""

  def __init__(self, python: str, src: str, driver: str, log_path: str):
    env = dict(os.environ, EXVAE_REF_SRC=src, PYTHONUNBUFFERED="1")
    self.log_path = log_path
    self.log = open(log_path, "w")
    self.proc = subprocess.Popen(
      [python, "-u", os.path.join(ROOT, "bench", "ref_worker.py"), driver],
      stdin=subprocess.PIPE,
      stdout=subprocess.PIPE,
      stderr=self.log,
      text=True,
      env=env,
    )
    self.info = self._read()

  def _read(self) -> dict:
    for line in self.proc.stdout:
      if line.startswith("@@ "):
        out = json.loads(line[3:])
        if "error" in out:
          raise RuntimeError(
            f"reference: {out['error']}\n{out.get('traceback', '')}(log: {self.log_path})"
          )
        return out
    raise RuntimeError(
      f"the reference worker exited (status {self.proc.wait()}); its log: "
      f"{self.log_path}:\n" + open(self.log_path).read()[-3000:]
    )

  def __call__(self, cmd: str, **kw) -> dict:
    self.proc.stdin.write(json.dumps(dict(kw, cmd=cmd)) + "\n")
    self.proc.stdin.flush()
    return self._read()

  def close(self):
    if self.proc.poll() is None:
      try:
        self("quit")
      except (RuntimeError, BrokenPipeError):
        pass
      self.proc.wait(timeout=60)
    self.log.close()


def require_reference() -> tuple[str, str, str]:
  """``find_reference()``, or its install steps on stderr and exit status 2 (for the CLIs)."""
  try:
    return find_reference()
  except ReferenceMissing as e:
    print(e, file=sys.stderr)
    sys.exit(2)


def loadavg() -> str:
  return "loadavg %.2f,%.2f,%.2f" % os.getloadavg()


class OtherCpu:
  """Share of the machine's CPU time taken by processes other than this benchmark.

  The load average lags by minutes (a machine made quiet just before the run
  still reports the earlier load), so the verdict "quiet" comes from
  /proc/stat instead: busy time of all cores minus the CPU time of this process
  and of the reference's worker, over the wall-clock time, as a fraction of
  the cores.  None where /proc is not readable.
  """

  def __init__(self, pids):
    self.pids = list(pids)
    self.start = self._sample()

  @staticmethod
  def _busy_and_total():
    with open("/proc/stat") as f:
      v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + (v[4] if len(v) > 4 else 0)  # idle + iowait
    return sum(v) - idle, sum(v)

  def _own(self):
    t = 0
    for pid in self.pids:
      try:
        with open(f"/proc/{pid}/stat") as f:
          fields = f.read().rsplit(")", 1)[1].split()
        t += int(fields[11]) + int(fields[12])  # utime + stime of the process
      except (OSError, ValueError, IndexError):
        pass
    return t

  def _sample(self):
    try:
      busy, total = self._busy_and_total()
      return busy, total, self._own()
    except (OSError, ValueError):
      return None

  def fraction(self):
    end = self._sample()
    if self.start is None or end is None or end[1] == self.start[1]:
      return None
    other = (end[0] - self.start[0]) - (end[2] - self.start[2])
    return max(0.0, other / (end[1] - self.start[1]))


def summary(
  cpu: str, cores: int, xla_gflops: float, torch_gflops: float, rows: list, provenance: dict
) -> dict:
  """The JSON summary of a run (what the README's speed table is generated from).

  Args:
    cpu: the CPU's name; cores: its core count.
    xla_gflops, torch_gflops: float32 2048^3 matmul rates of XLA and torch, this run.
    rows: ``(what, unit, exvae, reference[, speedup])`` per figure (times: lower is
      faster); speedup defaults to reference / exvae (a median of per-round
      ratios, where the run has one, is steadier than the ratio of medians).
    provenance: ``{"commit", "date", "command"}``.

  Returns:
    ``{"machine": {"cpu", "cores", "xla_matmul_gflops", "torch_matmul_gflops"},
    "provenance": {"commit", "date", "command"}, "rows": [{"what", "unit",
    "exvae", "reference", "speedup"}]}``.
  """
  return {
    "machine": {
      "cpu": str(cpu),
      "cores": int(cores),
      "xla_matmul_gflops": float(xla_gflops),
      "torch_matmul_gflops": float(torch_gflops),
    },
    "provenance": {k: str(provenance[k]) for k in ("commit", "date", "command")},
    "rows": [
      {
        "what": str(row[0]),
        "unit": str(row[1]),
        "exvae": float(row[2]),
        "reference": float(row[3]),
        "speedup": float(row[4])
        if len(row) > 4
        else (float(row[3]) / float(row[2]) if float(row[2]) > 0 else float("nan")),
      }
      for row in rows
    ],
  }


def med(xs) -> float:
  import numpy as np

  return float(np.median(np.asarray(xs, dtype=float)))


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--quick", action="store_true", help="few rounds and steps (a shared machine)")
  ap.add_argument("--modes", default="rat,exact,gaussian,eval")
  ap.add_argument("--rounds", type=int, default=None, help="alternated rounds per figure")
  ap.add_argument(
    "--threads",
    type=int,
    default=os.cpu_count(),
    help="cores for each code: torch threads of the reference; below the core "
    "count, both processes are pinned to that many cores (XLA sizes its pool "
    "from them). On a busy machine use 1: torch's OpenMP threads slow down "
    "tens of times when another process holds a core",
  )
  ap.add_argument(
    "--pretrain_steps",
    type=int,
    default=None,
    help="RAT: untimed training steps of both codes before timing",
  )
  ap.add_argument("--steps", default=None, help="steps per round, e.g. rat=10,exact=1,gaussian=30")
  ap.add_argument(
    "--out",
    default=os.path.join(ROOT, "results", "speed", "vs_reference.json"),
    help="where the JSON summary goes",
  )
  args = ap.parse_args()
  modes = [m for m in args.modes.split(",") if m]
  bad = set(modes) - set(MODES)
  if bad:
    ap.error(f"unknown modes {sorted(bad)}; known: {MODES}")
  py, src, drv = require_reference()
  if args.threads < os.cpu_count():
    os.sched_setaffinity(
      0, sorted(os.sched_getaffinity(0))[: args.threads]
    )  # inherited by the worker
  plan = dict(QUICK if args.quick else FULL)
  plan["steps"] = dict(plan["steps"])
  if args.rounds:
    plan["rounds"] = args.rounds
  if args.pretrain_steps is not None:
    plan["pretrain"] = args.pretrain_steps
  for kv in args.steps.split(",") if args.steps else []:
    k, v = kv.split("=")
    plan["steps"][k] = int(v)

  sys.path.insert(0, ROOT)
  import jax
  import jax.numpy as jnp
  import numpy as np
  from bench import train_speed as ts
  from exvae import evaluation, runinfo, train_lib

  log_path = os.path.join(tempfile.mkdtemp(prefix="vs_reference_"), "reference.log")
  ref = Reference(py, src, drv, log_path)
  try:
    splits, data_src = ts.load_splits()
    pool = jnp.asarray(splits.train_x)
    other_cpu = OtherCpu([os.getpid(), ref.proc.pid])
    print(
      f"machine: {runinfo.cpu_name(with_isa=True)}, {os.cpu_count()} cores, each code on {args.threads}; "
      f"{loadavg()} at start (lags by minutes: the summary line measures the CPU "
      "other processes took during the run)"
    )
    print(
      f"exvae: jax {jax.__version__} {jax.default_backend()}; reference: torch "
      f"{ref.info['torch']} ({args.threads} threads), their commit {ref.info['commit'][:7]} "
      f"in {ref.info['src']}; data {data_src}; worker log {log_path}",
      flush=True,
    )
    # Matmul rates, alternated.
    from bench.prior_kernel import limit_fns

    mm, mm_args = limit_fns()["matmul"]
    jax.block_until_ready(mm(*mm_args))
    xla_r, torch_r = [], []
    for _ in range(3):
      t0 = time.perf_counter()
      jax.block_until_ready(mm(*mm_args))
      xla_r.append(2.0 * 2048**3 / (time.perf_counter() - t0) / 1e9)
      torch_r.append(ref("matmul", n=2048, reps=1, threads=args.threads)["gflops"])
    print(
      f"matmul 2048^3 f32 (best of 3, alternated): XLA {max(xla_r):.1f} GFLOP/s, "
      f"torch {max(torch_r):.1f} GFLOP/s; {loadavg()}",
      flush=True,
    )

    speed = {m: float("nan") for m in ("rat", "exact", "gaussian", "eval")}
    rows = []  # (what, unit, exvae, reference) for the JSON summary
    workdir = tempfile.mkdtemp(prefix="vs_reference_val_")
    rat_run = None
    for mode in [m for m in modes if m != "eval"] + (["eval"] if "eval" in modes else []):
      if mode == "eval":
        speed["eval"], tx, tr = compare_eval(ref, ts, evaluation, splits, pool, plan, args, rat_run)
        rows.append(
          (
            "evaluation: IWAE bound (S = 5000, N = 50000) per test point",
            "s",
            tx,
            tr,
            speed["eval"],
          )
        )
        continue
      run, r_setup = setup_both(ref, ts, mode, splits, pool, args, plan)
      if mode == "rat":
        rat_run = run
      steps = plan["steps"][mode]
      xs, rs, ratios, xr, rr, rows_x, rows_r = [], [], [], [], [], [], []
      for _ in range(plan["rounds"]):
        if mode == "rat":
          rows_x.append(ts.union_valid_rows(run, pool))
        tx = ts.time_steps(run, pool, steps)
        out = ref("steps", n=steps, epoch=1)
        tr = float(np.mean(out["sec_per_step"]))
        xs.append(tx)
        rs.append(tr)
        ratios.append(tr / tx)
        rr.append(out["refresh_s"])
        rows_r += out["exemplar_rows"]
        xr.append(ts.time_refresh(run, pool))
      vx, vr, vloss = [], [], []
      train_lib.validate(run.state, run.setup, pool, splits, run.config, workdir, 0)  # compile
      for _ in range(plan["val_rounds"]):
        t0 = time.perf_counter()
        vm = train_lib.validate(run.state, run.setup, pool, splits, run.config, workdir, 0)
        vx.append(time.perf_counter() - t0)
        out = ref("val")
        vr.append(out["val_s"])
        vloss.append((vm["val_loss"], out["val_loss"]))
      spe = run.setup.steps_per_epoch
      ex = spe * med(xs) + med(xr) + med(vx)
      er = r_setup["steps_per_epoch"] * med(rs) + med(rr) + med(vr)
      speed[mode] = er / ex
      rows.append((f"{mode}: training step", "ms", med(xs) * 1e3, med(rs) * 1e3, med(ratios)))
      rows.append((f"{mode}: epoch (training + validation)", "s", ex, er))
      note = ""
      if mode in ("rat", "exact"):
        # RAT: exvae encodes the chunks holding the union's distinct rows
        # (exemplar.rat_compact), so its account takes the measured distinct count.
        fx = ts.step_flops(
          run.config,
          run.state.params["model"],
          run.setup.batch_size,
          run.setup.num_train,
          spe,
          union_rows=med(rows_x) if rows_x else None,
        )
        n_rows_r = med(rows_r) if rows_r else float("nan")
        fr = ts.step_flops(
          run.config,
          run.state.params["model"],
          run.setup.batch_size,
          run.setup.num_train,
          spe,
          union_rows=n_rows_r,
          remat=False,
          distinct=False,
        )
        note = (
          f"; exemplars encoded with gradients per step: exvae {fx['exemplar_rows']}"
          + (f" ({med(rows_x):.0f} distinct)" if rows_x else "")
          + f", reference {n_rows_r:.0f}; matmul GFLOP/step exvae {fx['total'] / 1e9:.2f}, "
          f"reference {fr['total'] / 1e9:.2f} (same account, no remat)"
        )
      print(
        f"{mode}: per step exvae {med(xs) * 1e3:.1f} ms, reference {med(rs) * 1e3:.1f} ms, "
        f"ratio {med(ratios):.2f}x (median of {len(ratios)} alternated rounds of {steps} "
        f"steps){note}",
        flush=True,
      )
      print(
        f"{mode}: per epoch (training + validation) exvae {ex:.1f} s = {spe} x step + "
        f"refresh {med(xr):.2f} s + val {med(vx):.2f} s; reference {er:.1f} s = "
        f"{r_setup['steps_per_epoch']} x step + refresh {med(rr):.2f} s + val {med(vr):.2f} s;"
        f" ratio {speed[mode]:.2f}x; val loss (untrained-ish, not comparable) exvae "
        f"{vloss[-1][0]:.1f} ref {vloss[-1][1]:.1f}; {loadavg()}",
        flush=True,
      )
    frac = other_cpu.fraction()
    quiet = frac < 0.05 if frac is not None else os.getloadavg()[0] <= 1.5
    print(
      f"summary: {loadavg()} at end; other processes took "
      + (f"{100 * frac:.1f}%" if frac is not None else "an unknown share")
      + " of the cores' time during the run; figures "
      + ("on a quiet machine" if quiet else "MEASURED UNDER LOAD")
    )
    out = summary(
      runinfo.cpu_name(with_isa=True),
      os.cpu_count(),
      max(xla_r),
      max(torch_r),
      rows,
      ts.provenance(),
    )
    print("wrote", ts.write_json(args.out, out), flush=True)
  finally:
    ref.close()
  print(
    "rat_speedup=%.2f exact_speedup=%.2f gaussian_speedup=%.2f eval_speedup=%.1f"
    % (speed["rat"], speed["exact"], speed["gaussian"], speed["eval"]),
    flush=True,
  )


def setup_both(ref, ts, mode, splits, pool, args, plan):
  """exvae's compiled run and the reference's model of ``mode``, both trained ``pretrain`` steps (RAT)."""
  t0 = time.perf_counter()
  run = ts.prepare(ts.make_config(mode), splits, pool, pretrain=0)  # both pretrain below
  t_x = time.perf_counter() - t0
  r_setup = ref("setup", mode=mode, threads=args.threads, warmup=1 if mode == "exact" else 2)
  pre = plan["pretrain"] if mode == "rat" else 0
  if pre:
    ts.time_steps(run, pool, pre)
    ref("steps", n=pre, epoch=1)
  print(
    f"{mode}: set up (exvae compile {t_x:.1f} s, reference {r_setup['setup_s']:.1f} s); "
    f"both trained {pre} untimed steps; reference args: {r_setup['args']}",
    flush=True,
  )
  return run, r_setup


def compare_eval(ref, ts, evaluation, splits, pool, plan, args, rat_run):
  """Seconds per test point of the IWAE bound, S = 5000, N = 50000, alternated.

  Returns:
    ``(ref / exvae, exvae s per point, reference s per point)`` (medians).
  """
  import jax
  import numpy as np

  if rat_run is None:
    rat_run = ts.prepare(ts.make_config("rat"), splits, pool, pretrain=0)
  # The reference's worker holds the model of the mode set up last (gaussian when
  # every mode runs): its evaluation must use the exemplar prior, so set it up again.
  ref("setup", mode="rat", threads=args.threads, warmup=1)
  params, setup = rat_run.state.params, rat_run.setup
  t0 = time.perf_counter()
  ctx = evaluation.eval_context(params, pool, jax.random.PRNGKey(0), setup=setup)
  jax.block_until_ready(ctx)
  t_bank = time.perf_counter() - t0
  n_x, n_r = plan["eval_points"]
  rng = np.random.default_rng(0)
  test = (rng.uniform(size=(n_x,) + splits.train_x.shape[1:]) < 0.286).astype(np.float32)
  s = 5000
  evaluation.evaluate_split(params, setup, ctx, test[:1], jax.random.PRNGKey(1), s, 5000)  # compile
  xs, rs, ratios, banks = [], [], [], []
  for r in range(plan["eval_rounds"]):
    t0 = time.perf_counter()
    evaluation.evaluate_split(params, setup, ctx, test, jax.random.PRNGKey(2 + r), s, 5000)
    tx = (time.perf_counter() - t0) / n_x
    out = ref("eval", points=n_r, S=s, seed=r)
    tr = float(np.mean(out["sec_per_point"]))
    xs.append(tx)
    rs.append(tr)
    ratios.append(tr / tx)
    banks.append(out["bank_s"])
  print(
    f"eval (IWAE, S={s}, N={splits.train_x.shape[0]}): per test point exvae {med(xs):.3f} s "
    f"({n_x} points/round), reference {med(rs):.2f} s ({n_r} points/round), ratio "
    f"{med(ratios):.1f}x (median of {len(ratios)} alternated rounds); bank of all exemplars "
    f"exvae {t_bank:.2f} s (compile included), reference {med(banks):.2f} s; {loadavg()}",
    flush=True,
  )
  return med(ratios), med(xs), med(rs)


if __name__ == "__main__":
  main()
