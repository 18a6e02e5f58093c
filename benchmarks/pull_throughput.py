"""Measure pull throughput with wrk against a local `moorage serve`.

Usage: python benchmarks/pull_throughput.py [--source SRC_DIR] [--seconds N]

Starts a server from SRC_DIR (default: this checkout's src), pushes one image
with a 1 MiB layer, fetches a bearer token with pull scope and runs wrk against
the manifest and the layer. It prints requests per second and the server's CPU
time per request (user and system, from /proc), which is steadier than
throughput on a machine shared with other work. Comparing two source trees (for
example main and a branch) gives the cost of a change. Needs wrk (Debian
package `wrk`) and Linux.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support.oci_client import push_image, small_image  # noqa: E402
from tests.support.server import ADMIN_LOGIN, ADMIN_PASSWORD, free_port  # noqa: E402


def start(source: Path, data_dir: Path, port: int) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOORAGE_")}
    env.update(
        PYTHONPATH=str(source),
        MOORAGE_DATA_DIR=str(data_dir),
        MOORAGE_ADMIN_PASSWORD=ADMIN_PASSWORD,
        MOORAGE_LOG_LEVEL="warning",
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "moorage", "serve", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for _ in range(300):
        try:
            httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1)
            return process
        except httpx.TransportError:
            time.sleep(0.1)
    raise RuntimeError(f"server on port {port} did not start within 30 s")


def cpu_seconds(pid: int) -> float:
    """Return the user plus system CPU time of a process, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wrk(url: str, token: str, seconds: int, connections: int, pid: int) -> Result:
    cpu_before = cpu_seconds(pid)
    completed = subprocess.run(
        [
            "wrk",
            "-t2",
            f"-c{connections}",
            f"-d{seconds}s",
            "-H",
            f"Authorization: Bearer {token}",
            "-H",
            "Accept: application/vnd.oci.image.manifest.v1+json",
            url,
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    cpu = cpu_seconds(pid) - cpu_before
    rate = re.search(r"Requests/sec:\s+([\d.]+)", completed.stdout)
    total = re.search(r"(\d+) requests in", completed.stdout)
    if rate is None or total is None or "Non-2xx" in completed.stdout:
        raise RuntimeError(completed.stdout)
    return Result(float(rate.group(1)), cpu / int(total.group(1)) * 1e6)


@dataclass(frozen=True)
class Result:
    requests_per_second: float
    cpu_microseconds_per_request: float


def measure(source: Path, seconds: int, connections: int) -> dict[str, Result]:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as directory:
        process = start(source, Path(directory), port)
        try:
            image = small_image(layer_size=1024 * 1024)
            with httpx.Client(
                base_url=base, auth=(ADMIN_LOGIN, ADMIN_PASSWORD)
            ) as client:
                push_image(client, "bench/app", "1.0", image)
                token = client.get(
                    "/token", params={"scope": "repository:bench/app:pull"}
                ).json()["token"]
            manifest_url = f"{base}/v2/bench/app/manifests/1.0"
            blob_url = f"{base}/v2/bench/app/blobs/{image.layer.digest}"
            return {
                "manifest": wrk(manifest_url, token, seconds, connections, process.pid),
                "blob": wrk(blob_url, token, seconds, connections, process.pid),
            }
        finally:
            process.terminate()
            process.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=ROOT / "src")
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=16)
    args = parser.parse_args()
    result = measure(args.source, args.seconds, args.connections)
    for name, found in result.items():
        print(
            f"{args.source} {name} GET: {found.requests_per_second:.0f} req/s, "
            f"{found.cpu_microseconds_per_request:.0f} us CPU per request"
        )


if __name__ == "__main__":
    main()
