"""An S3-compatible server for tests: moto's server mode, a real subprocess on 127.0.0.1.

camjobs reaches it as a user reaches MinIO or Ceph: pyarrow's own S3 client, credentials and the
endpoint from the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL). The
server's request log says which objects were read (GET), an oracle independent of camjobs.
"""

from __future__ import annotations

import contextlib
import re
import subprocess
import sys
import time
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs

ACCESS_KEY = "CAMJOBSTESTKEYID"


@dataclass
class S3Server:
    process: subprocess.Popen
    log: Path
    endpoint: str  # http://127.0.0.1:PORT

    def filesystem(self, secret: str) -> pafs.S3FileSystem:
        """pyarrow's client for it, configured by hand: a reader independent of camjobs.storage."""
        return pafs.S3FileSystem(
            access_key=ACCESS_KEY,
            secret_key=secret,
            endpoint_override=self.endpoint.split("://", 1)[1],
            scheme="http",
            region="us-east-1",
            allow_bucket_creation=True,
            allow_bucket_deletion=True,
        )

    def gets(self, prefix: str) -> list[str]:
        """Keys below `prefix` (bucket/key...) that were read with a GET so far, one entry per request."""
        self._logged_so_far()
        pattern = re.compile(r'"GET /([^ ?]*)[^"]*" 2\d\d')
        text = re.sub(r"\x1b\[[0-9;]*m", "", self.log.read_text(errors="replace"))  # the log's colours
        found = (urllib.parse.unquote(m.group(1)) for m in pattern.finditer(text))
        return [key for key in found if key.startswith(prefix)]

    def _logged_so_far(self, timeout_s: float = 10.0) -> None:
        """Wait until the log holds every request answered so far: a request of our own, once it shows."""
        marker = f"log-marker-{uuid.uuid4().hex}"
        with contextlib.suppress(OSError):
            urllib.request.urlopen(f"{self.endpoint}/{marker}", timeout=timeout_s).close()
        deadline = time.monotonic() + timeout_s
        while marker not in self.log.read_text(errors="replace") and time.monotonic() < deadline:
            time.sleep(0.05)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def start_server(log: Path, timeout_s: float = 60.0) -> S3Server:
    """moto's server on a free port of 127.0.0.1; returns once it listens."""
    handle = log.open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", "0"],
        stdout=handle,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    handle.close()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = re.search(r"Running on (http://127\.0\.0\.1:\d+)", log.read_text(errors="replace"))
        if found:
            return S3Server(process, log, found.group(1))
        if process.poll() is not None:
            raise RuntimeError(f"moto's server exited ({process.returncode}): {log.read_text()}")
        time.sleep(0.1)
    process.kill()
    raise RuntimeError(f"moto's server did not start within {timeout_s:g} s: {log.read_text()}")
