"""The authors' side of tests/test_hvae_fidelity.py::test_against_the_authors_code.

Run by the reference's Python (``$EXVAE_REF_PYTHON``, with torch) on a ``.npz``
written by the test: builds THEIR ``models/HVAE_2level.VAE`` (checked out in
``$EXVAE_REF_SRC``, unmodified), loads exvae's weights into it, replays exvae's
draws (``reparameterize`` and ``torch.randint`` patched to return them) and
writes, as JSON, their training loss, gradients (one array per exvae
parameter path) and per-sample IWAE log-weights.

  $EXVAE_REF_PYTHON tests/ref_hvae_torch.py IN.npz OUT.npz
"""

import os
import sys

SRC = os.environ["EXVAE_REF_SRC"]
SHIM = os.path.join(
  os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "reference", "shim"
)
sys.path[:0] = [os.environ.get("EXVAE_REF_SHIM", SHIM), SRC]

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.utils.data as du  # noqa: E402

torch.set_num_threads(1)
import density_estimation as de  # noqa: E402  (their flags; __main__-guarded)
from utils.evaluation import load_all_pseudo_input  # noqa: E402
from utils.utils import importing_model  # noqa: E402

# exvae path -> their module name.
GATED = {
  "q_z2_0": "q_z_layers.0",
  "q_z2_1": "q_z_layers.1",
  "q_z1_x": "q_z1_layers_x.0",
  "q_z1_z2": "q_z1_layers_z2.0",
  "q_z1_joint": "q_z1_layers_joint.0",
  "p_z1_0": "p_z1_layers_z2.0",
  "p_z1_1": "p_z1_layers_z2.1",
  "p_x_z1": "p_x_layers_z1.0",
  "p_x_z2": "p_x_layers_z2.0",
  "p_x_joint": "p_x_layers_joint.0",
}
DENSE = {
  "q_z2_head/mu": "q_z_mean",
  "q_z2_head/logvar": "q_z_logvar.linear",
  "q_z1_head/mu": "q_z1_mean",
  "q_z1_head/logvar": "q_z1_logvar.linear",
  "p_z1_head/mu": "p_z1_mean",
  "p_z1_head/logvar": "p_z1_logvar.linear",
  "p_x_head/out": "p_x_mean.linear",
}
PRIORS = {"gaussian": "standard", "vampprior": "vampprior", "exemplar": "exemplar_prior"}


def names():
  """exvae leaf path -> their state_dict key (weights are transposed)."""
  out = {}
  pairs = [(f"model/{e}/{h}", f"{r}.{h}") for e, r in GATED.items() for h in ("h", "g")]
  pairs += [(f"model/{e}", r) for e, r in DENSE.items()]
  for e, r in pairs:
    out[e + "/kernel"], out[e + "/bias"] = r + ".weight", r + ".bias"
  out["prior/pseudo_inputs"] = "means.linear.weight"
  out["prior/log_var"] = "prior_log_variance"
  return out


def main():
  src, dst = sys.argv[1:3]
  z = np.load(src)
  prior, rat = str(z["prior"]), bool(z["rat"])
  n, m, k = int(z["N"]), int(z["M"]), int(z["K"])
  args = de.parser.parse_args(
    [
      "--model_name",
      "hvae_2level",
      "--prior",
      PRIORS[prior],
      "--number_components",
      str(k if prior == "vampprior" else m),
      "--approximate_prior",
      str(rat),
      "--approximate_k",
      str(int(z["rat_k"])),
      "--hidden_size",
      str(int(z["hidden"])),
      "--z1_size",
      str(int(z["z1"])),
      "--z2_size",
      str(int(z["z2"])),
    ]
  )
  args.device, args.input_type, args.dynamic_binarization = "cpu", "binary", True
  args.input_size, args.training_set_size = [int(s) for s in z["input_size"]], n
  args.pseudoinputs_mean, args.pseudoinputs_std = 0.05, 0.01
  model = importing_model(args)(args)
  sd = model.state_dict()
  state = {}
  for ex, ref in names().items():
    if ref not in sd:
      continue
    a = z["params/" + ex]
    if ex == "prior/pseudo_inputs":
      a = a.reshape(a.shape[0], -1).T
    elif ex.endswith("/kernel"):
      a = a.T
    state[ref] = torch.from_numpy(np.ascontiguousarray(a, np.float32).reshape(sd[ref].shape))
  assert set(state) == set(sd), sorted(set(state) ^ set(sd))
  model.load_state_dict(state)
  queue = []
  model.reparameterize = lambda mu, logvar: mu + torch.exp(0.5 * logvar) * queue.pop(0)
  cand = torch.from_numpy(z["cand"].astype(np.int64))
  randint = torch.randint
  torch.randint = lambda *a, **kw: cand.clone()
  pool = torch.from_numpy(z["pool"])
  ds = du.TensorDataset(pool, torch.arange(n).reshape(-1, 1), torch.zeros(n))
  model.train()
  cache = None
  if rat:
    with torch.no_grad():
      cache = model.cache_z(ds)
  queue[:] = [torch.from_numpy(z["eps2"]), torch.from_numpy(z["eps1"])]
  x = torch.from_numpy(z["x"])
  ids = torch.from_numpy(z["ids"].astype(np.int64)).reshape(-1, 1)
  loss, re, kl = model.calculate_loss(
    (x, ids), float(z["beta"]), average=True, dataset=ds, cache=cache
  )
  loss.backward()
  torch.randint = randint
  out = {"loss": loss.item(), "re": re.item(), "kl": kl.item()}
  params = dict(model.named_parameters())
  for ex, ref in names().items():
    if ref in params:
      g = params[ref].grad.numpy()
      out["grads/" + ex] = g.T if g.ndim == 2 else g
  model.eval()
  with torch.no_grad():
    emb = load_all_pseudo_input(args, model, ds)
    xt, te2, te1 = (torch.from_numpy(z[k_]) for k_ in ("xt", "te2", "te1"))
    s = te2.shape[1]
    log_w = []
    for b in range(xt.shape[0]):
      queue[:] = [te2[b], te1[b]]
      prob, _, _ = model.calculate_loss(
        (xt[b : b + 1].expand(s, -1), None), exemplars_embedding=emb
      )
      log_w.append(-prob.numpy())
  out["log_w"] = np.stack(log_w)
  np.savez(dst, **out)


if __name__ == "__main__":
  main()
