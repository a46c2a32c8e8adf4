"""The README's and docs/'s Python examples and their sweep, report, plot and compare commands run
as written, their links lead somewhere, and the README stays short (so that the pages stay
true)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from effattn.sweep.spec import TINY_ENV

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]  # the README first: a command it shows is run under its name
README_MAX_LINES = 200  # issue #30: the README is the front door; the rest lives in docs/


def page_name(page: Path) -> str:
    return page.relative_to(ROOT).as_posix()


# -- reading a page ---------------------------------------------------------------------------
# A fence opens with ``` (indented inside a list item or not) and an info string, and closes
# with a line of at least as many backticks and nothing else.
FENCE = re.compile(r"^(?P<indent> *)(?P<fence>`{3,})\s*(?P<info>[^`\s]*)[^`]*$")


def split_page(text: str) -> list[tuple[str | None, str]]:
    """The page as (info, body) parts in order: info None for prose, the fence's language ('' if
    none) for a fenced code block, whose body is dedented by the fence's indent."""
    parts: list[tuple[str | None, str]] = []
    info: str | None = None
    fence, indent, lines = "", 0, []
    for line in text.splitlines():
        opening = FENCE.match(line) if info is None else None
        if opening:
            parts.append((None, "\n".join(lines)))
            info, fence, indent = opening["info"], opening["fence"], len(opening["indent"])
            lines = []
        elif info is not None and re.fullmatch(rf" *`{{{len(fence)},}} *", line):
            parts.append((info, "\n".join(lines) + "\n"))
            info, lines = None, []
        else:
            lines.append(line[indent:] if info is not None and line[:indent].isspace() else line)
    parts.append((info, "\n".join(lines)))  # prose to the end (or an unclosed block)
    return parts


def python_blocks(text: str) -> list[str]:
    return [body for info, body in split_page(text) if info == "python"]


def prose(text: str) -> str:
    """The page without its fenced code blocks."""
    return "\n".join(body for info, body in split_page(text) if info is None)


# -- the pages' Python examples ---------------------------------------------------------------
EXAMPLES = [
    pytest.param(page_name(page), index, block, id=f"{page_name(page)}-{index}")
    for page in PAGES
    for index, block in enumerate(python_blocks(page.read_text()))
]


def test_readme_has_examples():
    """The functional call, the drop-in module, HuggingFace and a new backend, at least."""
    assert len(python_blocks(README.read_text())) >= 4


@pytest.mark.parametrize(("page", "index", "block"), EXAMPLES)
def test_example_runs(page: str, index: int, block: str, scratch_registry):
    exec(compile(block, f"{page}[python block {index}]", "exec"), {})


def test_readme_lines():
    lines = len(README.read_text().splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines (at most {README_MAX_LINES})"


# -- the pages' links -------------------------------------------------------------------------
# Markdown links and images, [text](target) and ![alt](target "title"); inline code is not a link.
LINK = re.compile(
    r"""!? \[ (?: [^\[\]] | \[[^\]]*\] )* \]          # [text] or ![alt], one level of [] inside
        \( \s* <? (?P<target>[^)\s>]+) >? (?: \s+ "[^"]*" )? \s* \)  # (target "title")""",
    re.VERBOSE,
)


def relative_links(text: str) -> list[str]:
    """The page's links to files of the repository, #fragment stripped (web links and anchors
    within the page are not checked)."""
    text = re.sub(r"`[^`\n]*`", "", prose(text))
    targets = (m["target"] for m in LINK.finditer(text))
    return [
        t.partition("#")[0]
        for t in targets
        if not re.match(r"[a-z][a-z0-9+.-]*:", t, flags=re.IGNORECASE) and not t.startswith("#")
    ]


@pytest.mark.parametrize("page", PAGES, ids=page_name)
def test_links_lead_to_files(page: Path):
    missing = [t for t in relative_links(page.read_text()) if not (page.parent / t).exists()]
    assert not missing, f"{page_name(page)} links to files that do not exist: {missing}"


def test_every_doc_is_linked_from_the_readme_or_the_docs_index():
    index = ROOT / "docs" / "README.md"
    linked = {
        (page.parent / t).resolve()
        for page in (README, index)
        if page.exists()
        for t in relative_links(page.read_text())
    }
    orphans = [page_name(doc) for doc in DOCS if doc != index and doc.resolve() not in linked]
    assert not orphans, f"no link from README.md or docs/README.md to {orphans}"


# -- the pages' commands ----------------------------------------------------------------------
# Every `make sweep` and `effattn sweep|report|plot|compare|list ...` a page shows (in shell
# blocks, indented blocks or inline code) runs as written on a CPU-only machine, at toy sizes
# (EFFATTN_SWEEP_TINY: the sweep spec's tiny()), in a scratch folder. A command shown on several
# pages runs once, under the first page that shows it (the README, then docs/ by name).
# Placeholders: RUN... and RUN_A RUN_B are replaced by runs the pages' own sweeps made
# (compare: one run twice), PCT, FILE.md, PREFIX, DIR by a value. Commands for a Slurm cluster
# or a GPU say so in their options and are skipped with that reason.
SUBCOMMANDS = ("sweep", "report", "plot", "compare", "list", "quality", "fidelity")
MAKE_TARGETS = ("make sweep", "make quality", "make fidelity")
NEEDS = {
    "--executor submitit": "a Slurm cluster",
    "--device cuda": "a GPU",
    # transformers 5 and the model wheel: tests/test_fidelity.py runs the command in make test-hf5
    "effattn fidelity": "the fidelity extra (make test-hf5 runs it)",
    "make fidelity": "the fidelity extra (make test-hf5 runs it)",
}
PLACEHOLDERS = {"PCT": "10", "FILE.md": "compare.md", "PREFIX": "table", "DIR": "plots"}


def page_commands(text: str) -> list[str]:
    """A page's `make sweep` and effattn commands, in order, whitespace normalised."""
    found = []
    for info, body in split_page(text):
        if info in ("", "bash", "sh", "shell", "console"):
            found += [line.split("#")[0] for line in body.splitlines()]
    rest = prose(text)
    found += re.findall(r"^    (effattn .*)$", rest, flags=re.MULTILINE)  # indented blocks
    found += re.findall(r"`(effattn [^`]+)`", rest)  # inline, possibly over two lines
    commands = []
    for command in (" ".join(c.split()) for c in found):
        words = command.split()
        if command in MAKE_TARGETS or (words[:1] == ["effattn"] and words[1:2] and
                                       words[1] in SUBCOMMANDS):  # fmt: skip
            commands.append(command)
    return list(dict.fromkeys(commands))


def all_commands() -> list[tuple[str, str]]:
    """(page, command) for every command of every page, each command once."""
    seen: dict[str, str] = {}
    for page in PAGES:
        for command in page_commands(page.read_text()):
            seen.setdefault(command, page_name(page))
    return [(page, command) for command, page in seen.items()]


COMMANDS = all_commands()


def test_readme_shows_the_sweep_commands():
    readme = page_commands(README.read_text())
    assert "make sweep" in readme and "make quality" in readme
    commands = [command for _, command in COMMANDS]
    assert sum(c.startswith("effattn sweep") for c in commands) >= 2
    assert any(c.startswith("effattn report") for c in commands)
    assert any(c.startswith("effattn compare") for c in commands)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("readme")


def _argv(command: str, runs: list[str]) -> list[str]:
    if command == "make sweep":
        return ["make", "-s", "-f", str(ROOT / "Makefile"), "sweep", f"PY={sys.executable}",
                "STAMP=", "SWEEP_DEVICE=cpu"]  # fmt: skip
    if command == "make quality":  # the target's wiring, on the preset of seconds
        return ["make", "-s", "-f", str(ROOT / "Makefile"), "quality", f"PY={sys.executable}",
                "STAMP=", "QUALITY_PRESET=quality-smoke"]  # fmt: skip
    words = command.split()[1:]
    if words[0] == "compare":  # a run against itself: a gate it shows never trips on noise
        runs = [runs[0], runs[0]]
    out = [sys.executable, "-m", "effattn"]
    for word in words:
        if word in ("RUN...", "RUN_A..."):
            out += runs[:2] if words[0] == "report" else runs[:1]  # plots of one run: faster
        elif word in ("RUN", "RUN_A"):
            out.append(runs[0])
        elif word == "RUN_B":
            out.append(runs[1])
        else:
            out.append(PLACEHOLDERS.get(word, word))
    return out


def _sweep_runs(folder: Path) -> list[str]:
    """The sweep runs the pages' commands made (the quality runs share the folder)."""
    runs = []
    for results in sorted(folder.glob("*/results.jsonl")):
        first = results.read_text().partition("\n")[0]
        if first and "mode" in json.loads(first):
            runs.append(str(results.parent))
    return runs


@pytest.mark.slow
@pytest.mark.parametrize(
    "command",
    [
        pytest.param(command, id=f"{page}: {command}")
        for page, command in sorted(COMMANDS, key=lambda pc: "sweep" not in pc[1])
    ],
)
def test_page_command_runs_on_cpu(command: str, workdir: Path):
    """Sweeps first (sorted so), then the commands that read their runs."""
    for option, what in NEEDS.items():
        if option in command:
            pytest.skip(f"needs {what}: {command}")
    runs = _sweep_runs(workdir / "reports" / "runs")
    if any(w.startswith("RUN") for w in command.split()) and len(runs) < 2:
        pytest.skip("the pages' sweeps made fewer than two runs to read")
    env = {**os.environ, TINY_ENV: "1"}
    done = subprocess.run(_argv(command, runs), cwd=workdir, env=env, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, f"{command}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    assert "USDT:" not in done.stdout + done.stderr  # the profiler's notes stay off the screen
