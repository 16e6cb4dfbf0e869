"""A `polmctl rollout-server` process for tests: started on a free port, its address read from
its first line, stopped (SIGTERM, then SIGKILL) by ``stop``."""

from __future__ import annotations

import queue
import subprocess
import sys
import threading
import time

import pytest


class Server:
    """A `polmctl rollout-server` process and its address."""

    def __init__(self, *args: str):
        command = [sys.executable, "-m", "polmctl", "rollout-server", "builtin:tiny", "--port", "0", *args]
        self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        self.reader = threading.Thread(target=lambda: [self.lines.put(line) for line in self.proc.stdout], daemon=True)
        self.reader.start()
        self.output = ""
        deadline = time.monotonic() + 120
        while "on http://" not in self.output:
            try:
                self.output += self.lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                self.stop()
                pytest.fail(f"the rollout server did not come up in 120 s:\n{self.output}")
            if self.proc.poll() is not None and self.lines.empty():
                pytest.fail(f"the rollout server exited {self.proc.returncode}:\n{self.output}")
        self.url = "http://" + self.output.split("on http://", 1)[1].split()[0]

    def rest(self) -> str:
        """What the server printed after its address line (once it has exited)."""
        self.proc.wait(timeout=20)
        self.reader.join(timeout=20)  # it ends at the end of the output
        while not self.lines.empty():
            self.output += self.lines.get_nowait()
        return self.output

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: the server shuts down
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=20)
        return self.proc.returncode
