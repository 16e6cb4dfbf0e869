"""One run at a time in a run dir: an exclusive lock that a run holds for its whole life.

    polmctl run recipe=sft hydra.run.dir=outputs/sft/mine     # holds outputs/sft/mine/.polmctl.lock
    polmctl run recipe=sft hydra.run.dir=outputs/sft/mine     # meanwhile: stops at once, naming the holder

The lock is ``fcntl.flock`` on ``<run dir>/.polmctl.lock``; the file holds a JSON record of its
holder: pid, host, command, start time and the run's recorded ``.hydra/`` files (Hydra rewrites them
as a job starts, before polmctl can refuse it, so a refused run puts the holder's back).

Why flock by hand and not the ``filelock`` package: the kernel drops a flock when its holder dies,
however it dies (kill -9 too), so a dead run's lock never blocks; and ``filelock`` opens its file
with O_TRUNC, which would erase the holder's record each time another run tries the lock. (On NFS,
Linux turns flock into NFS byte-range locks, so runs on two hosts sharing a dir exclude each other.) A run that
ends (normally, by an error or by Ctrl-C) removes the file, so a file whose lock is free was left by a
killed run: the next run takes it over and says whose it was.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

from polmctl.errors import TrainingError

LOCK_FILE = ".polmctl.lock"
HYDRA_FILES = (".hydra/config.yaml", ".hydra/overrides.yaml", ".hydra/hydra.yaml")


class RunRefused(TrainingError):
    """The run stopped before it changed anything in its run dir (which keeps what it had)."""


class RunDirBusy(RunRefused):
    """Another live run holds the run dir."""

    def __init__(self, message: str, holder: Holder | None):
        super().__init__(message)
        self.holder = holder


@dataclass
class Holder:
    """Who holds (or held) a run dir's lock."""

    pid: int
    host: str
    command: str = ""
    started: float = 0.0
    files: dict[str, str] | None = field(default=None, repr=False)  # the run's .hydra files at its start

    @classmethod
    def parse(cls, text: str) -> Holder | None:
        try:
            data = json.loads(text)
            files = data.get("files")
            return cls(
                int(data["pid"]),
                str(data["host"]),
                str(data.get("command", "")),
                float(data.get("started", 0)),
                files if isinstance(files, dict) else None,
            )
        except (ValueError, KeyError, TypeError):
            return None

    def alive(self) -> bool | None:
        """Whether the holder still runs; None when it ran on another host (it cannot be told from here)."""
        return pid_alive(self.pid) if self.host == socket.gethostname() else None

    def describe(self) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started)) if self.started else "?"
        return f"pid {self.pid} on {self.host}, since {since}" + (f": {self.command}" if self.command else "")


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def read_holder(run_dir: Path) -> Holder | None:
    """The record in ``run_dir``'s lock file: its live holder, or a killed run's (read without locking)."""
    try:
        return Holder.parse((run_dir / LOCK_FILE).read_text())
    except OSError:
        return None


def recorded_files(run_dir: Path) -> dict[str, str]:
    """The run's ``.hydra/`` files as they are now (relative path -> text)."""
    return {name: (run_dir / name).read_text() for name in HYDRA_FILES if (run_dir / name).is_file()}


def restore_files(run_dir: Path, files: dict[str, str]) -> None:
    """Put a run's recorded ``.hydra/`` files back; one it did not have is removed."""
    for name in HYDRA_FILES:
        path = run_dir / name
        if name in files:
            if not path.is_file() or path.read_text() != files[name]:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(files[name])
        else:
            path.unlink(missing_ok=True)


class RunDirLock:
    """``with RunDirLock(run_dir, command, files):`` -- the run dir is this process's until the block ends.

    ``files``: the run's ``.hydra/`` files to record (None: record none, as for a pipeline stage, whose
    files are written after it takes the lock). ``taken_over`` is the record of a killed run whose lock
    this one took."""

    def __init__(self, run_dir: Path, command: str, files: dict[str, str] | None = None):
        self.run_dir, self.path = run_dir, run_dir / LOCK_FILE
        self.record = {"pid": os.getpid(), "host": socket.gethostname(), "command": command, "started": time.time()}
        if files is not None:
            self.record["files"] = files
        self.fd: int | None = None
        self.taken_over: Holder | None = None

    def acquire(self) -> None:
        """Take the lock, or raise RunDirBusy naming the live holder."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = self._holder_of(fd)
                os.close(fd)
                who = holder.describe() if holder else "a process that has not recorded itself yet"
                raise RunDirBusy(
                    f"{self.run_dir} is in use by another polmctl run ({who}); wait for it to end, or give this "
                    "run another dir (hydra.run.dir=... or output_dir=...)",
                    holder,
                ) from None
            # The holder removes the file as it ends: if that happened between our open and our lock, we
            # hold a file nobody else will open; start over on the one at the path now.
            try:
                current = os.stat(self.path).st_ino
            except FileNotFoundError:
                current = None
            if current == os.fstat(fd).st_ino:
                break
            os.close(fd)
        self.fd = fd
        previous = Holder.parse(os.pread(fd, 1 << 22, 0).decode(errors="replace"))
        self.taken_over = previous if previous and previous.pid != os.getpid() else None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(self.record).encode(), 0)

    def release(self) -> None:
        if self.fd is None:
            return
        # Removed before unlocking: a run that opens the path from now on makes a new file.
        self.path.unlink(missing_ok=True)
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None

    @staticmethod
    def _holder_of(fd: int) -> Holder | None:
        # The holder writes its record right after it takes the lock: give it a moment.
        for _ in range(25):
            holder = Holder.parse(os.pread(fd, 1 << 22, 0).decode(errors="replace"))
            if holder:
                return holder
            time.sleep(0.02)
        return None

    def __enter__(self) -> RunDirLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
