"""Priors, models and data sets from the user's own code: ``--config.prior=my_pkg.my_prior:MyPrior``.

A config names a prior (``config.prior``), a model (``config.model``) or a
data set (``config.dataset``, see :mod:`exvae.data.user`)
either by a registered name (``exemplar``, ``hvae``) or by a plug-in spec
``MODULE:ATTR``:

* ``MODULE`` is a dotted module path (``my_pkg.my_prior``), imported from
  ``sys.path`` and, failing that, from the current directory (as
  ``python -m`` would), or a path to a ``.py`` file (``examples/my_prior.py``,
  relative to the current directory);
* ``ATTR`` is the name in that module (dots reach nested attributes).

The spec is imported on demand, registered under the spec itself, and stays
in the run's config (``config.json``), so resuming and ``exvae-eval`` with the
same ``--config.prior=...`` find it again. Nothing in ``exvae/`` is edited.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
from typing import Any


def is_spec(name: str) -> bool:
  """Whether ``name`` is a ``MODULE:ATTR`` plug-in spec (not a registered name)."""
  module, sep, attr = str(name).rpartition(":")
  return bool(sep and module and attr)


def _import_file(path: str):
  path = os.path.abspath(path)
  if not os.path.isfile(path):
    raise ValueError(f"plug-in file {path} does not exist.")
  # One module per file, whatever the spelling of its path: importing twice
  # would run its registrations twice.
  name = "exvae_plugin_" + hashlib.sha1(path.encode()).hexdigest()[:12]
  if name in sys.modules:
    return sys.modules[name]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module
  try:
    spec.loader.exec_module(module)
  except BaseException:
    del sys.modules[name]
    raise
  return module


def _import_module(dotted: str):
  try:
    return importlib.import_module(dotted)
  except ModuleNotFoundError as e:
    top = dotted.split(".")[0]
    if e.name != top or os.getcwd() in sys.path:
      raise
  sys.path.append(os.getcwd())            # console scripts do not put the cwd on sys.path
  return importlib.import_module(dotted)


def load(spec: str, kind: str = "plug-in") -> Any:
  """Imports and returns the object named by ``spec`` (``MODULE:ATTR``).

  Args:
    spec: ``my_pkg.my_prior:MyPrior`` or ``path/to/file.py:MyPrior``.
    kind: what is loaded, for error messages (``'prior'``, ``'model'``).

  Returns:
    The attribute.

  Raises:
    ValueError: a malformed spec, a module that cannot be found, or a
      missing attribute (the message says which and where it looked);
      :class:`exvae.errors.SourceSyntaxError` for a module that does not compile.
  """
  module_path, _, attr = str(spec).rpartition(":")
  if not (module_path and attr):
    raise ValueError(f"{kind} plug-in {spec!r}: expected MODULE:ATTR, e.g. my_pkg.my_prior:MyPrior.")
  try:
    if module_path.endswith(".py") or os.sep in module_path or "/" in module_path:
      module = _import_file(module_path)
    else:
      module = _import_module(module_path)
  except ModuleNotFoundError as e:
    raise ValueError(f"{kind} plug-in {spec!r}: cannot import {module_path!r} ({e}); put its "
                     f"directory on PYTHONPATH, run from it, or give a file path "
                     f"(path/to/{module_path.split('.')[-1]}.py:{attr}).") from e
  except SyntaxError as e:                # the plug-in's own mistake, in one line
    from exvae import errors
    raise errors.source_syntax_error(e, f"{kind} plug-in {spec!r}") from None
  obj = module
  for part in attr.split("."):
    if not hasattr(obj, part):
      raise ValueError(f"{kind} plug-in {spec!r}: {module_path} has no attribute {attr!r}.")
    obj = getattr(obj, part)
  return obj


# ----------------------------------------------------------------------------
# Constructor options and the start-up check of a plug-in prior
# ----------------------------------------------------------------------------

# The methods a prior must implement (the base class's raise NotImplementedError),
# with the shape each returns.
REQUIRED_PRIOR_METHODS = {"log_prob": "(B,)", "sample": "(n, d)"}


class PluginError(ValueError):
  """A plug-in that cannot work: a missing method, a wrong shape or unusable options."""


def options(config, group: str) -> dict[str, Any]:
  """``config.<group>`` (``prior_options`` / ``model_options``) as a plain dict ({} if absent)."""
  if config is None or not hasattr(config, "get"):
    return {}
  opts = config.get(group)
  if opts is None:
    return {}
  return opts.to_dict() if hasattr(opts, "to_dict") else dict(opts)


def construct(factory: Any, spec: str, kind: str, *args: Any, opts: dict[str, Any]) -> Any:
  """``factory(*args, **opts)``: a plug-in built with its options from the config.

  Args:
    factory: the plug-in's class or function.
    spec: its ``MODULE:ATTR`` spec (for messages).
    kind: ``'prior'`` or ``'model'`` (the options group is ``<kind>_options``).
    *args: the positional arguments (the config; the image shape for a model).
    opts: the keyword arguments (``config.<kind>_options``).

  Returns:
    What ``factory`` returns.

  Raises:
    PluginError: the factory does not take these options.
  """
  check_options(factory, spec, kind, *args, opts=opts)
  return factory(*args, **opts)


def check_options(factory: Any, spec: str, kind: str, *args: Any, opts: dict[str, Any]) -> None:
  """``factory`` takes ``opts`` (by name, and by type where its signature says one).

  Args: as :func:`construct` (``args`` only count; their values are not looked at).

  Raises:
    PluginError: an option the factory does not take, or of another type than its
      argument's annotation or default, naming the option.
  """
  import inspect
  if not opts:
    return
  try:
    sig = inspect.signature(factory)
    sig.bind(*args, **opts)
  except TypeError as e:
    raise PluginError(f"{kind} plug-in {spec!r} does not take {kind}_options "
                      f"{sorted(opts)} ({e}); its constructor's keyword arguments are "
                      f"set with --config.{kind}_options.NAME=VALUE.") from None
  except ValueError:                     # no signature (a builtin): let the call say
    return
  _check_option_types(factory, sig, spec, kind, opts)


_SCALARS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _option_type(factory: Any, param: Any) -> type | None:
  """The scalar type a constructor argument takes: its annotation, else its default's type."""
  import typing
  ann = param.annotation
  if isinstance(ann, str):                 # `from __future__ import annotations`
    try:
      ann = typing.get_type_hints(getattr(factory, "__init__", factory)).get(param.name, ann)
    except Exception:  # noqa: BLE001  (an annotation that does not resolve: use the default)
      ann = None
  if ann in _SCALARS:
    return ann
  default = param.default
  if default is not param.empty and type(default) in _SCALARS:
    return type(default)
  return None


def _check_option_types(factory: Any, sig: Any, spec: str, kind: str,
                        opts: dict[str, Any]) -> None:
  """Each option has the scalar type its constructor argument declares (or defaults to).

  Raises:
    PluginError: naming the option, its value and the type it needs.
  """
  for name, value in opts.items():
    param = sig.parameters.get(name)
    want = None if param is None else _option_type(factory, param)
    if want is None:
      continue
    ok = (isinstance(value, want) and not (want is int and isinstance(value, bool))
          or want is float and isinstance(value, int) and not isinstance(value, bool))
    if not ok:
      default = "" if param.default is param.empty else f" (default {param.default!r})"
      raise PluginError(f"--config.{kind}_options.{name}={value!r}: {kind} plug-in {spec!r} "
                        f"takes {_SCALARS[want]} for {name}{default}.")


def check_prior_class(cls: type, spec: str) -> None:
  """The prior class implements every method of :data:`REQUIRED_PRIOR_METHODS`.

  Raises:
    PluginError: naming the first method left to the base class.
  """
  from exvae.priors.base import Prior
  for name, shape in REQUIRED_PRIOR_METHODS.items():
    if getattr(cls, name, None) is getattr(Prior, name):
      raise PluginError(f"prior plug-in {spec!r}: {cls.__name__} does not implement {name}() "
                        f"(it must return {shape}); see examples/learned_gaussian.py.")


def check_prior_shapes(prior: Any, model: Any, num_train: int, spec: str,
                       batch: int = 3, n: int = 5) -> None:
  """One traced call (``jax.eval_shape``, no computation) of the prior's methods on dummy inputs.

  Checks ``init``, ``init_state``, ``context``, ``log_prob`` (must return
  ``(B,)``) and ``sample`` (must return ``(n, d)``), with ``d`` the model's
  latent size, before any training step runs.

  Args:
    prior: the prior object.
    model: the :class:`exvae.models.Model` it serves.
    num_train: N, the training set size.
    spec: the prior's name (for messages).
    batch: B of the dummy batch.
    n: the number of dummy samples.

  Raises:
    PluginError: naming the method, the shape it returned and the one expected,
      or the error its trace raised.
  """
  import jax
  import jax.numpy as jnp

  from exvae.priors.base import ContextInputs
  d = int(model.latent_dim)
  h, w, c = (int(s) for s in model.image_shape)
  pool_n = min(int(num_train), 2 * batch)

  def traced(key):
    k1, k2, k3, k4 = jax.random.split(key, 4)
    model_params = model.init(k1)
    params = prior.init(k2, model, num_train)
    state = prior.init_state(model, num_train)
    inputs = ContextInputs(x=jnp.zeros((batch, h, w, c)), ids=jnp.arange(batch, dtype=jnp.int32),
                           mu=jnp.zeros((batch, d)), key=k3,
                           pool=jnp.zeros((pool_n, h, w, c)), pool_size=pool_n)
    ctx, _ = prior.context(params, state, model, model_params, inputs, True)
    z = jnp.zeros((batch, d))
    out = {}
    for name, call in (("log_prob", lambda: prior.log_prob(params, z, ctx, inputs.ids)),
                       ("sample", lambda: prior.sample(params, k4, n, ctx))):
      try:
        out[name] = call()
      except NotImplementedError:
        raise PluginError(f"prior plug-in {spec!r}: {type(prior).__name__}.{name}() raises "
                          f"NotImplementedError; it must return "
                          f"{REQUIRED_PRIOR_METHODS[name]}.") from None
    return out

  try:
    shapes = jax.eval_shape(traced, jax.random.PRNGKey(0))
  except PluginError:
    raise
  except Exception as e:  # noqa: BLE001  (the plug-in's own error, in one line)
    raise PluginError(f"prior plug-in {spec!r} fails on a dummy batch (B={batch}, d={d}): "
                      f"{type(e).__name__}: {' '.join(str(e).split())}") from e
  want = {"log_prob": (batch,), "sample": (n, d)}
  for name, shape in want.items():
    got = getattr(shapes[name], "shape", None)
    if tuple(got or ()) != shape or got is None:
      expected = REQUIRED_PRIOR_METHODS[name]
      raise PluginError(f"prior plug-in {spec!r}: {type(prior).__name__}.{name}() returns shape "
                        f"{tuple(got) if got is not None else type(shapes[name]).__name__}, "
                        f"expected {expected} = {shape} (B={batch}, n={n}, d={d}).")
  check_prior_finite(prior, model, num_train, spec, batch=batch)


def check_prior_finite(prior: Any, model: Any, num_train: int, spec: str, batch: int = 3) -> None:
  """One concrete call: ``log_prob`` at the initial parameters is finite.

  Evaluated (outside any training, with its own key) at ``z = 0`` and at ``batch`` of the
  prior's own samples, with the dummy context of :func:`check_prior_shapes`. A density
  that is not finite there (a log of 0 or of a negative number, a variance of 0) would
  stop training at its first step with a non-finite loss.

  Raises:
    PluginError: naming the prior, where ``log_prob`` is not finite and its values.
  """
  import jax
  import jax.numpy as jnp
  import numpy as np

  from exvae.priors.base import ContextInputs
  d = int(model.latent_dim)
  h, w, c = (int(s) for s in model.image_shape)
  pool_n = min(int(num_train), 2 * batch)
  k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(0), 4)
  params = prior.init(k2, model, num_train)
  inputs = ContextInputs(x=jnp.zeros((batch, h, w, c)), ids=jnp.arange(batch, dtype=jnp.int32),
                         mu=jnp.zeros((batch, d)), key=k3,
                         pool=jnp.zeros((pool_n, h, w, c)), pool_size=pool_n)
  ctx, _ = prior.context(params, prior.init_state(model, num_train), model, model.init(k1),
                         inputs, True)
  for where, z in (("z = 0", jnp.zeros((batch, d))),
                   ("its own samples", prior.sample(params, k4, batch, ctx))):
    lp = np.asarray(prior.log_prob(params, jnp.asarray(z), ctx, inputs.ids))
    if not np.all(np.isfinite(lp)):
      raise PluginError(f"prior plug-in {spec!r}: {type(prior).__name__}.log_prob() is not "
                        f"finite at its initial parameters ({where}: {lp.tolist()}); a log-density "
                        "must be finite (a log of 0 or of a negative number?).")


def check_dataset(name: str) -> None:
  """A user's data set named by ``config.dataset``, checked before any work starts.

  ``npz:PATH``: the file exists.  ``MODULE:FUNCTION``: it imports and is
  callable (it is called, and its arrays checked, when the data is loaded).

  Raises:
    DataNotFoundError, DataFormatError, PluginError, ValueError: in one line.
  """
  from exvae.data import user
  if user.is_npz(name):
    user.check_npz_exists(user.npz_path(name))
  elif is_spec(name):
    fn = load(name, "data set")
    if not callable(fn):
      raise PluginError(f"data set plug-in {name!r} is a {type(fn).__name__}, not a function "
                        "returning a dict of arrays (x_train, x_test, ...).")


def check_config_plugins(config) -> None:
  """What can be checked of ``config``'s plug-ins before any data is loaded.

  A plug-in prior is imported and its class checked (:func:`check_prior_class`), a
  plug-in's options checked against its signature (:func:`check_options`);
  ``prior_options`` / ``model_options`` must be empty for a built-in prior / model;
  a user's data set is found (:func:`check_dataset`).

  Raises:
    PluginError, ValueError: naming the plug-in and what is wrong.
  """
  check_dataset(str(config.get("dataset", "")))
  for kind in ("prior", "model"):
    name = str(config.get(kind, ""))
    opts = options(config, f"{kind}_options")
    if not is_spec(name):
      if opts:
        raise PluginError(f"{kind}_options {sorted(opts)} are for a plug-in {kind} "
                          f"(--config.{kind}=MODULE:ATTR); the built-in {kind} {name!r} takes "
                          f"its settings from its own config keys.")
      continue
    if kind == "prior":
      from exvae import priors
      cls = load(name, "prior")
      if isinstance(cls, type) and issubclass(cls, priors.Prior):
        check_prior_class(cls, name)
      check_options(cls, name, "prior", config, opts=opts)
    else:
      check_options(load(name, "model"), name, "model", config, None, opts=opts)
