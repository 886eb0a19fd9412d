"""The `microseg` command line. Each subsystem registers its own verbs.

A module listed in ``COMMAND_MODULES`` exposes ``register(subparsers)``, which adds one or more
verbs with ``set_defaults(func=handler)``; a handler takes the parsed arguments and returns an
exit code. A :class:`~microseg.errors.MicrosegError` becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from . import __version__
from .errors import MicrosegError

COMMAND_MODULES = [
    "microseg.app",
    "microseg.classify.commands",
    "microseg.policy.commands",
    "microseg.io.generator",
    "microseg.overlay.commands",
    "microseg.ipsec.commands",
    "microseg.packet.commands",
    "microseg.offload.commands",
    "microseg.conntrack.commands",
    "microseg.agent.agent",
    "microseg.agent.lab",
    "microseg.agent.control",
    "microseg.store.commands",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="microseg",
        description="Zero-trust micro-segmentation datapath: parse, classify, track, offload, encrypt.",
    )
    parser.add_argument("--version", action="version", version=f"microseg {__version__}")
    parser.add_argument(
        "--log-level",
        dest="global_log_level",
        default="warning",
        choices=("debug", "info", "warning", "error"),
        help="operational messages (lab, store, agent) to stderr at this level and above "
        "(default: %(default)s; user errors are always one line)",
    )
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


CLI_LOG_FORMAT = "microseg: %(levelname)s: %(name)s: %(message)s"


class _Stderr(logging.StreamHandler):
    """A handler that writes to whatever ``sys.stderr`` is when a message comes."""

    @property  # type: ignore[override]
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def log_handler() -> logging.Handler:
    """The one stderr handler of the ``microseg`` loggers (made on first use)."""
    lg = logging.getLogger("microseg")
    for h in lg.handlers:
        if isinstance(h, _Stderr):
            return h
    h = _Stderr()
    h.setFormatter(logging.Formatter(CLI_LOG_FORMAT))
    lg.addHandler(h)
    lg.propagate = False
    return h


def _logging(level: str) -> None:
    """The ``microseg`` loggers go to stderr, one line per message, keys never in them."""
    log_handler().setFormatter(logging.Formatter(CLI_LOG_FORMAT))
    logging.getLogger("microseg").setLevel(level.upper())


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _logging(args.global_log_level)
    try:
        return int(args.func(args) or 0)
    except MicrosegError as exc:
        print(f"microseg {args.verb}: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader went away (e.g. `| head`): stop quietly, as Unix tools do.
        sys.stdout = None  # type: ignore[assignment]
        return 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
