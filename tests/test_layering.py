"""Allowed dependencies between the packages of ``megatron_vespo`` (checked on the source, with ``ast``).

Every ``import`` counts, at module level and inside functions (a lazy import is still a
dependency: it only moves the failure to run time). A package may import itself and the packages
its row in ``ALLOWED`` lists; the table reads from the low-level packages (no dependency on the
rest of the project) up to the orchestration that wires everything together. Adding an edge is
a design decision: change the table in the same commit and say why.

Entry points are exempt: ``megatron_vespo.cli``, every ``<package>.cli`` (a subcommand wires
components together) and ``config.job`` (``JobConfig`` composes every package's ``config``
section). ``tests/test_imports.py`` checks the other half (light imports without heavy deps).
"""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "megatron_vespo"

#: the low-level packages: they may import only each other (and only as their rows say)
LOW = {"types", "wire", "utils", "compat", "config", "parallel", "losses"}

ALLOWED: dict[str, set[str]] = {
    # low level
    "types": set(),
    "wire": set(),  # the weight-bucket wire format spoken by weight_sync/ (sender) and rollout/ (engine)
    "utils": set(),
    "compat": {"utils"},
    "config": {"utils"},  # config.base; config.job / config.cli are entry points
    "parallel": {"config", "compat", "utils"},  # as megatron-core keeps parallel_state below models
    "losses": {"config", "types", "utils"},
    # components
    "rewards": {"types", "utils"},
    "routing": {"config", "types", "utils"},
    "buffer": {"routing", "types", "utils"},
    "observability": {"config", "utils"},
    "data": {"config", "rewards", "types", "utils"},
    "fp8": {"config", "models", "parallel", "types", "utils"},  # the FP8 format; models.dims for layout rules
    "models": {"config", "parallel", "types", "utils"},
    "checkpoint": {"compat", "config", "fp8", "models", "parallel", "types", "utils"},
    "train": {"compat", "config", "fp8", "losses", "models", "parallel", "routing", "types", "utils"},
    "rollout": {"config", "fp8", "models", "types", "utils", "wire"},  # fp8: the engine serves block-FP8 exports
    # weight sync drives the engines through the rollout client, so it sits above rollout
    "weight_sync": {"checkpoint", "config", "fp8", "models", "parallel", "rollout", "types", "utils", "wire"},
    "evaluation": {"checkpoint", "config", "data", "models", "rewards", "rollout", "types", "utils"},
    "plan": {"checkpoint", "compat", "config", "fp8", "models", "parallel", "types", "utils"},
    "evidence": {"buffer", "losses", "models", "rewards", "types", "utils"},
    # the loop wires every component
    "orchestration": {"buffer", "checkpoint", "compat", "config", "data", "evaluation", "fp8", "losses", "models",
                      "observability", "parallel", "rewards", "rollout", "routing", "train", "types", "utils",
                      "weight_sync"},
    "root": set(),  # megatron_vespo/__init__.py: torch alone
}

#: known violations, each with the reason it is still there and what removes it. Keep this short.
EXCEPTIONS: set[tuple[str, str]] = set()

ENTRY_POINTS = {"megatron_vespo.cli", "megatron_vespo.config.job"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _node(module: str) -> str | None:
    """Package of ``module`` in the table; None for an entry point."""
    if module in ENTRY_POINTS or module.endswith(".cli"):
        return None
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "root"


def imported_packages(source: str, module: str) -> set[str]:
    """``megatron_vespo`` packages ``source`` imports anywhere (module level and inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # the package uses absolute imports only; a relative one would hide an edge
                found.add("<relative import>")
                continue
            mod = node.module or ""
            names = [mod] + ([f"{mod}.{a.name}" for a in node.names] if mod == "megatron_vespo" else [])
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "megatron_vespo" and len(parts) > 1 and parts[1] != "__version__":
                found.add(parts[1])
    return found


def violations() -> list[str]:
    """Every import that leaves its package's row of ``ALLOWED`` (exceptions excluded)."""
    bad = []
    for path in sorted(PKG.rglob("*.py")):
        module = _module_name(path)
        node = _node(module)
        if node is None:
            continue
        assert node in ALLOWED, f"package {node} ({path}) has no row in tests/test_layering.py ALLOWED"
        for target in imported_packages(path.read_text(), module) - {node} - ALLOWED[node]:
            if (module, target) not in EXCEPTIONS:
                bad.append(f"{module} imports megatron_vespo.{target} ({node} may import: "
                           f"{', '.join(sorted(ALLOWED[node])) or 'nothing'})")
    return bad


def test_packages_import_only_what_the_table_allows():
    assert not violations(), "\n".join(violations())


def test_low_level_packages_import_only_low_level_ones():
    for pkg in LOW:
        assert ALLOWED[pkg] <= LOW, f"the table lets low-level {pkg} import {ALLOWED[pkg] - LOW}"


def test_every_exception_is_still_needed():
    """An exception whose import is gone must leave the table (else it would hide a new one)."""
    for module, target in EXCEPTIONS:
        path = PKG.parent / (module.replace(".", "/") + ".py")
        assert target in imported_packages(path.read_text(), module), f"{module} no longer imports {target}"


@pytest.mark.parametrize("source", [
    "from megatron_vespo.orchestration.setup import raise_if_interrupted\n",
    "def f():\n    import megatron_vespo.train.actor\n",
    "class C:\n    def m(self):\n        from megatron_vespo import rollout\n",
])
def test_checker_sees_module_and_function_level_imports(source):
    found = imported_packages(source, "megatron_vespo.losses.core")
    assert found & {"orchestration", "train", "rollout"}, found
    assert not (found <= ALLOWED["losses"])  # the table check would report it
