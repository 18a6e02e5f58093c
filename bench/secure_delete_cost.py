"""`python -m bench.secure_delete_cost`: what SQLite's secure_delete costs a push.

Moorage sets `PRAGMA secure_delete=ON` on every SQLite connection. This starts
a Moorage server from this checkout and one from a copy of its `src` with the
pragma set to OFF, alternating which goes first, and pushes the same number of
small images to each: three random 8 KiB layers, a config and a manifest per
image, with the admin account. It prints the server's CPU time (all of its
processes) and the wall time per image. Debian's SQLite has secure_delete on
by default, so there the OFF server shows what builds without it would save.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import httpx

from tests.support.identity import push_blob
from tests.support.server import ADMIN_LOGIN, ADMIN_PASSWORD, running_server

SOURCE = Path(__file__).resolve().parent.parent / "src"
PRAGMA_ON = 'cursor.execute("PRAGMA secure_delete=ON")'
PRAGMA_OFF = 'cursor.execute("PRAGMA secure_delete=OFF")'
LAYER_TYPE = "application/vnd.oci.image.layer.v1.tar+gzip"
CONFIG_TYPE = "application/vnd.oci.image.config.v1+json"
MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"


def copy_without_secure_delete(target: Path) -> Path:
    """Copy `src` to `target` with the pragma set to OFF; return the copy."""
    copy = target / "src"
    shutil.copytree(SOURCE, copy)
    engine = copy / "moorage" / "db" / "engine.py"
    text = engine.read_text()
    if PRAGMA_ON not in text:
        raise SystemExit(f"{engine} no longer sets secure_delete; update this script")
    engine.write_text(text.replace(PRAGMA_ON, PRAGMA_OFF))
    return copy


def process_tree_cpu_seconds(pid: int) -> float:
    """Return the user + system CPU seconds of `pid` and its direct children."""
    ticks = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(entry) == pid or int(fields[1]) == pid:
            ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def push_image(client: httpx.Client, repository: str, index: int) -> None:
    layers = []
    for _ in range(3):
        data = os.urandom(8 * 1024)
        digest = push_blob(client, repository, data)
        layers.append({"mediaType": LAYER_TYPE, "digest": digest, "size": len(data)})
    config = json.dumps({"architecture": "amd64", "os": "linux", "i": index}).encode()
    manifest = {
        "schemaVersion": 2,
        "mediaType": MANIFEST_TYPE,
        "config": {
            "mediaType": CONFIG_TYPE,
            "digest": push_blob(client, repository, config),
            "size": len(config),
        },
        "layers": layers,
    }
    response = client.put(
        f"/v2/{repository}/manifests/t{index}",
        content=json.dumps(manifest).encode(),
        headers={"Content-Type": MANIFEST_TYPE},
    )
    response.raise_for_status()


def measure(source: Path, images: int) -> tuple[float, float]:
    """Return server CPU ms and wall ms per image pushed to a new server."""
    os.environ["PYTHONPATH"] = str(source)
    with (
        tempfile.TemporaryDirectory() as directory,
        running_server(Path(directory)) as server,
        httpx.Client(
            base_url=server.url, auth=(ADMIN_LOGIN, ADMIN_PASSWORD), timeout=60
        ) as client,
    ):
        assert server.process is not None
        push_blob(client, "products/warm-up", b"warm-up")
        cpu_before = process_tree_cpu_seconds(server.process.pid)
        started = time.monotonic()
        for index in range(images):
            push_image(client, f"products/r{index % 10}", index)
        wall = time.monotonic() - started
        cpu = process_tree_cpu_seconds(server.process.pid) - cpu_before
    return 1000 * cpu / images, 1000 * wall / images


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.secure_delete_cost")
    parser.add_argument("--images", type=int, default=150, help="images per run")
    parser.add_argument("--rounds", type=int, default=4, help="runs per variant")
    arguments = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        variants = {
            "on": SOURCE,
            "off": copy_without_secure_delete(Path(directory)),
        }
        for round_ in range(arguments.rounds):
            order = ["on", "off"] if round_ % 2 == 0 else ["off", "on"]
            for name in order:
                cpu, wall = measure(variants[name], arguments.images)
                load = Path("/proc/loadavg").read_text().split()[0]
                print(
                    f"secure_delete {name}, round {round_}: server CPU "
                    f"{cpu:.1f} ms/image, wall {wall:.1f} ms/image, load {load}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
