"""One campaign, one runner: an exclusive lock beside the journal for the life of a run.

`DIR/campaign.lock` is held with flock(2) and names its holder (pid, host, start time, and a
heartbeat it refreshes). A second `run`/`resume` on the folder gets one line naming the holder.
A lock whose holder died (kill -9, a crash, a reboot) is no longer held by the kernel: the next
runner takes it over and says so. On shared storage where flock does not reach across hosts,
a holder on another host counts as alive while its heartbeat is fresh.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

from evomerge.errors import EvomergeError

HEARTBEAT_S = 30.0
STALE_S = 3 * HEARTBEAT_S


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


class CampaignLock:
    FILE = "campaign.lock"

    def __init__(self, folder: str | Path):
        self.path = Path(folder) / self.FILE
        self._fd: int | None = None
        self._guard = threading.Lock()  # the heartbeat thread and release() never touch the file together
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.info: dict = {}

    def _read(self) -> dict:
        """The holder's record, with every field of the right type (a damaged file reads as no holder)."""
        try:
            info = json.loads(self.path.read_text() or "{}")
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            return {}
        if not isinstance(info, dict):
            return {}
        number = lambda v: float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else 0.0  # noqa: E731
        return {"pid": int(number(info.get("pid"))), "host": str(info.get("host", "?")),
                "since": number(info.get("since")), "heartbeat": number(info.get("heartbeat"))} if info else {}

    def _holder(self, info: dict) -> str:
        if not info:
            return "another evomerge process"
        return f"pid {info['pid']} on {info['host']}, running since {_when(info['since'])}"

    def holder(self) -> dict | None:
        """Who runs the campaign now (pid, host, since), or None: for watchers, which never take the lock."""
        info = self._read()
        if not info:
            return None
        if info["host"] == socket.gethostname():
            try:
                os.kill(info["pid"], 0)
            except ProcessLookupError:
                return None
            except PermissionError:  # alive, owned by another user
                pass
            return info
        return info if time.time() - info["heartbeat"] < STALE_S else None

    def acquire(self) -> "CampaignLock":
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise EvomergeError(f"cannot create {self.path} ({exc.strerror}); check the campaign folder is writable") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise EvomergeError(f"{self.path.parent} is in use by {self._holder(self._read())}; wait for it to "
                                "finish, or stop it first (a second runner would evaluate the same candidates)") from None
        previous = self._read()
        host = socket.gethostname()
        if previous:
            fresh = time.time() - float(previous.get("heartbeat", 0)) < STALE_S
            if previous.get("host") != host and fresh:
                # flock is exact on one host; across hosts (NFS) it may not reach, so trust the heartbeat
                os.close(fd)
                raise EvomergeError(f"{self.path.parent} is in use by {self._holder(previous)} (heartbeat "
                                    f"{time.time() - float(previous.get('heartbeat', 0)):.0f} s ago); wait for it "
                                    "to finish, or stop it first")
            print(f"evomerge: note: taking over the lock of {self._holder(previous)}, which is no longer running",
                  file=sys.stderr)
        self._fd = fd
        now = time.time()
        self.info = {"pid": os.getpid(), "host": host, "since": now, "heartbeat": now}
        self._write()
        self._thread = threading.Thread(target=self._beat, name="evomerge-lock-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _write(self) -> None:
        data = json.dumps(self.info).encode()
        os.lseek(self._fd, 0, os.SEEK_SET)
        os.ftruncate(self._fd, 0)
        os.write(self._fd, data)
        os.fsync(self._fd)

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            with self._guard:
                if self._fd is None:
                    return
                self.info["heartbeat"] = time.time()
                try:
                    self._write()
                except OSError:
                    return

    def release(self) -> None:
        self._stop.set()
        with self._guard:
            if self._fd is None:
                return
            try:
                os.ftruncate(self._fd, 0)  # an empty lock file: released cleanly, nobody to take over from
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            finally:
                os.close(self._fd)
                self._fd = None
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=1)

    def __enter__(self) -> "CampaignLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
