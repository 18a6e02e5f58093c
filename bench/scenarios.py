"""The benchmark scenarios, each run against one registry at a time.

A scenario's `setup` prepares what it reads (once per registry) and its `run`
does one timed round, returning the figure, the work done (GiB or thousands of
requests, for CPU per unit) and extra figures such as latency percentiles.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import random
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.client import Client, basic_header, fetch_token
from bench.dataload import SEED_REPOSITORY, SEED_TAG
from bench.load import run_ab_head, run_wrk
from bench.servers import PASSWORD, SERVICE, USER, MoorageRegistry, Registry
from tests.support.images import (
    MEDIA_TYPE_OCI_LAYER_GZIP,
    Blob,
    OciLayout,
    canonical_json,
    large_image,
    random_blob_image,
)

MIB = 1024 * 1024
GIB = 1024 * MIB
MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
CONFIG_TYPE = "application/vnd.oci.image.config.v1+json"
IMAGE_REPOSITORIES = 10


@dataclass(frozen=True)
class Sizes:
    """How big each scenario is; `quick` keeps the whole run under a minute."""

    blob_bytes: int
    chunk_bytes: int
    load_seconds: float
    head_requests: int
    connections: int
    small_images: int
    tags: int
    listing_repeats: int
    skopeo_large: bool
    # The data-scale phase (--scale): repositories loaded, spread over
    # customers, with this many tags each.
    scale_repositories: int
    scale_customers: int
    scale_tags_per_repository: int

    @classmethod
    def full(cls) -> Sizes:
        return cls(GIB, 8 * MIB, 10, 5_000, 64, 200, 10_000, 5, True, 10_000, 100, 10)

    @classmethod
    def quick(cls) -> Sizes:
        return cls(32 * MIB, 8 * MIB, 1, 1_000, 16, 10, 100, 2, False, 40, 4, 3)


@dataclass
class Outcome:
    value: float
    work: float
    extra: dict[str, float] = field(default_factory=dict)


@dataclass
class Context:
    """What the scenarios share within one run."""

    sizes: Sizes
    token_url: str
    workdir: Path
    blob: memoryview
    blob_digest: str
    tokens: dict[str, str] = field(default_factory=dict)
    small_manifest: dict[str, str] = field(default_factory=dict)

    def token(self, scopes: list[str], registry: Registry | None = None) -> str:
        """Return a token for `scopes` that `registry` accepts (cached per run)."""
        url = registry.token_url if registry is not None else self.token_url
        key = f"{url} {' '.join(scopes)}"
        if key not in self.tokens:
            self.tokens[key] = fetch_token(url, scopes)
        return self.tokens[key]

    def client(self, registry: Registry, repositories: list[str]) -> Client:
        scopes = [f"repository:{name}:pull,push" for name in repositories]
        return Client(registry.url, self.token(scopes, registry))


def prefetch_tokens(context: Context, registries: list[Registry]) -> None:
    """Fetch every token the scenarios use, so no login falls in a measurement."""
    for registry in registries:
        for repositories in (
            ["bench/push-monolithic"],
            ["bench/push-chunked"],
            ["bench/pull"],
            ["bench/small"],
            ["bench/tags"],
            [f"bench/images-{i}" for i in range(IMAGE_REPOSITORIES)],
        ):
            scopes = [f"repository:{name}:pull,push" for name in repositories]
            context.token(scopes, registry)
        context.token(["repository:bench/small:pull"], registry)
        context.token(["registry:catalog:*"], registry)


def make_blob(workdir: Path, size: int) -> tuple[memoryview, str]:
    """Write `size` random bytes to a file and map it; return view and digest."""
    path = workdir / "blob.bin"
    hasher = hashlib.sha256()
    with open(path, "wb") as handle:
        remaining = size
        while remaining:
            piece = os.urandom(min(remaining, 16 * MIB))
            hasher.update(piece)
            handle.write(piece)
            remaining -= len(piece)
    with open(path, "rb") as handle:
        mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
    return memoryview(mapped), f"sha256:{hasher.hexdigest()}"


# Blob push and pull


def push_monolithic(context: Context, registry: Registry, round_: int) -> Outcome:
    return _push(context, registry, "bench/push-monolithic", chunked=False)


def push_chunked(context: Context, registry: Registry, round_: int) -> Outcome:
    return _push(context, registry, "bench/push-chunked", chunked=True)


def _push(
    context: Context, registry: Registry, repository: str, chunked: bool
) -> Outcome:
    client = context.client(registry, [repository])
    data, digest = context.blob, context.blob_digest
    started = time.perf_counter()
    if chunked:
        client.push_blob_chunked(repository, digest, data, context.sizes.chunk_bytes)
    else:
        client.push_blob(repository, digest, data)
    elapsed = time.perf_counter() - started
    client.close()
    return Outcome(len(data) / elapsed / 1e6, len(data) / GIB)


def setup_pull(context: Context, registry: Registry) -> None:
    """Push the blob that the pull scenarios read, unless it is there already.

    Both pull scenarios have this setup, so that `--only pull_eight` works alone.
    """
    client = context.client(registry, ["bench/pull"])
    present = client.request(
        "HEAD", f"/v2/bench/pull/blobs/{context.blob_digest}", expect=(200, 404)
    )
    if present.status == 404:
        client.push_blob("bench/pull", context.blob_digest, context.blob)
    client.close()


def pull_one(context: Context, registry: Registry, round_: int) -> Outcome:
    return _pull(context, registry, 1)


def pull_eight(context: Context, registry: Registry, round_: int) -> Outcome:
    return _pull(context, registry, 8)


def _pull(context: Context, registry: Registry, clients: int) -> Outcome:
    expected = len(context.blob)
    connections = [context.client(registry, ["bench/pull"]) for _ in range(clients)]
    received = [0] * clients
    barrier = threading.Barrier(clients + 1)

    def pull(index: int) -> None:
        buffer = bytearray(MIB)
        barrier.wait()
        received[index] = connections[index].pull_blob(
            "bench/pull", context.blob_digest, buffer
        )

    threads = [threading.Thread(target=pull, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    barrier.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    for connection in connections:
        connection.close()
    if any(count != expected for count in received):
        raise RuntimeError(f"short pull from {registry.name}: {received}")
    total = sum(received)
    return Outcome(total / elapsed / 1e6, total / GIB)


# Small requests with token auth


def setup_small_requests(context: Context, registry: Registry) -> None:
    client = context.client(registry, ["bench/small"])
    layer = random.Random(1).randbytes(16 * 1024)  # noqa: S311 - test data
    config = canonical_json({"architecture": "amd64", "os": "linux"})
    manifest = push_image(client, "bench/small", "latest", [layer], config)
    client.close()
    context.small_manifest = {"layer": _digest(layer), "manifest": manifest}


def manifest_get(context: Context, registry: Registry, round_: int) -> Outcome:
    token = context.token(["repository:bench/small:pull"], registry)
    result = run_wrk(
        f"{registry.url}/v2/bench/small/manifests/latest",
        {"Authorization": f"Bearer {token}", "Accept": MANIFEST_TYPE},
        connections=context.sizes.connections,
        seconds=context.sizes.load_seconds,
    )
    return _load_outcome(result)


def blob_head(context: Context, registry: Registry, round_: int) -> Outcome:
    token = context.token(["repository:bench/small:pull"], registry)
    result = run_ab_head(
        f"{registry.url}/v2/bench/small/blobs/{context.small_manifest['layer']}",
        {"Authorization": f"Bearer {token}"},
        connections=context.sizes.connections,
        requests=context.sizes.head_requests,
    )
    return _load_outcome(result)


def token_password(context: Context, registry: Registry, round_: int) -> Outcome:
    result = run_wrk(
        f"{registry.url}/token?service={SERVICE}&scope=repository:bench/small:pull",
        {"Authorization": basic_header(USER, PASSWORD)},
        connections=min(16, context.sizes.connections),
        seconds=context.sizes.load_seconds,
    )
    return _load_outcome(result)


def token_robot(context: Context, registry: Registry, round_: int) -> Outcome:
    assert isinstance(registry, MoorageRegistry)
    result = run_wrk(
        f"{registry.url}/token?service={SERVICE}&scope=repository:bench/small:pull",
        {"Authorization": basic_header(*registry.robot)},
        connections=min(16, context.sizes.connections),
        seconds=context.sizes.load_seconds,
    )
    return _load_outcome(result)


def _load_outcome(result: Any) -> Outcome:
    return Outcome(
        result.requests_per_second,
        result.requests / 1000,
        {"p50_ms": result.p50_ms, "p99_ms": result.p99_ms},
    )


# Many small images, tags and the catalog


def small_images(context: Context, registry: Registry, round_: int) -> Outcome:
    count = context.sizes.small_images
    seed = round_ * 2 + (registry.name == "distribution")
    images = [_random_image(seed, index) for index in range(count)]
    repositories = [f"bench/images-{i}" for i in range(IMAGE_REPOSITORIES)]
    local = threading.local()
    clients: list[Client] = []

    def push(index: int) -> None:
        if not hasattr(local, "client"):
            local.client = context.client(registry, repositories)
            clients.append(local.client)
        layers, config = images[index]
        repository = repositories[index % IMAGE_REPOSITORIES]
        push_image(local.client, repository, f"r{seed}-{index}", layers, config)

    started = time.perf_counter()
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(push, range(count)))
    elapsed = time.perf_counter() - started
    for client in clients:
        client.close()
    requests = count * 9
    return Outcome(count / elapsed, requests / 1000)


def setup_tags(context: Context, registry: Registry) -> None:
    client = context.client(registry, ["bench/tags"])
    layer = random.Random(2).randbytes(4096)  # noqa: S311 - test data
    config = canonical_json({"architecture": "amd64", "os": "linux", "tags": True})
    push_image(client, "bench/tags", "tag-0", [layer], config)
    manifest = client.request(
        "GET", "/v2/bench/tags/manifests/tag-0", headers={"Accept": MANIFEST_TYPE}
    ).body
    client.close()
    local = threading.local()

    def tag(index: int) -> None:
        if not hasattr(local, "client"):
            local.client = context.client(registry, ["bench/tags"])
        local.client.put_manifest("bench/tags", f"tag-{index}", manifest, MANIFEST_TYPE)

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(tag, range(1, context.sizes.tags)))


def tag_list(context: Context, registry: Registry, round_: int) -> Outcome:
    client = context.client(registry, ["bench/tags"])
    outcome = _listing(context, client, "/v2/bench/tags/tags/list", "tags")
    client.close()
    return outcome


def catalog(context: Context, registry: Registry, round_: int) -> Outcome:
    client = Client(registry.url, context.token(["registry:catalog:*"], registry))
    outcome = _listing(context, client, "/v2/_catalog?n=1000", "repositories")
    client.close()
    return outcome


def _listing(context: Context, client: Client, path: str, key: str) -> Outcome:
    times = []
    for _ in range(context.sizes.listing_repeats):
        started = time.perf_counter()
        found = client.follow_pages(path, key)
        times.append((time.perf_counter() - started) * 1000)
    return Outcome(statistics.median(times), len(times) / 1000, {"entries": len(found)})


# The data-scale phase


def push_scale_seed(context: Context, registry: Registry) -> None:
    """Push the small image that the data-scale load copies into every repository."""
    client = context.client(registry, [SEED_REPOSITORY])
    layer = random.Random(3).randbytes(2048)  # noqa: S311 - test data
    config = canonical_json({"architecture": "amd64", "os": "linux", "scale": True})
    push_image(client, SEED_REPOSITORY, SEED_TAG, [layer], config)
    client.close()


def warm_up(context: Context, registry: Registry) -> None:
    """Send a few requests over new connections, so that every worker has served."""
    token = context.token(["registry:catalog:*"], registry)
    for _ in range(16):
        client = Client(registry.url, token)
        client.request("GET", "/v2/_catalog?n=1")
        client.close()


# skopeo end to end


def setup_skopeo(context: Context, registry: Registry) -> None:
    """Build the image once: the Python standard library in 3 layers, or a tiny one."""
    path = context.workdir / "skopeo-image"
    if path.exists():
        return
    layout = OciLayout(path)
    if context.sizes.skopeo_large:
        large_image(layout, "bench")
    else:
        random_blob_image(layout, "bench", (256 * 1024,) * 3)


def skopeo_copy(context: Context, registry: Registry, round_: int) -> Outcome:
    layout = context.workdir / "skopeo-image"
    size = sum(p.stat().st_size for p in (layout / "blobs" / "sha256").iterdir())
    reference = f"docker://{registry.address}/bench/skopeo-{round_}:v1"
    home = Path(tempfile.mkdtemp(dir=context.workdir))
    pulled = home / "pulled"
    push_seconds = _skopeo(
        home,
        [
            "--dest-creds",
            f"{USER}:{PASSWORD}",
            "--dest-tls-verify=false",
            f"oci:{layout}:bench",
            reference,
        ],
    )
    pull_seconds = _skopeo(
        home,
        [
            "--src-creds",
            f"{USER}:{PASSWORD}",
            "--src-tls-verify=false",
            reference,
            f"dir:{pulled}",
        ],
    )
    shutil.rmtree(home)
    total = push_seconds + pull_seconds
    return Outcome(
        total, 2 * size / GIB, {"push_s": push_seconds, "pull_s": pull_seconds}
    )


def _skopeo(home: Path, arguments: list[str]) -> float:
    """Run one `skopeo copy` with an empty HOME, so no blob cache carries over."""
    env = {**os.environ, "HOME": str(home), "XDG_RUNTIME_DIR": str(home)}
    started = time.perf_counter()
    subprocess.run(
        ["skopeo", "copy", "--quiet", *arguments],
        env=env,
        check=True,
        capture_output=True,
    )
    return time.perf_counter() - started


# Helpers


def _digest(data: bytes) -> str:
    return f"sha256:{hashlib.sha256(data).hexdigest()}"


def _random_image(seed: int, index: int) -> tuple[list[bytes], bytes]:
    generator = random.Random(f"{seed}:{index}")  # noqa: S311 - test data
    layers = [
        generator.randbytes(generator.randint(4 * 1024, 64 * 1024)) for _ in range(3)
    ]
    config = canonical_json(
        {"architecture": "amd64", "os": "linux", "bench": f"{seed}:{index}"}
    )
    return layers, config


def push_image(
    client: Client, repository: str, tag: str, layers: list[bytes], config: bytes
) -> str:
    """Push layers, config and manifest the way docker does; return the digest."""
    for data in [*layers, config]:
        client.push_blob(repository, _digest(data), data)
    manifest = canonical_json(
        {
            "schemaVersion": 2,
            "mediaType": MANIFEST_TYPE,
            "config": Blob(CONFIG_TYPE, config).descriptor(),
            "layers": [
                Blob(MEDIA_TYPE_OCI_LAYER_GZIP, data).descriptor() for data in layers
            ],
        }
    )
    client.put_manifest(repository, tag, manifest, MANIFEST_TYPE)
    return _digest(manifest)


@dataclass(frozen=True)
class Scenario:
    key: str
    title: str
    unit: str
    higher_is_better: bool
    work_unit: str
    run: Callable[[Context, Registry, int], Outcome]
    setup: Callable[[Context, Registry], None] | None = None
    moorage_only: bool = False
    target: str = ""
    # Also run against Moorage with encryption at rest, for the encrypted/plain
    # ratio.
    encrypted: bool = False
    # Run again in the data-scale phase (--scale), with many repositories loaded.
    scale: bool = False


SCENARIOS = [
    Scenario(
        "push_monolithic",
        "Blob push, 1 request",
        "MB/s",
        True,
        "GiB",
        push_monolithic,
        target="ratio >= 2.0",
        encrypted=True,
    ),
    Scenario(
        "push_chunked",
        "Blob push, 8 MiB chunks",
        "MB/s",
        True,
        "GiB",
        push_chunked,
        target="ratio >= 2.0",
        encrypted=True,
    ),
    Scenario(
        "pull_one",
        "Blob pull, 1 client",
        "MB/s",
        True,
        "GiB",
        pull_one,
        setup_pull,
        target="ratio >= 1.0",
        encrypted=True,
    ),
    Scenario(
        "pull_eight",
        "Blob pull, 8 clients",
        "MB/s",
        True,
        "GiB",
        pull_eight,
        setup_pull,
        target="ratio >= 1.0",
        encrypted=True,
    ),
    Scenario(
        "manifest_get",
        "Manifest GET by tag (wrk)",
        "req/s",
        True,
        "1k req",
        manifest_get,
        setup_small_requests,
        target="ratio >= 2.0",
        scale=True,
    ),
    Scenario(
        "blob_head",
        "Blob HEAD (ab -i)",
        "req/s",
        True,
        "1k req",
        blob_head,
        target="ratio >= 2.0",
        scale=True,
    ),
    Scenario(
        "small_images",
        "Small images pushed",
        "images/s",
        True,
        "1k req",
        small_images,
        target="ratio >= 1.5",
        scale=True,
    ),
    Scenario(
        "tag_list", "Tag list", "ms", False, "1k req", tag_list, setup_tags, scale=True
    ),
    Scenario("catalog", "Catalog", "ms", False, "1k req", catalog, scale=True),
    Scenario(
        "token_password",
        "Token issue, password user",
        "req/s",
        True,
        "1k req",
        token_password,
        moorage_only=True,
    ),
    Scenario(
        "token_robot",
        "Token issue, robot account",
        "req/s",
        True,
        "1k req",
        token_robot,
        moorage_only=True,
        target="3,000 req/s",
    ),
    Scenario(
        "skopeo_copy",
        "skopeo copy push + pull",
        "s",
        False,
        "GiB",
        skopeo_copy,
        setup_skopeo,
    ),
]
