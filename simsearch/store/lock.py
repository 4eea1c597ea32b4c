"""One writer per run.dir: `flock` on `run.dir/.lock`, released by the kernel when its process dies."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

from simsearch.errors import SimsearchError
from simsearch.store.layout import LOCK

log = logging.getLogger(__name__)


def _write_owner(fd: int, data: bytes) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)


class RunLock:
    """`run.dir/.lock`, held while a run writes there: one writer per run.dir.

    The lock is `fcntl.flock` on the file, taken without waiting: the kernel lets one open file hold it
    and drops it when its process dies, so a dead run's lock is free with no takeover to race on. The
    holder writes its pid, host and start time into the file for the sentence that refuses the others,
    and removes the file while still holding the lock; a run that locked a file removed meanwhile
    (another inode than the path's) lets it go and tries again.
    """

    def __init__(self, run_dir: Path):
        self.path = run_dir / LOCK
        self.owner = {"pid": os.getpid(), "host": socket.gethostname(),
                      "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        self.fd: int | None = None

    def __enter__(self) -> RunLock:
        for _ in range(100):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
            except PermissionError:
                raise SimsearchError(f"run.dir={self.path.parent} is not writable") from None
            except OSError as error:
                raise SimsearchError(f"cannot create the lock {self.path}: {error.strerror or error}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                self._refuse()
            try:
                if os.fstat(fd).st_ino != os.stat(self.path, follow_symlinks=False).st_ino:
                    raise FileNotFoundError  # the holder removed this file as it finished: lock the new one
            except FileNotFoundError:
                os.close(fd)
                continue
            self.fd = fd
            try:
                left = os.pread(fd, 4096, 0)
                if left:  # a run killed while it held the lock: the kernel released it
                    log.warning("taking over the stale lock %s of a run that ended without releasing it (%s)",
                                self.path, left.decode("utf-8", "replace").strip()[:200])
                _write_owner(fd, (json.dumps(self.owner) + "\n").encode())
            except OSError as error:
                self.__exit__()
                raise SimsearchError(f"cannot write the lock {self.path}: {error.strerror or error}") from None
            return self
        raise SimsearchError(f"cannot take the lock {self.path}: other runs keep replacing it")

    def _refuse(self) -> None:
        try:
            holder = json.loads(self.path.read_text()[:4096])
        except (OSError, ValueError, RecursionError):
            holder = {}
        holder = holder if isinstance(holder, dict) else {}
        raise SimsearchError(
            f"another run (pid {holder.get('pid', '?')} on {holder.get('host', '?')}, since "
            f"{holder.get('started', '?')}) is writing to {self.path.parent}: wait for it to finish"
        )

    def __exit__(self, *exc_info: Any) -> None:
        if self.fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # still locked: no one else holds this file
        except OSError:
            pass
        os.close(self.fd)  # releases the lock
        self.fd = None
