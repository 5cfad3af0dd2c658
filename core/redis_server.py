"""An embedded `redis-server` child process, for `chatbot run` without REDIS_URL and for tests."""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import IO

import redis

from core.errors import RedisServerError

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _detach_and_die_with_parent() -> None:
    # Own session: a Ctrl-C in the terminal reaches us, and we stop Redis last, after the
    # worker has committed. PDEATHSIG: if we are killed outright, Redis does not linger.
    os.setsid()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class RedisServer:
    def __init__(self, data_dir: Path, port: int = 0, *, appendonly: bool = True) -> None:
        self.data_dir = data_dir
        self.port = port or free_port()
        self.appendonly = appendonly
        self.process: subprocess.Popen[bytes] | None = None
        self._lock_file: IO[str] | None = None

    @property
    def url(self) -> str:
        return f"redis://:{self.password}@127.0.0.1:{self.port}/0"

    @property
    def password(self) -> str:
        """A random password kept in the data directory (mode 0600): any local user could
        otherwise write to the streams and make the bot post anything, anywhere."""
        path = self.data_dir / "password"
        if not path.is_file():
            self.data_dir.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileExistsError):
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "w") as out:
                    out.write(secrets.token_urlsafe(24))
        return path.read_text().strip()

    @property
    def log_file(self) -> Path:
        return self.data_dir / "redis.log"

    def start(self, timeout_s: float = 15.0) -> str:
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        if not Path(binary).is_file():
            raise RedisServerError(
                "redis-server is not installed: run `make run` (it installs it), or "
                "`apt-get install redis-server`, or set REDIS_URL to an existing Redis"
            )
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._lock_data_dir()
        self.process = subprocess.Popen(
            self._command(binary), stdin=subprocess.DEVNULL, preexec_fn=_detach_and_die_with_parent
        )
        self._wait_until_up(self.process, timeout_s)
        log.info("embedded redis-server on port %d, data in %s", self.port, self.data_dir)
        return self.url

    def _command(self, binary: str) -> list[str]:
        options = {
            "port": str(self.port),
            "bind": "127.0.0.1",
            "dir": str(self.data_dir.resolve()),
            "appendonly": "yes" if self.appendonly else "no",
            "appendfsync": "everysec",
            "save": "",
            "daemonize": "no",
            "logfile": str(self.log_file.resolve()),
        }
        # The password goes in a file of ours, not on the command line (`ps` shows that).
        config = self.data_dir / "redis.conf"
        config.unlink(missing_ok=True)
        fd = os.open(config, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(f"requirepass {self.password}\n")
        return [
            binary,
            str(config.resolve()),
            *(part for name, value in options.items() for part in (f"--{name}", value)),
        ]

    def _wait_until_up(self, process: subprocess.Popen[bytes], timeout_s: float) -> None:
        client = redis.Redis(
            host="127.0.0.1", port=self.port, password=self.password, socket_connect_timeout=1
        )
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                if process.poll() is not None:
                    self.kill()  # releases the data directory
                    raise RedisServerError(
                        f"redis-server exited at start (code {process.returncode}); "
                        f"its log {self.log_file} ends with: {self._log_tail()}"
                    )
                try:
                    # Another server may already own the port: only our own child counts.
                    if client.info("server").get("process_id") == process.pid:
                        return
                except (redis.ConnectionError, redis.TimeoutError):
                    pass
                # Loading a large AOF answers LOADING (BusyLoadingError, a ConnectionError).
                if time.monotonic() > deadline:
                    self.kill()
                    raise RedisServerError(
                        f"redis-server did not answer on port {self.port} within {timeout_s:.0f} s"
                    )
                time.sleep(0.05)
        finally:
            client.close()

    def _lock_data_dir(self) -> None:
        """Two servers on one data directory would corrupt its append-only file."""
        if self._lock_file is not None:
            return
        handle = (self.data_dir / "server.lock").open("w")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise RedisServerError(
                f"another process (a running `chatbot run`?) already uses {self.data_dir}: "
                "stop it, or give this one its own CHATBOT_DATA_DIR"
            ) from None
        self._lock_file = handle

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM: Redis flushes its AOF and exits."""
        try:
            if self.process is None or self.process.poll() is not None:
                return
            self.process.terminate()
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                log.error("redis-server did not stop within %.0f s; killing it", timeout_s)
                self.process.kill()
                self.process.wait()
        finally:
            if self._lock_file is not None:
                self._lock_file.close()
                self._lock_file = None

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    def _log_tail(self) -> str:
        try:
            lines = self.log_file.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "(no log)"
        return " | ".join(lines[-3:]) or "(empty log)"
