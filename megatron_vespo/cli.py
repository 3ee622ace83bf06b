"""The ``megatron-vespo`` console entry point.

Subcommands are contributed by components: each module listed in ``_COMPONENT_CLIS``
defines ``register(subparsers)`` and keeps heavy imports inside its handlers, so
``megatron-vespo --help`` works with torch alone.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import sys

from megatron_vespo import __version__

_COMPONENT_CLIS = (
    "megatron_vespo.config.cli",
    "megatron_vespo.losses.cli",
    "megatron_vespo.rollout.cli",
    "megatron_vespo.checkpoint.cli",
    "megatron_vespo.train.cli",
    "megatron_vespo.orchestration.cli",
    "megatron_vespo.observability.cli",
    "megatron_vespo.evaluation.cli",
    "megatron_vespo.plan.cli",
)


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser with every available component's subcommands."""
    parser = argparse.ArgumentParser(prog="megatron-vespo", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"megatron_vespo {__version__}")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMPONENT_CLIS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # component has no CLI (yet)
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per HTTP request otherwise
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from megatron_vespo.config.base import ConfigError
    from megatron_vespo.utils.interrupt import raise_if_interrupted

    log = logging.getLogger("megatron_vespo")
    try:
        try:
            rc = args.func(args)
        except Exception as exc:
            raise_if_interrupted(exc)  # Ctrl-C that a library (anyio under httpx) turned into its own error
            raise
    except ConfigError as exc:
        log.error("%s", exc)
        return 2
    except (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
            PermissionError) as exc:
        # bad input (a data file, a checkpoint directory, ...) raises these with a message naming the
        # field or file: show that message, keep the traceback for --log-level DEBUG
        log.debug("traceback", exc_info=True)
        log.error("%s: %s (--log-level DEBUG shows the traceback)", type(exc).__name__, exc)
        return 2
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
            raise
        # a full disk: checkpoint.safety.DiskFullError names the directory and the free space
        log.debug("traceback", exc_info=True)
        log.error("%s (--log-level DEBUG shows the traceback)", exc)
        return 1
    except KeyboardInterrupt:
        # the loops close engines and files in their finally blocks; checkpoints are written atomically,
        # so the latest one on disk is whole. Re-raised so Python ends the process by SIGINT as usual
        # (exit status 130 in the shell; a plain exit would run C++ static destructors under live
        # threads: 'terminate called without an active exception'), minus the traceback.
        log.error("interrupted")
        _silence_keyboard_interrupt_traceback()
        raise
    return int(rc or 0)


def _silence_keyboard_interrupt_traceback() -> None:
    """Make the interpreter's top-level handler print nothing for KeyboardInterrupt (others unchanged)."""
    previous = sys.excepthook

    def hook(exc_type, exc, tb):  # noqa: ANN001 - the sys.excepthook signature
        if not issubclass(exc_type, KeyboardInterrupt):
            previous(exc_type, exc, tb)

    sys.excepthook = hook


if __name__ == "__main__":
    sys.exit(main())
