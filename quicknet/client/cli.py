"""`quicknet classify`: a batch tool on `AsyncClient`. Needs only the client extra (no torch, no
server libraries), so it is registered whether or not the service is installed.

Inputs are files, folders (recursively, the extensions the server decodes), globs, and `-` (paths
on standard input, one a line). Images go in requests of at most `--batch-size` (the server's
limit; the client lowers it if the server names a smaller one), `--concurrency` requests in
flight. Answers are printed in input order as they arrive. Exit 0 when every image was
classified; 1 when any failed, each listed on stderr as `path: reason`; 2 (one `error:` line)
when nothing can succeed: the server cannot be reached, or refuses the key or the request.
Output closed early (`| head`) ends the run quietly, as a Unix tool does."""

from __future__ import annotations

import argparse
import asyncio
import csv
import glob
import io
import json
import math
import os
import sys
from collections import deque
from collections.abc import Callable, Iterable
from pathlib import Path

from quicknet.errors import QuickNetError

# What the server decodes (quicknet/pixels.py FORMATS: PNG, JPEG, WebP, BMP, GIF), by file name.
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".webp", ".bmp", ".dib", ".gif"})
FORMATS = ("table", "jsonl", "csv")


def _folder(root: Path) -> list[Path]:
    """Image files under `root`, sorted; hidden files and folders skipped (`.git`, `._x.jpg`)."""
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [Path(folder, f) for f in files if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_SUFFIXES]
    return sorted(found)


def collect(args: Iterable[str], stdin: Iterable[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """(paths to classify, in order and once each; (input, reason) for inputs that name nothing).
    A named file is sent whatever its extension (the server is the judge); folders keep images only."""
    paths: list[str] = []
    failures: list[tuple[str, str]] = []
    seen: set[str] = set()

    def add(path: Path | str) -> None:
        if str(path) not in seen:
            seen.add(str(path))
            paths.append(str(path))

    def names() -> Iterable[str]:
        read_stdin = False
        for arg in args:
            if arg == "-":
                if not read_stdin:
                    read_stdin = True
                    yield from (line.rstrip("\r\n") for line in stdin)
            else:
                yield arg

    for name in names():
        if not name.strip():
            continue
        path = Path(name)
        if path.is_dir():
            found = _folder(path)
            if not found:
                failures.append((name, f"this folder holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))})"))
            for image in found:
                add(image)
        elif path.exists():
            add(name)
        elif glob.has_magic(name):
            matches = sorted(glob.glob(name, recursive=True))
            if not matches:
                failures.append((name, "no file matches this pattern"))
            for match in matches:
                if Path(match).is_dir():
                    for found in _folder(Path(match)):
                        add(found)
                else:
                    add(match)
        else:
            failures.append((name, "not found"))
    return paths, failures


def _formatter(fmt: str, paths: list[str]) -> tuple[str | None, Callable]:
    """(header line or None, result -> line) for one output format."""
    if fmt == "jsonl":

        def jsonl(path: str, r) -> str:
            predictions = [{"label": p.label, "index": p.index, "score": p.score} for p in r.predictions]
            return json.dumps({"image": path, "model": r.model, "version": r.version, "predictions": predictions})

        return None, jsonl
    if fmt == "csv":

        def rows(*values: object) -> str:
            out = io.StringIO()
            writer = csv.writer(out, lineterminator="\n")
            for row in values:
                writer.writerow(row)
            return out.getvalue().rstrip("\n")

        def csv_line(path: str, r) -> str:
            return rows(
                *[
                    (path, rank, p.label, p.index, p.score, r.model, r.version)
                    for rank, p in enumerate(r.predictions, 1)
                ]
            )

        return rows(("image", "rank", "label", "index", "score", "model", "version")), csv_line
    width = min(60, max(len(p) for p in paths) + 1) if paths else 0

    def table(path: str, r) -> str:
        return f"{(path + ':').ljust(width)} " + ", ".join(f"{p.label} {p.score:.3f}" for p in r.predictions)

    return None, table


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int):
    """tqdm on stderr when it is a terminal; nothing when piped or logged (or tqdm is missing).
    QUICKNET_PROGRESS=1 or 0 forces it on or off, as for the build's bars."""
    setting = os.environ.get("QUICKNET_PROGRESS", "")
    if not (setting == "1" or (setting != "0" and sys.stderr.isatty())):
        return _NoBar(), print
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoBar(), print
    bar = tqdm(total=total, unit="img", file=sys.stderr, dynamic_ncols=True, leave=False)
    if not sys.stdout.isatty():
        return bar, print
    return bar, lambda line: tqdm.write(line, file=sys.stdout)  # lifts the bar out of the way first


def _reason(error, resize: bool) -> str:
    """What follows a path on stderr: the server's words, and what to do about an image too large."""
    reason = error.reason
    if not resize and "limit for one image" in reason:
        reason += "; --resize shrinks it to 32x32 here before sending"
    return reason


async def _classify(
    client, paths: list[str], chunk: int, concurrency: int, emit: Callable, bar
) -> list[tuple[str, str]]:
    from quicknet.client import QuickNetClientError

    chunks = [paths[i : i + chunk] for i in range(0, len(paths), chunk)]
    todo = deque(enumerate(chunks))
    done: dict[int, list] = {}
    failures: list[tuple[str, str]] = []
    printed = 0
    resize = client._s.resize

    def flush() -> None:  # in input order: chunk k waits for chunks before it
        nonlocal printed
        while printed in done:
            for path, outcome in zip(chunks[printed], done.pop(printed), strict=True):
                if isinstance(outcome, QuickNetClientError):
                    failures.append((path, _reason(outcome, resize)))
                else:
                    emit(path, outcome)
            printed += 1

    async def worker() -> None:
        while todo:
            index, batch = todo.popleft()
            done[index] = await client.classify_batch(batch, return_exceptions=True)
            flush()
            bar.update(len(batch))

    async with client:
        tasks = [asyncio.create_task(worker()) for _ in range(min(concurrency, len(chunks)))]
        try:
            await asyncio.gather(*tasks)
        except QuickNetClientError as e:  # about the whole run: no server, wrong key, refused request
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            from quicknet.client.admin import explain

            raise QuickNetError(explain(e, "classify")) from None
    return failures


def cmd_classify(args: argparse.Namespace) -> None:
    from quicknet.client import AsyncClient, QuickNetClientError, Retry

    if args.json and args.format not in (None, "jsonl"):
        raise QuickNetError(f"--json is --format jsonl: give one of --json and --format {args.format}")
    fmt = "jsonl" if args.json else args.format or "table"
    paths, missing = collect(args.images, sys.stdin)
    if not paths and not missing:
        raise QuickNetError("no images to classify (give files, folders, globs, or - for paths on stdin)")
    for flag in ("top_k", "timeout", "concurrency", "batch_size"):
        if getattr(args, flag) is not None and getattr(args, flag) <= 0:
            raise QuickNetError(f"--{flag.replace('_', '-')} must be positive")
    if args.retries < 0:
        raise QuickNetError("--retries must be 0 or more")
    try:
        client = AsyncClient(
            f"grpc://{args.grpc}" if args.grpc else args.url,
            api_key=args.api_key,
            timeout=args.timeout,
            cacert=args.cacert,
            cert=args.cert,
            key=args.key,
            retry=Retry(attempts=args.retries + 1),
            top_k=args.top_k,
            max_images_per_request=args.batch_size,
            max_concurrency=args.concurrency,
            model=args.model,
            version=args.version,
            resize=args.resize,
        )
    except (QuickNetClientError, ValueError) as e:
        raise QuickNetError(str(e)) from None
    header, line = _formatter(fmt, paths)
    bar, out = _progress(len(paths))
    if header is not None:  # with the first result: a run that reaches no server leaves no half a file
        write, headed = out, []

        def out(text: str) -> None:
            if not headed:
                headed.append(header)
                write(header)
            write(text)

    failures = list(missing)
    # small runs still use every slot: the server batches across requests anyway
    chunk = min(args.batch_size, max(1, math.ceil(len(paths) / args.concurrency)))
    try:
        if paths:
            failures += asyncio.run(
                _classify(client, paths, chunk, args.concurrency, lambda p, r: out(line(p, r)), bar)
            )
        sys.stdout.flush()
    except BrokenPipeError:
        _stdout_closed()
    finally:
        bar.close()
    if failures:
        print(f"{len(failures)} of {len(paths) + len(missing)} inputs failed:", file=sys.stderr)
        for name, reason in failures:
            print(f"{name}: {reason}", file=sys.stderr)
        raise SystemExit(1)


def _stdout_closed() -> None:
    """The reader went away (`| head -2`): stop at once, quietly, as `cat` or `grep` do; exit 141
    (128 + SIGPIPE), what a shell reports for a tool its pipe ended. Standard output is pointed at
    /dev/null first, so the interpreter's own flush at exit finds no closed pipe to complain about."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    raise SystemExit(141)


def add_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "classify",
        help="classify image files, folders and globs with a running server (batched, concurrent)",
        description=__doc__.split("\n\n")[1],
    )
    p.add_argument(
        "images", nargs="+", metavar="INPUT", help="image file, folder (recursive), glob, or - (paths on stdin)"
    )
    target = p.add_mutually_exclusive_group()
    target.add_argument(
        "--url",
        default=None,
        help="REST endpoint: http(s)://host:port, or host:port for http "
        "[default $QUICKNET_URL, else http://127.0.0.1:${QUICKNET_HTTP_PORT:-8000}]",
    )
    target.add_argument("--grpc", metavar="HOST:PORT", help="use gRPC instead, e.g. 127.0.0.1:8001")
    p.add_argument(
        "--top-k", type=int, default=None, help="classes per image (default: the server's, 5, as on REST and the page)"
    )
    p.add_argument(
        "--model",
        default=None,
        help="the served model to ask, e.g. quicknet-xs (default: the server's default model; `quicknet models` "
        "or GET /v1/models lists them)",
    )
    p.add_argument("--version", default=None, help="that model's version number (default: the newest served)")
    p.add_argument(
        "--resize",
        action="store_true",
        help="shrink each image here to the model's 32x32 input and send raw pixels (3 KiB an image): "
        "large photos are neither refused (413) nor sent whole",
    )
    p.add_argument(
        "--timeout", type=float, default=10.0, help="seconds per request, retries included (default: %(default)s)"
    )
    p.add_argument("--format", choices=FORMATS, default=None, help="output on stdout (default: table)")
    p.add_argument("--json", action="store_true", help="the same as --format jsonl")
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight (default: %(default)s)")
    p.add_argument(
        "--batch-size",
        type=int,
        default=256,
        help="most images per request: the server's --max-images-per-request; lowered by itself when "
        "the server names a smaller limit (default: %(default)s)",
    )
    p.add_argument(
        "--retries",
        type=int,
        default=3,
        help="retries of a request refused with 429/503 (RESOURCE_EXHAUSTED/UNAVAILABLE), honouring "
        "Retry-After (default: %(default)s)",
    )
    p.add_argument("--api-key", default=os.environ.get("QUICKNET_API_KEY"), help="API key [env QUICKNET_API_KEY]")
    p.add_argument("--cacert", metavar="PEM", help="TLS: trust this CA (https:// URL, or TLS on gRPC)")
    p.add_argument("--cert", metavar="PEM", help="mutual TLS: client certificate (with --key)")
    p.add_argument("--key", metavar="PEM", help="mutual TLS: client private key")
    p.set_defaults(func=cmd_classify)
