"""`python -m bench.audit_instructions`: instructions per request audit event.

Counts with valgrind's callgrind the CPU instructions that recording a
manifest GET's audit event costs. The setting is that of `bench.audit_writer`:
one process, a fresh SQLite data directory, `RequestObserver.observe` as the
request middleware calls it, and the real audit writer storing the events.
Instruction counts do not depend on what else runs on the machine, so two
versions of the code compare on a shared machine where CPU time swings by a
fifth.

The script starts itself under callgrind with instrumentation off, and turns it
on around each measured phase with `callgrind_control`:

- request side: observing the requests with request events recorded, minus
  observing them without (metrics only);
- writer: the audit writer storing the queued events (fit, hash chain, insert,
  commit, and the hand-over to its thread).

It needs valgrind (Debian's `valgrind` package) and took one to two minutes
on a shared 2-core machine.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.audit_writer import _finished
from moorage.api.observe import RequestObserver
from moorage.config import Settings
from moorage.services import open_services

_CHILD = "--measure"


def _control(*arguments: str) -> None:
    """Send a command to callgrind and wait until it is done.

    The process sleeps meanwhile instead of spinning, so the wait adds almost
    no instructions to the phase being counted.
    """
    command = ["callgrind_control", *arguments, str(os.getpid())]
    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    while process.poll() is None:
        time.sleep(0.01)


async def _measure(events: int, rounds: int) -> None:
    with tempfile.TemporaryDirectory(prefix="moorage-audit-instructions-") as data:
        settings = Settings(
            data_dir=Path(data), encryption=False, audit_queue_size=events
        )
        services = await open_services(settings)
        try:
            audit = services.audit
            audit.start()
            audit.flush_seconds = 0
            unaudited = dataclasses.replace(
                services,
                settings=settings.model_copy(update={"audit_request_events": False}),
            )
            requests = [_finished(index) for index in range(events)]
            audited_observer = RequestObserver(services)
            plain_observer = RequestObserver(unaudited)
            for round_ in range(rounds + 1):
                # Round 0 warms up: imports, compiled statements, caches.
                count = round_ > 0
                if count:
                    _control("--instr=on")
                for finished in requests:
                    await audited_observer.observe(finished)
                if count:
                    _control("--dump=request")
                await audit._queue.join()
                if count:
                    _control("--dump=writer")
                for finished in requests:
                    await plain_observer.observe(finished)
                if count:
                    _control("--dump=unaudited")
                    _control("--instr=off")
        finally:
            await services.close()


def _totals(directory: Path) -> dict[str, list[int]]:
    """Return the instruction totals of each dump, by its name."""
    found: dict[str, list[int]] = {}
    for path in sorted(directory.glob("callgrind.out.*")):
        text = path.read_text(errors="replace")
        trigger = re.search(r"^desc: Trigger: .*dump (\S+)", text, re.MULTILINE)
        total = re.search(r"^totals: (\d+)", text, re.MULTILINE)
        if trigger and total:
            name = trigger.group(1)
            found.setdefault(name, []).append(int(total.group(1)))
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.audit_instructions", description=__doc__
    )
    parser.add_argument(
        "--events", type=int, default=1000, help="events per round (default 1000)"
    )
    parser.add_argument("--rounds", type=int, default=2, help="rounds (default 2)")
    parser.add_argument(_CHILD, action="store_true", help=argparse.SUPPRESS)
    arguments = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if arguments.measure:
        asyncio.run(_measure(arguments.events, arguments.rounds))
        return 0

    valgrind = shutil.which("valgrind")
    if valgrind is None:
        print("valgrind is not installed; install Debian's valgrind package")
        return 1

    with tempfile.TemporaryDirectory(prefix="moorage-callgrind-") as directory:
        command = [
            valgrind,
            "--tool=callgrind",
            "--instr-atstart=no",
            f"--callgrind-out-file={directory}/callgrind.out.%p",
            sys.executable,
            "-m",
            "bench.audit_instructions",
            _CHILD,
            f"--events={arguments.events}",
            f"--rounds={arguments.rounds}",
        ]
        subprocess.run(
            command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        totals = _totals(Path(directory))

    for name in ("request", "writer", "unaudited"):
        if len(totals.get(name, [])) != arguments.rounds:
            print(
                f"callgrind wrote {len(totals.get(name, []))} {name} dumps, "
                f"expected {arguments.rounds}; is callgrind_control installed?"
            )
            return 1

    for round_ in range(arguments.rounds):
        request = totals["request"][round_] - totals["unaudited"][round_]
        writer = totals["writer"][round_]
        per_event = [value / arguments.events for value in (request, writer)]
        print(
            f"round {round_ + 1}: request side {per_event[0]:8,.0f}  "
            f"writer {per_event[1]:8,.0f}  "
            f"both {sum(per_event):8,.0f} instructions per event"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
