"""Run a command and measure wall time, user+sys CPU, peak total RSS and peak anonymous RSS.

Peak anonymous memory is reported apart from total RSS: pages of memory-mapped input files count in
RSS but belong to the page cache and can be reclaimed.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Measurement:
    wall: float
    cpu: float
    durable: float  # wall time plus the `sync` that writes the command's dirty pages to disk
    peak_rss: int  # bytes
    peak_anon: int  # bytes
    returncode: int


def _status_kb(pid: int) -> dict[str, int]:
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                out[key] = int(rest.split()[0])
    except (OSError, ValueError):
        pass
    return out


def run(cmd: list[str], cgroup: Path | None = None, env: dict[str, str] | None = None) -> Measurement:
    """Runs `cmd` (optionally inside a cgroup v1 memory group) and polls its memory every 10 ms.

    Dirty pages left by earlier commands are synced first, untimed, so each command starts from the
    same state; the sync after it is timed separately (`durable`)."""
    subprocess.run(["sync"], check=True)

    def enter_cgroup() -> None:
        if cgroup is not None:
            (cgroup / "cgroup.procs").write_text(str(os.getpid()))

    start = time.perf_counter()
    proc = subprocess.Popen(cmd, preexec_fn=enter_cgroup, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peaks = {"rss": 0, "anon": 0}
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            s = _status_kb(proc.pid)
            peaks["rss"] = max(peaks["rss"], s.get("VmHWM", 0), s.get("VmRSS", 0))
            peaks["anon"] = max(peaks["anon"], s.get("RssAnon", 0))
            time.sleep(0.01)

    t = threading.Thread(target=poll, daemon=True)
    t.start()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    done.set()
    t.join()
    stderr = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    proc.stderr.close()
    rc = os.waitstatus_to_exitcode(status)
    subprocess.run(["sync"], check=True)
    durable = time.perf_counter() - start
    if rc != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({rc}): {stderr[-2000:]}")
    return Measurement(
        wall=wall,
        durable=durable,
        cpu=usage.ru_utime + usage.ru_stime,
        peak_rss=max(peaks["rss"], usage.ru_maxrss) * 1024,
        peak_anon=peaks["anon"] * 1024,
        returncode=rc,
    )


def memory_cgroup(limit_bytes: int) -> Path | None:
    """A fresh cgroup v1 memory group with a hard limit, or None where that is not possible."""
    root = Path("/sys/fs/cgroup/memory")
    if not (root / "cgroup.procs").exists():
        return None
    group = root / f"llmprune-bench-{os.getpid()}"
    try:
        group.mkdir(exist_ok=True)
        (group / "memory.limit_in_bytes").write_text(str(limit_bytes))
    except OSError:
        return None
    return group


def remove_cgroup(group: Path) -> None:
    try:
        group.rmdir()
    except OSError:
        pass


def peak_cgroup_usage(group: Path) -> int:
    try:
        return int((group / "memory.max_usage_in_bytes").read_text())
    except (OSError, ValueError):
        return 0
