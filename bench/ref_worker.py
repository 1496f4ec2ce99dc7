"""The reference's side of bench/vs_reference.py (runs under the reference's Python).

Started by ``bench/vs_reference.py`` as ``$EXVAE_REF_PYTHON bench/ref_worker.py DRIVER``,
with ``DRIVER`` the harness ``../shared/reference/driver.py`` (which puts its
torchvision shim and ``$EXVAE_REF_SRC``, the authors' checkout, on the path).
It stays alive so that the two codes can be timed in alternation, each warm:
it reads one JSON command per line on stdin and answers one line
``@@ {json}`` on its stdout; everything else (the driver's and the authors'
prints) goes to stderr. Every timed call is one of THEIR functions, through the
driver: ``train_one_epoch`` over a few batches, ``evaluate_loss`` (their
per-epoch validation) and ``calculate_likelihood`` (their IWAE test NLL).

Commands (``{"cmd": ...}``):
  setup     mode, threads, seed: build model, loaders and optimiser as the driver
            does, then one warm-up ``train_one_epoch`` over ``warmup`` batches.
  steps     n, epoch: ``train_one_epoch`` over n batches; seconds per step,
            the epoch-start cache refresh (RAT), and the rows encoded per step
            as exemplars (their ``q_z(prior=True)`` calls).
  val       one ``evaluate_loss`` over the validation set (their per-epoch pass).
  eval      points, S: seconds per test point of their IWAE (random binary points).
  matmul    n, reps: best-of torch float32 n^3 matmul rate.
  quit
"""

import json
import os
import sys
import time


def main():
  driver_path = os.path.abspath(sys.argv[1])
  proto = os.fdopen(os.dup(1), "w", buffering=1)
  os.dup2(2, 1)  # stray prints -> stderr; protocol on `proto` only
  sys.stdout = os.fdopen(1, "w", buffering=1)
  sys.path.insert(0, os.path.dirname(driver_path))
  import driver  # noqa: E402  (puts the shim and the authors' tree on the path)
  import torch

  def answer(obj):
    proto.write("@@ " + json.dumps(obj) + "\n")
    proto.flush()

  st = {}
  answer({"ready": True, "torch": torch.__version__, "commit": driver.COMMIT, "src": driver.SRC})
  for line in sys.stdin:
    cmd = json.loads(line)
    c = cmd["cmd"]
    try:
      if c == "quit":
        answer({"bye": True})
        return
      if c == "setup":
        st.clear()
        t0 = time.perf_counter()
        argv = driver.their_argv(cmd["mode"], seed=cmd.get("seed"))
        args, train_loader, val_loader, _, model, opt = driver.build(argv, int(cmd["threads"]))
        rows = []
        q_z = model.q_z

        def counting_q_z(x, prior=False):
          if prior and torch.is_grad_enabled():
            rows.append(int(x.shape[0]))  # exemplars encoded with gradients
          return q_z(x, prior=prior)

        model.q_z = counting_q_z
        st.update(
          args=args,
          train_loader=train_loader,
          val_loader=val_loader,
          model=model,
          opt=opt,
          rows=rows,
          mode=cmd["mode"],
        )
        wl = driver.LimitedLoader(train_loader, int(cmd.get("warmup", 2)))
        driver.quiet_call(driver.train_one_epoch, 1, args, wl, model, opt)
        answer(
          {
            "setup_s": time.perf_counter() - t0,
            "args": driver.describe(args),
            "steps_per_epoch": len(train_loader),
            "num_val": len(val_loader.dataset),
          }
        )
      elif c == "steps":
        args = st["args"]
        tl = driver.LimitedLoader(st["train_loader"], int(cmd["n"]))
        del st["rows"][:]
        t0 = time.perf_counter()
        loss, _, _ = driver.quiet_call(
          driver.train_one_epoch, int(cmd.get("epoch", 1)), args, tl, st["model"], st["opt"]
        )
        t1 = time.perf_counter()
        ends = tl.req[1:] + [t1]
        steps = [e - s for s, e in zip(tl.req, ends)]
        rat = args.prior == "exemplar_prior" and args.approximate_prior
        answer(
          {
            "sec_per_step": steps,
            "refresh_s": (tl.req[0] - t0) if rat else 0.0,
            "loss": float(loss),
            "exemplar_rows": list(st["rows"]),
          }
        )
      elif c == "val":
        t0 = time.perf_counter()
        with torch.no_grad():
          vl = driver.quiet_call(
            driver.evaluate_loss,
            st["args"],
            st["model"],
            st["val_loader"],
            dataset=st["train_loader"].dataset,
          )
        answer({"val_s": time.perf_counter() - t0, "val_loss": float(vl[0])})
      elif c == "eval":
        x = driver.load_points(None, int(cmd["points"]))
        _, secs, t_cache = driver.iwae_points(
          st["args"],
          st["model"],
          st["train_loader"].dataset,
          x,
          int(cmd["S"]),
          int(cmd.get("seed", 0)),
        )
        st["model"].train()
        answer({"sec_per_point": [float(s) for s in secs], "bank_s": float(t_cache)})
      elif c == "matmul":
        n, reps = int(cmd.get("n", 2048)), int(cmd.get("reps", 3))
        if cmd.get("threads"):
          torch.set_num_threads(int(cmd["threads"]))
        a = torch.randn(n, n)
        torch.mm(a, a)
        best = float("inf")
        for _ in range(reps):
          t0 = time.perf_counter()
          torch.mm(a, a)
          best = min(best, time.perf_counter() - t0)
        answer({"gflops": 2.0 * n**3 / best / 1e9, "threads": torch.get_num_threads()})
      else:
        answer({"error": f"unknown command {c!r}"})
    except Exception as e:  # report, keep serving: the parent decides
      import traceback

      answer({"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()})


if __name__ == "__main__":
  main()
