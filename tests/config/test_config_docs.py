"""Every config field is documented where it is declared, and ``config --explain`` prints it."""

import importlib
import pkgutil
import subprocess
import sys
from pathlib import Path

import megatron_vespo
from megatron_vespo.config.base import Section, explain_fields
from megatron_vespo.config.cli import explain
from megatron_vespo.config.job import JobConfig

ROOT = Path(__file__).resolve().parents[2]

# Sections exempt from the field-docstring rule (empty: every section documents its fields; an
# entry needs a reason and a date to remove it).
PENDING: set[str] = set()


def _all_sections() -> set[type]:
    """Every Section subclass declared in a ``*.config`` module of the package."""
    for mod in pkgutil.walk_packages(megatron_vespo.__path__, "megatron_vespo."):
        if mod.name.endswith(".config"):
            importlib.import_module(mod.name)
    seen, todo = set(), list(Section.__subclasses__())
    while todo:
        cls = todo.pop()
        if cls not in seen and cls.__module__.startswith("megatron_vespo."):
            seen.add(cls)
            todo.extend(cls.__subclasses__())
    return seen


def test_every_field_has_a_docstring():
    sections = _all_sections()
    assert JobConfig in sections and len(sections) >= 12
    missing = [f"{cls.__module__}.{cls.__name__}.{name}" for cls in sections if cls.__name__ not in PENDING
               for name, field in cls.model_fields.items() if not (field.description or "").strip()]
    assert not missing, ("config fields without a docstring (write a one-line \"\"\"...\"\"\" under the "
                         f"field): {missing}")


def test_undocumented_field_is_caught():
    class Probe(Section):
        documented: int = 1
        """A documented field."""
        bare: int = 2

    assert Probe.model_fields["documented"].description == "A documented field."
    assert Probe.model_fields["bare"].description is None


def test_explain_rows_cover_every_leaf():
    rows = {r[0]: r for r in explain_fields(JobConfig)}
    assert rows["train.lr"][1:3] == ("float", "1e-06")
    assert rows["rollout.sampling.temperature"][3].startswith("Sampling temperature")
    assert "rollout.sampling" not in rows  # a nested section is expanded, not listed


def test_explain_section_filters():
    text = explain("train")
    assert "train.lr: float = 1e-06\n    Peak learning rate." in text
    assert "loss." not in text and "train.lr_warmup_steps" in text


def test_explain_cli_prints_train_lr():
    out = subprocess.run([sys.executable, "-m", "megatron_vespo.cli", "config", "--explain", "train"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "train.lr: float" in out.stdout and "parallel." not in out.stdout
    bad = subprocess.run([sys.executable, "-m", "megatron_vespo.cli", "config", "--explain", "trian"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert bad.returncode != 0 and "unknown section 'trian'" in bad.stderr
