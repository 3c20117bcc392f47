"""The package's shape: imports flow one way, and every command the README shows can work."""

from __future__ import annotations

import ast
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def imports_of(path: Path) -> set[str]:
    """The doodl modules a file imports, inside functions too."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("doodl"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("doodl")}
    return found


def test_imports_in_the_package_flow_one_way():
    graph = {}
    for path in (ROOT / "doodl").rglob("*.py"):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        graph[name] = imports_of(path) - {"doodl"}  # the package's own __init__ re-exports, it is no step

    def cycle_from(start: str) -> list[str] | None:
        stack = [(start, [start])]
        seen = set()
        while stack:
            module, path = stack.pop()
            for imported in graph.get(module, ()):
                if imported == start:
                    return [*path, start]
                if imported not in seen:
                    seen.add(imported)
                    stack.append((imported, [*path, imported]))
        return None

    cycles = [cycle for module in sorted(graph) if (cycle := cycle_from(module))]
    assert not cycles, " -> ".join(cycles[0])


# --- the README's commands ---------------------------------------------------------------------------

COMMAND = re.compile(r"(?:\.venv/bin/)?python3? (?:app\.py|-m doodl(?: batch)?)(?=\s|$)[^`\n]*")


def readme_commands() -> list[str]:
    """Every command line of the README that runs the app, the command line or a batch (a backslash
    continues a line)."""
    text = (ROOT / "README.md").read_text().replace("\\\n", " ")
    return [match.group(0).strip() for match in COMMAND.finditer(text)]


def placeholder(name: str) -> bool:
    """A name the README leaves to the reader: <sd>, FILE, DIR, ..."""
    return name.startswith("<") or name in ("...", "FILE", "DIR", "PROMPTS", "MODEL")


def test_the_readme_shows_the_commands_that_matter():
    commands = readme_commands()
    assert any("app.py --model black-forest-labs/FLUX.1-dev" in c for c in commands)
    assert any(c.startswith("python -m doodl batch") for c in commands)
    assert len(commands) >= 10


@pytest.mark.parametrize("command", readme_commands())
def test_every_readme_command_parses_and_names_models_that_can_load(command, monkeypatch):
    """Through the real parsers and the real name checks (`check_guide_name`, which `load_guide` runs
    before anything loads, and the generator's `pipeline_source`); nothing is downloaded or loaded."""
    import app
    from doodl import __main__ as single
    from doodl import batch
    from doodl.capabilities import GUIDE_KINDS, check_guide_name
    from doodl.cli import model_names
    from doodl.pipeline import pipeline_source
    from doodl.serving import locate

    monkeypatch.delenv("SPACE_ID", raising=False)
    words = shlex.split(command.removesuffix(" ..."))  # "...": more flags of the reader's
    if "--help" in words:
        parse = app.parse_args if "app.py" in words else single.parse_args
        with pytest.raises(SystemExit) as exited:
            parse(["--help"])
        assert exited.value.code == 0
        return
    words = words[words.index("app.py") + 1 :] if "app.py" in words else words[words.index("doodl") + 1 :]
    if "app.py" in command:
        args = app.parse_args(words)
        names = app.serving_of(args).names
    elif words[:1] == ["batch"]:
        args = batch.parse_args(words[1:])
        names = model_names(args)
    else:
        if "--prompt" not in words:  # an inline mention of a flag, not a whole command
            words += ["--prompt", "x"]
        args = single.parse_args(words)
        names = model_names(args)
    if not placeholder(names.sd):
        pipeline_source(locate(names.sd))
    for role, kind in GUIDE_KINDS.items():
        name = names.guide(role)
        if name and not placeholder(name.split()[0]):
            check_guide_name(kind, locate(name))
