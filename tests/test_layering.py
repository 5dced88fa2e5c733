"""Import layering: modeling -> processing -> data / inference -> training / evaluation -> serving / toyworld / cli.

Every import between the package's parts is read from the source (module level and inside functions alike)
and checked against the layer each part may use. A new import that points up, or sideways between parts
that must stay independent, fails here with the file, the line and the rule it breaks.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import flamingo_vlm

PACKAGE = "flamingo_vlm"
SRC = Path(flamingo_vlm.__file__).parent

BASE = {"config", "yaml_config", "_requirements"}
# Each part of the package and the parts it may import (besides itself).
ALLOWED: dict[str, set[str]] = {
    "config": {"yaml_config"},
    "yaml_config": set(),
    "_requirements": set(),
    "tiny": set(),
    "modeling": BASE,
    "processing": BASE | {"modeling"},
    "builder": BASE | {"modeling", "processing"},
    "data": BASE | {"modeling", "processing"},
    "inference": BASE | {"modeling", "processing"},
    "convert": BASE | {"modeling", "processing", "builder"},
    "training": BASE | {"modeling", "processing", "builder", "data"},
    "evaluation": BASE | {"modeling", "processing", "builder", "inference"},
    "serving": BASE | {"modeling", "processing", "builder", "inference"},
    "benchmark": BASE | {"modeling", "processing", "builder", "data", "inference", "training", "tiny"},
    "toyworld": BASE | {"modeling", "processing", "builder", "data", "inference", "training", "evaluation", "tiny"},
    "cli": set(),  # the command line may import every part (checked below)
}
# The per-call media context is built by FlamingoModel.media_context only.
MODELING_INTERNALS = {"modeling.masking", "modeling.context"}


def part_of(module: str) -> str:
    """'flamingo_vlm.inference.scoring' -> 'inference'; the package's own __init__ is the public facade."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(source: str, module: str, is_package: bool) -> list[tuple[int, str, list[str]]]:
    """(line, imported flamingo_vlm module, imported names) for every import of the package in ``source``."""
    found = []
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name, []) for a in node.names if a.name.split(".")[0] == PACKAGE]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] == PACKAGE:
                names = [a.name for a in node.names]
                # `from . import x` may import a submodule x
                found.append((node.lineno, target, names))
    return found


def violations(source: str, module: str, is_package: bool = False) -> list[str]:
    here = part_of(module)
    problems = []
    for line, target, names in imports_of(source, module, is_package):
        there = part_of(target)
        where = f"{module} line {line}: imports {target}"
        if there in ("", here) or here in ("", "cli"):
            continue  # within a part, the public facade's own re-exports, and the command line
        if here not in ALLOWED:
            problems.append(f"{where}: {here!r} has no layering rule (add it to ALLOWED in {Path(__file__).name})")
        elif there not in ALLOWED[here]:
            problems.append(f"{where}: {here} may import only {sorted(ALLOWED[here])}, not {there}")
        inner = ".".join(target.split(".")[1:3])
        if here != "modeling" and inner in MODELING_INTERNALS:
            problems.append(f"{where}: only modeling/ uses {inner}; build media contexts with FlamingoModel.media_context")
        if here == "toyworld" and target.count(".") > 1:
            problems.append(f"{where}: the toy world uses only public APIs (flamingo_vlm or a subpackage's exports)")
        if here == "toyworld" and target.count(".") == 1 and names:
            exported = set(getattr(__import__(target, fromlist=["_"]), "__all__", ()))
            hidden = [n for n in names if n not in exported]
            if hidden:
                problems.append(f"{where}: {hidden} not in {target}.__all__ (the toy world uses only public APIs)")
    return problems


def source_files() -> list[Path]:
    return sorted(p for p in SRC.rglob("*.py"))


def test_the_package_respects_its_layers():
    problems = []
    for path in source_files():
        module = module_name(path)
        if module == PACKAGE:
            continue
        problems += violations(path.read_text(), module, is_package=path.name == "__init__.py")
    assert not problems, "import layering broken:\n" + "\n".join(problems)


def test_every_part_has_a_rule():
    parts = {part_of(module_name(p)) for p in source_files()} - {""}
    assert parts <= set(ALLOWED), f"parts without a layering rule: {sorted(parts - set(ALLOWED))}"


@pytest.mark.parametrize(
    "module,source,message",
    [
        ("flamingo_vlm.modeling.flamingo", "from ..builder import load_backbones", "modeling may import only"),
        ("flamingo_vlm.modeling.vision", "from flamingo_vlm.processing import ImageTransform", "not processing"),
        ("flamingo_vlm.serving.runner", "def f():\n    from ..evaluation.runner import evaluate", "not evaluation"),
        ("flamingo_vlm.serving.app", "from ..toyworld.presets import toy_presets", "not toyworld"),
        ("flamingo_vlm.inference.scoring", "from ..modeling.masking import build_routing", "FlamingoModel.media_context"),
        ("flamingo_vlm.data.labels", "from ..training import loop", "not training"),
        ("flamingo_vlm.toyworld.demo", "from ..training.loop import train", "only public APIs"),
        ("flamingo_vlm.toyworld.demo", "from ..evaluation import _not_exported", "not in flamingo_vlm.evaluation.__all__"),
    ],
)
def test_a_new_upward_import_is_caught(module, source, message):
    problems = violations(source, module)
    assert problems and message in problems[0]


def test_allowed_imports_pass():
    assert violations("from ..modeling.flamingo import FlamingoModel\nfrom . import media", "flamingo_vlm.inference.prompts") == []
    assert violations("from ..evaluation import evaluate", "flamingo_vlm.toyworld.demo") == []
