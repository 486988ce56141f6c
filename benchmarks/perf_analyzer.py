"""Triton's own load generator, `perf_analyzer`, against a real `quicknet serve` over the Open
Inference Protocol (KServe v2): HTTP and gRPC, `-b 1` and `-b 8`, a concurrency range.

    python -m benchmarks.perf_analyzer [--check | --install] [--quick] [--batch 1 8]
                                       [--concurrency 1,2,4,8] [--interval-ms 500]
                                       [--url HOST:PORT --grpc HOST:PORT] [--model quicknet-xs]

perf_analyzer ships on PyPI (`perf-analyzer` 2.60.0) as a manylinux_2_38 wheel: pip on an
older system only offers an empty placeholder, and the binary needs glibc 2.38. `install()` puts
everything into `.perf_analyzer/` (git-ignored), nothing system-wide:
  - the wheel, `pip download --no-deps --only-binary=:all: --platform manylinux_2_38_x86_64`, unzipped;
  - Debian trixie's libc6, libstdc++6, libgcc-s1 (and libssl3t64, zlib1g, which the binary also
    links), via `apt-get download` with a private apt configuration (a trixie sources entry,
    its own lists and cache: `apt-get update` into the folder), unpacked with `dpkg -x`;
  - `bin/perf_analyzer`, a wrapper: `<private ld-linux-x86-64.so.2> --library-path <private libs>
    <binary> "$@"`.
It is idempotent (a complete install is reused) and `--check` says whether it is installed.

Without --url the script starts `quicknet serve` over a store of the untrained model (speed does
not depend on the weights), runs every protocol x batch x concurrency, reads
perf_analyzer's `-f` CSV (throughput, p50/p99 as it reports them), prints a table and writes
benchmarks/results/perf_analyzer.json. perf_analyzer also reads the server's statistics
extension after every window and aborts when they are inconsistent (Triton's semantics).
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HOME = Path(os.environ.get("PERF_ANALYZER_HOME", REPO / ".perf_analyzer"))
VERSION = "2.60.0"
WHEEL_PLATFORM = "manylinux_2_38_x86_64"
DEBIAN_SUITE = "trixie"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
DEBS = ["libc6", "libstdc++6", "libgcc-s1", "libssl3t64", "zlib1g"]
LIB_DIRS = ["usr/lib/x86_64-linux-gnu", "lib/x86_64-linux-gnu"]
KEYRINGS = [
    "/usr/share/keyrings/debian-archive-keyring.gpg",
    "/usr/share/keyrings/debian-archive-trixie-stable.gpg",
]


class InstallError(RuntimeError):
    """perf_analyzer cannot be installed here; the message says why."""


class BrokenInstall(InstallError):
    """Installed, but it does not start: a bug here (wrapper, library path), not a missing network."""


def wrapper(home: Path = HOME) -> Path:
    return home / "bin" / "perf_analyzer"


def check(home: Path = HOME) -> str | None:
    """perf_analyzer's version line when the install at `home` runs, else None."""
    exe = wrapper(home)
    if not exe.exists():
        return None
    try:
        out = subprocess.run([str(exe), "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    text = (out.stdout + out.stderr).strip()  # it prints its version on stderr
    line = text.splitlines()[0] if text else ""
    return line if out.returncode == 0 and line.startswith("Perf Analyzer") else None


def _run(cmd: list[str], what: str, timeout: float = 600, **kwargs) -> None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)
    except (OSError, subprocess.SubprocessError) as e:
        raise InstallError(f"{what} failed: {e}") from e
    if out.returncode != 0:
        tail = (out.stderr or out.stdout).strip().splitlines()[-5:]
        raise InstallError(f"{what} failed (exit {out.returncode}): {' / '.join(tail)}")


def _fetch_wheel(home: Path) -> Path:
    """The wheel, unzipped to `home/wheel`; returns the binary."""
    binary = home / "wheel" / "perf_analyzer" / "bin" / "perf_analyzer"
    if binary.exists():
        return binary
    downloads = home / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--platform", WHEEL_PLATFORM]
    pip += ["--timeout", "20", "--retries", "1", "-q", "-d", str(downloads)]
    _run([*pip, f"perf-analyzer=={VERSION}"], "pip download perf-analyzer")
    wheels = sorted(downloads.glob(f"perf_analyzer-{VERSION}-*.whl"))
    if not wheels:
        raise InstallError(f"pip download left no perf_analyzer-{VERSION} wheel in {downloads}")
    staging = home / "wheel.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    with zipfile.ZipFile(wheels[0]) as z:
        z.extractall(staging)
    staged = staging / "perf_analyzer" / "bin" / "perf_analyzer"
    if not staged.exists():
        raise InstallError(f"{wheels[0].name} has no perf_analyzer/bin/perf_analyzer")
    for path in staging.rglob("*"):  # zipfile drops the executable bits
        if path.is_file() and (path.parent.name == "bin" or ".so" in path.name):
            path.chmod(0o755)
    shutil.rmtree(home / "wheel", ignore_errors=True)
    staging.rename(home / "wheel")
    return binary


def _apt_options(home: Path) -> list[str]:
    """A private apt: trixie sources, its own lists, cache and (empty) dpkg status; nothing system-wide."""
    apt = home / "apt"
    for d in ("lists/partial", "cache/archives/partial", "etc/sources.list.d", "etc/preferences.d"):
        (apt / d).mkdir(parents=True, exist_ok=True)
    keyring = next((k for k in KEYRINGS if Path(k).exists()), None)
    if keyring is None:
        raise InstallError(f"no Debian archive keyring ({' or '.join(KEYRINGS)}): apt cannot verify trixie")
    (apt / "etc" / "trixie.sources").write_text(
        f"Types: deb\nURIs: {DEBIAN_MIRROR}\nSuites: {DEBIAN_SUITE}\nComponents: main\nSigned-By: {keyring}\n"
    )
    (apt / "status").touch()
    sandbox = ["-oAPT::Sandbox::User=root"] if os.geteuid() == 0 else []  # the private folders are root's
    return [
        *sandbox,
        f"-oDir::Etc::sourcelist={apt / 'etc' / 'trixie.sources'}",
        f"-oDir::Etc::sourceparts={apt / 'etc' / 'sources.list.d'}",
        f"-oDir::Etc::preferencesparts={apt / 'etc' / 'preferences.d'}",
        f"-oDir::State::Lists={apt / 'lists'}",
        f"-oDir::State::status={apt / 'status'}",
        f"-oDir::Cache={apt / 'cache'}",
        "-oAPT::Architecture=amd64",
        "-oDebug::NoLocking=1",
        "-oAcquire::Retries=1",
        "-oAcquire::http::Timeout=20",
        "-qq",
    ]


def _fetch_libs(home: Path) -> Path:
    """Debian trixie's C and C++ runtimes, unpacked to `home/sysroot`; returns its ld.so."""
    sysroot = home / "sysroot"
    loader = sysroot / LIB_DIRS[0] / "ld-linux-x86-64.so.2"
    if loader.exists() and all((home / "debs").glob(f"{name}_*.deb") for name in DEBS):
        return loader
    for tool in ("apt-get", "dpkg"):
        if shutil.which(tool) is None:
            raise InstallError(f"`{tool}` is not on PATH: the trixie libraries come from Debian packages")
    options = _apt_options(home)
    _run(["apt-get", *options, "update"], f"apt-get update ({DEBIAN_SUITE}, private lists)")
    debs = home / "debs"
    shutil.rmtree(debs, ignore_errors=True)
    debs.mkdir(parents=True)
    _run(["apt-get", *options, "download", *DEBS], f"apt-get download {' '.join(DEBS)}", cwd=debs)
    staging = home / "sysroot.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    for deb in sorted(debs.glob("*.deb")):
        _run(["dpkg", "-x", str(deb), str(staging)], f"dpkg -x {deb.name}")
    if not (staging / LIB_DIRS[0] / "ld-linux-x86-64.so.2").exists():
        raise InstallError(f"libc6 from {DEBIAN_SUITE} has no {LIB_DIRS[0]}/ld-linux-x86-64.so.2")
    shutil.rmtree(sysroot, ignore_errors=True)
    staging.rename(sysroot)
    return loader


def install(home: Path = HOME) -> Path:
    """Install perf_analyzer into `home` (idempotent); returns the wrapper. Raises InstallError."""
    if check(home):
        return wrapper(home)
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        here = f"{sys.platform} {platform.machine()}"
        raise InstallError(f"perf_analyzer {VERSION} is an x86_64 Linux binary; this is {here}")
    home.mkdir(parents=True, exist_ok=True)
    binary = _fetch_wheel(home)
    loader = _fetch_libs(home)
    # the private libraries first, then any libraries the wheel carries next to its binary
    lib_dirs = [home / "sysroot" / d for d in LIB_DIRS if (home / "sysroot" / d).is_dir()]
    lib_dirs += sorted({p.parent for p in (home / "wheel").rglob("*.so*") if p.is_file()})
    library_path = ":".join(f'"$HOME_DIR/{d.relative_to(home)}"' for d in lib_dirs)
    exe = wrapper(home)
    exe.parent.mkdir(parents=True, exist_ok=True)
    exe.write_text(
        "#!/bin/sh\n"
        f"# perf_analyzer {VERSION} (PyPI wheel) on Debian {DEBIAN_SUITE}'s glibc; see benchmarks/perf_analyzer.py\n"
        'HOME_DIR="$(cd "$(dirname "$0")/.." && pwd)"\n'
        f'exec "$HOME_DIR/{loader.relative_to(home)}" --library-path {library_path} '
        f'"$HOME_DIR/{binary.relative_to(home)}" "$@"\n'
    )
    exe.chmod(0o755)
    if not check(home):
        out = subprocess.run([str(exe), "--version"], capture_output=True, text=True, timeout=30)
        raise BrokenInstall(f"the installed perf_analyzer does not start: {(out.stderr or out.stdout).strip()[-500:]}")
    return exe


def run(
    exe: Path,
    *,
    model: str,
    protocol: str,
    target: str,
    batch: int,
    concurrency: str,
    interval_ms: int,
    stability: int = 10,
    max_trials: int = 10,
    extra: list[str] | None = None,
    timeout: float = 600,
) -> tuple[list[dict], subprocess.CompletedProcess]:
    """One perf_analyzer run (`concurrency` as start[:end[:step]]); its CSV rows, sorted by concurrency."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.csv"
        cmd = [str(exe), "-m", model, "-i", protocol, "-u", target, "-b", str(batch)]
        cmd += ["--concurrency-range", concurrency, "-p", str(interval_ms), "-s", str(stability)]
        cmd += ["-r", str(max_trials), "-f", str(report), *(extra or [])]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        rows = []
        if report.exists():
            for rec in csv.DictReader(report.open()):
                rows.append(
                    {
                        "protocol": protocol,
                        "batch": batch,
                        "concurrency": int(rec["Concurrency"]),
                        "infer_s": float(rec["Inferences/Second"]),
                        "p50_ms": float(rec["p50 latency"]) / 1000,
                        "p99_ms": float(rec["p99 latency"]) / 1000,
                        "server_queue_ms": float(rec["Server Queue"]) / 1000,
                        "server_compute_ms": sum(
                            float(rec[f"Server Compute {p}"]) for p in ("Input", "Infer", "Output")
                        )
                        / 1000,
                    }
                )
    rows.sort(key=lambda r: r["concurrency"])
    return rows, proc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="say whether perf_analyzer is installed, then exit")
    parser.add_argument("--install", action="store_true", help="install perf_analyzer (if needed), then exit")
    parser.add_argument("--model", default="quicknet-xs")
    parser.add_argument("--protocol", nargs="+", default=["http", "grpc"], choices=["http", "grpc"])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="perf_analyzer -b")
    parser.add_argument(
        "--concurrency",
        default="1,2,4,8",
        help="a list (one perf_analyzer run each) or a --concurrency-range start:end:step",
    )
    parser.add_argument("--interval-ms", type=int, default=500, help="measurement window (perf_analyzer -p)")
    parser.add_argument("--stability", type=int, default=10, help="perf_analyzer -s: allowed spread (%%) of 3 windows")
    parser.add_argument("--quick", action="store_true", help="concurrency 1,4,8 and 300 ms windows")
    parser.add_argument("--threads", type=int, default=2, help="engine threads of the started server")
    parser.add_argument("--name", default="perf_analyzer", help="results file: benchmarks/results/NAME.json")
    parser.add_argument("--url", help="an already running server's HTTP host:port (skips starting one)")
    parser.add_argument("--grpc", help="an already running server's gRPC host:port")
    args = parser.parse_args()

    if args.check:
        version = check()
        print(f"{version} at {wrapper()}" if version else f"perf_analyzer is not installed in {HOME}")
        sys.exit(0 if version else 1)
    try:
        exe = install()
    except InstallError as e:
        sys.exit(f"perf_analyzer cannot be installed: {e}")
    print(f"{check()} at {exe}", flush=True)
    if args.install:
        return
    from benchmarks.common import make_untrained_store, save, table

    if args.quick:
        args.concurrency, args.interval_ms = "1,4,8", min(args.interval_ms, 300)
    ranges = args.concurrency.split(",")

    with tempfile.TemporaryDirectory() as tmp:
        server = None
        if args.url:
            http, grpc = args.url.removeprefix("http://"), args.grpc
        else:
            from quicknet.testing import start_server

            root = make_untrained_store(Path(tmp) / "store", [args.model])
            server = start_server(Path(tmp), store=root, model=args.model, threads=args.threads)
            http, grpc = f"127.0.0.1:{server.http_port}", server.grpc_target
        rows: list[dict] = []
        try:
            for protocol in args.protocol:
                target = http if protocol == "http" else grpc
                if not target:
                    sys.exit(f"--{protocol} target missing (give --grpc with --url)")
                for batch in args.batch:
                    got = []
                    for concurrency in ranges:
                        some, proc = run(
                            exe,
                            model=args.model,
                            protocol=protocol,
                            target=target,
                            batch=batch,
                            concurrency=concurrency,
                            interval_ms=args.interval_ms,
                            stability=args.stability,
                        )
                        if proc.returncode != 0:
                            failed = f"perf_analyzer {protocol} -b {batch} c={concurrency} failed ({proc.returncode})"
                            sys.exit(f"{failed}:\n{proc.stdout}{proc.stderr}")
                        got += some
                    rows += got
                    best = max(got, key=lambda r: r["infer_s"])
                    best_s = f"{best['infer_s']:.0f} infer/s at c={best['concurrency']}"
                    print(f"  {protocol} -b {batch}: best {best_s}", flush=True)
        finally:
            if server is not None:
                server.stop()
    columns = ["protocol", "batch", "concurrency", "infer_s", "p50_ms", "p99_ms"]
    columns += ["server_queue_ms", "server_compute_ms"]
    print(f"\nperf_analyzer {VERSION}, {args.model}, {args.interval_ms} ms windows (infer/s = images/s)")
    print(table(rows, columns))
    payload = {"model": args.model, "perf_analyzer": VERSION, "args": vars(args), "rows": rows}
    print(f"\nwrote {save(args.name, payload)}")


if __name__ == "__main__":
    main()
