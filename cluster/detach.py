"""`pdcluster up --detach` and `pdcluster down`.

A detached cluster is the same supervising launcher as `pdcluster up`, started in its own
session with its output in a log file; `up --detach` returns once that launcher says the
cluster is healthy. Every running launcher leaves a state file (its pid, the router's URL,
its run folder) in $PDCLUSTER_STATE_DIR (default ~/.local/state/pdcluster), removed when it
exits; `pdcluster down` finds the launcher there and sends it SIGTERM, which stops the
cluster as Ctrl-C does (nodes, router, Ray actors).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

DETACHED_START_MARGIN_S = 300.0   # beyond the launcher's own start timeout (PDCLUSTER_START_TIMEOUT_S)
DOWN_TIMEOUT_S = 60.0


def state_dir() -> Path:
    base = os.environ.get("PDCLUSTER_STATE_DIR")
    if base:
        return Path(base).expanduser()
    return Path(os.environ.get("XDG_STATE_HOME", "~/.local/state")).expanduser() / "pdcluster"


def _private_state_dir() -> Path:
    """The state folder, readable by this account only: launcher logs may name the API key."""
    d = state_dir()
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    return d


def write_state(url: str, backend: str, run_dir: Path) -> Path:
    """Called by a launcher whose cluster is ready; returns the file to remove at exit."""
    path = _private_state_dir() / f"launcher-{os.getpid()}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"pid": os.getpid(), "pid_started": process_start_time(os.getpid()), "url": url,
                               "backend": backend, "run_dir": str(run_dir), "started": time.time()}))
    tmp.replace(path)  # readers never see half a file
    return path


def process_start_time(pid: int) -> int | None:
    """When `pid` started, in clock ticks since boot (/proc/PID/stat field 22): with the pid,
    it names one process for good, where a pid alone is reused. None off Linux."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[19])  # after "(comm)": field 22
    except (OSError, ValueError, IndexError):
        return None


def running_clusters() -> list[dict[str, Any]]:
    """State files of launchers that are alive (stale ones are removed)."""
    out = []
    for path in sorted(state_dir().glob("launcher-*.json")):
        try:
            state = json.loads(path.read_text())
            os.kill(int(state["pid"]), 0)
            if not _is_launcher(int(state["pid"]), state.get("pid_started")):  # its pid was reused
                raise ProcessLookupError
        except ProcessLookupError:
            path.unlink(missing_ok=True)
            continue
        except (OSError, ValueError, KeyError, TypeError):
            continue
        state["file"] = str(path)
        out.append(state)
    return out


def run_detached(config_path: str | None) -> int:
    """Start `pdcluster up` in the background; return once it is ready (0) or has failed (1)."""
    log_path = _private_state_dir() / f"up-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    argv = [sys.executable, "-m", "cluster.cli", "up", *([config_path] if config_path else [])]
    with open(os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "ab") as log:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, close_fds=True)
    from cluster.launcher import DEFAULT_START_TIMEOUT_S
    limit = float(os.environ.get("PDCLUSTER_START_TIMEOUT_S", DEFAULT_START_TIMEOUT_S)) + DETACHED_START_MARGIN_S
    deadline = time.monotonic() + limit
    print(f"starting the cluster in the background (launcher pid {proc.pid}, log {log_path})", flush=True)
    try:
        return _wait_ready(proc, log_path, deadline, limit)
    except KeyboardInterrupt:  # the launcher runs in its own session: Ctrl-C here must reach it
        proc.send_signal(signal.SIGTERM)
        print("\npdcluster up --detach: interrupted: stopping the launcher", file=sys.stderr)
        return 130


def _wait_ready(proc: subprocess.Popen, log_path: Path, deadline: float, limit: float) -> int:
    while True:
        state = next((s for s in running_clusters() if s["pid"] == proc.pid), None)
        if state is not None:
            print(f"pdcluster is ready: {state['url']}\n"
                  f"  pdcluster status --url {state['url']}\n"
                  f"  pdcluster down --url {state['url']}    (stops it)")
            return 0
        if proc.poll() is not None:
            print(f"pdcluster up --detach: the launcher exited with code {proc.returncode} before the cluster was "
                  f"ready; its log {log_path}:\n{_tail(log_path)}", file=sys.stderr)
            return 1
        if time.monotonic() > deadline:
            proc.send_signal(signal.SIGTERM)
            print(f"pdcluster up --detach: not ready after {limit:.0f} s: stopping it; "
                  f"log {log_path}", file=sys.stderr)
            return 1
        time.sleep(0.3)


def run_down(url: str | None) -> int:
    clusters = running_clusters()
    if url is not None:
        clusters = [c for c in clusters if c["url"].rstrip("/") == url.rstrip("/")]
    if not clusters:
        where = f" at {url}" if url else ""
        print(f"pdcluster down: no running cluster{where} was started from this machine's account "
              f"(state files in {state_dir()})", file=sys.stderr)
        return 1
    if len(clusters) > 1:
        print("pdcluster down: several clusters run; name one with --url:\n"
              + "\n".join(f"  {c['url']}  (launcher pid {c['pid']}, {c['backend']})" for c in clusters),
              file=sys.stderr)
        return 2
    c = clusters[0]
    pid = int(c["pid"])
    print(f"stopping the cluster at {c['url']} (launcher pid {pid})...", flush=True)
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        Path(c["file"]).unlink(missing_ok=True)
        print("stopped")
        return 0
    deadline = time.monotonic() + DOWN_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            print("stopped")
            return 0
        time.sleep(0.2)
    print(f"pdcluster down: the launcher (pid {pid}) did not exit within {DOWN_TIMEOUT_S:.0f} s; its log is in "
          f"{c['run_dir']}", file=sys.stderr)
    return 1


def _is_launcher(pid: int, started: int | None) -> bool:
    """Whether `pid` is still the launcher that wrote the state file: the same start time
    (Linux), else, for files without one, a `cluster.cli up` command line. Off Linux
    (no /proc) the pid is taken at its word."""
    if not Path("/proc/self").exists():
        return True
    if started is not None:
        return process_start_time(pid) == started
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"up" in argv and any(a == b"cluster.cli" or a.rsplit(b"/", 1)[-1] == b"pdcluster" for a in argv)


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
