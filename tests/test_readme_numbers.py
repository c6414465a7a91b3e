"""Every measured figure in README.md names, beside it, the command that reproduces it.

The rule, precisely:

- README.md is cut into blocks at blank lines. Fenced (```) and indented
  (4 spaces) code blocks are blocks of their own.
- A *figure* is, outside code blocks and inline `code`: a number followed by a
  speed or size unit (×, x as a multiplication sign, ms, µs/us, s, min, GB/s,
  MB, %), or a number in scientific notation with a negative exponent
  (an error such as 2.4e-7). Numbers that are parts of shapes (32x64x56x56,
  32×64×56×56), versions, dates and counts are not figures.
- A *command* is an inline code span or a code-block line that runs
  something: it starts with `make `, `python`, `.venv/bin/`, `torchrun`,
  `pytest`, `bash ` or names a script (`*.py`, `*.sh`).
- Each block that holds a figure must name a command, itself or in its
  *context*: a table or a list takes the context of the paragraph that
  introduces it (the block right above, and that block's own context when it
  is a table or a list); a paragraph right after a code block takes the code
  block as context.
"""
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")

NUMBER = r"(?<![\w.])\d+(?:[.,]\d+)*"
FIGURE = re.compile(
    NUMBER + r"(?:\s?(?:×|ms\b|µs\b|us\b|s\b|min\b|GB/s|MB\b|%)|x(?![\w]))"  # with a unit
    r"|(?<![\w.])\d+(?:\.\d+)?e-\d+"  # an error in scientific notation
)
# Parts of shapes: 32x64x56x56, 32×64×56×56 (a number both followed and preceded by x/×, or followed by x + digit).
SHAPE = re.compile(r"\d+(?:\s?[x×]\s?\d+)+")
COMMAND = re.compile(r"^(make |python|\.venv/bin/|torchrun|pytest|bash )|\.(py|sh)\b")


def blocks(text):
    """[(kind, text)] with kind 'code', 'table', 'list' or 'paragraph'."""
    result, current, fenced = [], [], False

    def flush(kind=None):
        if current:
            body = "\n".join(current)
            if kind is None:
                first = current[0].lstrip()
                kind = "table" if first.startswith("|") else "list" if re.match(r"([-*]|\d+\.)\s", first) else "paragraph"
                if all(line.startswith("    ") for line in current):
                    kind = "code"
            result.append((kind, body))
            current.clear()

    for line in text.splitlines():
        if line.startswith("```"):
            if fenced:
                current.append(line)
                flush("code")
                fenced = False
            else:
                flush()
                fenced = True
                current.append(line)
            continue
        if fenced:
            current.append(line)
        elif not line.strip():
            flush()
        elif line.startswith("#"):
            flush()
            current.append(line)
            flush("heading")
        else:
            current.append(line)
    flush("code" if fenced else None)
    return result


def figures(text):
    text = re.sub(r"`[^`]*`", " ", text)
    text = SHAPE.sub(" ", text)
    return [m.group(0) for m in FIGURE.finditer(text)]


def commands(kind, text):
    if kind == "code":
        return [line.strip() for line in text.splitlines() if COMMAND.search(line.strip())]
    return [span for span in re.findall(r"`([^`]+)`", text) if COMMAND.search(span.strip())]


def context_commands(parsed, i):
    """Commands named in block i or in its context (see the module docstring)."""
    kind, text = parsed[i]
    found = commands(kind, text)
    if i > 0:
        above_kind, _ = parsed[i - 1]
        if kind in ("table", "list") and above_kind not in ("heading", "code"):
            found += context_commands(parsed, i - 1)
        elif kind == "paragraph" and above_kind == "code":
            found += commands(*parsed[i - 1])
    return found


def unsourced(text):
    """[(block text, its figures)] for the blocks with figures and no command in reach."""
    parsed = blocks(text)
    bad = []
    for i, (kind, body) in enumerate(parsed):
        if kind in ("code", "heading"):
            continue
        found = figures(body)
        if found and not context_commands(parsed, i):
            bad.append((body[:200], found))
    return bad


def test_every_readme_figure_names_its_command():
    with open(README, encoding="utf-8") as f:
        bad = unsourced(f.read())
    assert not bad, "figures with no command beside them:\n" + "\n\n".join(f"{figs}: {body}" for body, figs in bad)


@pytest.mark.parametrize("text,expected", [
    ("The step is 1.54× faster.", ["1.54×"]),
    ("It took 2.98 ms at 43 GB/s, 97% of a copy; error 2.4e-7.", ["2.98 ms", "43 GB/s", "97%", "2.4e-7"]),
    ("A 32x64x56x56 and a 32×128×28×28 layer, torch 2.13.0, 2 cores, offset 1e6.", []),
    ("eval 1.2x, build 3 min 10 s", ["1.2x", "3 min", "10 s"]),
])
def test_what_counts_as_a_figure(text, expected):
    assert figures(text) == expected


def test_the_rule_catches_an_unsourced_figure_and_accepts_sourced_ones():
    assert unsourced("Ours is 1.5× faster than nn.\n")
    assert not unsourced("Ours is 1.5× faster than nn (`make bench`).\n")
    table = "Measured with `benchmarks/bench.py`:\n\n| case | ratio |\n|---|---|\n| a | 1.5× |\n"
    assert not unsourced(table)
    assert unsourced("Some intro.\n\n| case | ratio |\n|---|---|\n| a | 1.5× |\n")
    assert not unsourced("    torchrun --nproc_per_node=2 examples/ddp_train.py\n\ntrains in 12 s.\n")
    assert unsourced("## Speed\n\n- 1.5× faster\n")


def test_readme_shows_the_demo_picture():
    with open(README, encoding="utf-8") as f:
        text = f.read()
    match = re.search(r"!\[[^\]]*\]\((docs/demo\.png)\)", text)
    assert match, "README.md should show docs/demo.png"
    with open(os.path.join(ROOT, match.group(1)), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
