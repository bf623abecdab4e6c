"""The README's examples run: every ``keras-newton`` command line parses with the real
parsers and names models and weights that exist; the quick Python example runs.

Command lines are read from the code blocks (fenced or indented) of README.md and
zoo/in_progress/README.md: continuation backslashes, ``# comments``, a ``$`` prompt and
leading ``VAR=value`` assignments are stripped, and ``[--flag value]`` (an optional
part) is read as present. Nothing else is substituted.
"""

import re
import shlex
from pathlib import Path

import pytest
from helpers import REPO

from keras_newton import cli, zoo
from keras_newton.models import canonical_name

DOCS = [REPO / "README.md", REPO / "zoo" / "in_progress" / "README.md"]
ENV_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


def code_blocks(text):
    """The code blocks of a markdown text: fenced ones, then 4-space indented ones."""
    blocks = re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.M | re.S)
    outside = re.sub(r"^```[^\n]*\n.*?^```", "", text, flags=re.M | re.S)
    blocks += ["\n".join(line[4:] for line in block.splitlines())
               for block in re.findall(r"(?:^ {4}.*\n?)+", outside, flags=re.M)]
    return blocks


def logical_lines(block):
    """Lines of a shell block, continuations joined, quoted newlines kept inside."""
    pending = ""
    for line in block.splitlines():
        pending += line
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        try:
            shlex.split(pending, comments=True)
        except ValueError:  # a quote spans lines (TF_CONFIG='{... \n ...}')
            pending += "\n"
            continue
        yield pending
        pending = ""


def commands(path):
    """``(line, argv)`` of every ``keras-newton`` command line in ``path``'s code blocks."""
    found = []
    for block in code_blocks(path.read_text()):
        for line in logical_lines(block):
            tokens = shlex.split(line, comments=True)
            if tokens[:1] == ["$"]:
                tokens = tokens[1:]
            while tokens and ENV_ASSIGNMENT.match(tokens[0]):
                tokens = tokens[1:]
            if tokens[:1] == ["keras-newton"]:
                argv = [t.removeprefix("[").removesuffix("]") for t in tokens[1:]]
                found.append((" ".join(line.split()), argv))
    return found


ALL = [(path.relative_to(REPO).as_posix(), line, argv)
       for path in DOCS if path.exists() for line, argv in commands(path)]


@pytest.mark.parametrize("path", [p for p in DOCS if p.exists()], ids=lambda p: p.name)
def test_every_command_line_is_read(path):
    """No command line is lost (e.g. to an unbalanced quote earlier in its block)."""
    starts = [line for block in code_blocks(path.read_text()) for line in block.splitlines()
              if re.match(r"\s*(\$\s+)?keras-newton\s", line)]
    assert len(commands(path)) == len(starts) > 0
    if path.name == "README.md" and path.parent == REPO:
        assert any(argv[0] == "export" and "--weights" in argv for _, argv in commands(path))


@pytest.mark.parametrize("doc,line,argv", ALL, ids=[f"{d}:{a[0]}" for d, _, a in ALL])
def test_command_line_parses(doc, line, argv):
    parser = cli.build_parser(argv[0])
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        pytest.fail(f"{doc}: `keras-newton {' '.join(argv)}` does not parse (exit {e.code})")
    model = getattr(args, "model", None)
    if model is not None and "." in model:  # a zoo key, arch.tag[.int8] (serve)
        assert model.removesuffix(".int8") in zoo.REGISTRY, (
            f"{doc}: `{line}`: registered: {zoo.available()}")
    elif model is not None and (args.command != "tune" or args.preset == "figure4"):
        arch = canonical_name(model)  # ValueError: no such model
        weights = getattr(args, "weights", None)
        if weights is not None and not Path(weights).suffix:  # a tag, not a file
            assert f"{arch}.{weights}" in zoo.REGISTRY, (
                f"{doc}: `{line}` names weights {arch}.{weights}; registered: "
                f"{zoo.available()}")


def test_python_example_runs():
    """The first Python block of the README (building models and a block) runs as is."""
    text = (REPO / "README.md").read_text()
    example = re.search(r"^## Example\n.*?^```python\n(.*?)^```", text, flags=re.M | re.S)
    namespace = {}
    exec(compile(example.group(1), "README.md:Example", "exec"), namespace)
    assert namespace["model"].count_params() > 0 and namespace["block"].filters == 32
