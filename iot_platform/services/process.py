"""Child processes that are started, watched and ended by PID — never by name."""

from __future__ import annotations

import logging
import os
import pwd
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

log = logging.getLogger(__name__)
# While waiting for a service to start or a run to end: a progress line at least this often.
PROGRESS_EVERY_S = 10.0


class ServiceError(RuntimeError):
    """A service could not start; the message carries the tail of its log."""


def free_port(host: str = "127.0.0.1") -> int:
    """An ephemeral port that was free a moment ago (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_is_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def unprivileged_user(preferred: str) -> pwd.struct_passwd | None:
    """As root, servers that refuse root (PostgreSQL) run as ``preferred`` or nobody."""
    if os.geteuid() != 0:
        return None
    for name in (preferred, "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise ServiceError(f"running as root but neither {preferred!r} nor 'nobody' exists")


def chown_tree(path: Path, user: pwd.struct_passwd | None) -> None:
    if user is None:
        return
    os.chown(path, user.pw_uid, user.pw_gid)
    for root, dirs, files in os.walk(path):
        os.chown(root, user.pw_uid, user.pw_gid)
        for name in dirs + files:
            os.chown(os.path.join(root, name), user.pw_uid, user.pw_gid, follow_symlinks=False)


def log_tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class ChildProcess:
    """One service process with its log file; stop() ends exactly this PID."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        user: pwd.struct_passwd | None = None,
        stop_signal: int = signal.SIGTERM,
        signal_group: bool = False,
        stop_timeout_s: float = 20.0,
    ) -> None:
        """``signal_group``: stop() signals the child's whole process group, not only the
        child, and kills the group if it has not exited after ``stop_timeout_s`` (a Dagster
        code server waits for the runs it started, which are in its group)."""
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self.user = user
        self.stop_signal = stop_signal
        self.signal_group = signal_group
        self.stop_timeout_s = stop_timeout_s
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self) -> ChildProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log_file = self.log_path.open("ab")
        try:
            self.proc = subprocess.Popen(
                self.argv,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                cwd=self.cwd,
                user=self.user.pw_uid if self.user else None,
                group=self.user.pw_gid if self.user else None,
                # Own process group: a Ctrl-C in the terminal reaches the supervisor only,
                # which then stops children in order.
                start_new_session=True,
            )
        except FileNotFoundError as exc:
            raise ServiceError(f"{self.name}: executable not found: {exc.filename}") from None
        finally:
            log_file.close()
        log.info("started %s (pid %s), log %s", self.name, self.proc.pid, self.log_path)
        return self

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, signum: int) -> None:
        if self.running():
            assert self.proc is not None
            self.proc.send_signal(signum)

    def wait_until(self, ready: Callable[[], bool], *, timeout: float, what: str) -> None:
        """Poll ``ready()`` until true; fail early with the log tail if the process died.

        A process that does not become ready (timeout, or Ctrl-C meanwhile) is stopped
        before the error propagates: nobody would hold its PID to end it later.
        """
        try:
            self._wait_until(ready, timeout=timeout, what=what)
        except BaseException:
            self.stop()
            raise

    def _wait_until(self, ready: Callable[[], bool], *, timeout: float, what: str) -> None:
        started = time.monotonic()
        deadline = started + timeout
        next_note = started + PROGRESS_EVERY_S
        while (now := time.monotonic()) < deadline:
            if now >= next_note:  # `up` waits up to minutes on a busy machine: say so
                log.info(
                    "waiting for %s (%s): %.0fs of %.0fs", self.name, what, now - started, timeout
                )
                next_note = now + PROGRESS_EVERY_S
            if not self.running():
                raise ServiceError(
                    f"{self.name} exited (code {self.proc.returncode if self.proc else '?'}) "
                    f"before {what}; log {self.log_path}:\n{log_tail(self.log_path)}"
                )
            if ready():
                return
            time.sleep(0.1)
        raise ServiceError(
            f"{self.name} not ready ({what}) after {timeout:.0f}s; log {self.log_path}:\n"
            f"{log_tail(self.log_path)}"
        )

    def wait_for_port(self, host: str, port: int, *, timeout: float = 30.0) -> None:
        self.wait_until(lambda: port_is_open(host, port), timeout=timeout, what=f"{host}:{port}")

    def stop(self, timeout: float | None = None) -> int | None:
        """Ask politely, then SIGKILL this PID (or group) after ``timeout`` seconds
        (default ``stop_timeout_s``)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            if self.signal_group:
                os.killpg(self.proc.pid, self.stop_signal)  # start_new_session: pgid = pid
            else:
                self.proc.send_signal(self.stop_signal)
            try:
                self.proc.wait(timeout=self.stop_timeout_s if timeout is None else timeout)
            except subprocess.TimeoutExpired:
                log.warning("%s (pid %s) ignored stop; killing", self.name, self.proc.pid)
                if self.signal_group:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                else:
                    self.proc.kill()
                self.proc.wait(timeout=10)
        self._end_process_group()
        log.info("stopped %s (pid %s, code %s)", self.name, self.proc.pid, self.proc.returncode)
        return self.proc.returncode

    def _end_process_group(self, grace: float = 5.0) -> None:
        """End what the child left behind in its own process group (e.g. Dagster's code
        servers, which otherwise linger until their heartbeat times out)."""
        assert self.proc is not None
        pgid = self.proc.pid  # start_new_session: the child leads its own group
        for signum in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(pgid, signum)
            except (ProcessLookupError, PermissionError):
                return
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline:
                try:
                    os.killpg(pgid, 0)
                except (ProcessLookupError, PermissionError):
                    return
                time.sleep(0.1)
            log.warning("%s left processes in group %s; killing them", self.name, pgid)
