"""results/: collecting an evaluated run and generating the README table from it."""

import json
import os
import shutil

import numpy as np
import pytest

from conftest import ROOT, load_script


def _script(name):
  return load_script(f"scripts/{name}.py")


def _fake_run(tmp_path, nll_values):
  wd = tmp_path / "run"
  wd.mkdir()
  (wd / "config.json").write_text(
    json.dumps(
      {
        "dataset": "fashion_mnist",
        "model": "vae",
        "prior": "exemplar",
        "num_epochs": 2000,
        "warmup_epochs": 100,
        "early_stopping_patience": 50,
      }
    )
  )
  m = len(nll_values)
  (wd / "eval_metrics.json").write_text(
    json.dumps(
      {
        "test_nll": float(np.mean(nll_values)),
        "test_nll_stderr": float(np.std(nll_values, ddof=1) / np.sqrt(m)),
        "num_importance_samples": 5000,
        "num_test_examples": m,
        "eval_seconds": 12.0,
      }
    )
  )
  np.savez(wd / "per_example.npz", log_px=-np.asarray(nll_values, np.float32))
  recs = [
    {"epoch": 1, "val_loss": 300.0, "time": 10.0},
    {"step": 7, "time": 12.0},
    {"epoch": 2, "val_loss": 290.0, "time": 20.0},
    # killed, then resumed: the clock restarts; epoch 2 is validated again
    {"epoch": 2, "val_loss": 289.5, "time": 3.0},
    {"epoch": 3, "val_loss": 295.0, "time": 9.0},
    {"summary": {"early_stopped": True}},
  ]
  with open(wd / "metrics.jsonl", "w") as f:
    for r in recs:
      f.write(json.dumps(r) + "\n")
    f.write('{"cut by a cra')  # a torn last line is ignored
  return wd


def test_collect_writes_entry_and_budget_from_resumed_segments(tmp_path):
  collect = _script("collect_result")
  wd = _fake_run(tmp_path, [226.0, 228.0, 227.0, 229.0])
  before = sorted(os.listdir(wd))
  dest = collect.collect(
    str(wd), "fashion_vae_exemplar_rat", str(tmp_path / "results"), measure=False
  )
  assert sorted(os.listdir(wd)) == before  # the run dir is only read
  b = json.load(open(os.path.join(dest, "budget.json")))
  assert b["train_wall_clock_s"] == pytest.approx(20.0 + 9.0)  # two segments
  assert (b["epochs_trained"], b["best_epoch"], b["best_val_loss"]) == (3, 2, 289.5)
  assert b["early_stopped"] is True
  per = np.load(os.path.join(dest, "per_example.npz"))
  np.testing.assert_array_equal(per["log_px"], -np.float32([226.0, 228.0, 227.0, 229.0]))
  assert open(os.path.join(dest, "curve.csv")).read().splitlines()[1:] == [
    "1,300.0000",
    "2,289.5000",
    "3,295.0000",
  ]


def test_collect_reads_the_evaluation_from_eval_dir(tmp_path):
  """eval.py --config.eval.out_dir=DIR: the metrics and scores come from DIR, the rest from the run."""
  collect = _script("collect_result")
  wd = _fake_run(tmp_path, [226.0, 228.0])
  ev = tmp_path / "eval_reference"
  ev.mkdir()
  for f in ("eval_metrics.json", "per_example.npz"):
    os.replace(wd / f, ev / f)
  with pytest.raises(SystemExit, match="eval_metrics.json"):
    collect.collect(str(wd), "x", str(tmp_path / "r"), measure=False)
  m = json.loads((ev / "eval_metrics.json").read_text())
  # A test NLL that is not the mean of the scores beside it is refused, not collected.
  (ev / "eval_metrics.json").write_text(json.dumps(dict(m, test_nll=1.5)))
  with pytest.raises(SystemExit, match="does not check.*test_nll=1.5"):
    collect.collect(str(wd), "x", str(tmp_path / "r"), measure=False, eval_dir=str(ev))
  (ev / "eval_metrics.json").write_text(json.dumps(dict(m, eval_seconds=99.0)))
  rc = collect.main(
    [
      "--workdir",
      str(wd),
      "--name",
      "x",
      "--out",
      str(tmp_path / "r"),
      "--eval_dir",
      str(ev),
      "--no-measure",
    ]
  )
  assert rc == 0
  out = tmp_path / "r" / "x"
  assert json.loads((out / "metrics.json").read_text())["eval_seconds"] == 99.0
  np.testing.assert_array_equal(
    np.load(out / "per_example.npz")["log_px"], -np.float32([226.0, 228.0])
  )
  assert json.loads((out / "budget.json").read_text())["best_epoch"] == 2


def test_collect_counts_the_budget_up_to_the_evaluated_checkpoint(tmp_path):
  """Training went on after eval.py read its checkpoint: those epochs are not the result's."""
  collect = _script("collect_result")
  wd = _fake_run(tmp_path, [226.0, 228.0])
  m = json.loads((wd / "eval_metrics.json").read_text())
  (wd / "eval_metrics.json").write_text(json.dumps(dict(m, checkpoint_step=20)))
  recs = [
    {"epoch": e, "step": 10 * e, "val_loss": 300.0 - e, "time": 5.0 * e} for e in (1, 2, 3, 4)
  ]
  with open(wd / "metrics.jsonl", "w") as f:
    f.write("\n".join(json.dumps(r) for r in recs) + "\n")
  b = json.load(
    open(
      os.path.join(collect.collect(str(wd), "x", str(tmp_path / "r"), measure=False), "budget.json")
    )
  )
  assert (b["epochs_trained"], b["best_epoch"], b["evaluated_checkpoint_step"]) == (2, 2, 20)
  assert b["train_wall_clock_s"] == pytest.approx(10.0)
  assert open(tmp_path / "r" / "x" / "curve.csv").read().splitlines()[1:] == [
    "1,299.0000",
    "2,298.0000",
  ]


def test_collect_counts_a_paused_job_apart(tmp_path):
  """A job stopped with SIGSTOP keeps its clock running: the gap is recorded as paused."""
  collect, tab = _script("collect_result"), _script("results_table")
  wd = _fake_run(tmp_path, [226.0, 228.0])
  recs = [
    {"epoch": 1, "step": 10, "val_loss": 300.0, "time": 100.0},
    {"step": 15, "time": 150.0},
    {"step": 16, "time": 150.0 + 2700.0},  # paused 45 minutes
    {"epoch": 2, "step": 20, "val_loss": 299.0, "time": 2900.0},
    {"epoch": 3, "step": 30, "val_loss": 298.0, "time": 60.0},  # resumed: new segment
    {"epoch": 4, "step": 40, "val_loss": 297.0, "time": 400.0},
  ]  # 340 s: a pause too
  with open(wd / "metrics.jsonl", "w") as f:
    f.write("\n".join(json.dumps(r) for r in recs) + "\n")
  dest = collect.collect(str(wd), "x", str(tmp_path / "r"), measure=False)
  b = json.load(open(os.path.join(dest, "budget.json")))
  assert b["train_wall_clock_s"] == pytest.approx(2900.0 + 400.0)
  assert b["train_paused_s"] == pytest.approx(2700.0 + 340.0)
  row = tab.table(tab.load_entries(str(tmp_path / "r")))
  assert "0.1 h training (pauses excluded)" in row  # (3300 - 3040) s
  b.pop("train_paused_s")  # collected before pauses were measured
  with open(os.path.join(dest, "budget.json"), "w") as f:
    json.dump(b, f)
  assert "0.9 h training wall-clock" in tab.table(tab.load_entries(str(tmp_path / "r")))


def test_collect_refuses_an_unevaluated_run(tmp_path):
  collect = _script("collect_result")
  wd = _fake_run(tmp_path, [1.0, 2.0])
  os.remove(wd / "per_example.npz")
  with pytest.raises(SystemExit, match="per_example.npz"):
    collect.collect(str(wd), "x", str(tmp_path / "results"), measure=False)


def test_results_table_from_results_and_readme_markers(tmp_path):
  collect, tab = _script("collect_result"), _script("results_table")
  vals = [226.0, 228.0, 227.0, 229.0]
  collect.collect(
    str(_fake_run(tmp_path, vals)),
    "fashion_vae_exemplar_rat",
    str(tmp_path / "results"),
    measure=False,
  )
  text = tab.table(tab.load_entries(str(tmp_path / "results")))
  row = [l for l in text.splitlines() if "fashion_vae_exemplar_rat" in l][0]
  se = np.std(vals, ddof=1) / 2
  assert "226.75 +- 0.07" in row  # the paper's exemplar row
  assert f"{np.mean(vals):.2f} +- {se:.2f}" in row
  assert f"{np.mean(vals) - 226.75:+.2f}" in row
  assert "pruned" not in row
  m = json.load(open(tmp_path / "results" / "fashion_vae_exemplar_rat" / "metrics.json"))
  with open(tmp_path / "results" / "fashion_vae_exemplar_rat" / "metrics.json", "w") as f:
    json.dump(dict(m, prune_keep=2048), f)
  pruned_row = tab.table(tab.load_entries(str(tmp_path / "results"))).splitlines()[-1]
  assert "prior pruned to the 2048 nearest exemplars" in pruned_row
  assert "exvae's binarisation" in pruned_row  # no eval_binarize: the old draw
  with open(tmp_path / "results" / "fashion_vae_exemplar_rat" / "metrics.json", "w") as f:
    json.dump(dict(m, eval_binarize="reference"), f)
  ref_row = tab.table(tab.load_entries(str(tmp_path / "results"))).splitlines()[-1]
  assert "binarised as the paper's (reference draw)" in ref_row
  readme = tmp_path / "README.md"
  readme.write_text(f"intro\n{tab.BEGIN}\nold table\n{tab.END}\noutro\n")
  tab.write_readme(str(readme), text)
  s = readme.read_text()
  assert "old table" not in s and row in s and s.startswith("intro\n") and s.endswith("outro\n")


def _paper_runs(tmp_path, jobs, configs, fail="", **env_extra):
  """Runs scripts/paper_runs.sh with a stand-in Python that logs its cores and arguments."""
  import subprocess

  log = tmp_path / "calls.log"
  log.unlink(missing_ok=True)
  stub = tmp_path / "py"
  stub.write_text(
    "#!/usr/bin/env bash\n"
    "cores=$(taskset -cp $$ | sed 's/.*: //')\n"
    f"echo \"$cores $*\" >> {log}\n"
    f"case \"$*\" in *{fail or '@never@'}*) exit 3;; esac\n"
  )
  stub.chmod(0o755)
  env = dict(
    os.environ,
    PY=str(stub),
    RUNS=str(tmp_path / "runs"),
    JOBS=str(jobs),
    CONFIGS=" ".join(configs),
    **env_extra,
  )
  proc = subprocess.run(
    ["bash", os.path.join(ROOT, "scripts", "paper_runs.sh")],
    env=env,
    capture_output=True,
    text=True,
    timeout=60,
  )
  calls = log.read_text().splitlines() if log.exists() else []
  return proc, [c.split(" ", 1) for c in calls]


@pytest.mark.skipif(
  len(os.sched_getaffinity(0)) < 2 or os.cpu_count() < 2, reason="needs two cores"
)
def test_paper_runs_jobs_pins_each_run_to_its_own_cores(tmp_path):
  if os.cpu_count() != len(os.sched_getaffinity(0)):
    pytest.skip("nproc differs from the affinity mask")
  n = os.cpu_count()
  proc, calls = _paper_runs(tmp_path, 2, ["cfg_a", "cfg_b", "cfg_c"])
  assert proc.returncode == 0, proc.stderr
  per = n // 2
  want = {
    "cfg_a": f"0-{per - 1}" if per > 1 else "0",
    "cfg_c": f"0-{per - 1}" if per > 1 else "0",
    "cfg_b": f"{per}-{2 * per - 1}" if per > 1 else f"{per}",
  }
  for cfg, cores in want.items():
    mine = [(c, a) for c, a in calls if f"configs/{cfg}.py" in a or f"--name {cfg}" in a]
    # train, eval, collect, then the same on the paper's test draw: in that order, all on
    # the run's own cores
    assert [a.split()[0] for _, a in mine] == [
      "train.py",
      "eval.py",
      "scripts/collect_result.py",
      "eval.py",
      "scripts/collect_result.py",
    ]
    assert {c for c, _ in mine} == {cores}, (cfg, mine)
    wd = f"{tmp_path}/runs/{cfg}"
    assert "eval_binarize" not in mine[1][1]
    # evaluations print progress lines to the log (a line a minute without a terminal)
    assert "progress=False" not in mine[1][1] and "progress=False" not in mine[3][1]
    assert mine[3][1].endswith(
      f"--config.eval_binarize=reference --config.eval.out_dir={wd}.eval_reference"
    )
    assert mine[4][1] == (
      f"scripts/collect_result.py --workdir {wd} --eval_dir "
      f"{wd}.eval_reference --name {cfg}_reference_draw"
    )
    assert (tmp_path / "runs" / f"{cfg}.log").exists()
  # cfg_a finishes before cfg_c starts (same slot); the table comes last, once
  order = [a for _, a in calls]
  assert order.index(
    "train.py --config=configs/cfg_c.py --workdir=%s/runs/cfg_c --config.progress=False" % tmp_path
  ) > order.index("scripts/collect_result.py --workdir %s/runs/cfg_a --name cfg_a" % tmp_path)
  assert [a for a in order if "results_table" in a] == [order[-1]]
  # first, carried runs are unpacked where their directories are missing
  assert order[0] == f"scripts/carry_runs.py unpack --runs {tmp_path}/runs cfg_a cfg_b cfg_c"


def test_paper_runs_failure_keeps_the_table_and_bad_jobs_is_one_line(tmp_path):
  proc, calls = _paper_runs(tmp_path, min(2, os.cpu_count()), ["cfg_a", "cfg_b"], fail="cfg_b.py")
  assert proc.returncode != 0
  assert not [a for _, a in calls if "results_table" in a]
  # REFERENCE_DRAW=0: one evaluation per run
  proc, calls = _paper_runs(tmp_path, 1, ["cfg_a"], REFERENCE_DRAW="0")
  assert proc.returncode == 0, proc.stderr
  assert [a.split()[0] for _, a in calls if "cfg_a" in a][1:] == [
    "train.py",
    "eval.py",
    "scripts/collect_result.py",
  ]
  proc, calls = _paper_runs(tmp_path, os.cpu_count() + 1, ["cfg_a"])
  assert proc.returncode == 2 and calls == []
  assert len(proc.stderr.strip().splitlines()) == 1 and "JOBS must be" in proc.stderr


def _speed_record(rows):
  return {
    "machine": {
      "cpu": "Test CPU",
      "cores": 2,
      "xla_matmul_gflops": 195.2,
      "torch_matmul_gflops": 151.7,
    },
    "provenance": {
      "commit": "abc1234",
      "date": "2026-12-01",
      "command": "python bench/vs_reference.py",
    },
    "rows": rows,
  }


def test_speed_table_from_the_benchmark_record(tmp_path):
  tab = _script("results_table")
  path = tmp_path / "speed" / "vs_reference.json"
  missing = tab.speed_table(str(path))
  assert "has not been recorded" in missing and "|" not in missing
  path.parent.mkdir()
  rows = [
    {"what": "RAT epoch", "unit": "s", "exvae": 18.5, "reference": 40.5, "speedup": 40.5 / 18.5},
    {
      "what": "IWAE test point",
      "unit": "s",
      "exvae": 0.238,
      "reference": 8.37,
      "speedup": 8.37 / 0.238,
    },
  ]
  path.write_text(json.dumps(_speed_record(rows)))
  text = tab.speed_table(str(path))
  assert "Test CPU, 2 cores (matmul: XLA 195, torch 152 GFLOP/s)" in text
  assert "`abc1234`" in text and "2026-12-01" in text
  assert "| RAT epoch | s | 18.5 | 40.5 | 2.19x |" in text
  assert "| IWAE test point | s | 0.238 | 8.37 | 35.17x |" in text
  assert tab.blocks(str(tmp_path))["speed"] == text


def test_readme_holds_the_generated_blocks():
  """README.md's results, speed and GPU blocks are what the generator makes from results/."""
  tab = _script("results_table")
  readme = open(os.path.join(ROOT, "README.md")).read()
  for name, text in tab.blocks(os.path.join(ROOT, "results")).items():
    begin, end = tab.markers(name)
    assert begin in readme and end in readme, name
    assert readme.split(begin, 1)[1].split(end, 1)[0].strip() == text.strip(), (
      f"README's {name} block is stale: run python scripts/results_table.py --write-readme README.md"
    )


def test_gpu_table_from_the_device_check(tmp_path):
  tab = _script("results_table")
  assert "No device check" in tab.gpu_table(str(tmp_path / "none"))
  src = os.path.join(ROOT, "results", "device", "h200-2026-11-30")
  run = tmp_path / "run"
  shutil.copytree(src, run)
  ts = json.loads((run / "train_speed.json").read_text())
  ts["rows"]["vae_rat"].update(ms_per_step=1.25, epoch_s=0.625)
  (run / "train_speed.json").write_text(json.dumps(ts))
  text = tab.gpu_table(str(run), "results/device/x")
  assert "| MLP VAE, exemplar prior, RAT | 1.25 ms | 0.62 s |" in text
  assert text.startswith("NVIDIA H200, jax 0.11.2 (`results/device/x/`)")


def _entry(root, name, prior, nll, model="vae", images="abc", draw="exvae", **config):
  """A results/<name>/ entry with per-image scores (only what the tables read)."""
  from exvae import per_example

  d = root / name
  d.mkdir(parents=True)
  (d / "config.json").write_text(
    json.dumps({"dataset": "fashion_mnist", "model": model, "prior": prior, **config})
  )
  (d / "metrics.json").write_text(
    json.dumps(
      {"test_nll": float(np.mean(nll)), "eval_binarize": draw, "num_importance_samples": 5000}
    )
  )
  (d / "budget.json").write_text("{}")
  per_example.save(
    str(d),
    {"log_px": -np.asarray(nll), "elbo": -np.asarray(nll) - 1},
    {
      "dataset": "fashion_mnist",
      "split": "test",
      "eval_binarize_seed": 0,
      "count": len(nll),
      "images_sha256": images,
    },
    {"num_importance_samples": 5000, "eval_binarize": draw},
  )


def test_paired_table_pairs_the_priors_of_one_model_on_the_same_images(tmp_path):
  tab = _script("results_table")
  rng = np.random.default_rng(0)
  g = 228 + rng.normal(size=400)
  e = g - 1.5 + 1.2 * rng.normal(size=400)  # better on most images, not all
  h = e - 0.3 + 0.5 * rng.normal(size=400)  # the deeper model, same prior, same images
  _entry(tmp_path, "fashion_vae_gaussian", "gaussian", g.astype(np.float32))
  _entry(tmp_path, "fashion_vae_exemplar_rat", "exemplar", e.astype(np.float32))
  _entry(tmp_path, "fashion_hvae_gaussian", "gaussian", g[:300], model="hvae")
  _entry(tmp_path, "fashion_hvae_vampprior", "vampprior", g[:300], model="hvae", images="other")
  _entry(tmp_path, "fashion_hvae_exemplar_rat", "exemplar", h.astype(np.float32), model="hvae")
  _entry(tmp_path, "fashion_vae_vampprior_reference_draw", "vampprior", g, draw="reference")
  text = tab.paired_table(tab.load_entries(str(tmp_path)), str(tmp_path))
  rows = text.splitlines()[2:]

  def want(a, b):
    d = a.astype(np.float32).astype(np.float64) - b.astype(np.float32).astype(np.float64)
    return f"{d.mean():+.2f} +- {d.std(ddof=1) / np.sqrt(d.size):.2f} | {100 * np.mean(d < 0):.1f}%"

  # Priors within each model, VAE before HVAE as in the paper; then each model against the
  # next simpler one per prior. The reference-draw row has no partner on its draw.
  assert len(rows) == 6, text
  assert rows[0] == (
    f"| VAE, Fashion-MNIST | `fashion_vae_exemplar_rat` - `fashion_vae_gaussian` "
    f"| {want(e, g)} | {226.75 - 228.70:+.2f} |"
  )
  assert (
    rows[1].startswith(
      "| HVAE, Fashion-MNIST | `fashion_hvae_vampprior` - `fashion_hvae_gaussian` | not paired"
    )
    and "did not score" in rows[1]
  )
  assert rows[2].startswith(
    "| HVAE, Fashion-MNIST | `fashion_hvae_exemplar_rat` - `fashion_hvae_gaussian` | not paired"
  )
  assert rows[3].startswith(
    "| HVAE, Fashion-MNIST | `fashion_hvae_exemplar_rat` - `fashion_hvae_vampprior` | not paired"
  )
  assert rows[4].startswith(
    "| Gaussian prior, Fashion-MNIST | `fashion_hvae_gaussian` - "
    "`fashion_vae_gaussian` | not paired"
  )
  assert rows[5] == (
    f"| exemplar prior, Fashion-MNIST | `fashion_hvae_exemplar_rat` - "
    f"`fashion_vae_exemplar_rat` | {want(h, e)} | {226.53 - 226.75:+.2f} |"
  )
  empty = tmp_path / "none"
  _entry(empty, "fashion_vae_gaussian", "gaussian", g)
  assert tab.paired_table(tab.load_entries(str(empty)), str(empty)).startswith("(no two rows")


def test_paired_table_sets_other_objectives_beside_the_elbo_rows(tmp_path):
  """IWAE rows pair among themselves and each with the ELBO row of its model and prior;
  the results table names each row's objective."""
  tab = _script("results_table")
  rng = np.random.default_rng(1)
  g = 228 + rng.normal(size=300)
  e = g - 1.7 + rng.normal(size=300)
  ie, ig = e - 0.8 + 0.3 * rng.normal(size=300), g - 1.0 + 0.3 * rng.normal(size=300)
  iwae = {"objective": "iwae", "objective_samples": 5, "gradient_estimator": "dreg"}
  _entry(tmp_path, "fashion_vae_gaussian", "gaussian", g.astype(np.float32))
  _entry(tmp_path, "fashion_vae_exemplar_rat", "exemplar", e.astype(np.float32))
  _entry(tmp_path, "fashion_vae_exemplar_rat_iwae", "exemplar", ie.astype(np.float32), **iwae)
  _entry(tmp_path, "fashion_vae_gaussian_iwae", "gaussian", ig.astype(np.float32), **iwae)
  rows = tab.paired_table(tab.load_entries(str(tmp_path)), str(tmp_path)).splitlines()[2:]

  def want(a, b):
    d = a.astype(np.float32).astype(np.float64) - b.astype(np.float32).astype(np.float64)
    return f"{d.mean():+.2f} +- {d.std(ddof=1) / np.sqrt(d.size):.2f} | {100 * np.mean(d < 0):.1f}%"

  assert rows == [
    f"| VAE, Fashion-MNIST | `fashion_vae_exemplar_rat` - `fashion_vae_gaussian` | "
    f"{want(e, g)} | {226.75 - 228.70:+.2f} |",
    f"| VAE, Fashion-MNIST, IWAE k=5, DReG | `fashion_vae_exemplar_rat_iwae` - "
    f"`fashion_vae_gaussian_iwae` | {want(ie, ig)} | {226.75 - 228.70:+.2f} |",
    f"| VAE, Gaussian prior, Fashion-MNIST | `fashion_vae_gaussian_iwae` - "
    f"`fashion_vae_gaussian` | {want(ig, g)} | n/a |",
    f"| VAE, exemplar prior, Fashion-MNIST | `fashion_vae_exemplar_rat_iwae` - "
    f"`fashion_vae_exemplar_rat` | {want(ie, e)} | n/a |",
  ]
  for d in tmp_path.iterdir():  # table() reads the budget's epochs
    (d / "budget.json").write_text(json.dumps({"epochs_trained": 3, "max_epochs": 3}))
  table = tab.table(tab.load_entries(str(tmp_path))).splitlines()[2:]
  assert [r.split(" | ")[:2] for r in table] == [
    ["| `fashion_vae_gaussian`", "ELBO"],
    ["| `fashion_vae_gaussian_iwae`", "IWAE k=5, DReG"],
    ["| `fashion_vae_exemplar_rat`", "ELBO"],
    ["| `fashion_vae_exemplar_rat_iwae`", "IWAE k=5, DReG"],
  ]


def test_results_table_follows_the_papers_order(tmp_path):
  tab = _script("results_table")
  g = 228 + np.zeros(4)
  for name, prior, model in [
    ("a_hvae_exemplar", "exemplar", "hvae"),
    ("b_vae_vamp", "vampprior", "vae"),
    ("c_hvae_gauss", "gaussian", "hvae"),
    ("d_vae_exemplar", "exemplar", "vae"),
    ("b_vae_vamp_reference_draw", "vampprior", "vae"),
    ("e_vae_gauss", "gaussian", "vae"),
  ]:
    _entry(tmp_path, name, prior, g, model=model)
  for d in tmp_path.iterdir():  # table() reads the budget's epochs
    (d / "budget.json").write_text(json.dumps({"epochs_trained": 3, "max_epochs": 3}))
  rows = tab.table(tab.load_entries(str(tmp_path))).splitlines()[2:]
  assert [r.split("`")[1] for r in rows] == [
    "e_vae_gauss",
    "b_vae_vamp",
    "b_vae_vamp_reference_draw",
    "d_vae_exemplar",
    "c_hvae_gauss",
    "a_hvae_exemplar",
  ]


def test_budget_names_every_cpu_that_trained_the_run(tmp_path):
  collect = _script("collect_result")
  wd = _fake_run(tmp_path, [226.0, 228.0])
  # Epochs 1-2 on one CPU, 3 on another; a segment past the last epoch counted is ignored.
  segs = [
    {"step": 0, "cpu": "AMD EPYC"},
    {"step": 10, "cpu": "AMD EPYC"},
    {"step": 20, "cpu": "Intel Xeon"},
    {"step": 40, "cpu": "Other"},
  ]
  assert collect.machines_text(segs, 10, 3) == "AMD EPYC (epochs 1-2), Intel Xeon (epochs 3-3)"
  assert collect.machines_text(segs[:2], 10, 3) == "AMD EPYC"
  assert collect.machines_text(segs, 10, 5) == (
    "AMD EPYC (epochs 1-2), Intel Xeon (epochs 3-4), Other (epochs 5-5)"
  )
  # A resume from an older checkpoint on the first CPU trains epochs 2-4 again there.
  assert collect.machines_text(segs[:3] + [{"step": 10, "cpu": "AMD EPYC"}], 10, 4) == "AMD EPYC"
  (wd / "machines.jsonl").write_text("".join(json.dumps(s) + "\n" for s in segs))
  recs = [json.loads(l) for l in (wd / "metrics.jsonl").read_text().splitlines()[:-1]]
  with open(wd / "metrics.jsonl", "w") as f:  # validation records with steps: 10 per epoch
    for r in recs:
      if "val_loss" in r:
        r["step"] = 10 * r["epoch"]
      f.write(json.dumps(r) + "\n")
  b = json.load(
    open(
      os.path.join(collect.collect(str(wd), "x", str(tmp_path / "r"), measure=False), "budget.json")
    )
  )
  assert b["cpu"] == "AMD EPYC (epochs 1-2), Intel Xeon (epochs 3-3)"
  assert b["cpu_source"] == "machines.jsonl" and len(b["machines"]) == 4
  b = json.load(
    open(
      os.path.join(
        collect.collect(str(wd), "y", str(tmp_path / "r"), measure=False, cpu="Given CPU"),
        "budget.json",
      )
    )
  )
  assert (b["cpu"], b["cpu_source"]) == ("Given CPU", "given (--cpu)")


def test_training_records_the_machine_of_each_segment(tmp_path):
  from conftest import load_config
  from exvae import runinfo, train_lib

  wd = str(tmp_path / "run")
  for steps in (10, 20):
    train_lib.train_and_evaluate(load_config("test", max_steps=steps), wd)
  segs = [json.loads(l) for l in open(os.path.join(wd, "machines.jsonl"))]
  assert [s["step"] for s in segs] == [0, 10]
  assert all(
    s["cpu"] == runinfo.cpu_name(with_isa=True) and s["backend"] == "cpu" and s["cores"] >= 1
    for s in segs
  )
