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
    (KeyboardInterrupt(), 130, "interrupted"),
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
