"""``ServerProcess``: our gRPC server in a child process, for the tests that need one."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Mapping

from deepzero_oracle.server.cli import serving_address, serving_rest_url


class ServerProcess:
    """``python -m deepzero_oracle.server`` (``deepzero-oracle serve``) in a child process;
    knows its address, its REST URL (``rest_url``, with ``--http-port``), its process id and the
    "serving ..." line it printed (``line``).

    Args:
        target: ``MODULE:CALLABLE`` as for the CLI.
        *args: more CLI options (``"--token", "t"``); ``--port 0`` is added if no --port.
        cwd: directory to start in (MODULE must import from there).
        env: environment for the child (default: this process's).
        startup_timeout: seconds to wait for the "serving ... at HOST:PORT" line.
    Stop it with ``stop()`` (SIGTERM, then SIGKILL after ``timeout``) or ``kill()``.
    """

    def __init__(self, target: str, *args: str, cwd: str | os.PathLike | None = None,
                 env: Mapping[str, str] | None = None, python: str = sys.executable,
                 startup_timeout: float = 60.0):
        cmd = [python, "-m", "deepzero_oracle.server", target, *args]
        if "--port" not in args:
            cmd += ["--port", "0"]
        self.stderr_file = tempfile.TemporaryFile(mode="w+b")
        self.proc = subprocess.Popen(cmd, cwd=cwd, env=None if env is None else dict(env),
                                     stdout=subprocess.PIPE, stderr=self.stderr_file,
                                     stdin=subprocess.DEVNULL, text=True, bufsize=1)
        self.pid = self.proc.pid
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._drain, daemon=True).start()
        deadline = time.monotonic() + startup_timeout
        self.address, self.rest_url, self.line = "", None, ""
        while not self.address:
            try:
                line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                self.kill()
                raise TimeoutError(f"server {target} did not start in {startup_timeout} s; "
                                   f"stderr: {self.stderr_tail()}") from None
            if line is None:
                self.proc.wait()
                raise RuntimeError(f"server {target} exited with {self.proc.returncode} before "
                                   f"serving; stderr: {self.stderr_tail()}")
            self.address, self.line = serving_address(line) or "", line
            self.rest_url = serving_rest_url(line)
        self.port = int(self.address.rsplit(":", 1)[1])

    def _drain(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def stderr_tail(self, chars: int = 2000) -> str:
        """The end of the child's stderr (for error messages)."""
        self.stderr_file.seek(0)
        return self.stderr_file.read().decode("utf-8", "replace")[-chars:]

    def stop(self, timeout: float = 15.0, sig: int = signal.SIGTERM) -> int:
        """Send ``sig`` (default SIGTERM: graceful) to our child, wait; SIGKILL if it hangs."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def kill(self) -> int:
        """SIGKILL the child (a crash, as far as clients can tell)."""
        if self.proc.poll() is None:
            self.proc.kill()
        return self.proc.wait()

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
