"""The readers' fault-campaign tables of docs/running.md, generated from results/integrity/.

Reads every ``readers_seed*.json`` that ``scripts/fault_campaign.py --record`` wrote and
prints two Markdown tables: one row per campaign (its commit and outcome counts), and the
newest campaign's episodes per surface and fault kind. ``--write PAGE`` replaces the text
between the page's ``<!-- readers-campaigns:begin -->`` and ``<!-- readers-campaigns:end -->``
markers; ``--check PAGE`` exits 1 when the page differs from what would be written.

  .venv/bin/python scripts/integrity_table.py --write docs/running.md
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys

BEGIN, END = "<!-- readers-campaigns:begin -->", "<!-- readers-campaigns:end -->"
OUTCOMES = ("identical", "recomputed", "refused", "wrong_silent", "lost", "multi_line", "failed")
SURFACES = {
  "eval": "`exvae-eval`",
  "knn": "`exvae-uses knn`",
  "augment": "`exvae-uses augment`",
  "generate": "`exvae-uses generate`",
  "published": "published model (tiny)",
  "published_real": "published model (a copy of `fashion_vae_exemplar_rat`)",
  "run": "a run's `config.json`",
  "compare": "`exvae-compare`",
}


def load_records(results: str) -> list[dict]:
  """The readers' campaign records under ``results/integrity``, oldest first (by start time)."""
  out = []
  for path in glob.glob(os.path.join(results, "integrity", "readers_seed*.json")):
    with open(path) as f:
      record = json.load(f)
    out.append(dict(record, file=os.path.basename(path)))
  return sorted(out, key=lambda r: r.get("started", ""))


def tables(records: list[dict]) -> str:
  """The two Markdown tables (campaigns; the newest one's surfaces), as one text.

  The commit each campaign ran is in its record, not in the table (docs carry no hashes).
  """
  head = "| record | episodes | faults landed | " + " | ".join(OUTCOMES) + " | wall-clock |"
  lines = [head, "|" + "---|" * (head.count("|") - 1)]
  for r in records:
    rd = r["readers"]
    counts = " | ".join(str(rd["outcomes"].get(k, 0)) for k in OUTCOMES)
    lines.append(
      f"| [{r['file']}](../results/integrity/{r['file']}) | {rd['episodes']} | {rd['faults_landed']} | {counts} | "
      f"{r['wall_clock_s'] / 60:.0f} min |"
    )
  newest = records[-1]
  lines += [
    "",
    f"Per surface and fault kind, {newest['file']} (fault kind: outcomes):",
    "",
    "| surface | faults landed | fault kinds |",
    "|---|---|---|",
  ]
  landed = newest["readers"].get("faults_landed_per_surface", {})
  for key, kinds in newest["readers"]["per_surface"].items():
    text = "; ".join(
      f"{kind}: " + ", ".join(f"{n} {o}" for o, n in sorted(outs.items()))
      for kind, outs in sorted(kinds.items())
    )
    lines.append(f"| {SURFACES.get(key, key)} | {landed.get(key, '')} | {text} |")
  return "\n".join(lines) + "\n"


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--results", default="results")
  g = p.add_mutually_exclusive_group()
  g.add_argument("--write", metavar="PAGE")
  g.add_argument("--check", metavar="PAGE")
  args = p.parse_args(argv)
  records = load_records(args.results)
  if not records:
    print(
      f"integrity_table: error: no readers_seed*.json under {args.results}/integrity",
      file=sys.stderr,
    )
    return 2
  text = tables(records)
  page = args.write or args.check
  if page is None:
    sys.stdout.write(text)
    return 0
  with open(page) as f:
    old = f.read()
  if BEGIN not in old or END not in old:
    print(f"integrity_table: error: {page} has no {BEGIN} ... {END} markers", file=sys.stderr)
    return 2
  new = old[: old.index(BEGIN) + len(BEGIN)] + "\n" + text + old[old.index(END) :]
  if args.check:
    if new != old:
      print(
        f"integrity_table: {page} differs from the records; run with --write {page}",
        file=sys.stderr,
      )
      return 1
    return 0
  with open(page, "w") as f:
    f.write(new)
  return 0


if __name__ == "__main__":
  sys.exit(main())
