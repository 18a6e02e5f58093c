"""Run the HTTP load generators (wrk, ApacheBench) and read their reports.

wrk hangs on HEAD responses that carry a Content-Length, so HEAD goes through
`ab -i`. Every run fails loudly when any response was not a success, so a
stream of 401s can never pass for a fast server.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from dataclasses import dataclass

_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


class LoadError(Exception):
    """The load generator failed or saw failed requests."""


@dataclass
class LoadResult:
    requests: int
    requests_per_second: float
    p50_ms: float
    p99_ms: float


def lua_headers(headers: dict[str, str]) -> str:
    lines = [f'wrk.headers["{name}"] = "{value}"' for name, value in headers.items()]
    return "\n".join(lines) + "\n"


def lua_cycle(paths: list[str]) -> str:
    """Return a wrk script body that GETs `paths` in turn, over and over."""
    quoted = ", ".join(f'"{path}"' for path in paths)
    return (
        f"local paths = {{{quoted}}}\n"
        "local next_path = 0\n"
        "request = function()\n"
        "  next_path = next_path % #paths + 1\n"
        '  return wrk.format("GET", paths[next_path])\n'
        "end\n"
    )


def run_wrk(
    url: str,
    headers: dict[str, str],
    *,
    connections: int,
    seconds: float,
    threads: int = 2,
    paths: list[str] | None = None,
) -> LoadResult:
    """GET `url` for `seconds` at `connections` keep-alive connections; with
    `paths`, GET those paths of `url`'s server in turn instead."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua") as script:
        script.write(lua_headers(headers))
        if paths:
            script.write(lua_cycle(paths))
        script.flush()
        completed = subprocess.run(
            [
                "wrk",
                f"-t{threads}",
                f"-c{connections}",
                f"-d{max(1, round(seconds))}s",
                "--latency",
                "-s",
                script.name,
                url,
            ],
            capture_output=True,
            text=True,
            check=False,
        )
    return parse_wrk(completed.stdout + completed.stderr)


def parse_wrk(output: str) -> LoadResult:
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    if bad:
        raise LoadError(f"wrk saw {bad.group(1)} failed responses:\n{output}")
    rate = re.search(r"Requests/sec:\s+([\d.]+)", output)
    total = re.search(r"(\d+) requests in", output)
    p50 = re.search(r"50%\s+([\d.]+)(us|ms|s)", output)
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)", output)
    if not (rate and total and p50 and p99):
        raise LoadError(f"cannot read the wrk report:\n{output}")
    return LoadResult(
        requests=int(total.group(1)),
        requests_per_second=float(rate.group(1)),
        p50_ms=float(p50.group(1)) * _UNITS[p50.group(2)],
        p99_ms=float(p99.group(1)) * _UNITS[p99.group(2)],
    )


def run_ab_head(
    url: str, headers: dict[str, str], *, connections: int, requests: int
) -> LoadResult:
    """HEAD `url` `requests` times at `connections` keep-alive connections."""
    command = ["ab", "-q", "-i", "-k", "-c", str(connections), "-n", str(requests)]
    for name, value in headers.items():
        command += ["-H", f"{name}: {value}"]
    completed = subprocess.run(
        [*command, url], capture_output=True, text=True, check=False
    )
    return parse_ab(completed.stdout + completed.stderr)


def parse_ab(output: str) -> LoadResult:
    failed = re.search(r"Failed requests:\s+(\d+)", output)
    bad = re.search(r"Non-2xx responses:\s+(\d+)", output)
    if (failed and int(failed.group(1))) or bad:
        raise LoadError(f"ab saw failed requests:\n{output}")
    rate = re.search(r"Requests per second:\s+([\d.]+)", output)
    total = re.search(r"Complete requests:\s+(\d+)", output)
    p50 = re.search(r"^\s+50%\s+(\d+)", output, re.MULTILINE)
    p99 = re.search(r"^\s+99%\s+(\d+)", output, re.MULTILINE)
    if not (rate and total and p50 and p99):
        raise LoadError(f"cannot read the ab report:\n{output}")
    return LoadResult(
        requests=int(total.group(1)),
        requests_per_second=float(rate.group(1)),
        p50_ms=float(p50.group(1)),
        p99_ms=float(p99.group(1)),
    )


def package_version(package: str) -> str:
    """Return the installed Debian package version, or "not installed"."""
    try:
        completed = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", package],
            capture_output=True,
            text=True,
        )
    except FileNotFoundError:
        return "unknown"
    return completed.stdout.strip() or "not installed"
