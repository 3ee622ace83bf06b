"""`import megatron_vespo` and its light modules work with torch alone (no Megatron, SGLang, ...)."""

import subprocess
import sys
import textwrap

import pytest

from megatron_vespo.utils.imports import is_available, require

HEAVY = ["megatron", "transformers", "transformer_engine", "sglang", "ray", "wandb", "fastapi",
         "uvicorn", "httpx", "safetensors", "apex"]


def test_light_imports_without_heavy_dependencies():
    code = textwrap.dedent(f"""
        import sys
        for name in {HEAVY!r}:
            sys.modules[name] = None  # makes `import name` raise ImportError
        import megatron_vespo
        import megatron_vespo.losses
        import megatron_vespo.config.job
        from megatron_vespo.cli import build_parser
        build_parser().format_help()
        leaked = [m for m in {HEAVY!r} if sys.modules.get(m) is not None]
        assert not leaked, leaked
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_require_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "sglang", None)
    with pytest.raises(ImportError, match=r"megatron_vespo\[sglang\]"):
        require("sglang", "the SGLang rollout engine")
    assert not is_available("sglang")
    assert require("torch").__name__ == "torch"


def test_test_module_basenames_are_unique():
    """pytest imports test modules by basename (rootdir mode): two `test_gpu.py` break collection."""
    from collections import Counter
    from pathlib import Path

    names = Counter(p.name for p in (Path(__file__).parent).rglob("test_*.py"))
    assert not [n for n, c in names.items() if c > 1], names
