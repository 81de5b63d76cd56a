"""docs/book.md runs: every block fenced ```python run or ```bash run is executed, in the
page's order, and what it prints is compared with the ```output block right after it.

Python blocks run in this process (numpy backend, each in a fresh namespace); commands run
in a shell. All blocks share one scratch folder as their working directory, so a command
may read what an earlier one wrote (5.3 samples from the model trained in 5.2). Python
output must match exactly; a command's expected lines must appear in order among the lines
it printed, since commands also print timings; an expected command line ending in "..." only
has to start a printed line (for values such as perplexities, too sensitive to compare whole).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GUIDE = ROOT / "docs" / "book.md"
FENCE = re.compile(r"^```(\S*)[ \t]*(\S*)[ \t]*$")
RUNNABLE = {"python", "bash"}
COMMAND_TIMEOUT_S = 120


@dataclass
class Snippet:
    lang: str  # "python" or "bash"
    code: str
    expected: str | None  # the ```output block after it, None when there is none
    line: int  # 1-based line of the opening fence
    section: str  # the ### heading above it

    @property
    def id(self) -> str:
        return f"L{self.line}-{self.section.split()[0]}-{self.lang}"


def parse_snippets(text: str) -> list[Snippet]:
    """The runnable blocks of a markdown page, each with the output block that follows it."""
    lines = text.splitlines()
    snippets: list[Snippet] = []
    section = "top"
    i = 0
    while i < len(lines):
        if lines[i].startswith("### "):
            section = lines[i][4:].strip()
        fence = FENCE.match(lines[i])
        if not fence or not fence.group(1):
            i += 1
            continue
        lang, marker, start = fence.group(1), fence.group(2), i
        end = _closing_fence(lines, start)
        body = "\n".join(lines[start + 1:end])
        if lang == "output":
            raise ValueError(f"{GUIDE.name}:{start + 1}: an output block must follow a runnable block")
        i = end + 1
        if lang in RUNNABLE and marker == "run":
            expected = None
            nxt = i
            while nxt < len(lines) and not lines[nxt].strip():
                nxt += 1
            if nxt < len(lines) and lines[nxt].strip() == "```output":
                out_end = _closing_fence(lines, nxt)
                expected = "\n".join(lines[nxt + 1:out_end])
                i = out_end + 1
            snippets.append(Snippet(lang, body, expected, start + 1, section))
    return snippets


def _closing_fence(lines: list[str], start: int) -> int:
    for j in range(start + 1, len(lines)):
        if lines[j].strip() == "```":
            return j
    raise ValueError(f"{GUIDE.name}:{start + 1}: code block never closed")


def _normalise(text: str) -> list[str]:
    return [line.rstrip() for line in text.strip("\n").splitlines()]


def _line_matches(expected: str, printed: str) -> bool:
    """A command's expected line ending in "..." matches any printed line that starts with the rest."""
    if expected.endswith("..."):
        return printed.startswith(expected[:-3])
    return printed == expected


def run_python(code: str, name: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, name, "exec"), {"__name__": "__guide__"})
    return out.getvalue()


def run_command(code: str) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    # the guide writes `python`; run it with this interpreter
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    done = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", code], capture_output=True, text=True, env=env,
                          timeout=COMMAND_TIMEOUT_S)
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"command failed (exit {done.returncode}):\n{code}\n--- output ---\n{output}"
    return output


SNIPPETS = parse_snippets(GUIDE.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("book_guide")


def test_every_section_has_a_checked_snippet() -> None:
    text = re.sub(r"^```.*?^```$", "", GUIDE.read_text(encoding="utf-8"), flags=re.M | re.S)  # outside code
    chapters = re.findall(r"^## (.+)$", text, flags=re.M)
    assert len(chapters) == 7, chapters  # chapters 2-7 and the appendices
    sections = re.findall(r"^### (.+)$", text, flags=re.M)
    assert len(sections) == 45, sections  # the book's sections, appendices A, D and E
    assert not set(sections) - {s.section for s in SNIPPETS}, "sections without a runnable snippet"
    assert all(s.expected for s in SNIPPETS), [s.id for s in SNIPPETS if not s.expected]


def test_readme_links_the_guide() -> None:
    assert "(docs/book.md)" in (ROOT / "README.md").read_text(encoding="utf-8")


def test_guide_figures_exist() -> None:
    for image in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", GUIDE.read_text(encoding="utf-8")):
        assert (GUIDE.parent / image).is_file(), f"{image} is missing: run python docs/make_figures.py"


@pytest.mark.parametrize("snippet", SNIPPETS, ids=[s.id for s in SNIPPETS])
def test_snippet(snippet: Snippet, workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(workdir)
    where = f"{GUIDE.name}:{snippet.line} ({snippet.section})"
    if snippet.lang == "python":
        printed = run_python(snippet.code, where)
    else:
        printed = run_command(snippet.code)
    if snippet.expected is None:
        return
    got, want = _normalise(printed), _normalise(snippet.expected)
    if snippet.lang == "python":
        assert got == want, f"{where}: printed\n" + "\n".join(got) + "\nexpected\n" + "\n".join(want)
        return
    remaining = iter(got)
    missing = [line for line in want if not any(_line_matches(line, seen) for seen in remaining)]
    assert not missing, f"{where}: expected lines not printed in order: {missing}\nprinted:\n" + "\n".join(got)
