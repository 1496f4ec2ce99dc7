"""Per-operation profile of a compiled XLA:CPU computation, from a jax.profiler trace.

XLA:CPU runs a compiled module as a sequence of thunks, one per HLO
instruction of the entry computation (fusions, dots, copies, sorts, loops;
the instructions of a loop body each run as their own thunk, once per
iteration).  ``jax.profiler.trace`` records every thunk execution as a trace
event whose ``args.hlo_op`` names the instruction.  This module joins those
events with the compiled module's HLO text, which says what each instruction
is (a dot and its shape, a gather, an element-wise fusion, a copy), and sums
the time by kind of operation and by the part of the model the operation
comes from (its ``op_name`` metadata).

Times are wall-clock durations of the thunks (exclusive: a loop's own time
excludes its body's thunks), so on a machine shared with other processes they
include time the thread was descheduled; the shares between kinds stay
meaningful when the load is steady over the profile.
"""

from __future__ import annotations

import bisect
import collections
import glob
import gzip
import json
import math
import os
import re
import tempfile
from typing import Any, Callable

_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s+([\w\-]+)\((.*)$")
_COMP = re.compile(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->.*\{\s*$")
_SHAPE = re.compile(r"^\(?\s*(\w+)\[([\d,]*)\]")

# Kinds of operation, in the order of the printed table.
KINDS = (
  "matmul",
  "elementwise",
  "reduce",
  "gather/scatter",
  "copy/transpose/concat",
  "sort/top-k",
  "loop control",
  "other",
  "no thunk running",
)
MOVES = {
  "copy",
  "transpose",
  "concatenate",
  "pad",
  "slice",
  "dynamic-slice",
  "dynamic-update-slice",
  "bitcast",
  "reshape",
  "broadcast",
  "copy-start",
  "copy-done",
  "tuple",
  "get-tuple-element",
  "iota",
}


def _dims(shape_text: str) -> tuple[str, tuple[int, ...]] | None:
  m = _SHAPE.match(shape_text.strip())
  if not m:
    return None
  return m.group(1), tuple(int(d) for d in m.group(2).split(",") if d)


def parse_hlo(text: str) -> dict[str, Any]:
  """Instructions and computations of an HLO module's text (``compiled.as_text()``).

  Returns:
    ``{"instr": {name: info}, "comps": {computation: [names]}}`` where info
    holds ``opcode``, ``shape`` (dtype, dims) of the result, ``rest`` (the
    text after the opcode: operands and attributes), ``comp`` (the enclosing
    computation) and ``op_name`` (its metadata, '' if none).
  """
  instr, comps, comp = {}, collections.defaultdict(list), None
  for line in text.splitlines():
    cm = _COMP.match(line)
    if cm and "=" not in line.split("(")[0]:
      comp = cm.group(1)
      continue
    m = _INSTR.match(line)
    if not m or comp is None:
      continue
    name, shape, opcode, rest = m.groups()
    op_name = re.search(r'op_name="([^"]*)"', rest)
    instr[name] = {
      "opcode": opcode,
      "shape": _dims(shape),
      "rest": rest,
      "comp": comp,
      "op_name": op_name.group(1) if op_name else "",
    }
    comps[comp].append(name)
  return {"instr": instr, "comps": dict(comps)}


def _called(info: dict) -> list[str]:
  return re.findall(r"(?:calls|to_apply|body|condition)=%?([\w.\-]+)", info["rest"])


def _dot_flops(hlo: dict, name: str) -> tuple[float, str]:
  """FLOPs and an ``MxKxN`` label of one dot instruction (batch dims folded into M)."""
  info = hlo["instr"][name]
  out = info["shape"][1] if info["shape"] else ()
  operands = re.findall(r"%([\w.\-]+)", info["rest"].split(")")[0])
  lhs = hlo["instr"].get(operands[0]) if operands else None
  cd = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", info["rest"])
  k = 1
  if lhs and lhs["shape"] and cd:
    k = math.prod(lhs["shape"][1][int(i)] for i in cd.group(1).split(",") if i)
  n_out = math.prod(out)
  n = out[-1] if out else 1
  return 2.0 * n_out * k, f"{n_out // max(n, 1)}x{k}x{n}"


def classify(hlo: dict, name: str) -> dict[str, Any]:
  """Kind, matmul label and FLOPs, and model part of the instruction ``name``."""
  info = hlo["instr"].get(name)
  if name == UNTRACED:
    return {"kind": "no thunk running", "label": "", "flops": 0.0, "part": UNTRACED}
  if info is None:
    return {"kind": "other", "label": name, "flops": 0.0, "part": "unknown"}
  op = info["opcode"]
  inner = []  # instructions of the fused/called computations
  if op in ("fusion", "call", "custom-call"):
    for c in _called(info):
      inner += hlo["comps"].get(c, [])
  inner_ops = {hlo["instr"][n]["opcode"] for n in inner}
  flops, label = 0.0, ""
  dots = [n for n in ([name] if op == "dot" else inner) if hlo["instr"][n]["opcode"] == "dot"]
  if dots:
    kind = "matmul"
    for d in dots:
      f, lab = _dot_flops(hlo, d)
      flops += f
      label = label or lab
  elif op in ("gather", "scatter") or inner_ops & {"gather", "scatter"}:
    kind = "gather/scatter"
  elif op in ("sort",) or "TopK" in info["rest"]:
    kind = "sort/top-k"
  elif op in ("while", "conditional", "call"):
    kind = "loop control"
  elif op == "reduce" or "reduce" in inner_ops or op == "reduce-window":
    kind = "reduce"
  elif op in MOVES or (op == "fusion" and inner_ops and inner_ops <= MOVES | {"parameter"}):
    kind = "copy/transpose/concat"
  elif op == "fusion" or op in (
    "add",
    "multiply",
    "subtract",
    "divide",
    "select",
    "exponential",
    "log",
    "compare",
    "convert",
    "maximum",
    "minimum",
    "negate",
  ):
    kind = "elementwise"
  else:
    kind = "other"
  return {"kind": kind, "label": label, "flops": flops, "part": model_part(info["op_name"])}


TOP = 15  # costliest instructions kept in a profile

# op_name fragments -> the part of the training step the operation belongs to (first match).
PARTS = (
  ("log_kernel_sum", "prior kernel"),
  ("topk_neighbors", "retrieval (top-k)"),
  ("encode_mean", "exemplar encoder"),
  ("encode_rows", "exemplar encoder"),
  ("VAE.encode", "batch encoder"),
  ("VAE.decode", "batch decoder"),
  ("threefry", "random numbers"),
  ("_normal", "random numbers"),
  ("_randint", "random numbers"),
  ("bernoulli", "random numbers"),
  ("unique", "exemplar ids (sort/unique)"),
  ("sort", "exemplar ids (sort/unique)"),
  ("gather", "gathers"),
  ("scatter", "scatters"),
)


def model_part(op_name: str) -> str:
  """The part of the step an op comes from, by its ``op_name`` metadata."""
  for frag, part in PARTS:
    if frag in op_name:
      return part
  return "optimizer, loss and other"


UNTRACED = "(no thunk running)"


def _exclusive_events(
  events: list, module: str, control: frozenset = frozenset()
) -> list[tuple[str, float, Any, float, float, bool]]:
  """``(hlo_op, µs, run_id, start, end, is_launch)`` of each thunk of ``module``, time attributed.

  Each thunk gets its exclusive time (a loop's own time excludes its body's
  thunks).  Some thunks are asynchronous: the trace event covers launching
  the work (Eigen dots), whose completion shows up later as an ``end: <op>``
  event while the executor runs other thunks.  Time in a step when no thunk
  event is open is split evenly between the asynchronous thunks in flight
  (launched, not yet ended) and, with none in flight, booked as
  :data:`UNTRACED` (scheduling, or the process waiting for a core).  Loops
  (the instructions named in ``control``) do not count as running: time in a
  loop when none of its body's thunks runs goes to the asynchronous thunks
  in flight, and is taken off the loop's own time.
  """
  evs = [
    e
    for e in events
    if e.get("ph") == "X"
    and (e.get("args") or {}).get("hlo_op")
    and e["args"].get("hlo_module") == module
  ]
  evs.sort(key=lambda e: (e["tid"], e["ts"], -e["dur"]))
  excl = {id(e): float(e["dur"]) for e in evs}
  stacks: dict[Any, list] = {}
  for e in evs:
    st = stacks.setdefault(e["tid"], [])
    while st and st[-1]["ts"] + st[-1]["dur"] <= e["ts"]:
      st.pop()
    if st:
      excl[id(st[-1])] -= float(e["dur"])
    st.append(e)
  ends = collections.defaultdict(list)
  for e in events:
    if e.get("ph") == "X" and str(e.get("name", "")).startswith("end: "):
      ends[e["name"][5:]].append(float(e["ts"]))
  for v in ends.values():
    v.sort()
  rows = []
  by_run = collections.defaultdict(list)
  for e in evs:
    by_run[e["args"].get("run_id")].append(e)
  for run, es in by_run.items():
    lo, hi = min(e["ts"] for e in es), max(e["ts"] + e["dur"] for e in es)
    busy = sorted(
      (float(e["ts"]), float(e["ts"] + e["dur"])) for e in es if e["args"]["hlo_op"] not in control
    )
    loops = [e for e in es if e["args"]["hlo_op"] in control]
    flights = []  # (launch end, completion) of asynchronous thunks
    for e in es:
      cands = ends.get(e["args"]["hlo_op"], [])
      i = bisect.bisect_left(cands, e["ts"])  # this launch's own end event
      if i < len(cands) and cands[i] - (e["ts"] + e["dur"]) > 20.0:
        flights.append((float(e["ts"] + e["dur"]), min(cands[i], hi), e["args"]["hlo_op"]))
    gaps, t = [], float(lo)
    for s, f in busy:
      if s > t:
        gaps.append((t, s))
      t = max(t, f)
    for g0, g1 in gaps:
      # Split the gap at the flights' boundaries, each piece shared by the flights open in it.
      cuts = sorted({g0, g1} | {x for a, b, _ in flights for x in (a, b) if g0 < x < g1})
      for a, b in zip(cuts[:-1], cuts[1:]):
        open_ = [op for s, f, op in flights if s <= a and f >= b]
        inside = [e for e in loops if e["ts"] <= a and e["ts"] + e["dur"] >= b]
        if inside and not open_:
          continue  # the loop's own time (already in its exclusive time)
        if inside:  # innermost loop: this piece is an async thunk's, not its own
          excl[id(max(inside, key=lambda e: e["ts"]))] -= b - a
        for op in open_ or [UNTRACED]:
          rows.append((op, (b - a) / max(len(open_), 1), run, a, b, False))
  rows += [
    (
      e["args"]["hlo_op"],
      excl[id(e)],
      e["args"].get("run_id"),
      float(e["ts"]),
      float(e["ts"] + e["dur"]),
      True,
    )
    for e in evs
  ]
  return rows


def profile(
  fn: Callable[[], Any], hlo_text: str, module: str, steps: int, trace_dir: str | None = None
) -> dict[str, Any]:
  """Runs ``fn`` ``steps`` times under the profiler; times by kind, matmul shape and part.

  Args:
    fn: runs one execution of the compiled module and blocks until it is done.
    hlo_text: the compiled module's HLO text (``compiled.as_text()``).
    module: the module's name in the trace (``jit_<function name>``).
    steps: executions profiled.
    trace_dir: where the trace goes (default: a temporary directory, removed).

  Returns:
    dict: ``steps``, ``step_ms`` (median wall span of one execution in the
    trace), ``op_ms`` (sum of exclusive thunk time per execution), ``kinds``
    {kind: ms per execution}, ``matmuls`` [{shape, calls, ms, gflop, gflops}]
    per distinct MxKxN, ``parts`` {part: ms}, ``top`` (the 15 costliest
    instructions: name, kind, part, ms).
  """
  import jax

  hlo = parse_hlo(hlo_text)
  tmp = None
  if trace_dir is None:
    tmp = tempfile.TemporaryDirectory(prefix="exvae_trace_")
    trace_dir = tmp.name
  try:
    with jax.profiler.trace(trace_dir):
      for _ in range(steps):
        fn()
    paths = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
    if not paths:
      raise RuntimeError(f"jax.profiler wrote no *.trace.json.gz under {trace_dir}")
    with gzip.open(max(paths, key=os.path.getmtime)) as f:
      events = json.load(f)["traceEvents"]
  finally:
    if tmp is not None:
      tmp.cleanup()
  control = frozenset(
    n for n, i in hlo["instr"].items() if i["opcode"] in ("while", "conditional", "call")
  )
  rows = _exclusive_events(events, module, control)
  if not rows:
    raise RuntimeError(f"the trace has no thunk events of module {module!r}")
  return summarize(hlo, rows)


def summarize(hlo: dict, rows: list) -> dict[str, Any]:
  """Aggregates the rows of :func:`_exclusive_events` (see :func:`profile`)."""
  runs = collections.defaultdict(list)
  for r in rows:
    runs[r[2]].append(r)
  n = len(runs)
  spans = sorted((max(r[4] for r in rs) - min(r[3] for r in rs)) / 1e3 for rs in runs.values())
  kinds = dict.fromkeys(KINDS, 0.0)
  parts: dict[str, float] = collections.defaultdict(float)
  mm: dict[str, dict] = {}
  per_op: dict[str, float] = collections.defaultdict(float)
  cache = {}
  for op, us, _, _, _, launch in rows:
    c = cache.get(op) or cache.setdefault(op, classify(hlo, op))
    ms = us / 1e3 / n
    kinds[c["kind"]] += ms
    parts[c["part"]] += ms
    per_op[op] += ms
    if c["kind"] == "matmul":
      e = mm.setdefault(c["label"], {"shape": c["label"], "calls": 0.0, "ms": 0.0, "gflop": 0.0})
      e["ms"] += ms
      if launch:
        e["calls"] += 1.0 / n
        e["gflop"] += c["flops"] / 1e9 / n
  for e in mm.values():
    e["gflops"] = e["gflop"] / (e["ms"] / 1e3) if e["ms"] > 0 else float("nan")
  top = sorted(per_op.items(), key=lambda kv: -kv[1])[:TOP]
  return {
    "steps": n,
    "step_ms": spans[len(spans) // 2],
    "op_ms": sum(kinds.values()),
    "kinds": kinds,
    "matmuls": sorted(mm.values(), key=lambda e: -e["ms"]),
    "parts": dict(sorted(parts.items(), key=lambda kv: -kv[1])),
    "top": [
      {"op": op, "kind": cache[op]["kind"], "part": cache[op]["part"], "ms": ms} for op, ms in top
    ],
  }


def isolated_rates(shapes: list[str], rounds: int = 5) -> dict[str, float]:
  """GFLOP/s of a lone float32 ``(M, K) @ (K, N)`` per ``MxKxN`` label, and of 2048^3.

  Each product is jitted on its own and timed best-of ``rounds``, all shapes
  and the 2048^3 product alternated round by round (same background load).
  The step's own dots may contract other axes (a weight gradient contracts
  the batch), so a label's lone rate is the rate of its shape, not of its
  layout.

  Returns:
    ``{label: GFLOP/s}``, with ``"2048x2048x2048"`` always included.
  """
  import jax
  import jax.numpy as jnp
  from bench.prior_kernel import interleaved

  labels = list(dict.fromkeys(list(shapes) + ["2048x2048x2048"]))
  mm = jax.jit(lambda a, b: a @ b)
  calls, flops = {}, {}
  for lab in labels:
    m, k, n = (int(v) for v in lab.split("x"))
    calls[lab] = (mm, (jnp.ones((m, k), jnp.float32), jnp.ones((k, n), jnp.float32)))
    flops[lab] = 2.0 * m * k * n
  best = interleaved(calls, rounds)
  return {lab: flops[lab] / best[lab] / 1e9 for lab in labels}


def add_ceiling(p: dict, rates: dict[str, float]) -> None:
  """Adds each matmul shape's lone rate to profile ``p`` and the step's matmul-bound time.

  ``matmul_bound_ms``: the step's matrix products (the profile's FLOPs per
  shape) at their shapes' lone rates; ``matmul_bound_share``: the share of
  the 2048^3 rate a step taking exactly that long would show.
  """
  for e in p["matmuls"]:
    e["isolated_gflops"] = rates.get(e["shape"])
  bound = sum(e["gflop"] / e["isolated_gflops"] for e in p["matmuls"] if e.get("isolated_gflops"))
  p["matmul_bound_ms"] = bound * 1e3
  total = sum(e["gflop"] for e in p["matmuls"])
  p["matmul_bound_share"] = (total / bound / rates["2048x2048x2048"]) if bound else None


def format_table(name: str, p: dict, rate: float | None = None) -> str:
  """The profile ``p`` of config ``name`` as a plain-text table (ms per step and share)."""
  tot = p["op_ms"] or 1.0
  lines = [
    f"{name}: {p['steps']} profiled steps, median span {p['step_ms']:.1f} ms, "
    f"thunk time {p['op_ms']:.1f} ms/step"
  ]
  lines.append(f"  {'kind':34s} {'ms/step':>8s} {'share':>6s}")
  for k, v in p["kinds"].items():
    lines.append(f"  {k:34s} {v:8.2f} {v / tot:6.1%}")
    if k == "matmul":
      for e in p["matmuls"]:
        extra = f" {e['gflops']:6.0f} GFLOP/s" + (
          f" ({e['gflops'] * 1e9 / rate:.0%})" if rate else ""
        )
        if e.get("isolated_gflops"):
          extra += f", alone {e['isolated_gflops']:.0f} GFLOP/s"
        lines.append(
          f"    {e['shape']:>18s} x{e['calls']:<5.0f} {e['ms']:8.2f} {e['ms'] / tot:6.1%}"
          f" {e['gflop']:7.3f} GFLOP{extra}"
        )
  if p.get("matmul_bound_ms"):
    lines.append(
      f"  matrix products at their shapes' lone rates: {p['matmul_bound_ms']:.1f} ms/step "
      f"({p['matmul_bound_share']:.0%} of the 2048^3 rate at best)"
    )
  lines.append(f"  {'part of the step':34s}")
  for k, v in p["parts"].items():
    lines.append(f"  {k:34s} {v:8.2f} {v / tot:6.1%}")
  lines.append(
    "  costliest instructions: "
    + ", ".join(f"{t['op']} ({t['kind']}, {t['part']}) {t['ms']:.2f}" for t in p["top"][:8])
  )
  return "\n".join(lines)


def _checkout_command(command: str) -> str:
  """A recorded ``python ...`` command as a checkout runs it (Debian has no ``python``)."""
  return re.sub(r"^python(?=\s)", ".venv/bin/python", command)


def markdown(doc: dict) -> str:
  """Markdown tables of a ``profile.json`` (train_speed.py --profile): one per config.

  Columns per config: ms per step and share of the step's thunk time, by kind
  (matrix products one row per MxKxN shape, with the rate each reaches and its
  share of the run's 2048^3 matmul rate), then by part of the step.
  """
  m = doc.get("machine", {})
  rate = m.get("xla_matmul_gflops")
  prov = doc.get("provenance", {})
  out = [
    f"Measured on {m.get('cpu', '?')} ({m.get('cores', '?')} cores), XLA float32 "
    f"2048^3 matmul {rate:.0f} GFLOP/s in the same run; load average "
    f"{', '.join(str(x) for x in m.get('loadavg', []))} at the start; "
    f"`{_checkout_command(prov.get('command', ''))}`, "
    f"{prov.get('date', '')} (the commit is in "
    f"`results/speed/profile.json`)."
    if rate
    else "",
    "",
  ]
  for p in doc.get("configs", []):
    tot = p["op_ms"] or 1.0
    g = p.get("gflop_per_step")
    ach = (
      (
        f", {g:.2f} GFLOP of matrix products per step: {g / p['unprofiled_ms_per_step'] * 1e3:.0f}"
        f" GFLOP/s"
        + (
          f", {g / p['unprofiled_ms_per_step'] * 1e3 / rate:.0%} of the matmul rate" if rate else ""
        )
      )
      if g
      else ""
    )
    if p.get("distinct_union_rows"):
      ach += (
        f" (the unprofiled steps' RAT unions hold {p['distinct_union_rows']} distinct rows; "
        "the account counts the chunks encoded)"
      )
    out += [
      f"**{p['config']}**: {p['unprofiled_ms_per_step']:.1f} ms per step unprofiled, "
      f"{p['step_ms']:.1f} ms profiled{ach}; thunk time (summed over threads) "
      f"{p['op_ms']:.1f} ms per step, the base of the shares.",
      "",
      "| kind | ms/step | share | GFLOP/step | GFLOP/s | of matmul rate | alone, GFLOP/s |",
      "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for k, v in p["kinds"].items():
      if v <= 0:
        continue
      out.append(f"| {k} | {v:.2f} | {v / tot:.1%} | | | | |")
      if k == "matmul":
        shown, acc = [], 0.0
        for e in p["matmuls"]:  # the costliest shapes, up to 97% of the products' time
          if len(shown) >= 10 or acc >= 0.97 * v:
            break
          shown.append(e)
          acc += e["ms"]
        rest = p["matmuls"][len(shown) :]
        for e in shown:
          share = f"{e['gflops'] / rate:.0%}" if rate else ""
          alone = f"{e['isolated_gflops']:.0f}" if e.get("isolated_gflops") else ""
          out.append(
            f"| &nbsp;&nbsp;{e['shape']} (x{e['calls']:.0f}) | {e['ms']:.2f} | "
            f"{e['ms'] / tot:.1%} | {e['gflop']:.3f} | {e['gflops']:.0f} | {share} | "
            f"{alone} |"
          )
        if rest:
          r_ms, r_gf = sum(e["ms"] for e in rest), sum(e["gflop"] for e in rest)
          out.append(
            f"| &nbsp;&nbsp;{len(rest)} other shapes | {r_ms:.2f} | {r_ms / tot:.1%} | "
            f"{r_gf:.3f} | {r_gf / (r_ms / 1e3) if r_ms else 0:.0f} | | |"
          )
    if p.get("matmul_bound_ms"):
      out += [
        "",
        f"Its matrix products at their shapes' lone rates take {p['matmul_bound_ms']:.1f} "
        f"ms: a step made of nothing else would show {p['matmul_bound_share']:.0%} of "
        "the 2048^3 rate.",
      ]
    out += ["", "| part of the step | ms/step | share |", "|---|---:|---:|"]
    out += [f"| {k} | {v:.2f} | {v / tot:.1%} |" for k, v in p["parts"].items() if v > 0]
    out.append("")
  return "\n".join(out)


BEGIN, END = "<!-- profile tables: begin -->", "<!-- profile tables: end -->"


def replace_block(text: str, tables: str) -> str:
  """``text`` with what lies between :data:`BEGIN` and :data:`END` replaced by ``tables``."""
  i, j = text.find(BEGIN), text.find(END)
  if i < 0 or j < i:
    raise ValueError(f"no '{BEGIN}' ... '{END}' block to replace")
  return text[: i + len(BEGIN)] + "\n" + tables.rstrip() + "\n" + text[j:]


def main(argv: list[str] | None = None) -> None:
  """``python bench/op_profile.py [profile.json] [--doc docs/speed.md]``: print or place the tables."""
  import argparse

  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  ap = argparse.ArgumentParser(description="Markdown tables of train_speed.py --profile's JSON.")
  ap.add_argument(
    "profile", nargs="?", default=os.path.join(root, "results", "speed", "profile.json")
  )
  ap.add_argument(
    "--doc", default=None, help="replace the tables between the profile-table markers of this file"
  )
  args = ap.parse_args(argv)
  with open(args.profile) as f:
    tables = markdown(json.load(f))
  if not args.doc:
    print(tables)
    return
  with open(args.doc) as f:
    text = f.read()
  with open(args.doc, "w") as f:
    f.write(replace_block(text, tables))
  print("updated", args.doc)


if __name__ == "__main__":
  main()
