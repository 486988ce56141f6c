"""Where a running server's CPU goes, from /proc (Linux): by process role and thread, over a window.

Roles come from the names the server gives its processes (`service.supervisor.name_process`):
`quicknet-engine`, the engine process, whose main thread runs the event loop that takes every
front's requests and forms the batches, and whose other threads run the engine; `quicknet-front`,
a front process (REST and gRPC, its own event loop). A one-process server (`--workers 1`) has no
named children: its main thread is then the one event loop doing both jobs, and its "engine
threads" are all its other threads (the engine's, decoding's, gRPC's).

    before = snapshot(server_pid); ...load...; cores(before, snapshot(server_pid))

gives CPU time as cores busy (1.0 = one core all the time) for the engine loop, the engine's
threads, the fronts together and the busiest front's event loop, and the share of the whole
machine in use (load generator included). `limit()` reads one row and names what saturated first.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

TICKS_PER_S = os.sysconf("SC_CLK_TCK")
SATURATED = 0.9  # of a core for a thread or loop, of all cores for the machine, of the time for the GPU


def tree(pid: int) -> list[int]:
    """`pid` and its descendants that are alive now."""
    out = [pid]
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return out
    for child in children:
        out += tree(int(child))
    return out


def _thread_seconds(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) of each thread of `pid`."""
    out = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # the name may hold spaces and brackets
        out[int(tid)] = (int(fields[11]) + int(fields[12])) / TICKS_PER_S
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
    threads: dict[int, dict[int, float]]  # pid -> tid -> CPU seconds


def snapshot(server_pid: int) -> Snapshot:
    roles = {}
    for pid in tree(server_pid):
        try:
            name = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            continue
        if name == "quicknet-engine":
            roles[pid] = "engine"
        elif name == "quicknet-front":
            roles[pid] = "front"
    if not roles:
        roles[server_pid] = "server"
    return Snapshot(time.monotonic(), _machine_ticks(), roles, {pid: _thread_seconds(pid) for pid in roles})


def cores(before: Snapshot, after: Snapshot) -> dict:
    """Cores busy between two snapshots of one server, by role (a process restarted in between
    counts from its start)."""
    wall = max(after.at - before.at, 1e-9)

    def used(pid: int, main_thread: bool | None = None) -> float:
        then = before.threads.get(pid, {})
        total = 0.0
        for tid, seconds in after.threads.get(pid, {}).items():
            if main_thread is None or (tid == pid) == main_thread:
                total += seconds - then.get(tid, 0.0)
        return total / wall

    engines = [pid for pid, role in after.roles.items() if role in ("engine", "server")]
    fronts = [pid for pid, role in after.roles.items() if role == "front"]
    busy = after.machine[0] - before.machine[0]
    total = after.machine[1] - before.machine[1]
    return {
        "engine_loop_cores": round(sum((used(pid, True) for pid in engines), 0.0), 3),
        # on a GPU these threads also spin while they wait for it (CUDA's default synchronization)
        "engine_threads_cores": round(sum((used(pid, False) for pid in engines), 0.0), 3),
        "fronts_cores": round(sum((used(pid) for pid in fronts), 0.0), 3),  # loops, decoding and gRPC threads
        "front_loop_max_cores": round(max((used(pid, True) for pid in fronts), default=0.0), 3),
        "machine_busy": round(busy / total, 3) if total else None,
    }


def limit(row: dict) -> str:
    """What saturated first, from a row of `cores()` (and `gpu_util` where there is a GPU)."""
    if (row.get("gpu_util") or 0) >= SATURATED:
        return "GPU"
    if row["engine_loop_cores"] >= SATURATED:
        return "engine loop" if row["fronts_cores"] else "the one process's event loop"
    if row["front_loop_max_cores"] >= SATURATED:
        return "a front's event loop"
    if (row.get("machine_busy") or 0) >= SATURATED:
        return "all cores (load generator included)"
    return "nothing at 90%: latency-bound (more concurrency would serve more)"
