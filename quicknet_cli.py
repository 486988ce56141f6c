"""The `quicknet` command: build commands from `quicknet.cli`, serving commands from `service.cli`.

It lives outside both packages so that neither imports the other; each command imports its
heavy libraries only when it runs, so `quicknet serve` starts without torch.
"""

from __future__ import annotations

import argparse
import sys

from quicknet.errors import QuickNetError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="quicknet", description="QuickNet Serving: offline build and online service")
    sub = parser.add_subparsers(dest="command", required=True)
    from quicknet.cli import add_commands as add_build_commands

    add_build_commands(sub)
    try:
        from service.cli import add_commands as add_service_commands
    except ImportError as e:  # a build-only install has no [serve] extra
        serve = sub.add_parser("serve", help="run the service (needs the serve extra)")
        serve.set_defaults(func=lambda _a, e=e: _missing_serve(e))
    else:
        add_service_commands(sub)
    return parser


def _missing_serve(error: ImportError) -> None:
    raise QuickNetError(f"the service is not installed ({error.name} missing): pip install -e '.[serve]'")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except QuickNetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
