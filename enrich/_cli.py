"""The `enrich` command: thin glue over the library.

Expected failures print one line, `enrich: error: ...`, and exit with a documented code; `-v` shows
the traceback as well.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from enrich._exceptions import EnrichError

__all__ = ["main"]

EXIT_OK = 0
EXIT_USAGE = 2

_EPILOG = """\
exit codes:
  0  success
  2  a usage or input error (nothing was sent)
"""


def _emulate(args: argparse.Namespace) -> int:
    from enrich._emulator import EmulatorConfig, serve

    faults = frozenset(f.strip() for f in args.faults.split(",") if f.strip()) if args.faults else None
    fields: dict[str, object] = {
        "api_key": args.api_key,
        "latency": args.latency,
        "failure_rate": args.failure_rate,
        "fault_rate": args.fault_rate,
        "rate_limit": args.rate_limit or None,
        "run_rate_limit": args.run_rate_limit or None,
        "credit": args.credit,
        "seed": args.seed,
    }
    if faults is not None:
        fields["faults"] = faults
    try:
        config = EmulatorConfig(**fields)  # type: ignore[arg-type]
    except ValueError as exc:
        raise EnrichError(str(exc)) from exc
    key = args.api_key or "any non-empty key"
    print(
        f"enrich: Task API emulator on http://{args.host}:{args.port} (key: {key}); answers are synthetic.\n"
        f"enrich: export PARALLEL_BASE_URL=http://{args.host}:{args.port}   Ctrl-C stops it.",
        file=sys.stderr,
    )
    serve(config, host=args.host, port=args.port)
    return EXIT_OK


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="enrich",
        description="Enrich tables through Parallel's Task API.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="show tracebacks of errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    emu = sub.add_parser(
        "emulate",
        help="serve a local emulator of the Task API (no key, no network)",
        description="Serve a local emulator of the Task API on 127.0.0.1. Its answers are synthetic.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    emu.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    emu.add_argument("--port", type=int, default=8787, help="port (default: 8787)")
    emu.add_argument("--api-key", help="accept only this key (default: any non-empty key)")
    emu.add_argument(
        "--latency", type=float, help="mean seconds a run takes (default: the processor's range / 60)"
    )
    emu.add_argument("--failure-rate", type=float, default=0.0, help="share of runs that fail (0-1)")
    emu.add_argument("--fault-rate", type=float, default=0.0, help="share of requests hit by a fault (0-1)")
    emu.add_argument(
        "--faults", help="fault kinds, comma-separated: html_5xx,drop,slow,lost_create (default: all)"
    )
    emu.add_argument(
        "--rate-limit", type=int, default=2000, help="requests per minute per key, 0 for none (default 2000)"
    )
    emu.add_argument("--run-rate-limit", type=int, default=0, help="runs created per minute, 0 for none")
    emu.add_argument("--credit", type=float, help="dollars of credit; runs beyond it get 402")
    emu.add_argument("--seed", type=int, default=0, help="seed of every random choice (default 0)")
    emu.set_defaults(func=_emulate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `enrich` command; returns its exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return int(args.func(args))
    except EnrichError as exc:
        if args.verbose:
            raise
        print(f"enrich: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
