"""Measure the server CPU cost of encrypted blob pulls, and what it is made of.

Usage:
    python benchmarks/encrypted_pull.py pairs [--source NAME=SRC_DIR ...]
        [--rounds N] [--size-mib N]
    python benchmarks/encrypted_pull.py floor [--size-mib N]

`pairs` starts one plaintext Moorage and one encrypted Moorage per source tree,
with two workers each as `python -m bench` does, and pushes one random blob to
each. Each round pulls it with 1 and with 8 clients from each server in turn,
in the reverse order of the round before. It prints MB/s and the server's
CPU seconds per GiB (its whole process tree, from /proc) for every pull, then
the medians. CPU per GiB moves less than MB/s when other work shares the
machine, and taking the trees in turn spreads that work over all of them.
The plaintext server runs the first source tree. Pass `--source
main=../main/src --source branch=src` to compare a change with main.

`floor` splits the cost of reading an encrypted file from the page cache in
one thread: `preadv` alone, AES-GCM alone on data already in the CPU cache,
both as the server does them (`_FileSegments.open_into`, 1 MiB runs of 64 KiB
segments), and AES-GCM reading a memory map of the file instead of a copy.
It prints CPU seconds per GiB for each. Run from the checkout with the
benchmark extras installed (`pip install -e '.[bench]'`); Linux only.
"""

from __future__ import annotations

import argparse
import mmap
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.procstat import cpu_seconds  # noqa: E402
from bench.scenarios import (  # noqa: E402
    Context,
    Sizes,
    make_blob,
    pull_eight,
    pull_one,
    setup_pull,
)
from bench.servers import MoorageRegistry  # noqa: E402

MIB = 1024 * 1024
GIB = 1024 * MIB


def pairs(sources: list[tuple[str, Path]], rounds: int, size: int) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="moorage-encrypted-pull-"))
    first = str(sources[0][1].resolve())
    servers = [
        (
            "plaintext",
            MoorageRegistry(
                "plaintext", workdir / "plaintext", environment={"PYTHONPATH": first}
            ),
        )
    ]
    for name, source in sources:
        environment = {"PYTHONPATH": str(source.resolve())}
        registry = MoorageRegistry(
            name, workdir / name, encrypted=True, environment=environment
        )
        servers.append((name, registry))
    try:
        for _, registry in servers:
            registry.start()
        blob, digest = make_blob(workdir, size)
        context = Context(Sizes.full(), servers[0][1].token_url, workdir, blob, digest)
        for _, registry in servers:
            setup_pull(context, registry)
            # The first pull reads the stored file into the page cache.
            pull_one(context, registry, 0)
        samples: dict[tuple[int, str], list[tuple[float, float]]] = {}
        for round_ in range(rounds):
            order = servers if round_ % 2 == 0 else servers[::-1]
            for clients, pull in ((1, pull_one), (8, pull_eight)):
                for name, registry in order:
                    before = cpu_seconds(registry.pid)
                    outcome = pull(context, registry, round_)
                    cpu = (cpu_seconds(registry.pid) - before) / outcome.work
                    samples.setdefault((clients, name), []).append((outcome.value, cpu))
                    print(
                        f"round {round_} clients {clients} {name}: "
                        f"{outcome.value:,.0f} MB/s, {cpu:.3f} CPU s/GiB, "
                        f"load {os.getloadavg()[0]:.1f}",
                        flush=True,
                    )
        context.blob.release()
    finally:
        for _, registry in servers:
            registry.stop()
        subprocess.run(["rm", "-rf", "--", str(workdir)], check=False)
    print("medians:")
    for (clients, name), found in samples.items():
        rate = statistics.median(value for value, _ in found)
        cpu = statistics.median(cpu for _, cpu in found)
        print(f"  clients {clients} {name}: {rate:,.0f} MB/s, {cpu:.3f} CPU s/GiB")


def floor(size: int) -> None:
    from moorage.storage.encryption.driver import _FileSegments, seal_whole
    from moorage.storage.encryption.format import (
        HEADER_BYTES,
        Header,
        SegmentCipher,
    )

    header = Header.new()
    cipher = SegmentCipher(header, os.urandom(32))
    with tempfile.TemporaryDirectory(prefix="moorage-encrypted-floor-") as directory:
        path = Path(directory) / "sealed"
        path.write_bytes(seal_whole(cipher, os.urandom(size)))
        fd = os.open(path, os.O_RDONLY)
        try:
            stored_size = os.fstat(fd).st_size
            runs = _FileSegments(str(path), fd, cipher, stored_size)
            per_run = MIB // header.segment_bytes
            sealed_run = per_run * header.sealed_segment_bytes
            plain = bytearray(MIB)
            sealed = bytearray(sealed_run)

            def read_only() -> None:
                view = memoryview(sealed)
                for start in range(HEADER_BYTES, stored_size, sealed_run):
                    os.preadv(fd, [view], start)

            def aes_only() -> None:
                # The first run, decrypted again and again, stays in the cache.
                os.preadv(fd, [memoryview(sealed)], HEADER_BYTES)
                for _ in range(runs.segments // per_run):
                    cipher.open_run_into(
                        "cached", 0, memoryview(sealed), False, memoryview(plain)
                    )

            def read_and_aes() -> None:
                for first in range(0, runs.segments, per_run):
                    count = min(per_run, runs.segments - first)
                    runs.open_into(first, count, plain)

            def mapped_aes() -> None:
                with mmap.mmap(fd, 0, access=mmap.ACCESS_READ) as mapped:
                    view = memoryview(mapped)
                    final = runs.segments - 1
                    for first in range(0, runs.segments, per_run):
                        start = header.segment_offset(first)
                        count = min(per_run, runs.segments - first)
                        cipher.open_run_into(
                            "mapped",
                            first,
                            view[start : start + count * header.sealed_segment_bytes],
                            first + count - 1 == final,
                            memoryview(plain),
                        )
                    del view

            steps: dict[str, Callable[[], None]] = {
                "preadv from the page cache": read_only,
                "AES-GCM of data in the CPU cache": aes_only,
                "preadv and AES-GCM (the server's path)": read_and_aes,
                "AES-GCM from a memory map": mapped_aes,
            }
            read_and_aes()
            for round_ in range(3):
                for name, step in steps.items():
                    started = time.process_time()
                    step()
                    cpu = (time.process_time() - started) * GIB / size
                    print(
                        f"round {round_} {name}: {cpu:.3f} CPU s/GiB, "
                        f"load {os.getloadavg()[0]:.1f}",
                        flush=True,
                    )
        finally:
            os.close(fd)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["pairs", "floor"])
    parser.add_argument(
        "--source",
        action="append",
        default=[],
        help="NAME=SRC_DIR of a source tree to run encrypted (repeatable; "
        "default: this checkout's src)",
    )
    parser.add_argument("--rounds", type=int, default=3, help="rounds (pairs)")
    parser.add_argument(
        "--size-mib", type=int, default=1024, help="blob size in MiB (default 1024)"
    )
    args = parser.parse_args()
    size = args.size_mib * MIB
    if args.mode == "floor":
        floor(size)
        return
    sources = [
        (name, Path(directory))
        for name, _, directory in (entry.partition("=") for entry in args.source)
    ] or [("encrypted", ROOT / "src")]
    pairs(sources, args.rounds, size)


if __name__ == "__main__":
    main()
