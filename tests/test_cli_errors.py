"""The CLI answers bad input with one error line and exit code 2, and Ctrl-C with 130 (no traceback wall)."""

import argparse
import logging

import pytest

from megatron_vespo import cli


def _parser_with(handler):
    """A parser whose only subcommand runs ``handler``."""
    parser = argparse.ArgumentParser(prog="megatron-vespo")
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("boom").set_defaults(func=handler)
    return parser


@pytest.mark.parametrize("exc, code, text", [
    (ValueError("d.jsonl:2: missing key 'label' (data.label_key)"), 2, "ValueError: d.jsonl:2: missing key 'label'"),
    (FileNotFoundError("data.path: x.jsonl does not exist"), 2, "FileNotFoundError: data.path: x.jsonl"),
    (FileExistsError("output directory d already exists and is not empty"), 2, "FileExistsError: output directory d"),
    (NotADirectoryError(20, "Not a directory", "afile"), 2, "NotADirectoryError: [Errno 20] Not a directory: 'afile'"),
])
def test_bad_input_is_one_error_line(monkeypatch, caplog, exc, code, text):
    def handler(args):
        raise exc

    monkeypatch.setattr(cli, "build_parser", lambda: _parser_with(handler))
    with caplog.at_level(logging.INFO, logger="megatron_vespo"):
        assert cli.main(["boom"]) == code
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and text in errors[0].getMessage() and errors[0].exc_info is None


def test_unexpected_errors_keep_their_traceback(monkeypatch):
    def handler(args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(cli, "build_parser", lambda: _parser_with(handler))
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main(["boom"])


def test_ctrl_c_logs_one_line_and_dies_by_sigint_without_traceback(monkeypatch, caplog, capsys):
    import sys

    def handler(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", lambda: _parser_with(handler))
    monkeypatch.setattr(sys, "excepthook", sys.__excepthook__)
    with caplog.at_level(logging.INFO, logger="megatron_vespo"), pytest.raises(KeyboardInterrupt) as info:
        cli.main(["boom"])  # re-raised: the interpreter then ends the process by SIGINT
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR] == ["interrupted"]
    sys.excepthook(info.type, info.value, info.tb)  # what the interpreter does at the top level
    assert "Traceback" not in capsys.readouterr().err
    sys.excepthook(ValueError, ValueError("other"), None)  # other exceptions still print
    assert "ValueError: other" in capsys.readouterr().err


def test_interrupt_wrapped_by_a_library_counts_as_ctrl_c(monkeypatch, caplog):
    import sys

    def handler(args):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise RuntimeError("Attempted to exit a cancel scope") from None  # what anyio does

    monkeypatch.setattr(cli, "build_parser", lambda: _parser_with(handler))
    monkeypatch.setattr(sys, "excepthook", sys.__excepthook__)
    with caplog.at_level(logging.INFO, logger="megatron_vespo"), pytest.raises(KeyboardInterrupt):
        cli.main(["boom"])
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR] == ["interrupted"]
