"""The command line as a user meets it: the run's own config, one-line errors, --help,
plug-ins with options checked at start, compare refusing what is not comparable.

One tiny run (configs/test.py, a plug-in prior with an option) is trained once
through ``train.py`` and shared by the module; the mistakes are driven through
the scripts as subprocesses (most end before JAX is imported, in well under a second).
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, load_config
from exvae import per_example

PY = sys.executable
EXAMPLE_PRIOR = os.path.join(ROOT, "examples", "learned_gaussian.py") + ":LearnedGaussian"
SMALL = ["--config.max_train=200", "--config.num_epochs=1", "--config.warmup_epochs=1"]


def _cli(script, *args, cwd=ROOT, env=None, timeout=600):
  cmd = [PY, os.path.join(ROOT, script)] if script.endswith(".py") else [PY, "-m", script]
  return subprocess.run(
    cmd + list(args),
    capture_output=True,
    text=True,
    cwd=cwd,
    timeout=timeout,
    env=dict(os.environ, **(env or {})),
  )


def _lines(stderr):
  return [l for l in stderr.splitlines() if l.strip() and not l.startswith("WARNING:absl")]


def _snapshot(root):
  """{relative path: (size, mtime_ns)} of everything under root but the writer's lock file."""
  out = {}
  for dirpath, dirs, files in os.walk(root):
    for name in dirs + files:
      p = os.path.join(dirpath, name)
      if name != ".lock":
        st = os.stat(p)
        out[os.path.relpath(p, root)] = (st.st_size if name in files else 0, st.st_mtime_ns)
  return out


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  """A 1-epoch run of configs/test.py with the example plug-in prior and one prior option."""
  wd = str(tmp_path_factory.mktemp("cli") / "run")
  r = _cli(
    "train.py",
    "--config=test",
    f"--workdir={wd}",
    f"--config.prior={EXAMPLE_PRIOR}",
    "--config.prior_options.init_log_var=-1.5",
    *SMALL,
  )
  assert r.returncode == 0, r.stdout + r.stderr
  return wd, r.stdout


@pytest.mark.slow
def test_a_plugin_prior_with_options_trains_from_the_command_line(run_dir):
  wd, out = run_dir
  stored = json.load(open(os.path.join(wd, "config.json")))
  assert stored["prior"] == EXAMPLE_PRIOR and stored["prior_options"] == {"init_log_var": -1.5}
  recs = [json.loads(l) for l in open(os.path.join(wd, "metrics.jsonl"))]
  first = [r["prior_log_var"] for r in recs if "prior_log_var" in r][0]
  assert abs(first + 1.5) < 0.05  # the option reached the constructor (default 0)
  last = out.strip().splitlines()[-1]  # a readable summary, best epoch 1-based as logged
  assert last.startswith("finished: step 10, epoch 1") and "at epoch 1" in last, out
  assert "{" not in last


@pytest.mark.slow
def test_eval_without_config_reproduces_the_long_form(run_dir, tmp_path):
  wd, _ = run_dir
  r = _cli("eval.py", f"--workdir={wd}")
  assert r.returncode == 0, r.stderr
  short = json.load(open(os.path.join(wd, "eval_metrics.json")))
  out = str(tmp_path / "long")
  r = _cli(
    "eval.py",
    "--config=test",
    f"--workdir={wd}",
    f"--config.prior={EXAMPLE_PRIOR}",
    "--config.prior_options.init_log_var=-1.5",
    *SMALL,
    f"--config.eval.out_dir={out}",
  )
  assert r.returncode == 0, r.stderr
  long = json.load(open(os.path.join(out, "eval_metrics.json")))
  assert f"test NLL = {short['test_nll']:.2f}" in r.stdout
  for k in ("test_nll", "test_elbo", "test_recon", "test_kl", "checkpoint_step"):
    assert short[k] == long[k], k
  # The scalars reached TensorBoard, beside the training curves (and in the out_dir).
  from exvae import writers

  scalars = writers.read_scalars(wd)
  assert scalars["eval/test_nll"][-1][1] == pytest.approx(short["test_nll"], rel=1e-6)
  assert scalars["eval/test_nll"][-1][0] == short["checkpoint_step"]
  assert "val/loss" in scalars
  assert writers.read_scalars(out)["eval/test_kl"][-1][1] == pytest.approx(
    long["test_kl"], rel=1e-6
  )


def test_a_json_config_and_print_config(run_dir, tmp_path):
  wd, _ = run_dir
  path = os.path.join(wd, "config.json")
  r = _cli("eval.py", f"--config={path}", "--config.eval.seed=3", "--print_config")
  assert r.returncode == 0, r.stderr
  printed = json.loads(r.stdout)
  stored = json.load(open(path))
  assert printed["eval"]["seed"] == 3
  printed["eval"]["seed"] = stored["eval"]["seed"]
  assert printed == stored
  # Without --config the run's config is read; overrides apply on top.
  r = _cli("train.py", f"--workdir={wd}", "--config.num_epochs=7", "--print_config")
  assert r.returncode == 0 and json.loads(r.stdout)["num_epochs"] == 7
  r = _cli(
    "train.py",
    "--config=test",
    "--config.hidden=32,32",
    "--config.prior_options.k=5",
    "--print_config",
  )
  cfg = json.loads(r.stdout)
  assert cfg["hidden"] == [32, 32] and cfg["prior_options"] == {"k": 5}


@pytest.mark.slow
def test_resume_without_config_reads_the_run(run_dir, tmp_path):
  import shutil

  wd = str(tmp_path / "copy")
  shutil.copytree(run_dir[0], wd)
  r = _cli("train.py", f"--workdir={wd}", "--config.max_steps=12", "--config.num_epochs=2")
  assert r.returncode == 0, r.stderr
  assert "Resumed from checkpoint at step 10" in r.stdout and "step 12" in r.stdout
  assert json.load(open(os.path.join(wd, "config.json")))["prior_options"] == {"init_log_var": -1.5}


def test_help_version_and_python_m(run_dir):
  for script in ("train.py", "eval.py", "uses.py", "compare.py"):
    r = _cli(script, "--help")
    assert r.returncode == 0, r.stderr
    assert "usage: exvae-" in r.stdout
  r = _cli("train.py", "--help")
  for flag in (
    "--config:",
    "--workdir:",
    "--allow_config_change:",
    "--print_config:",
    "--version:",
  ):
    assert flag in r.stdout, flag
  assert "num_epochs = 2000" in r.stdout and "prior_options." in r.stdout
  r = _cli("eval.py", f"--workdir={run_dir[0]}", "--help")  # the run's own keys
  assert "max_train = 200" in r.stdout
  r = _cli("uses.py", "--help")
  assert "--ks:" in r.stdout and "--bank:" in r.stdout
  r = _cli("exvae", "--version")
  import exvae

  assert r.returncode == 0 and r.stdout.strip() == f"exvae {exvae.__version__}"
  r = _cli("exvae", "eval", "--version")
  assert r.returncode == 0 and exvae.__version__ in r.stdout
  r = _cli("exvae", "configs")
  assert r.returncode == 0 and "test" in r.stdout.split()


def _mistakes(wd, tmp):
  """(argv, exit code, words the one line must hold) for the mistakes a user makes."""
  afile = os.path.join(tmp, "a_file")
  open(afile, "w").close()
  missing = os.path.join(tmp, "missing")
  return [
    (
      ["train.py", f"--workdir={wd}", "--config.num_epoch=1"],
      2,
      ["exvae-train: error:", "num_epochs"],
    ),
    (
      ["eval.py", f"--workdir={wd}", "--config.eval.num_importance_sample=5"],
      2,
      ["did you mean", "eval.num_importance_samples"],
    ),
    (["train.py", "--config=test", f"--workdir={afile}"], 2, ["is a file"]),
    (["eval.py", f"--workdir={afile}"], 2, ["is a file"]),
    (["train.py", "--config=tset", f"--workdir={missing}"], 2, ["did you mean test"]),
    (["eval.py", f"--workdir={missing}"], 1, ["does not exist", "exvae-train"]),
    (["uses.py", "knn", f"--workdir={missing}"], 1, ["does not exist"]),
    (["train.py", f"--workdir={missing}"], 2, ["--config=NAME"]),
    (["train.py", "--config=test"], 2, ["--workdir"]),
    (["eval.py", f"--workdir={wd}", "--config.num_epochs=abc"], 2, ["expected an integer"]),
    (["eval.py", f"--workdir={wd}", "--config.exemplar.rat=maybe"], 2, ["true or false"]),
    (["eval.py", f"--workdir={wd}", "--config.eval=3"], 2, ["is a group"]),
    (["eval.py", f"--workdir={wd}", "--config"], 2, ["--config needs a value"]),
    (["eval.py", f"--workdir={wd}", "--workdri=x"], 2, ["workdri"]),
    (["eval.py", f"--workdir={wd}", "--config.latent_dim=8"], 1, ["latent_dim 4 -> 8"]),
    (["eval.py", f"--config={wd}", f"--workdir={wd}"], 2, ["is a directory", "config.json"]),
    (["uses.py", "knnn", f"--workdir={wd}"], 2, ["did you mean knn"]),
    (["uses.py", f"--workdir={wd}"], 2, ["expected one command"]),
    (["uses.py", "augment", f"--workdir={wd}", "--arms=with,mixup"], 2, ["--arms", "mixup"]),
    (["compare.py", wd], 2, ["two or more runs"]),
    (["compare.py", missing, wd], 1, ["no such per-example file", "missing"]),
    (["exvae", "trian"], 2, ["did you mean train"]),
    (
      ["train.py", "--config=test", f"--workdir={missing}", "--config.prior_options.k=5"],
      1,
      ["prior_options", "plug-in prior"],
    ),
  ]


def test_every_mistake_is_one_line_with_its_exit_code_and_an_untouched_run(run_dir, tmp_path):
  wd, _ = run_dir
  before = _snapshot(wd)
  cases = _mistakes(wd, str(tmp_path))
  # Four at a time: most end in well under a second, two import JAX.
  from concurrent.futures import ThreadPoolExecutor

  with ThreadPoolExecutor(4) as pool:
    results = list(pool.map(lambda case: _cli(*case[0]), cases))
  for (argv, code, words), r in zip(cases, results):
    lines = _lines(r.stderr)
    assert r.returncode == code, (argv, r.returncode, r.stderr[-2000:])
    assert len(lines) == 1, (argv, r.stderr[-2000:])
    assert lines[0].startswith("exvae"), lines
    for w in words:
      assert w.lower() in lines[0].lower(), (argv, w, lines[0])
    assert "Traceback" not in r.stderr
  assert _snapshot(wd) == before
  assert not os.path.exists(os.path.join(str(tmp_path), "missing"))


def test_the_traceback_on_request(tmp_path):
  r = _cli("eval.py", f"--workdir={tmp_path / 'none'}", env={"EXVAE_TRACEBACK": "1"})
  assert r.returncode != 0 and "Traceback" in r.stderr and "does not exist" in r.stderr
  r = _cli(
    "train.py", "--config=test", f"--workdir={tmp_path}", "--config.num_epoch=1", "--verbosity=1"
  )
  assert r.returncode != 0 and "Traceback" in r.stderr and "ConfigNameError" in r.stderr


# ----------------------------------------------------------------------------
# Plug-ins checked at start
# ----------------------------------------------------------------------------

_NO_SAMPLE = '''
import jax.numpy as jnp
from exvae.priors import Prior

class NoSample(Prior):
  def log_prob(self, params, z, ctx, ids=None):
    return -0.5 * jnp.sum(z ** 2, -1)
'''

_BAD_SHAPE = '''
import jax, jax.numpy as jnp
from exvae.priors import Prior

class BadShape(Prior):
  def log_prob(self, params, z, ctx, ids=None):
    return -0.5 * z ** 2                      # (B, d), not (B,)
  def sample(self, params, key, n, ctx):
    return jax.random.normal(key, (n, 4))

class BadSample(Prior):
  def __init__(self, config, scale=1.0):
    super().__init__(config)
    self.scale = scale
  def log_prob(self, params, z, ctx, ids=None):
    return -0.5 * jnp.sum(z ** 2, -1)
  def sample(self, params, key, n, ctx):
    return jax.random.normal(key, (n,))       # (n,), not (n, d)
'''


def test_plugin_prior_checks_name_the_method_and_the_shape(tmp_path):
  from exvae import plugins, train_lib
  from exvae.priors import make_prior

  (tmp_path / "nosample.py").write_text(_NO_SAMPLE)
  (tmp_path / "badshape.py").write_text(_BAD_SHAPE)
  with pytest.raises(
    plugins.PluginError, match=r"NoSample does not implement sample\(\).*\(n, d\)"
  ):
    make_prior(f"{tmp_path}/nosample.py:NoSample", None)
  c = load_config("test", prior=f"{tmp_path}/badshape.py:BadShape")
  splits = train_lib.load_data(c)
  with pytest.raises(
    plugins.PluginError,
    match=r"BadShape.log_prob\(\) returns shape \(3, 4\), "
    r"expected \(B,\) = \(3,\)",
  ):
    train_lib.make_setup(c, splits)
  c = load_config("test", prior=f"{tmp_path}/badshape.py:BadSample")
  with pytest.raises(
    plugins.PluginError,
    match=r"BadSample.sample\(\) returns shape \(5,\), "
    r"expected \(n, d\) = \(5, 4\)",
  ):
    train_lib.make_setup(c, splits)
  c.prior_options.scal = 2.0  # a misspelt option
  with pytest.raises(plugins.PluginError, match="does not take prior_options"):
    make_prior(c.prior, c)
  del c.prior_options["scal"]
  c.prior_options.scale = 2.0
  assert make_prior(c.prior, c).scale == 2.0


def test_a_broken_plugin_fails_at_start_in_one_line(tmp_path):
  (tmp_path / "nosample.py").write_text(_NO_SAMPLE)
  (tmp_path / "badshape.py").write_text(_BAD_SHAPE)
  cases = (
    ("nosample.py:NoSample", "does not implement sample()"),
    ("badshape.py:BadShape", "log_prob() returns shape (3, 4)"),
  )
  from concurrent.futures import ThreadPoolExecutor

  with ThreadPoolExecutor(2) as pool:
    results = list(
      pool.map(
        lambda case: _cli(
          "train.py",
          "--config=test",
          f"--workdir={tmp_path / case[0][:5]}",
          f"--config.prior={case[0]}",
          cwd=str(tmp_path),
        ),
        cases,
      )
    )
  for (spec, words), r in zip(cases, results):
    wd = tmp_path / spec[:5]
    lines = _lines(r.stderr)
    assert r.returncode == 1 and len(lines) == 1 and words in lines[0], r.stderr[-2000:]
    assert not os.path.isdir(wd / "checkpoints") and not os.path.exists(wd / "metrics.jsonl")


# ----------------------------------------------------------------------------
# compare: only what is comparable
# ----------------------------------------------------------------------------


def _write(path, log_px, **provenance):
  ident = dict(
    dataset="digits", split="test", eval_binarize_seed=0, count=len(log_px), images_sha256="d" * 64
  )
  return per_example.save(
    str(path),
    {"log_px": log_px, "elbo": log_px - 1.0},
    ident,
    dict({"eval_binarize": "exvae"}, **provenance),
  )


def test_compare_refuses_different_s_unless_forced_and_warns_of_stale_scores(tmp_path):
  rng = np.random.default_rng(0)
  lp = -rng.gamma(2.0, 30.0, 50)
  a = _write(tmp_path / "a" / per_example.FILENAME, lp, num_importance_samples=500)
  b = _write(tmp_path / "b" / per_example.FILENAME, lp + 0.1, num_importance_samples=5)
  r = _cli("compare.py", os.path.dirname(a), os.path.dirname(b))
  lines = _lines(r.stderr)
  assert r.returncode == 2 and len(lines) == 1, r.stderr
  assert (
    lines[0].startswith("exvae-compare: error:") and "importance samples S 500 vs 5" in lines[0]
  )
  r = _cli("compare.py", os.path.dirname(a), os.path.dirname(b), "--force")
  assert r.returncode == 0 and "diff +0.1000" in r.stdout, r.stderr
  # Pruned against exact (read from eval_metrics.json beside the file): refused too.
  c = _write(tmp_path / "c" / per_example.FILENAME, lp, num_importance_samples=500)
  json.dump(
    {"num_importance_samples": 500, "prune_keep": 10},
    open(tmp_path / "c" / "eval_metrics.json", "w"),
  )
  json.dump(
    {"num_importance_samples": 500, "prune_keep": 0},
    open(tmp_path / "a" / "eval_metrics.json", "w"),
  )
  r = _cli("compare.py", os.path.dirname(a), os.path.dirname(c))
  assert r.returncode == 2 and "pruning" in r.stderr
  # A per-example file older than its run's newest checkpoint: one warning line.
  os.makedirs(tmp_path / "a" / "checkpoints" / "20")
  _write(tmp_path / "a" / per_example.FILENAME, lp, num_importance_samples=500, checkpoint_step=10)
  r = _cli("compare.py", os.path.dirname(a), os.path.dirname(c), "--force")
  lines = _lines(r.stderr)
  assert r.returncode == 0 and len(lines) == 1, r.stderr
  assert "warning" in lines[0] and "step 20" in lines[0] and "re-evaluate" in lines[0]


# ----------------------------------------------------------------------------
# Smaller: the training summary, exvae-uses without \r, exvae.load_run
# ----------------------------------------------------------------------------


def test_summary_line_is_readable_with_a_one_based_best_epoch():
  from exvae.cli.train import summary_line

  line = summary_line(
    {
      "step": 128,
      "epochs": 2.0,
      "best_val": 45.1234,
      "best_epoch": 1,
      "finished": True,
      "early_stopped": False,
      "wall_time_s": 12.3,
    }
  )
  assert line == "finished: step 128, epoch 2, 12 s; best validation loss 45.123 at epoch 1"
  line = summary_line(
    {"step": 5, "epochs": 0.5, "best_val": None, "best_epoch": -1, "finished": False}
  )
  assert line == "stopped: step 5, epoch 0.5; no validated epoch yet"


def test_library_warnings_are_one_line_and_other_packages_keep_the_default(capsys, monkeypatch):
  import warnings
  from exvae import rundir
  from exvae.cli import exits

  before = []
  monkeypatch.setattr(warnings, "showwarning", lambda *a, **k: before.append(a[:4]))
  exits.one_line_warnings()
  with warnings.catch_warnings():
    warnings.simplefilter("always")
    warnings.warn_explicit("the bank records no source model", UserWarning, rundir.__file__, 9)
    warnings.warn_explicit("a third-party note", UserWarning, "/elsewhere/lib.py", 3)
  assert capsys.readouterr().err == "warning: the bank records no source model\n"
  assert [(str(m), c, f, n) for m, c, f, n in before] == [
    ("a third-party note", UserWarning, "/elsewhere/lib.py", 3)
  ]


def test_uses_commands_match_the_cli_list():
  from exvae.cli import uses as uses_cli
  from exvae.uses import commands

  assert set(uses_cli.COMMANDS) == set(commands.COMMANDS)


def test_load_run_is_ready_for_log_prob_sampling_and_knn(run_dir, tmp_path):
  import jax

  import exvae
  from scipy import stats

  wd, _ = run_dir
  before = _snapshot(wd)
  run = exvae.load_run(wd)
  assert run.config.prior == EXAMPLE_PRIOR and run.prior.init_log_var == -1.5
  d = run.model.latent_dim
  z = run.encode(run.splits.test_x[:6])
  assert z.shape == (6, d)
  p = run.params["prior"]
  want = stats.multivariate_normal(
    np.asarray(p["mean"]), np.exp(float(p["log_var"])) * np.eye(d)
  ).logpdf(z)
  np.testing.assert_allclose(run.log_prob(z), want, rtol=1e-5)
  s = run.sample(jax.random.PRNGKey(0), 7)
  assert s.shape == (7, d) and np.all(np.isfinite(s))
  assert run.decode(s).shape == (7,) + tuple(run.splits.image_shape)
  dist, rows = run.bank.nearest(run.bank.codes[:4], k=3)
  np.testing.assert_array_equal(rows[:, 0], np.arange(4))
  np.testing.assert_allclose(dist[:, 0], 0.0, atol=1e-4)
  assert _snapshot(wd) == before  # a reader never modifies the run directory


@pytest.mark.slow
def test_uses_writes_no_carriage_returns_without_a_terminal(run_dir, tmp_path):
  wd, _ = run_dir
  r = _cli(
    "uses.py",
    "knn",
    f"--workdir={wd}",
    "--config.progress=True",
    "--ks=3",
    f"--out={tmp_path / 'u'}",
    env={"EXVAE_PROGRESS": ""},
  )
  assert r.returncode == 0, r.stderr[-2000:]
  assert "\r" not in r.stdout and "\r" not in r.stderr
  assert os.path.isfile(tmp_path / "u" / "knn.json")


def test_version_matches_the_package_metadata():
  import tomllib

  import exvae

  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    assert tomllib.load(f)["project"]["version"] == exvae.__version__


def test_json_config_keeps_types_and_overrides_parse_by_type(tmp_path):
  from exvae import config_registry, rundir

  c = load_config("test")
  path = tmp_path / "config.json"
  path.write_text(json.dumps(rundir.config_dict(c)))
  back = config_registry.load(str(path))
  assert back.hidden == (16, 16) and isinstance(back.hidden, tuple)
  assert rundir.config_dict(back) == rundir.config_dict(c)
  config_registry.apply_overrides(
    back,
    [
      ("hidden", "8,8"),
      ("exemplar.rat", "True"),
      ("learning_rate", "1e-3"),
      ("prior_options.k", "5"),
      ("prior_options.name", "abc"),
    ],
  )
  assert back.hidden == (8, 8) and back.exemplar.rat is True and back.learning_rate == 1e-3
  assert back.prior_options.to_dict() == {"k": 5, "name": "abc"}
  with pytest.raises(config_registry.ConfigNameError, match="Did you mean exemplar.rat_k"):
    config_registry.apply_overrides(back, [("exemplar.ratk", "3")])


def test_plugin_options_reach_a_model_factory_and_a_misspelt_one_is_named():
  from exvae import plugins

  def factory(config, image_shape, width=8):
    return (config, image_shape, width)

  c = load_config("test", model="my.mod:factory")
  c.model_options.width = 32
  assert plugins.construct(
    factory, c.model, "model", c, (8, 8, 1), opts=plugins.options(c, "model_options")
  ) == (c, (8, 8, 1), 32)
  with pytest.raises(plugins.PluginError, match=r"does not take model_options \['widht'\]"):
    plugins.construct(factory, c.model, "model", c, (8, 8, 1), opts={"widht": 3})
  with pytest.raises(plugins.PluginError, match="built-in prior 'exemplar'"):
    c.prior_options.k = 5
    from exvae.config_checks import check_plugins

    check_plugins(c)


# ----------------------------------------------------------------------------
# A first user's rough edges: each one line (or one line, then how to fix it)
# ----------------------------------------------------------------------------

_MIX = '''
from __future__ import annotations

import jax, jax.numpy as jnp
from exvae.priors import Prior

class Mix(Prior):
  def __init__(self, config, num_components: int = 2, scale=1.0):
    super().__init__(config)
    self.num_components, self.scale = num_components, scale
  def init(self, key, model, num_train):
    return {"means": jnp.zeros((self.num_components, model.latent_dim))}
  def log_prob(self, params, z, ctx, ids=None):
    d = -0.5 * jnp.sum((z[:, None] - params["means"][None]) ** 2, -1) / self.scale
    return jax.nn.logsumexp(d, 1) - jnp.log(self.num_components)
  def sample(self, params, key, n, ctx):
    return jax.random.normal(key, (n, params["means"].shape[1]))

class LogOfZero(Mix):
  def log_prob(self, params, z, ctx, ids=None):
    return jnp.log(jnp.zeros(z.shape[0]))           # -inf everywhere

class Spike(Mix):                                   # finite at z = 0 only: fails in training
  def log_prob(self, params, z, ctx, ids=None):
    return jnp.where(jnp.all(z == 0, -1), 0.0, -jnp.inf)
  def sample(self, params, key, n, ctx):
    return jnp.zeros((n, params["means"].shape[1]))
'''


def _one_line(r, code, *words):
  lines = _lines(r.stderr)
  assert r.returncode == code and len(lines) == 1, (r.returncode, r.stderr[-3000:])
  assert "Traceback" not in r.stderr
  for w in words:
    assert w in lines[0], (w, lines[0])
  return lines[0]


def test_print_config_of_a_workdir_that_does_not_exist_is_one_line(tmp_path):
  missing = str(tmp_path / "nope")
  for argv in (["eval.py"], ["uses.py", "knn"]):
    r = _cli(*argv, f"--workdir={missing}", "--print_config")
    _one_line(r, 1, "does not exist", "exvae-train --config=NAME")
  assert not os.path.exists(missing)


def test_a_syntax_error_in_a_config_or_a_plugin_is_one_line_with_its_file_and_line(tmp_path):
  (tmp_path / "bad_config.py").write_text(
    "from exvae.config_base import base_config\n\ndef get_config(:\n  return base_config()\n"
  )
  (tmp_path / "bad_prior.py").write_text("import jax\n\nclass P:\n  def f(self)\n    pass\n")
  cases = [
    (["--config=bad_config.py"], "bad_config.py, line 3", "--config=bad_config.py"),
    (
      ["--config=test", "--config.prior=bad_prior.py:P"],
      "bad_prior.py, line 4",
      "prior plug-in 'bad_prior.py:P'",
    ),
    (
      ["--config=test", "--config.prior=bad_prior:P"],
      "bad_prior.py, line 4",
      "prior plug-in 'bad_prior:P'",
    ),
  ]
  for args, where, what in cases:
    r = _cli("train.py", f"--workdir={tmp_path / 'wd'}", *args, cwd=str(tmp_path))
    line = _one_line(r, 1, where, what, "SyntaxError")
    assert len(line) < 200, line
  assert not os.path.exists(tmp_path / "wd")


def test_a_plugin_option_of_the_wrong_type_is_named(tmp_path):
  from exvae import plugins

  (tmp_path / "mix.py").write_text(_MIX)
  r = _cli(
    "train.py",
    "--config=test",
    f"--workdir={tmp_path / 'wd'}",
    "--config.prior=mix.py:Mix",
    "--config.prior_options.num_components=three",
    cwd=str(tmp_path),
  )
  _one_line(r, 1, "--config.prior_options.num_components='three'", "takes an integer", "mix.py:Mix")
  assert not os.path.exists(tmp_path / "wd")
  # In the library: by annotation (a string under `from __future__ import annotations`)
  # or by default; an int is a float, a bool is not an int.
  mix = plugins.load(f"{tmp_path}/mix.py:Mix", "prior")
  c = load_config("test")
  for opts, ok in (
    ({"num_components": 3}, True),
    ({"num_components": True}, False),
    ({"num_components": 2.5}, False),
    ({"scale": 2}, True),
    ({"scale": "big"}, False),
  ):
    if ok:
      plugins.check_options(mix, "m:Mix", "prior", c, opts=opts)
    else:
      with pytest.raises(plugins.PluginError, match=f"prior_options.{next(iter(opts))}="):
        plugins.check_options(mix, "m:Mix", "prior", c, opts=opts)


def test_a_plugin_prior_whose_log_density_is_not_finite_is_named(tmp_path):
  from exvae import plugins, train_lib

  (tmp_path / "mix.py").write_text(_MIX)
  # At start: log_prob evaluated once at the initial parameters.
  c = load_config("test", prior=f"{tmp_path}/mix.py:LogOfZero")
  splits = train_lib.load_data(c)
  with pytest.raises(plugins.PluginError, match=r"LogOfZero.log_prob\(\) is not finite .*-inf"):
    train_lib.make_setup(c, splits)
  train_lib.make_setup(load_config("test", prior=f"{tmp_path}/mix.py:Mix"), splits)
  # In training: the non-finite loss names the plug-in prior and the term, not only the rate.
  c = load_config("test", prior=f"{tmp_path}/mix.py:Spike", max_steps=5)
  with pytest.raises(train_lib.NonFiniteLossError) as ei:
    train_lib.train_and_evaluate(c, str(tmp_path / "wd"))
  msg = str(ei.value)
  assert f"the plug-in '{tmp_path}/mix.py:Spike'" in msg and "kl=inf" in msg, msg


def test_a_single_value_for_a_tuple_key_is_refused_in_one_line(tmp_path):
  from exvae import config_registry

  r = _cli("train.py", "--config=test", f"--workdir={tmp_path / 'wd'}", "--config.hidden=300")
  _one_line(r, 2, "--config.hidden=300", "--config.hidden=300,300", "--config.hidden=300,")
  c = load_config("test")
  with pytest.raises(config_registry.ConfigNameError, match="hidden is a tuple"):
    config_registry.apply_overrides(c, [("hidden", "300")])
  for text, want in (
    ("300,", (300,)),
    ("(300,)", (300,)),
    ("64,32", (64, 32)),
    ("[8, 8, 8]", (8, 8, 8)),
  ):
    assert config_registry.apply_overrides(c, [("hidden", text)]).hidden == want, text


def test_missing_data_is_a_short_line_then_how_to_get_it(tmp_path):
  empty = tmp_path / "empty"
  empty.mkdir()
  r = _cli(
    "train.py",
    "--config=test",
    f"--workdir={tmp_path / 'wd'}",
    "--config.dataset=mnist",
    "--config.data_source=auto",
    f"--config.data_dir={empty}",
  )
  lines = _lines(r.stderr)
  assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
  assert lines[0].startswith("exvae-train: error: mnist: data not found") and len(lines[0]) < 160
  rest = "\n".join(lines[1:])
  assert "To fix" in rest and "--config.data_dir=" in rest and "tfds build mnist" in rest
  assert all(not l.startswith("exvae-train:") for l in lines[1:])


@pytest.mark.slow
def test_eval_of_a_run_in_progress_says_so_and_records_it(run_dir, tmp_path):
  import fcntl

  wd, _ = run_dir
  out = str(tmp_path / "e")
  fd = os.open(os.path.join(wd, ".lock"), os.O_RDWR)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a training writer holds it
    r = _cli("eval.py", f"--workdir={wd}", f"--config.eval.out_dir={out}")
  finally:
    os.close(fd)
  assert r.returncode == 0, r.stderr[-3000:]
  said = [l for l in r.stdout.splitlines() if "run in progress" in l]
  assert len(said) == 1 and "best epoch 1" in said[0] and "1 epochs validated" in said[0], said
  m = json.load(open(os.path.join(out, "eval_metrics.json")))
  assert m["run_in_progress"] is True and m["epochs_validated"] == 1 and m["best_epoch"] == 1
  # Once the writer has gone, those outputs are not reused as they are: scored again, and
  # recorded as a finished run's.
  r = _cli("eval.py", f"--workdir={wd}", f"--config.eval.out_dir={out}")
  assert r.returncode == 0 and "run in progress" not in r.stdout, r.stderr[-3000:]
  m2 = json.load(open(os.path.join(out, "eval_metrics.json")))
  assert m2["run_in_progress"] is False and "epochs_validated" not in m2
  assert m2["test_nll"] == pytest.approx(m["test_nll"], abs=1e-9)
