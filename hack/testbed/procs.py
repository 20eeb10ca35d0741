"""Processes of the test bed: started in their own sessions, stopped by PID.

Shared by the control plane (cluster.py) and Prometheus (prometheus.py).
Every process we start runs in its own session so it outlives the command
that started it (`hack/cluster up` returns; the cluster runs on). We stop
them by the PIDs we recorded, never by name, and only after checking that the
PID still runs *our* process: its command line must name the owner's state
directory, which keeps a stop from signalling an unrelated process that
reused a recorded PID after ours died.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Callable


def free_port() -> int:
    """A port free on 127.0.0.1 now (another process may take it before we bind it: callers retry)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def is_ours(pid: int, owner: Path) -> bool:
    """True when pid runs (not a zombie) and its command line names `owner`."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            return False
    except (FileNotFoundError, IndexError):
        return False
    return str(owner) in cmdline


def exit_status(pid: int) -> str:
    """How a child we started ended (we are its parent when `up` runs in-process)."""
    try:
        done, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return "not our child; status unknown"
    if done == 0:
        return "still running"
    if os.WIFSIGNALED(status):
        return f"killed by signal {os.WTERMSIG(status)}"
    return f"exit code {os.WEXITSTATUS(status)}"


def spawn(argv: list[str], *, log: Path, cwd: Path) -> int:
    """Start argv in its own session, output appended to `log`; returns its PID."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, cwd=cwd)
    # Popen returns once exec has begun, but /proc/<pid>/cmdline stays empty
    # until the kernel has laid out the new argv; on a loaded machine is_ours
    # could read it then and take a starting process for a dead one.
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and proc.poll() is None:
        with contextlib.suppress(OSError):
            if Path(f"/proc/{proc.pid}/cmdline").read_bytes():
                break
        time.sleep(0.005)
    return proc.pid


def reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def stop(pids: dict[str, int], *, owner: Path, grace: float = 10.0) -> list[str]:
    """SIGTERM each recorded process that is still ours, in reverse start
    order, then SIGKILL it after `grace` seconds. Returns the names stopped."""
    stopped = []
    for name, pid in reversed(list(pids.items())):
        if is_ours(pid, owner):
            try:
                os.kill(pid, signal.SIGTERM)
                stopped.append(name)
            except ProcessLookupError:
                continue
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline and is_ours(pid, owner):
                time.sleep(0.05)
            if is_ours(pid, owner):
                os.kill(pid, signal.SIGKILL)
        reap(pid)
    return stopped


def tail(log: Path, lines: int = 30) -> str:
    """The last lines of a log, or a note that there is none."""
    if not log.exists():
        return f"(no log at {log})"
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def wait_until(what: str, *, name: str, pid: int, owner: Path, log: Path, check: Callable[[], tuple[bool, str]],
               timeout: float, error: type[Exception]) -> None:
    """Poll check() -> (ok, detail) every 0.25 s until ok; raise `error` with
    the tail of `log` when process `name` exits meanwhile or time runs out.
    An OSError from check() (refused, reset, TLS) counts as not ok yet."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        # Our own child is judged by waitpid, which cannot be wrong; /proc is
        # the fallback for a process another command started. (A start on a
        # loaded machine once read a running etcd as gone through /proc.)
        status = exit_status(pid)
        if status != "still running" and not is_ours(pid, owner):
            raise error(f"{name} exited ({status}) while waiting for {what}; log {log}; "
                        f"last lines:\n{tail(log)}")
        try:
            ok, last = check()
            if ok:
                return
        except OSError as exc:
            last = str(exc)
        time.sleep(0.25)
    raise error(f"timed out after {timeout:.0f}s waiting for {what} ({last}); "
                f"last lines of {name}'s log:\n{tail(log)}")
