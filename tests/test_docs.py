"""README.md and docs/ describe the product: no history, short README, links that resolve."""

import glob
import os
import re

import pytest

from conftest import ROOT

# Phrases that tell the project's history instead of describing the product.
HISTORY = [
  (r"\bsessions?\s+\d+", "a work session"),
  (r"\bthis\s+session\b", "a work session"),
  (r"\bsession-\d+", "a work session"),
  (r"\bissues?\s*#?\d+", "an issue number"),
  (r"\bbefore\s+the\s+[^.\n]*\bchanges?\b", "before/after a change"),
  (r"\bafter\s+the\s+[^.\n]*\bchanges\b", "before/after a change"),
  (r"\bat\s+commit\s+[0-9a-f]{7}", "a commit"),
  (r"\bno\s+GPU\s+was\s+lent\b", "the project's machines"),
  (r"\bexvae\s+before\b", "an earlier version"),
  (r"\bis\s+now\b|\bare\s+now\b|\bno\s+longer\b", "an earlier version"),
]
# A bare commit hash: 7-40 hex digits with at least one letter and one digit.
HASH = re.compile(r"\b(?=[0-9a-f]*[a-f])(?=[0-9a-f]*\d)[0-9a-f]{7,40}\b")


# Pages other parts of the project write; until they exist a link to them is not checked.
def _pages():
  return [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))


def _prose(text: str) -> str:
  """The text without fenced code blocks and inline code spans (where provenance lives)."""
  text = re.sub(r"```.*?```", "", text, flags=re.S)
  return re.sub(r"`[^`\n]*`", "", text)


def history_findings(text: str) -> list[str]:
  """Every history phrase and bare commit hash in a page's prose.

  Args:
    text: a markdown page.

  Returns:
    ``"line N: what: the matched text"`` for each finding, in page order.
  """
  found = []
  for n, line in enumerate(_prose(text).splitlines(), 1):
    for pattern, what in HISTORY:
      for m in re.finditer(pattern, line, flags=re.I):
        found.append(f"line {n}: {what}: {m.group(0)!r}")
    for m in HASH.finditer(line):
      found.append(f"line {n}: a commit hash: {m.group(0)!r}")
  return found


@pytest.mark.parametrize("page", _pages(), ids=lambda p: os.path.relpath(p, ROOT))
def test_no_history_in_readme_and_docs(page):
  with open(page) as f:
    found = history_findings(f.read())
  assert not found, f"{os.path.relpath(page, ROOT)}: " + "; ".join(found)


def test_history_test_catches_planted_phrases():
  planted = {
    "The run of session 3 stopped.": "a work session",
    "As issue #24 asks.": "an issue number",
    "measured before the fidelity changes": "before/after a change",
    "Measured at commit a94661c.": "a commit",
    "The run started from 57ed13e.": "a commit hash",
    "no GPU was lent to this work": "the project's machines",
    "This session ran three seeds.": "a work session",
  }
  for text, what in planted.items():
    found = history_findings(f"# page\n\nSome text.\n{text}\n")
    assert found and what in found[0] and found[0].startswith("line 4"), (text, found)
  # Code and provenance may name commits; ordinary numbers are not hashes.
  assert not history_findings(
    "Commit `57ed13e` in a code span.\n```\nrun a94661c\n```\n"
    "N = 1000000 images, 2026-11-30, 5e4 codes.\n"
  )


def test_readme_is_short_and_shows_results_early():
  with open(os.path.join(ROOT, "README.md")) as f:
    lines = f.read().splitlines()
  assert len(lines) <= 250, f"README.md has {len(lines)} lines (at most 250)"
  starts = [i for i, l in enumerate(lines, 1) if l.strip() == "<!-- results:begin -->"]
  assert starts and starts[0] <= 120, f"the results table starts at line {starts}"
  commands = [l.split("#")[0].strip() for l in lines if l.startswith(".venv/bin/python -m pytest")]
  assert len(commands) == 1, f"one test command in the README, found {commands}"
  with open(os.path.join(ROOT, ".ci", "run")) as f:
    ci = [l.strip() for l in f.read().splitlines()]
  assert commands[0] in ci, f"{commands[0]!r} is the README's test command; .ci/run must run it"


LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _relative_links(page: str) -> list[str]:
  with open(page) as f:
    text = re.sub(r"```.*?```", "", f.read(), flags=re.S)
  out = []
  for target in LINK.findall(text):
    if re.match(r"[a-z]+:", target) or target.startswith("#"):
      continue  # a URL or an anchor in the page
    out.append(target.split("#", 1)[0])
  return out


def test_relative_links_resolve():
  pages = _pages() + [os.path.join(ROOT, "reference", "README.md")]
  missing = []
  for page in pages:
    for target in _relative_links(page):
      path = os.path.normpath(os.path.join(os.path.dirname(page), target))
      if not os.path.exists(path):
        missing.append(f"{os.path.relpath(page, ROOT)} -> {target}")
  assert not missing, "broken links: " + ", ".join(missing)
  assert _relative_links(os.path.join(ROOT, "README.md")), "the README links its docs"


# A command run with a bare `python` (Debian has none): not `.venv/bin/python`, `python3`,
# `--python-version` or a ```python fence.
BARE_PYTHON = re.compile(r"(?<![\w./-])python(?=[ \t\n])")


def _code(text: str) -> list[str]:
  """The lines of a page's fenced code blocks, then its inline code spans."""
  out = []
  for m in re.finditer(r"```[^\n]*\n(.*?)```", text, flags=re.S):
    out += m.group(1).splitlines()
  return out + re.findall(r"`([^`]+)`", re.sub(r"```.*?```", "", text, flags=re.S))


def bare_python_commands(text: str) -> list[str]:
  """Every code line or span of a markdown page that runs a bare ``python``."""
  return [c for c in _code(text) if BARE_PYTHON.search(c)]


@pytest.mark.parametrize(
  "page",
  _pages() + [os.path.join(ROOT, "reference", "README.md")],
  ids=lambda p: os.path.relpath(p, ROOT),
)
def test_commands_never_run_a_bare_python(page):
  with open(page) as f:
    found = bare_python_commands(f.read())
  assert not found, (
    f"{os.path.relpath(page, ROOT)}: use .venv/bin/python (or the exvae-* commands): {found}"
  )


def test_bare_python_check_catches_planted_commands():
  page = (
    "# p\n\nRun `python scripts/x.py --a`.\n\n```bash\ncd x\npython -m exvae configs\n```\n"
    "Or `.venv/bin/python scripts/x.py`, `python3 x.py`, `--python-version 3.12`.\n"
    "```python\nimport exvae\n```\nPython 3.11.\n"
  )
  assert bare_python_commands(page) == ["python -m exvae configs", "python scripts/x.py --a"]


def test_the_readme_clones_shallow_and_says_why():
  with open(os.path.join(ROOT, "README.md")) as f:
    text = f.read()
  clones = [c for c in _code(text) if "git clone" in c]
  assert clones and all("--depth 1" in c for c in clones), clones
  assert re.search(r"~?\d+ MB of old training-state archives", text)
