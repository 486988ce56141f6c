"""Where a running server's CPU goes, from /proc (Linux): by process role and thread, over a window.

Roles come from the names the server gives its processes (`quicknet.serve.supervisor.name_process`):
`quicknet-engine`, the engine process, whose main thread runs the event loop that takes every
front's requests and forms the batches, and whose other threads run the engine; `quicknet-front`,
a front process (REST and gRPC, its own event loop). A one-process server (`--workers 1`) has no
named children: its main thread is then the one event loop doing both jobs, and its "engine
threads" are all its other threads (the engine's, decoding's, gRPC's).

    before = snapshot(server_pid); ...load...; cores(before, snapshot(server_pid))

gives CPU time as cores busy (1.0 = one core all the time) for the engine loop, the engine's
threads, the fronts together and the busiest front's event loop, and the share of the whole
machine in use (load generator included). `limit()` reads one row and names the saturated part.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

TICKS_PER_S = os.sysconf("SC_CLK_TCK")
SATURATED = 0.9  # of a core for a thread or loop, of all cores for the machine, of the time for the GPU


def _stat_fields(path: str) -> list[str]:
    """A /proc stat line's fields from the third on (the name in brackets may hold anything)."""
    stat = Path(path).read_text()
    return stat[stat.rindex(")") + 2 :].split()


def cpu_seconds(path: str) -> float:
    """User + system CPU seconds from a /proc stat file: a process's (every thread's) or one thread's."""
    fields = _stat_fields(path)
    return (int(fields[11]) + int(fields[12])) / TICKS_PER_S  # utime + stime


def tree(pid: int) -> list[int]:
    """`pid` and its descendants alive now, found through every process's parent: the shortcut,
    /proc/<pid>/task/<pid>/children, needs a kernel built with it, and the GPU machines run
    gVisor's or Firecracker's, never checked here."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                children.setdefault(int(_stat_fields(f"/proc/{entry}/stat")[1]), []).append(int(entry))
            except (OSError, ValueError, IndexError):
                continue
    out = [pid]
    for p in out:  # grows as it goes: breadth first
        out += children.get(p, [])
    return out


def _machine_ticks() -> tuple[int, int]:
    """(busy, total) clock ticks of all CPUs since boot."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return sum(values) - idle, sum(values)


@dataclass
class Snapshot:
    at: float
    machine: tuple[int, int]
    roles: dict[int, str]  # pid -> engine | front | server
    seconds: dict[int, tuple[float, float]]  # pid -> CPU seconds (whole process, main thread)


def snapshot(server_pid: int) -> Snapshot:
    roles = {}
    pids = tree(server_pid)
    for pid in pids:
        try:
            name = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            continue
        if name in ("quicknet-engine", "quicknet-front"):
            roles[pid] = name.removeprefix("quicknet-")
    if len(pids) == 1:  # no children at all: a one-process server
        roles[server_pid] = "server"
    seconds = {}
    for pid in roles:
        try:  # the process's own total includes threads that have exited
            seconds[pid] = (cpu_seconds(f"/proc/{pid}/stat"), cpu_seconds(f"/proc/{pid}/task/{pid}/stat"))
        except (OSError, ValueError, IndexError):
            continue
    return Snapshot(time.monotonic(), _machine_ticks(), roles, seconds)


def cores(before: Snapshot, after: Snapshot) -> dict:
    """Cores busy between two snapshots of one server, by role (a process started in between, a
    restarted front say, counts from its start). `processes` says which roles were found."""
    wall = max(after.at - before.at, 1e-9)

    def used(pid: int) -> tuple[float, float]:
        """(whole process, main thread) cores busy."""
        then = before.seconds.get(pid, (0.0, 0.0))
        now = after.seconds.get(pid, then)
        return (now[0] - then[0]) / wall, (now[1] - then[1]) / wall

    engines = [used(pid) for pid, role in after.roles.items() if role in ("engine", "server")]
    fronts = [used(pid) for pid, role in after.roles.items() if role == "front"]
    busy = after.machine[0] - before.machine[0]
    total = after.machine[1] - before.machine[1]
    return {
        "processes": " ".join(sorted(after.roles.values())) or "none found",
        "engine_loop_cores": round(sum((main for _, main in engines), 0.0), 3),
        # on a GPU these threads also spin while they wait for it (CUDA's default synchronization)
        "engine_threads_cores": round(sum((whole - main for whole, main in engines), 0.0), 3),
        "fronts_cores": round(sum((whole for whole, _ in fronts), 0.0), 3),  # loops, decoding, gRPC
        "front_loop_max_cores": round(max((main for _, main in fronts), default=0.0), 3),
        "machine_busy": round(busy / total, 3) if total else None,
    }


def limit(row: dict) -> str:
    """Which part is saturated (at 90%), asked in this order: the GPU, the engine core (its runners'
    work outside the engine call, under one lock: one core's worth at most), the engine's event
    loop (the one loop of a `--workers 1` server), a front's loop, all cores. An order of asking,
    not of time: the numbers beside it say how close the others are."""
    if (row.get("gpu_util") or 0) >= SATURATED:
        return "GPU"
    if (row.get("engine_core_us") or 0) * (row.get("requests_s") or 0) / 1e6 >= SATURATED:
        return "the engine core (its runners outside the engine call)"
    if row["engine_loop_cores"] >= SATURATED:
        return "the one process's event loop" if row.get("workers", 1) == 1 else "engine loop"
    if row["front_loop_max_cores"] >= SATURATED:
        return "a front's event loop"
    if (row.get("machine_busy") or 0) >= SATURATED:
        return "all cores (load generator included)"
    return "none at 90% (the clients' concurrency, latency or a lock)"
