"""Serve with several worker processes that share the listening sockets.

The parent (`moorage.prefork`, which `moorage serve` execs so that the workers
do not inherit the command line's modules) binds the sockets, migrates the
database and creates the first admin in a child process of its own, listens,
forks the workers and then replaces itself with `moorage.supervisor`, which
waits. So neither alembic (about 10 MiB, needed only to migrate) nor the
parent's copy of the application (about 80 MiB) stays in memory. With one
worker, the parent does the same up to the listen and then serves itself.
SIGTERM or SIGINT to the parent is passed on to every worker, which finishes
its requests and stops. Each worker opens its own database connections and
blob store; caches are per process, and upload sessions already work across
processes (see `moorage.storage.registry`). Password hashes and checks go to
the supervisor over socket pairs, so that argon2id's 7 MiB count once instead
of in every worker (see `moorage.auth.password_service`).
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import itertools
import os
import signal
import socket
import sys
from collections.abc import Callable

import structlog

from moorage import admin
from moorage.audit.recorder import AdminRecorder, local_actor
from moorage.auth.authenticator import password_check_limit
from moorage.auth.password_service import PasswordService
from moorage.auth.secrets import ARGON2_SLOTS, use_password_service
from moorage.config import Settings
from moorage.db.engine import (
    UNREACHABLE_DATABASE_ERRORS,
    unreachable_database_message,
)
from moorage.errors import InvalidInputError, MoorageError
from moorage.logs import flush_logs
from moorage.prefork import logs_json
from moorage.server import run_on_uvloop, run_server
from moorage.services import open_services
from moorage.supervisor import FORWARDED_SIGNALS

log = structlog.get_logger(__name__)

# prctl option: the signal a process gets when its parent dies (linux/prctl.h).
_PR_SET_PDEATHSIG = 1
# glibc raises its mmap threshold to the size of the first large block freed,
# so without a fixed threshold the supervisor keeps argon2id's 7 MiB resident
# after its second computation. With one, each block is mapped and unmapped.
# Other C libraries ignore the variable.
_SUPERVISOR_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(1024 * 1024)}


# Connections a listening socket queues before they are accepted: uvicorn's
# default, which the server used when uvicorn opened its socket.
LISTEN_BACKLOG = 2048


def run_single(settings: Settings) -> None:
    """Serve in this process, after preparing the database in a child."""
    listeners = bind_listeners(settings)
    _prepare_in_child(settings)
    listen(listeners, settings)
    # As in each worker: uvicorn stops gracefully on SIGINT, then raises it
    # again, which the default action turns into a plain exit, as for SIGTERM,
    # rather than a KeyboardInterrupt that cancels what is still closing.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    run_on_uvloop(run_server(settings, listeners))


def run_workers(settings: Settings) -> None:
    listeners = bind_listeners(settings)
    _prepare_in_child(settings)
    listen(listeners, settings)
    # One socket pair per password check a worker may run at once; the
    # supervisor keeps the first ends (see moorage.auth.password_service).
    checks = password_check_limit(settings.workers)
    pairs = [
        [socket.socketpair() for _ in range(checks)] for _ in range(settings.workers)
    ]
    # Objects that exist now are never collected, so the garbage collector does
    # not write to the pages the workers share with this process.
    gc.freeze()
    workers = [
        _fork(settings, listeners, pairs, index) for index in range(settings.workers)
    ]
    for listener in listeners:
        listener.close()
    supervisor_descriptors = []
    for own, theirs in itertools.chain.from_iterable(pairs):
        theirs.close()
        own.set_inheritable(True)
        supervisor_descriptors.append(str(own.fileno()))
    log.info("workers started", pids=workers)
    sys.stdout.flush()
    sys.stderr.flush()
    # Blocked until the supervisor has its handlers (the mask survives exec).
    signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED_SIGNALS)
    arguments = [
        f"--log-format={'json' if logs_json(settings.log_format) else 'console'}",
        f"--password-slots={ARGON2_SLOTS}",
        f"--password-sockets={','.join(supervisor_descriptors)}",
        *map(str, workers),
    ]
    os.execve(  # noqa: S606 (runs this interpreter with fixed arguments)
        sys.executable,
        # -P: the working directory stays off sys.path (see `exec_prefork`).
        [sys.executable, "-P", "-m", "moorage.supervisor", *arguments],
        {**os.environ, **_SUPERVISOR_MALLOC},
    )


def bind_listeners(settings: Settings) -> list[socket.socket]:
    """Bind a socket to each address of `settings.host`, as asyncio's
    create_server does for uvicorn, without listening yet.

    Called before the first start writes anything, so that a port in use stops
    `moorage serve` with nothing created: no data directory, database schema
    or first admin. The next start is then a first start again. The sockets
    listen only after the database is prepared, so that clients are refused
    until the server can respond.

    NOTE: two servers that start on one port at the same moment can both
    bind, because both set SO_REUSEADDR and neither listens yet. The later
    one then fails in `listen`, after it has prepared its database.
    """
    try:
        addresses = socket.getaddrinfo(
            settings.host or None,
            settings.port,
            type=socket.SOCK_STREAM,
            flags=socket.AI_PASSIVE,
        )
    except socket.gaierror as error:
        raise _listen_error(settings, error) from None
    listeners: list[socket.socket] = []
    try:
        for family, kind, protocol, _, address in dict.fromkeys(addresses):
            try:
                listener = socket.socket(family, kind, protocol)
            except OSError:
                # As asyncio does: skip a family that this system lacks, such
                # as the IPv6 address of "localhost" without IPv6.
                continue
            listeners.append(listener)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                # As asyncio does: "::" takes IPv6 only, and 0.0.0.0 IPv4.
                listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            listener.bind(address)
    except OSError as error:
        for listener in listeners:
            listener.close()
        raise _listen_error(settings, error) from None
    if not listeners:
        raise MoorageError(
            f"cannot listen on {settings.host}:{settings.port}: this system "
            "supports none of the address families of that host"
        )
    return listeners


def listen(listeners: list[socket.socket], settings: Settings) -> None:
    """Start listening on the sockets of `bind_listeners`."""
    try:
        for listener in listeners:
            listener.listen(LISTEN_BACKLOG)
    except OSError as error:
        raise _listen_error(settings, error) from None


def _listen_error(settings: Settings, error: OSError) -> MoorageError:
    return MoorageError(
        f"cannot listen on {settings.host}:{settings.port}: {error.strerror}"
    )


def _use_password_service(
    pairs: list[list[tuple[socket.socket, socket.socket]]], index: int
) -> None:
    """Close the sockets that belong to the supervisor and the other workers,
    and send this worker's password hashes and checks over its own."""
    mine = []
    for number, pairs_of_worker in enumerate(pairs):
        for own, theirs in pairs_of_worker:
            own.close()
            if number == index:
                mine.append(theirs)
            else:
                theirs.close()
    use_password_service(PasswordService(mine))


def _stop_with_parent(parent: int) -> None:
    """Ask Linux to send this worker SIGTERM when its parent dies.

    Without it, a supervisor killed with SIGKILL leaves its workers serving on
    the port with no process left to stop them. The parent's exec into the supervisor
    does not count as its death. Elsewhere this does nothing.
    """
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        log.warning("setting the parent-death signal failed", errno=ctypes.get_errno())
        return
    if os.getppid() != parent:
        # The parent died before the request took effect.
        os.kill(os.getpid(), signal.SIGTERM)


# Signals held back while the process forks.
_HELD_AT_FORK = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}


def fork_holding_signals() -> int:
    """Fork with SIGINT, SIGTERM and SIGHUP blocked, and return os.fork's result.

    os.fork runs Python callbacks after the fork, such as logging's lock
    release. A Ctrl-C handled inside one of them is printed as an ignored
    exception and then lost, so the server went on starting and never
    stopped. Blocked, the signal waits until the fork has returned, and the
    parent gets it there; the child starts with no pending signal.
    """
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _HELD_AT_FORK)
    try:
        return os.fork()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def prepare_installation(settings: Settings) -> None:
    """Migrate the database, create the keys and the first admin, and return:
    what `moorage serve` does before it listens (`moorage init`).

    Raises SystemExit(1) after printing the error when that fails.
    """
    _prepare_in_child(settings)


def _prepare_in_child(settings: Settings) -> None:
    """Migrate, add audit events saved at the last shutdown and create the first
    admin before any worker starts, in a child process, so that what it imports
    and allocates leaves with it."""
    _check_first_admin(settings)
    pid = fork_holding_signals()
    if pid == 0:
        status = 0
        try:
            run_on_uvloop(_prepare(settings))
        except MoorageError as error:
            # A set-up problem for the operator to fix, such as missing keys.
            print(f"error: {error.message}", file=sys.stderr)
            status = 1
        except UNREACHABLE_DATABASE_ERRORS as error:
            log.debug("database connection failed", exc_info=error)
            message = unreachable_database_message(
                settings.resolved_database_url, error
            )
            print(f"error: {message}", file=sys.stderr)
            status = 1
        except BaseException as error:
            # Ctrl-C in a terminal reaches this child too; the parent reports it.
            if not _interrupted(error):
                log.exception("preparing the database failed")
            status = 1
        finally:
            flush_logs()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(status)
    _, code = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(code) != 0:
        raise SystemExit(1)


def _check_first_admin(settings: Settings) -> None:
    """Check the first admin's name and password before the database, the keys
    or any file exist, so that a rejected value leaves nothing half made.

    Checked at every start, even when the admin exists and the values go
    unused. Prints each problem and raises SystemExit(1).
    """
    password = settings.admin_password
    problems = _problems(lambda: admin.validate_login(settings.admin_username))
    named = [f"admin_username (MOORAGE_ADMIN_USERNAME): {text}" for text in problems]
    if password is not None:
        problems = _problems(
            lambda: admin.check_password(
                password.get_secret_value(), settings.admin_username
            )
        )
        named += [
            f"admin_password (MOORAGE_ADMIN_PASSWORD): {text}" for text in problems
        ]
    if not named:
        return
    for problem in named:
        print(f"error: {problem}", file=sys.stderr)
    print(
        "nothing was created; correct the settings above and run again", file=sys.stderr
    )
    raise SystemExit(1)


def _problems(check: Callable[[], object]) -> list[str]:
    """Return the problems that one input check raises, none when it passes."""
    try:
        check()
    except InvalidInputError as error:
        return list(error.problems)
    return []


def _interrupted(error: BaseException | None) -> bool:
    """Return whether `error` is Ctrl-C, or came from clean-up that it caused.

    Ctrl-C cancels the task, and the clean-up then finds the connection closed:
    Alembic, for one, drops the temporary table of a batch operation on the
    way out and raises PendingRollbackError.
    """
    while error is not None:
        if isinstance(error, KeyboardInterrupt | asyncio.CancelledError):
            return True
        error = error.__context__
    return False


async def _prepare(settings: Settings) -> None:
    services = await open_services(settings)
    try:
        await services.audit.import_pending()
        password = (
            settings.admin_password.get_secret_value()
            if settings.admin_password
            else None
        )
        created = await admin.ensure_vendor_admin(
            services.identity,
            settings.admin_username,
            password,
            audit=AdminRecorder(services.audit, local_actor("moorage-serve")),
        )
        if created is not None:
            _announce_admin(created)
    finally:
        await services.close()


def _fork(
    settings: Settings,
    listeners: list[socket.socket],
    pairs: list[list[tuple[socket.socket, socket.socket]]],
    index: int,
) -> int:
    """Fork worker `index`, which keeps the second ends of `pairs[index]`."""
    parent = os.getpid()
    pid = fork_holding_signals()
    if pid != 0:
        return pid
    status = 0
    try:
        _stop_with_parent(parent)
        _use_password_service(pairs, index)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        # The supervisor passes SIGHUP on; a worker serving TLS replaces this
        # with its certificate reload, the others ignore the signal.
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        run_on_uvloop(run_server(settings, listeners))
    except BaseException:
        log.exception("worker failed")
        status = 1
    finally:
        flush_logs()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)


def _announce_admin(created: admin.CreatedAccount) -> None:
    # With print, not rich: the server runs without rich (see moorage.prefork).
    if created.password is None:
        print(f"vendor admin {created.login!r} created with the given password")
        return
    print(
        f"vendor admin created. login: {created.login}  password: {created.password}\n"
        "This password is shown once; store it now."
    )
