"""The README's generated tables: results, speed and GPU figures (never typed by hand).

Usage: python scripts/results_table.py [--results results] [--write-readme README.md]

Prints four markdown blocks:

* results: per ``results/<name>/``, the paper's test NLL and error bar, the
  measured test NLL and its standard error over test images, the difference,
  and the training budget (epochs, early stop, best epoch, S, test images,
  wall-clock, machine);
* paired: the paired NLL differences between the priors of each model and between
  each model and the next simpler one (from the per-image scores), beside the
  paper's differences;
* speed: exvae against the authors' code from ``results/speed/vs_reference.json``
  (both codes measured in one run on one machine by ``bench/vs_reference.py``),
  or a line saying that the benchmark has not been run;
* gpu: the device check's figures from ``results/device/<run>/``.

With ``--write-readme`` each block replaces the text between its markers,
``<!-- NAME:begin -->`` and ``<!-- NAME:end -->``.
"""

import argparse
import json
import os
import re
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from exvae.config_base import PAPER_NLL  # noqa: E402

BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
SPEED_JSON = os.path.join("speed", "vs_reference.json")
GPU_DIR = os.path.join("device", "h200-2026-11-30")


def load_entries(root: str) -> list[dict]:
  """One dict per ``root/<name>/`` holding metrics.json, config.json and budget.json."""
  out = []
  if not os.path.isdir(root):
    return out
  for name in sorted(os.listdir(root)):
    d = os.path.join(root, name)
    files = {f: os.path.join(d, f"{f}.json") for f in ("metrics", "config", "budget")}
    if not all(os.path.exists(p) for p in files.values()):
      continue
    e = {"name": name}
    for k, p in files.items():
      with open(p) as f:
        e[k] = json.load(f)
    out.append(e)
  return out


def _budget_text(b: dict, m: dict) -> str:
  stop = (
    f"early-stopped at epoch {b['epochs_trained']}"
    if b.get("early_stopped")
    else f"{b['epochs_trained']} of {b.get('max_epochs')} epochs, not early-stopped"
  )
  hours = (b.get("train_wall_clock_s", 0.0) - b.get("train_paused_s", 0.0)) / 3600
  # budget.json files collected before pauses were measured count the pauses in.
  clock = "training (pauses excluded)" if "train_paused_s" in b else "training wall-clock"
  pruned = (
    f", prior pruned to the {m['prune_keep']} nearest exemplars" if m.get("prune_keep") else ""
  )
  # Runs evaluated before the choice existed were scored on exvae's own test draw.
  draw = (
    "binarised as the paper's (reference draw)"
    if m.get("eval_binarize") == "reference"
    else "exvae's binarisation"
  )
  return (
    f"{stop}; best epoch {b.get('best_epoch')}; S = {m.get('num_importance_samples')}, "
    f"{m.get('num_test_examples')} test images, {draw}{pruned}; {hours:.1f} h {clock} "
    + (
      f"on {b.get('cpu_count')} cores: {b['cpu']}"
      if "(epochs" in str(b.get("cpu"))
      else f"on {b.get('cpu_count')} cores ({b.get('cpu', '?')})"
    )
  )


def objective_label(c: dict) -> str:
  """The training objective of a config.json: ``ELBO``, or ``IWAE k=5, DReG`` and the like."""
  if c.get("objective", "elbo") == "elbo":
    return "ELBO"
  est = {"dreg": ", DReG"}.get(c.get("gradient_estimator", "reparam"), "")
  return f"IWAE k={c.get('objective_samples')}{est}"


def _paper_order(e: dict) -> tuple:
  """Sort key of a results entry: data set, then the paper's model and prior order, the
  paper's objective (the ELBO) before others, then name."""
  from exvae import compare

  c = e.get("config") or {}
  model, prior = c.get("model"), c.get("prior")

  def rank(order, x):  # unknown names after the paper's, in name order
    return order.index(x) if x in order else len(order)

  return (
    str(c.get("dataset")),
    rank(MODEL_ORDER, model),
    str(model),
    rank(compare.PRIORS, prior),
    objective_label(c) != "ELBO",
    e["name"],
  )


def table(entries: list[dict]) -> str:
  """Markdown table of the entries (objective, paper value, measured value, difference, budget).

  Rows follow the paper: per data set, VAE, HVAE, ConvHVAE, PixelCNN, each with
  the Gaussian, VampPrior and exemplar priors; a row's variants (such as
  ``_reference_draw``, then other objectives) follow it.  The paper trains
  every row with the ELBO; a row with another objective is set beside the
  paper's row of the same model and prior.
  """
  lines = [
    "| config | objective | paper NLL | measured NLL | measured - paper | budget |",
    "|---|---|---|---|---|---|",
  ]
  for e in sorted(entries, key=_paper_order):
    c, m, b = e["config"], e["metrics"], e["budget"]
    paper = PAPER_NLL.get((c.get("dataset"), c.get("model"), c.get("prior")))
    nll, se = m["test_nll"], m.get("test_nll_stderr") or 0.0
    paper_txt = f"{paper[0]:.2f} +- {paper[1]:.2f}" if paper else "n/a"
    diff = f"{nll - paper[0]:+.2f}" if paper else "n/a"
    lines.append(
      f"| `{e['name']}` | {objective_label(c)} | {paper_txt} | {nll:.2f} +- "
      f"{se:.2f} | {diff} | {_budget_text(b, m)} |"
    )
  return "\n".join(lines)


MODEL_NAMES = {"vae": "VAE", "hvae": "HVAE", "convhvae": "ConvHVAE", "pixelcnn": "PixelCNN"}
MODEL_ORDER = list(MODEL_NAMES)  # the paper's order, simplest model first
PRIOR_NAMES = {"gaussian": "Gaussian prior", "vampprior": "VampPrior", "exemplar": "exemplar prior"}
DATASET_NAMES = {"fashion_mnist": "Fashion-MNIST", "mnist": "MNIST"}


def _paired_row(root: str, label: str, a: dict, b: dict, paper: tuple | None) -> str:
  """One row of :func:`paired_table`: NLL(a) - NLL(b) over the images both scored."""
  from exvae import compare

  pair = f"`{a['name']}` - `{b['name']}`"
  try:
    runs = compare.load_runs([os.path.join(root, a["name"]), os.path.join(root, b["name"])])
  except (compare.IdentityMismatchError, FileNotFoundError) as err:
    return f"| {label} | {pair} | not paired: {str(err).split(':')[0]} | | |"
  st = compare.paired_stats(-np.asarray(runs[0]["log_px"]), -np.asarray(runs[1]["log_px"]))
  paper_txt = f"{paper[0][0] - paper[1][0]:+.2f}" if paper and all(paper) else "n/a"
  return (
    f"| {label} | {pair} | {st['mean_diff']:+.2f} +- {st['stderr']:.2f} | "
    f"{100 * st['a_wins']:.1f}% | {paper_txt} |"
  )


def paired_table(entries: list[dict], root: str) -> str:
  """Markdown table of the paired differences between priors, and between models.

  Rows with the same data set and test binarisation scored the same images, so
  their per-image NLLs (``results/<name>/per_example.npz``) pair. The table
  gives, first, for each model the differences between its priors, then, for
  each prior, the difference between each model and the next simpler one of
  the paper (HVAE - VAE, ConvHVAE - HVAE, ...), each among the rows trained
  with one objective; last, each row trained with another objective against
  the ELBO row of its model and prior.  Each row: the mean of NLL(richer) -
  NLL(simpler) over the test images with its paired standard error, the share
  of images on which the richer is better, and the paper's difference (n/a
  where the paper has no such pair).

  Args:
    entries: :func:`load_entries` of ``root``.
    root: the results folder.

  Returns:
    The table, or one line when no two rows pair.
  """
  import itertools

  from exvae import compare

  # (dataset, draw, objective) -> model -> prior -> the first entry (variants sort after
  # their row). Entries are inserted in the paper's order, so each group's models come out
  # in it too, and the ELBO groups before the others.
  groups: dict[tuple, dict[str, dict[str, dict]]] = {}
  for e in sorted(entries, key=_paper_order):
    fam = compare.config_family(e["config"])  # load_entries read config.json
    if fam is not None:
      (dataset, model), prior = fam
      key = (dataset, e["metrics"].get("eval_binarize", "exvae"), objective_label(e["config"]))
      groups.setdefault(key, {}).setdefault(model, {}).setdefault(prior, e)
  lines = [
    "| held fixed | richer - simpler | NLL difference (paired) | images where the "
    "richer is better | paper |",
    "|---|---|---|---|---|",
  ]
  order = lambda key: (key[0], key[1], key[2] != "ELBO", key[2])
  for dataset, draw, objective in sorted(groups, key=order):
    by_model = groups[(dataset, draw, objective)]
    where = (
      f"{DATASET_NAMES.get(dataset, dataset)}"
      + (", paper's test draw" if draw == "reference" else "")
      + ("" if objective == "ELBO" else f", {objective}")
    )
    models = list(by_model)
    for model in models:
      by_prior = by_model[model]
      present = [p for p in compare.PRIORS if p in by_prior]
      for simpler, richer in itertools.combinations(present, 2):
        paper = tuple(PAPER_NLL.get((dataset, model, p)) for p in (richer, simpler))
        lines.append(
          _paired_row(
            root,
            f"{MODEL_NAMES.get(model, model)}, {where}",
            by_prior[richer],
            by_prior[simpler],
            paper,
          )
        )
    for prior in compare.PRIORS:
      having = [m for m in models if prior in by_model[m]]
      for simpler, richer in zip(having, having[1:]):
        paper = tuple(PAPER_NLL.get((dataset, m, prior)) for m in (richer, simpler))
        lines.append(
          _paired_row(
            root,
            f"{PRIOR_NAMES[prior]}, {where}",
            by_model[richer][prior],
            by_model[simpler][prior],
            paper,
          )
        )
    if objective == "ELBO" or (dataset, draw, "ELBO") not in groups:
      continue
    for model, by_prior in by_model.items():  # this objective against the ELBO
      for prior, e in by_prior.items():
        base = groups[(dataset, draw, "ELBO")].get(model, {}).get(prior)
        if base is not None:
          lines.append(
            _paired_row(
              root,
              f"{MODEL_NAMES.get(model, model)}, {PRIOR_NAMES[prior]}, "
              f"{DATASET_NAMES.get(dataset, dataset)}",
              e,
              base,
              None,
            )
          )
  if len(lines) == 2:
    return "(no two rows scored on the same test images yet)"
  return "\n".join(lines)


def checkout_command(command: str) -> str:
  """A recorded ``python ...`` command as a checkout runs it (``.venv/bin/python ...``;
  Debian has no ``python``)."""
  return re.sub(r"^python(?=\s)", ".venv/bin/python", command)


def speed_table(path: str) -> str:
  """Markdown for the side-by-side benchmark record at ``path``.

  Args:
    path: ``results/speed/vs_reference.json``: ``machine`` (``cpu``, ``cores``,
      ``xla_matmul_gflops``, ``torch_matmul_gflops``), ``provenance``
      (``commit``, ``date``, ``command``) and ``rows``, each with ``what``,
      ``unit``, ``exvae``, ``reference`` and ``speedup``.

  Returns:
    A line naming the machine and the run, then a table with one row per
    measured quantity; or one line saying the benchmark has not been run
    when the file does not exist.
  """
  if not os.path.exists(path):
    return (
      "The side-by-side benchmark (`bench/vs_reference.py`) has not been recorded yet; "
      "its record is `results/speed/vs_reference.json`."
    )
  with open(path) as f:
    rec = json.load(f)
  m, p = rec["machine"], rec["provenance"]
  lines = [
    f"{m['cpu']}, {m['cores']} cores (matmul: XLA {m['xla_matmul_gflops']:.0f}, "
    f"torch {m['torch_matmul_gflops']:.0f} GFLOP/s); {p['date']}, commit "
    f"`{p['commit']}`, `{checkout_command(p['command'])}`.",
    "",
    "| | unit | exvae | reference | exvae faster by |",
    "|---|---|---|---|---|",
  ]
  for r in rec["rows"]:
    lines.append(
      f"| {r['what']} | {r['unit']} | {r['exvae']:.4g} | {r['reference']:.4g} | "
      f"{r['speedup']:.2f}x |"
    )
  return "\n".join(lines)


def gpu_table(run_dir: str, label: str | None = None) -> str:
  """Markdown for one device check (``bench/device_check.py --out run_dir``).

  Args:
    run_dir: a folder holding the check's ``env.json``, ``train_speed.json``
      and ``eval.json``.
    label: how the text names that folder (default ``run_dir``).

  Returns:
    A line naming the device and the folder, then a table of epoch times and
    the projected test-set evaluation; one line if the folder is missing.
  """
  label = label or run_dir
  names = ("env", "train_speed", "eval")
  files = {n: os.path.join(run_dir, f"{n}.json") for n in names}
  if not all(os.path.exists(f) for f in files.values()):
    return f"No device check recorded in `{label}`."
  rec = {}
  for n, f in files.items():
    with open(f) as fh:
      rec[n] = json.load(fh)
  env, ts, ev = rec["env"], rec["train_speed"], rec["eval"]
  dev = env.get("device_kind") or env.get("device") or env.get("backend", "?")
  row_names = {
    "vae_gaussian": "MLP VAE, Gaussian prior",
    "vae_rat": "MLP VAE, exemplar prior, RAT",
    "vae_exact": "MLP VAE, exact exemplar prior (M = 25000)",
    "hvae_rat": "HVAE, RAT",
    "convhvae_rat": "ConvHVAE, RAT",
  }
  lines = [
    f"{dev}, jax {env.get('versions', {}).get('jax', '?')} (`{label}/`); batch "
    f"{ts.get('batch_size')}, {ts.get('num_train')} training images:",
    "",
    "| | per step | per epoch |",
    "|---|---|---|",
  ]
  for key, text in row_names.items():
    r = ts["rows"].get(key)
    if r:
      lines.append(f"| {text} | {r['ms_per_step']:.2f} ms | {r['epoch_s']:.2f} s |")
  best = min(ev["rows"], key=lambda r: r["projected_10000_points_s"])
  lines.append(
    f"| test NLL, S = {ev['samples']}, N = {ev['num_train']}, 10000 test images "
    f"(`eval.max_queries={best['max_queries']}`) | {1e3 * best['s_per_point']:.1f} ms "
    f"per image | {best['projected_10000_points_s']:.0f} s in all |"
  )
  return "\n".join(lines)


def write_readme(path: str, text: str, markers: tuple[str, str] = (BEGIN, END)) -> None:
  """Replaces the text between ``markers`` in the file at ``path`` with ``text``."""
  begin, end = markers
  with open(path) as f:
    s = f.read()
  if begin not in s or end not in s:
    raise SystemExit(f"{path} has no {begin} ... {end} markers.")
  head, rest = s.split(begin, 1)
  _, tail = rest.split(end, 1)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write(f"{head}{begin}\n{text}\n{end}{tail}")
  os.replace(tmp, path)


def blocks(results: str) -> dict[str, str]:
  """The README's generated blocks, by marker name (``results``, ``paired``, ``speed``, ``gpu``)."""
  entries = load_entries(results)
  return {
    "results": table(entries) if entries else "(no results yet: scripts/paper_runs.sh makes them)",
    "paired": paired_table(entries, results),
    "speed": speed_table(os.path.join(results, SPEED_JSON)),
    "gpu": gpu_table(os.path.join(results, GPU_DIR), os.path.join("results", GPU_DIR)),
  }


def markers(name: str) -> tuple[str, str]:
  return f"<!-- {name}:begin -->", f"<!-- {name}:end -->"


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--results", default="results")
  ap.add_argument("--write-readme", default=None, metavar="README")
  a = ap.parse_args(argv)
  for name, text in blocks(a.results).items():
    print(text + "\n")
    if a.write_readme:
      write_readme(a.write_readme, text, markers(name))
  return 0


if __name__ == "__main__":
  sys.exit(main())
