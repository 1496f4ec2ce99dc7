"""The README's results table, generated from ``results/`` (never typed by hand).

Usage: python scripts/results_table.py [--results results] [--write-readme README.md]

Prints a markdown table with, per ``results/<name>/``: the paper's test NLL
and error bar, the measured test NLL and its standard error over test images,
the difference, and the training budget (epochs, early stop, best epoch, S,
test images, wall-clock, machine).  With ``--write-readme`` the table replaces
the text between ``<!-- results:begin -->`` and ``<!-- results:end -->``.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from exvae.config_base import PAPER_NLL  # noqa: E402

BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


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
  stop = (f"early-stopped at epoch {b['epochs_trained']}" if b.get("early_stopped")
          else f"{b['epochs_trained']} of {b.get('max_epochs')} epochs, not early-stopped")
  hours = (b.get("train_wall_clock_s", 0.0) - b.get("train_paused_s", 0.0)) / 3600
  # budget.json files collected before pauses were measured count the pauses in.
  clock = "training (pauses excluded)" if "train_paused_s" in b else "training wall-clock"
  pruned = (f", prior pruned to the {m['prune_keep']} nearest exemplars"
            if m.get("prune_keep") else "")
  # Runs evaluated before the choice existed were scored on exvae's own test draw.
  draw = ("binarised as the paper's (reference draw)" if m.get("eval_binarize") == "reference"
          else "exvae's binarisation")
  return (f"{stop}; best epoch {b.get('best_epoch')}; S = {m.get('num_importance_samples')}, "
          f"{m.get('num_test_examples')} test images, {draw}{pruned}; {hours:.1f} h {clock} "
          f"on {b.get('cpu_count')} cores ({b.get('cpu', '?')})")


def table(entries: list[dict]) -> str:
  """Markdown table of the entries (paper value, measured value, difference, budget)."""
  lines = ["| config | paper NLL | measured NLL | measured - paper | budget |",
           "|---|---|---|---|---|"]
  for e in entries:
    c, m, b = e["config"], e["metrics"], e["budget"]
    paper = PAPER_NLL.get((c.get("dataset"), c.get("model"), c.get("prior")))
    nll, se = m["test_nll"], m.get("test_nll_stderr") or 0.0
    paper_txt = f"{paper[0]:.2f} +- {paper[1]:.2f}" if paper else "n/a"
    diff = f"{nll - paper[0]:+.2f}" if paper else "n/a"
    lines.append(f"| `{e['name']}` | {paper_txt} | {nll:.2f} +- {se:.2f} | {diff} | "
                 f"{_budget_text(b, m)} |")
  return "\n".join(lines)


def write_readme(path: str, text: str) -> None:
  with open(path) as f:
    s = f.read()
  if BEGIN not in s or END not in s:
    raise SystemExit(f"{path} has no {BEGIN} ... {END} markers.")
  head, rest = s.split(BEGIN, 1)
  _, tail = rest.split(END, 1)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write(f"{head}{BEGIN}\n{text}\n{END}{tail}")
  os.replace(tmp, path)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--results", default="results")
  ap.add_argument("--write-readme", default=None, metavar="README")
  a = ap.parse_args(argv)
  entries = load_entries(a.results)
  text = table(entries) if entries else "(no results yet: scripts/paper_runs.sh makes them)"
  print(text)
  if a.write_readme:
    write_readme(a.write_readme, text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
