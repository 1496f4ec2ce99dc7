"""What every exvae command shares: ``--config`` and its overrides, ``--help``, one-line errors.

A command (:class:`Spec` plus a ``main(inv)``) is run by :func:`run`:

1. ``--help`` / ``-h`` prints the command's own flags and the config's
   top-level keys and exits 0; ``--version`` prints the version and exits 0.
2. ``--config=VALUE`` (a shipped name, a ``.py`` file or a ``.json`` file such
   as a run's ``config.json``) and the ``--config.KEY=VALUE`` overrides are
   taken out of the command line here, so a misspelt key is reported with
   "did you mean"; the other flags are parsed by absl.
3. Without ``--config``, a command that works on a run (eval, uses, and
   train on a workdir that already holds a run) reads ``<workdir>/config.json``
   as JSON; overrides apply on top (and are checked against the run's config
   by the usual drift rules, :mod:`exvae.rundir`).
4. ``--print_config`` prints the resolved config as JSON and exits 0.
5. ``main(inv)`` runs; every expected error ends the command with one line on
   stderr (:mod:`exvae.cli.exits`).

Heavy imports (JAX) happen inside ``main``, so help and usage errors are quick.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Any, Callable, Sequence

from absl import flags
from absl import logging  # also defines --verbosity

from exvae.cli import exits

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "The run directory (checkpoints/, config.json, logs).")
flags.DEFINE_bool("print_config", False, "Print the resolved config (JSON) and exit.")
flags.DEFINE_bool("version", False, "Print the exvae version and exit.")

HELP_ARGS = ("-h", "--help", "-help", "--helpshort", "-?")
_SHARED = ("workdir", "print_config", "version", "verbosity")


@dataclasses.dataclass(frozen=True)
class Spec:
  """A command's command line.

  Attributes:
    name: ``train``; the program is ``exvae-<name>``.
    module: the module defining the command's own absl flags (listed by ``--help``).
    summary: one paragraph said by ``--help``.
    usage: the synopsis (``exvae-eval [--config=...] --workdir=DIR ...``).
    config: ``'required'`` (train: unless the workdir holds a run),
      ``'from_run'`` (eval, uses: the run's config.json by default) or ``'none'``.
    positional: ``(min, max)`` positional arguments (None: no upper bound).
    positional_help: what the positional arguments are, for error messages.
  """

  name: str
  module: str
  summary: str
  usage: str
  config: str = "from_run"
  positional: tuple[int, int | None] = (0, 0)
  positional_help: str = ""

  @property
  def prog(self) -> str:
    return f"exvae-{self.name}"


@dataclasses.dataclass
class Invocation:
  """What ``main`` gets: the resolved config, the workdir and the positional arguments."""

  prog: str
  config: Any
  workdir: str | None
  args: list[str]
  config_source: str | None


def version() -> str:
  """The installed exvae version (the package's ``__version__`` in a checkout)."""
  try:
    from importlib import metadata

    return metadata.version("exvae")
  except Exception:  # noqa: BLE001  (a checkout that is not installed)
    import exvae

    return exvae.__version__


def split_argv(args: Sequence[str]) -> tuple[str | None, list[tuple[str, str]], list[str]]:
  """Takes ``--config`` and ``--config.KEY=VALUE`` out of ``args``.

  Returns:
    ``(config value or None, [(dotted key, text)], the remaining args)``.

  Raises:
    UsageError: ``--config`` or an override without a value.
  """
  value, overrides, rest = None, [], []
  args = list(args)
  i = 0
  while i < len(args):
    a = args[i]
    if a == "--":
      rest.extend(args[i:])
      break
    if a in ("--config", "-config") or a.startswith(("--config=", "-config=")):
      if "=" in a:
        value = a.split("=", 1)[1]
      elif i + 1 < len(args):
        i += 1
        value = args[i]
      else:
        raise exits.UsageError("--config needs a value: a config name, a .py or a .json file.")
      if not value:
        raise exits.UsageError("--config needs a value: a config name, a .py or a .json file.")
    elif a.startswith(("--config.", "-config.")):
      key, sep, text = a.lstrip("-")[len("config.") :].partition("=")
      if not sep:
        if i + 1 < len(args) and not args[i + 1].startswith("-"):
          i += 1
          text = args[i]
        else:
          raise exits.UsageError(f"{a}: give a value, e.g. {a}=VALUE.")
      if not key:
        raise exits.UsageError(f"{a}: give a key, e.g. --config.num_epochs=10.")
      overrides.append((key, text))
    else:
      rest.append(a)
    i += 1
  return value, overrides, rest


def _parse_flags(prog: str, rest: list[str]) -> list[str]:
  """absl-parses ``rest``; returns the positional arguments."""
  try:
    return FLAGS([prog] + rest)[1:]
  except flags.Error as e:
    msg = " ".join(str(e).split())
    if isinstance(e, flags.UnrecognizedFlagError) and "config" in str(e.flagname):
      msg += " (config keys are set as --config.KEY=VALUE)"
    raise exits.UsageError(msg) from None


def _run_config(workdir: str | None) -> str | None:
  if workdir and os.path.isfile(os.path.join(workdir, "config.json")):
    return os.path.join(workdir, "config.json")
  return None


def resolve_config(
  spec: Spec, value: str | None, overrides: list[tuple[str, str]], workdir: str | None
):
  """The config of this invocation and where it came from.

  Returns:
    ``(config or None, source)``.

  Raises:
    UsageError, config_registry.ConfigNameError: see the module docstring.
  """
  from exvae import config_registry

  if spec.config == "none":
    if value or overrides:
      raise exits.UsageError(f"{spec.prog} takes no --config.")
    return None, None
  if value is None:
    source = _run_config(workdir)
    if source is None:
      if workdir is None:
        raise exits.UsageError(
          f"give --config=NAME (a shipped config, a .py or a .json file) "
          f"or --workdir=DIR of a trained run; `{spec.prog} --help`."
        )
      if spec.config == "required":
        raise exits.UsageError(
          f"{workdir} holds no run (no config.json): give --config=NAME to start one there "
          f"(`exvae configs` lists the names)."
        )
      return None, None  # the reader reports the missing run (exit 1)
    try:
      config = config_registry.from_json(source)
    except config_registry.ConfigNameError as e:  # the run's file, not a flag: exit 1
      why = str(e).split(": ", 1)[-1].rstrip(".")
      raise exits.RunConfigError(
        f"{source}, the config of the run in {workdir}, cannot be used ({why}): restore "
        "it from a copy, or give the run's config with --config=NAME|FILE."
      ) from None
  else:
    source = value
    config = config_registry.load(value)
  config_registry.apply_overrides(config, overrides)
  _absolute_data_path(config)
  return config, source


def _absolute_data_path(config) -> None:
  """``--config.dataset=npz:PATH`` with a relative PATH: made absolute (from the current
  directory), so the run's config.json names the file wherever a later command runs."""
  name = str(config.get("dataset", "")) if hasattr(config, "get") else ""
  if name.startswith("npz:") and len(name) > 4:
    absolute = "npz:" + os.path.abspath(os.path.expanduser(name[4:]))
    if absolute != name:
      config.dataset = absolute  # an existing key: allowed on a locked config


def _check_workdir(spec: Spec, workdir: str | None) -> None:
  if workdir is None:
    raise exits.UsageError(f"--workdir=DIR is required (the run directory); `{spec.prog} --help`.")
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise exits.UsageError(
      f"--workdir={workdir} is a file, not a directory: give the run "
      "directory (it holds checkpoints/ and config.json)."
    )


def format_help(spec: Spec, config=None) -> str:
  """``--help``: summary, usage, the command's flags, the config's top-level keys."""
  lines = [f"{spec.prog}: {spec.summary}", "", f"usage: {spec.usage}", "", "flags:"]
  if spec.config != "none":
    how = "a shipped config's name (`exvae configs`), a .py file, or a run's config.json" + (
      "; default: <workdir>/config.json"
      if spec.config == "from_run"
      else "; default on a workdir that holds a run: its config.json"
    )
    lines.append(f"  --config: {how}.")
    lines.append("  --config.KEY=VALUE: override a config key (groups: --config.eval.seed=1).")
  mine = [f for f in FLAGS.get_flags_for_module(sys.modules[spec.module])]
  shared = [
    FLAGS[n]
    for n in _SHARED
    if n in FLAGS
    and (n != "workdir" or spec.config != "none")
    and (n != "print_config" or spec.config != "none")
  ]
  for f in mine + shared:
    if f.name == "verbosity":
      lines.append(
        "  --verbosity: 1 shows INFO logs, and the traceback of an expected error "
        "(as EXVAE_TRACEBACK=1 does)."
      )
      continue
    default = "" if f.default in (None, "", False) else f" (default: {f.default_as_str})"
    lines.append(f"  --{f.name}: {' '.join(f.help.split())}{default}")
  lines.append("  --help: this text; --helpfull: every flag of every library.")
  if config is not None:
    lines += ["", "config keys (--config.KEY=VALUE):"]
    for k in config.keys():
      v = config[k]
      if hasattr(v, "items"):
        sub = ", ".join(v.keys()) or "free keys: a plug-in's constructor options"
        lines.append(f"  {k}.{{{sub}}}")
      else:
        lines.append(f"  {k} = {v!r}")
  return "\n".join(lines)


def run(spec: Spec, main: Callable[[Invocation], Any], argv: Sequence[str] | None = None) -> None:
  """Runs a command (see the module docstring); ends the process on errors and for ``--help``.

  Once the command has finished or said why it stopped, SIGINT and SIGTERM are
  ignored (:func:`exvae.cli.exits.settle`): the process is ending, and its exit
  code is the one the command decided.

  Args:
    spec: the command's description.
    main: called with the :class:`Invocation`.
    argv: the command line, ``argv[0]`` the program (default ``sys.argv``).
  """
  argv = list(sys.argv if argv is None else argv)
  prog = spec.prog
  exits.keep_interrupts()  # a Ctrl-C caught by a gc callback is delivered again
  exits.one_line_warnings()
  try:
    args = argv[1:]
    if "--version" in args:
      print(f"exvae {version()}")
      sys.exit(0)
    value, overrides, rest = split_argv(args)
    if any(a in HELP_ARGS for a in args) or "--helpfull" in args:
      _print_help(spec, value, rest, full="--helpfull" in args)
      sys.exit(0)
    positional = _parse_flags(prog, rest)
    logging.use_absl_handler()
    if not FLAGS["verbosity"].present:  # keep Orbax's INFO chatter out of the terminal
      logging.set_verbosity(logging.WARNING)
    lo, hi = spec.positional
    if len(positional) < lo or (hi is not None and len(positional) > hi):
      what = spec.positional_help or "no positional arguments"
      got = " ".join(positional) or "none"
      raise exits.UsageError(f"expected {what}; got {got}. `{prog} --help`.")
    workdir = FLAGS.workdir if spec.config != "none" else None
    if workdir is not None and os.path.exists(workdir) and not os.path.isdir(workdir):
      _check_workdir(spec, workdir)
    config, source = resolve_config(spec, value, overrides, workdir)
    if FLAGS.print_config:
      from exvae import rundir

      if config is None:  # a reader on a workdir without a run, and no --config
        raise exits.missing_run(workdir)
      print(json.dumps(rundir.config_dict(config), indent=2))
      sys.exit(0)
    if spec.config != "none":
      _check_workdir(spec, workdir)
    main(
      Invocation(prog=prog, config=config, workdir=workdir, args=positional, config_source=source)
    )
    exits.settle()  # done: a late Ctrl-C must not cut the teardown into exit -2
    exits.drain()  # no computation outlives the interpreter
  except (Exception, KeyboardInterrupt) as e:  # noqa: BLE001
    exits.fail(prog, e)


def _print_help(spec: Spec, value: str | None, rest: list[str], full: bool) -> None:
  config = None
  if spec.config != "none":
    from exvae import config_base, config_registry

    try:
      workdir = next((a.split("=", 1)[1] for a in rest if a.startswith("--workdir=")), None)
      if value:
        config = config_registry.load(value)
      elif _run_config(workdir):
        config = config_registry.from_json(_run_config(workdir))
      else:
        config = config_base.finalize(config_base.base_config())
    except Exception:  # noqa: BLE001  (help never fails; the keys of the base config)
      config = config_base.finalize(config_base.base_config())
  print(format_help(spec, config))
  if full:
    print("\n" + FLAGS.get_help())
