"""The `quicknet` command: build commands from `quicknet.build.cli`, serving commands from `quicknet.serve.cli`,
`classify` and the commands for a running server (`models`, `stats`, `load`, `unload`, `health`)
from `quicknet.client` (the client extra alone runs them).

The top of the house: it imports the layers below it, none of them imports it. Each command
imports its heavy libraries only when it runs, so `quicknet serve` starts without torch.
"""

from __future__ import annotations

import argparse
import sys

from quicknet.errors import QuickNetError


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("quicknet-serving")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown (not installed)"


class _Parser(argparse.ArgumentParser):
    """argparse's parser, answering a misspelt command (or choice) with the one it resembles:
    `quicknet clasify` says "(did you mean 'classify'?)". Subcommands' parsers are of this class too."""

    def error(self, message: str):
        import difflib
        import re

        if m := re.match(r"argument .*: invalid choice: '(.*)' \(choose from (.*)\)$", message):
            choices = [c.strip().strip("'") for c in m.group(2).split(",")]  # quoted up to 3.12.3, bare after
            if close := difflib.get_close_matches(m.group(1), choices, n=1, cutoff=0.75):
                message += f" (did you mean {close[0]!r}?)"
        super().error(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="quicknet", description="QuickNet Serving: offline build and online service")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    from quicknet.build.cli import add_commands as add_build_commands

    add_build_commands(sub)
    from quicknet.client.cli import add_command as add_classify_command

    add_classify_command(sub)
    from quicknet.client.admin import add_commands as add_admin_commands

    add_admin_commands(sub)  # models, stats, load, unload, health: the client extra, like classify
    try:
        from quicknet.serve.cli import add_commands as add_service_commands

        add_service_commands(sub)  # imports the serve extra's settings first: fails before adding anything
    except ImportError as e:  # a build-only or client-only install has no [serve] extra
        serve = sub.add_parser("serve", help="run the service (needs the serve extra)")
        serve.set_defaults(func=lambda _a, e=e: _missing_serve(e))
    _each_knows_its_parser(parser)
    return parser


def _each_knows_its_parser(parser: argparse.ArgumentParser) -> None:
    """`usage_parser` in the namespace: the innermost command's parser (`data fetch`'s, not `data`'s),
    which main() reports a misspelt flag with (argparse would print the top level's usage)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for command in action.choices.values():
                command.set_defaults(usage_parser=command)
                _each_knows_its_parser(command)


def _did_you_mean(parser: argparse.ArgumentParser, unknown: list[str]) -> str:
    """` (did you mean --train-subset?)` for a misspelt flag among `unknown`, or nothing."""
    import difflib

    flags = [o for action in parser._actions for o in action.option_strings if o.startswith("--")]
    for arg in unknown:
        if arg.startswith("--"):
            close = difflib.get_close_matches(arg.partition("=")[0], flags, n=1, cutoff=0.75)
            if close:
                return f" (did you mean {close[0]}?)"
    return ""


def _missing_serve(error: ImportError) -> None:
    raise QuickNetError(f"the service is not installed ({error.name} missing): pip install -e '.[serve]'")


# A missing module that an extra installs ends in a one-line hint naming the extra the command needs,
# not a traceback (`make serve` installs the serve extra only; `quicknet train` then lacks torch).
# TensorRT and NVML come only with the gpu extra; any other module, with the command's own extra.
COMMAND_EXTRA = {"classify": "client", "serve": "serve", "probe": "serve", "api-key": "serve"}  # others: build
COMMAND_EXTRA.update(dict.fromkeys(("models", "stats", "load", "unload", "health"), "client"))
GPU_MODULES = frozenset({"tensorrt", "cuda", "pynvml"})
EXTRA_MODULES = GPU_MODULES | {
    *("torch", "onnx", "onnxscript", "matplotlib", "tqdm", "onnxruntime", "fastapi", "starlette", "uvicorn"),
    *("pydantic", "pydantic_settings", "grpc", "grpc_health", "grpc_reflection", "prometheus_client"),
    *("opentelemetry", "numpy", "PIL", "google", "httpx"),
}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # argparse would answer with the top-level usage, all the commands, not this one's
        given = sys.argv[1:] if argv is None else argv
        before_command = given[: given.index(args.command)]  # `quicknet --json classify`: not classify's fault
        blamed = parser if any(u in before_command for u in unknown) else args.usage_parser
        blamed.error(f"unrecognized arguments: {' '.join(unknown)}{_did_you_mean(blamed, unknown)}")
    try:
        args.func(args)
    except QuickNetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:
        module = (e.name or "").partition(".")[0]
        if module not in EXTRA_MODULES:
            raise  # not a missing extra: a bug, with its traceback
        extra = "gpu" if module in GPU_MODULES else COMMAND_EXTRA.get(args.command, "build")
        # The lock pins torch's CPU build (+cpu), which PyPI lacks (pip alone would fetch the multi-GB
        # CUDA build): `make venv-dev` installs from the lock, and README "Offline build" says how.
        how = "make venv-dev (README: Offline build)" if extra == "build" else f"pip install -e '.[{extra}]'"
        print(
            f"error: `quicknet {args.command}` needs the {extra} extra ({e.name} is not installed): {how}",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
