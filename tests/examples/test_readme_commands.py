"""Commands the README and docs show that run in seconds do run: every `megatron-vespo config` line validates."""

import re
import shlex
from pathlib import Path

import pytest

from megatron_vespo.cli import main

ROOT = Path(__file__).resolve().parents[2]


def _config_commands() -> list[tuple[str, list[str]]]:
    """``megatron-vespo config ...`` commands from README.md and docs/*.md (backslash continuations joined)."""
    found = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = doc.read_text().replace("\\\n", " ")
        for line in text.splitlines():
            m = re.search(r"megatron-vespo config (examples/\S+\.yaml.*)", line)
            if m:
                argv = shlex.split(m.group(1).split("#")[0].strip().rstrip("`"))
                found.append((doc.name, argv))
    return found


def test_readme_shows_a_config_command():
    assert any(name == "README.md" for name, _ in _config_commands())


@pytest.mark.parametrize("doc, argv", _config_commands())
def test_documented_config_command_validates(monkeypatch, doc, argv):
    monkeypatch.chdir(ROOT)
    assert main(["config", *argv]) == 0, f"{doc}: megatron-vespo config {' '.join(argv)}"


def test_torchrun_commands_name_a_module():
    """`torchrun ... megatron-vespo` fails (torchrun wants a script path): docs must show `-m megatron_vespo.cli`."""
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = doc.read_text().replace("\\\n", " ")
        bad = re.findall(r"torchrun [^`\n]*?megatron-vespo", text)
        assert not bad, f"{doc.name}: {bad}"
