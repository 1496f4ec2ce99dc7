"""The base ConfigDict every ``configs/*.py`` starts from (every key a run reads).

Configs are locked: ``--config.some_typo=1`` fails with an error naming the
unknown key instead of being ignored.
"""

import ml_collections


def base_config() -> ml_collections.ConfigDict:
  """Paper defaults (MNIST-style VAE, exemplar prior, AdamNormGrad, batch 100)."""
  c = ml_collections.ConfigDict()
  # Data.
  c.dataset = (
    "fashion_mnist"  # mnist | fashion_mnist | digits | omniglot | npz:PATH | MODULE:FUNCTION
  )
  c.data_dir = ""  # '' = defaults (tfds ~/tensorflow_datasets; Debian Fashion-MNIST)
  c.data_source = "auto"  # auto | idx | tfds | sklearn | mat
  c.val_size = (
    0  # >0: last val_size training images are validation (0: data-set default, 10000 for MNIST)
  )
  c.max_train = 0  # >0: truncate the training split (tiny runs)
  c.max_test = 0  # >0: truncate validation and test splits
  c.eval_binarize_seed = 0  # fixed binarisation of validation/test images
  # Whose fixed draw binarises them: "exvae" (seeded by eval_binarize_seed) or "reference"
  # (mnist, fashion_mnist: the authors' np.random.seed(777) draw, the images the paper scored).
  c.eval_binarize = "exvae"
  # Model.
  c.model = "vae"  # vae | hvae | convhvae | pixelcnn (see exvae/models)
  c.latent_dim = 40  # d of the prior's latent (z2 for hvae / convhvae)
  c.hidden = (300, 300)
  c.likelihood = "bernoulli"  # bernoulli | logistic (discretised, 256 levels)
  c.matmul_dtype = "float32"  # float32 | bfloat16: operand dtype of the networks' matrix
  # products, float32 accumulation (vae, hvae only; parameters,
  # prior kernel and losses stay float32)
  c.hvae = ml_collections.ConfigDict(
    dict(
      z1_dim=40,  # size of the lower latent z1 (hvae, convhvae)
      conv_channels=(32, 32, 64, 64, 6),  # convhvae encoder gated convs
      dec_channels=(64, 64, 64, 64),
    )
  )  # convhvae decoder 3x3 gated convs
  c.pixelcnn = ml_collections.ConfigDict(
    dict(
      channels=64,  # F: feature maps of the vertical/horizontal stacks and of cond(z)
      num_layers=6,  # gated residual layers (mask 'B') after the mask-'A' input layer
      kernel_size=5,
    )
  )  # odd k: vertical convs (k//2+1) x k, horizontal 1 x (k//2+1)
  # Prior.
  c.prior = "exemplar"  # gaussian | vampprior | exemplar (see exvae/priors)
  # Keyword arguments of a plug-in prior's / model's constructor (free keys:
  # --config.prior_options.k=5); a built-in prior or model takes none.
  c.prior_options = ml_collections.ConfigDict()
  c.model_options = ml_collections.ConfigDict()
  c.exemplar = ml_collections.ConfigDict(
    dict(
      num_exemplars=25000,  # M random exemplars per batch (<= 0: all)
      rat=False,  # retrieval augmented training
      rat_k=10,  # neighbours per batch element for RAT
      rat_mode="reference",  # reference (the authors' RAT) | bound (1/(N-1) lower bound)
      binarize_exemplars=False,  # False: exemplars encoded from grey levels (reference);
      # True: binarised like the data point
      loo=True,  # leave-one-out in training
      chunk_size=0,  # bank chunk of the streamed kernel (0: auto, ~2M / batch)
      encode_chunk=1000,  # exemplars encoded per chunk (exact mode)
      rat_compact=False,  # RAT: True encodes only the distinct exemplars of the B*k
      # union (moved to the front, in chunks of rat_compact_chunk;
      # chunks past the last distinct one are skipped); False: all
      # B*k rows in one product (faster once the union is ~97%
      # distinct, from about step 250 on: docs/speed.md)
      rat_compact_chunk=125,  # RAT: rows per chunk of that encoding (the skip granularity)
      encode_remat_mb=1024.0,  # recompute the exemplar forward in the backward pass only
      # when keeping its activations would exceed this many MiB
      # (MLP VAE, M = 25000: ~540 MB, kept; 0: always; <0: never)
      log_var_init_mean=0.0,  # log s2 = mean + std * N(0, 1), as the reference
      log_var_init_std=1.0,
    )
  )
  # Pseudo-inputs start as the reference's do: its constructor draws N(0.05, 0.01), then its
  # He initialiser overwrites every nn.Linear, the pseudo-input layer (in_features = K)
  # included, with N(0, 2 / K). About half start below 0, where the hardtanh passes no
  # gradient, and stay there. init="normal" draws N(init_mean, init_std) instead (the
  # VampPrior paper's code).
  c.vampprior = ml_collections.ConfigDict(
    dict(num_pseudo=500, init="he", init_mean=0.05, init_std=0.01)
  )
  # Optimisation.
  c.optimizer = "adamnormgrad"  # adamnormgrad | adam
  c.learning_rate = 5e-4
  c.batch_size = 100
  c.num_epochs = 2000
  c.max_steps = 0  # >0: stop after this many steps in total
  c.warmup_epochs = 100  # KL warm-up: beta = min(1, epoch / warmup)
  # Training objective (docs/objectives.md): "elbo" (the paper's, one sample) or "iwae" (the
  # importance-weighted bound with objective_samples samples per image; validation is then
  # that bound at the same k). gradient_estimator: "reparam" or "dreg" (doubly reparameterised
  # gradients for the encoder, iwae only).
  c.objective = "elbo"
  c.objective_samples = 1
  c.gradient_estimator = "reparam"
  c.early_stopping_patience = 50  # epochs without validation improvement (after warm-up)
  c.seed = 0
  c.num_devices = 0  # data-parallel devices (0: all visible; 1: no mesh)
  c.pool_sharding = "auto"  # auto | replicated | sharded: training images split along N
  # over the devices (auto: sharded when several hosts)
  # Bookkeeping.
  c.checkpoint_every_steps = 500
  c.keep_checkpoints = 3
  c.log_every_steps = 50
  c.val_every_epochs = 1
  c.num_picture_samples = 64
  c.progress = True  # progress bars (also off without a terminal, or with CI set)
  c.tensorboard = True  # TensorBoard event files in the workdir (exvae/writers.py)
  # Evaluation (eval.py).
  c.eval = ml_collections.ConfigDict(
    dict(
      num_importance_samples=5000,  # S per test point
      max_queries=5000,  # latent codes scored per call (memory bound)
      bank_seed=1234,  # binarisation of training images for the evaluation bank
      max_test_examples=0,  # >0: evaluate on the first n test images only
      use_best=True,  # best-on-validation parameters (else the last)
      prune_keep=0,  # >0: certified pruning, sum only the nearest prune_keep exemplars
      prune_tol=1e-3,  # (reporting only) tolerance used for the kernel's num_needed
      # Where eval.py writes eval_metrics.json, per_example.npz and eval_samples.png ("": the
      # workdir). A second evaluation of the same run (e.g. eval_binarize=reference) then
      # keeps the first one's files.
      out_dir="",
      # A finished evaluation in out_dir with the same parameters, test images and
      # settings is returned, not redone (False: always evaluate).
      reuse=True,
      seed=0,
    )
  )
  return c


# The paper's test NLL (nats, mean +- error bar over its runs), Table 1 of
# arXiv 2004.04795, keyed by (dataset, model, prior).  The results table
# (scripts/results_table.py) prints these beside the measured values.
PAPER_NLL = {
  ("mnist", "vae", "gaussian"): (84.45, 0.12),
  ("mnist", "vae", "vampprior"): (82.43, 0.06),
  ("mnist", "vae", "exemplar"): (82.09, 0.18),
  ("mnist", "hvae", "gaussian"): (82.39, 0.11),
  ("mnist", "hvae", "vampprior"): (81.56, 0.09),
  ("mnist", "hvae", "exemplar"): (81.22, 0.05),
  ("mnist", "convhvae", "gaussian"): (80.52, 0.28),
  ("mnist", "convhvae", "vampprior"): (79.67, 0.09),
  ("mnist", "convhvae", "exemplar"): (79.58, 0.07),
  ("mnist", "pixelcnn", "exemplar"): (77.95, 0.01),
  ("fashion_mnist", "vae", "gaussian"): (228.70, 0.15),
  ("fashion_mnist", "vae", "vampprior"): (227.35, 0.05),
  ("fashion_mnist", "vae", "exemplar"): (226.75, 0.07),
  ("fashion_mnist", "hvae", "gaussian"): (227.37, 0.10),
  ("fashion_mnist", "hvae", "vampprior"): (226.72, 0.08),
  ("fashion_mnist", "hvae", "exemplar"): (226.53, 0.09),
  ("fashion_mnist", "convhvae", "gaussian"): (225.38, 0.08),
  ("fashion_mnist", "convhvae", "vampprior"): (224.67, 0.03),
  ("fashion_mnist", "convhvae", "exemplar"): (224.63, 0.06),
  ("fashion_mnist", "pixelcnn", "exemplar"): (223.26, 0.01),
  ("omniglot", "vae", "gaussian"): (108.34, 0.06),
  ("omniglot", "vae", "vampprior"): (106.78, 0.21),
  ("omniglot", "vae", "exemplar"): (105.22, 0.18),
  ("omniglot", "hvae", "gaussian"): (104.92, 0.08),
  ("omniglot", "hvae", "vampprior"): (103.30, 0.43),
  ("omniglot", "hvae", "exemplar"): (102.25, 0.43),
  ("omniglot", "convhvae", "gaussian"): (98.12, 0.17),
  ("omniglot", "convhvae", "vampprior"): (97.30, 0.07),
  ("omniglot", "convhvae", "exemplar"): (96.38, 0.24),
  ("omniglot", "pixelcnn", "exemplar"): (89.28, 0.12),
}

# Exemplar candidates M per step in the paper's configs: half the training set.
_PAPER_NUM_EXEMPLARS = {"mnist": 25000, "fashion_mnist": 25000, "omniglot": 11500}


def paper_config(
  dataset: str, model: str, prior: str, *, rat: bool = False, iwae_samples: int = 0
) -> ml_collections.ConfigDict:
  """The locked config of one row of the paper's tables.

  Every row shares d = 40 (z1 = 40 for the hierarchical models), K = 500
  VampPrior pseudo-inputs, M = half the training set as exemplar candidates
  (25000 for MNIST and Fashion-MNIST, 11500 for Omniglot) and k = 10
  retrieved neighbours under RAT; PixelCNN decoders score 1000 codes per
  evaluation call to bound their activations (~400 MB per 128-channel layer).

  Args:
    dataset: 'mnist', 'fashion_mnist' or 'omniglot'.
    model: 'vae', 'hvae', 'convhvae' or 'pixelcnn'.
    prior: 'gaussian', 'vampprior' or 'exemplar'.
    rat: exemplar prior only: retrieval augmented training instead of the exact prior.
    iwae_samples: > 0: train the importance-weighted bound with this many
      samples per image and doubly reparameterised gradients (not a paper
      row: the paper trains the ELBO).

  Returns:
    The locked ConfigDict.
  """
  if dataset not in _PAPER_NUM_EXEMPLARS:
    raise ValueError(
      f"No paper config for dataset {dataset!r}; known: {sorted(_PAPER_NUM_EXEMPLARS)}."
    )
  if rat and prior != "exemplar":
    raise ValueError(f"rat=True needs the exemplar prior, got prior={prior!r}.")
  c = base_config()
  c.dataset = dataset
  c.model = model
  c.latent_dim = 40  # z2 for the hierarchical models (the prior's latent)
  c.hvae.z1_dim = 40
  c.prior = prior
  if prior == "vampprior":
    c.vampprior.num_pseudo = 500
  if prior == "exemplar":
    c.exemplar.num_exemplars = _PAPER_NUM_EXEMPLARS[dataset]
    c.exemplar.rat = rat
    if rat:
      c.exemplar.rat_k = 10
  if model == "pixelcnn":
    c.pixelcnn.channels = 64
    c.pixelcnn.num_layers = 6
    c.pixelcnn.kernel_size = 5
    c.eval.max_queries = 1000
  if iwae_samples > 0:
    c.objective = "iwae"
    c.objective_samples = int(iwae_samples)
    c.gradient_estimator = "dreg"
  return finalize(c)


def finalize(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Locks the config so unknown keys are errors (the plug-in option groups stay open)."""
  c.lock()
  for group in ("prior_options", "model_options"):
    if group in c:
      c[group].unlock()
  return c
