"""fedldm: federated, differentially private latent diffusion for medical images.

One-machine commands: simulate, evaluate, export, demo-data, pretrain-ae, pretrain-dm.
Hospital side: fedldm site check|init|start|budget.
Consortium side: fedldm coordinator start|register-site|sites|unregister-site|run.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Sequence

from cli import args as A
from cli import coordinator, local, site
from cli.errors import CommandError, UsageError

EXIT_CODES = """\
exit codes:
  0  ok
  2  bad input: bad flags, bad data, bad config, a missing file, or refused by a check
     (one line on stderr: `fedldm <command>: <message>`; nothing was changed)
  1  runtime failure: a step that should have worked did not (for example a SuperLink that
     does not answer, or a failed run); unexpected errors also print a traceback
  130 interrupted (Ctrl-C)
"""

# Expected errors, by (module, class name): printed as one line, no traceback. A module that
# was never imported cannot have raised its error, so the table costs no imports (torch).
EXPECTED: tuple[tuple[str, str, int], ...] = (
    ("ldm_core.data", "DataError", 2),
    ("ldm_core.config", "ConfigError", 2),
    ("ldm_core.checkpoint", "CheckpointError", 2),
    ("client.site_config", "SiteConfigError", 2),
    ("client.ledger", "LedgerError", 2),  # and its subclasses (LedgerMissingError)
    ("common.tls", "TlsError", 2),
    ("server.federation", "FederationError", 1),
    ("server.acceptance", "AcceptanceError", 2),
    ("server.export", "ExportError", 2),
    ("server.augment", "AugmentError", 2),
    ("server.stress", "StressError", 2),
)
# Operating-system errors about a path the user gave.
PATH_ERRORS: tuple[type[OSError], ...] = (FileNotFoundError, PermissionError, IsADirectoryError,
                                          NotADirectoryError)


def build_parser() -> A.Parser:
    parser = A.Parser(prog="fedldm", description=__doc__, epilog=EXIT_CODES,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    local.register(sub)
    site.register(sub)
    coordinator.register(sub)
    return parser


def _command_name(args: argparse.Namespace) -> str:
    if args.command == "site":
        return site.command_name(args)
    if args.command == "coordinator":
        return coordinator.command_name(args)
    return str(args.command)


def exit_code_of(exc: BaseException) -> int | None:
    """The exit code of an expected error, or None for an unexpected one."""
    if isinstance(exc, CommandError):
        return exc.exit_code
    if isinstance(exc, PATH_ERRORS):
        return 2
    for module, name, code in EXPECTED:
        cls = getattr(sys.modules.get(module), name, None)
        if isinstance(cls, type) and isinstance(exc, cls):
            return code
    return None


def one_line(exc: BaseException) -> str:
    """The error's message on one line (its class name when it has none)."""
    return " ".join(str(exc).split()) or type(exc).__name__


def run(args: argparse.Namespace) -> int:
    if args.command == "site":
        return site.run(args)
    if args.command == "coordinator":
        return coordinator.run(args)
    return local.COMMANDS[args.command](args)


def main(argv: Sequence[str] | None = None) -> int:
    """`fedldm ARGV`; returns the exit code (0 ok, 2 bad input, 1 runtime failure)."""
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(None if argv is None else list(argv))
        name = _command_name(args)
        if extra:  # reported by the command that got them, not by `fedldm`
            raise UsageError(f"fedldm {name}", f"unrecognized arguments: {' '.join(extra)} "
                             f"(see `fedldm {name} --help`)")
    except UsageError as e:
        print(f"{e.prog}: {one_line(e)}", file=sys.stderr)
        return 2
    except SystemExit as e:  # --help
        return e.code if isinstance(e.code, int) else 0
    try:
        return run(args)
    except KeyboardInterrupt:
        print(f"fedldm {name}: interrupted" + (
            ": the run folder keeps the last finished round; rerun the same command to resume"
            if args.command == "simulate" else ""), file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - sorted into expected (one line) and unexpected
        code = exit_code_of(e)
        if code is None:
            traceback.print_exc()
            print(f"fedldm {name}: unexpected error (a bug, please report it with the "
                  "traceback above)", file=sys.stderr)
            return 1
        print(f"fedldm {name}: {one_line(e)}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
