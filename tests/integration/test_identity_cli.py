"""The account, robot, token, grant and signing-key commands against a database
of their own. They run in this process through Typer's test runner, which
takes a fraction of the time of one interpreter start per command."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from moorage import admin
from moorage.config import Settings
from moorage.errors import InvalidInputError, UnauthorizedError
from moorage.services import Services, open_services
from tests.support.cli import Cli
from tests.support.database import create_database, drop_database
from tests.support.identity import admin_client, push_image
from tests.support.server import ServerProcess, unique

T = TypeVar("T")


@pytest.fixture(scope="module")
def cli(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cli]:
    """A data directory and database with the customer acme."""
    data_dir = tmp_path_factory.mktemp("cli")
    url = create_database(data_dir)
    runner = Cli(data_dir, url)
    runner.ok("customer", "add", "acme")
    yield runner
    drop_database(url)


def test_robot_add_prints_secret_once(cli: Cli) -> None:
    """robot add prints the login and a 32-character secret; list never does."""
    output = cli.ok(
        "robot", "add", "acme", "ci", "--role", "writer", "--expires", "90d"
    )
    lines = output.strip().splitlines()
    assert "robot acme+ci added as writer" in lines[0]
    secret = lines[-1]
    assert len(secret) == 32
    listing = cli.ok("robot", "list", "acme")
    assert "acme+ci" in listing
    assert secret not in listing


def test_robot_rotate_prints_new_secret(cli: Cli) -> None:
    """robot rotate prints a different secret."""
    first = cli.ok("robot", "add", "acme", "deploy").strip().splitlines()[-1]
    second = cli.ok("robot", "rotate", "acme", "deploy").strip().splitlines()[-1]
    assert len(second) == 32
    assert second != first


def test_robot_disable_enable_remove(cli: Cli) -> None:
    """A robot shows disabled after disable, active after enable, gone after remove."""
    cli.ok("robot", "add", "acme", "tmp")
    cli.ok("robot", "disable", "acme", "tmp")
    assert "disabled" in cli.ok("robot", "list", "acme").split("acme+tmp", 1)[1]
    cli.ok("robot", "enable", "acme", "tmp")
    assert "active" in cli.ok("robot", "list", "acme").split("acme+tmp", 1)[1]
    cli.ok("robot", "remove", "acme", "tmp")
    assert "acme+tmp" not in cli.ok("robot", "list", "acme")


def test_user_disable_unknown(cli: Cli) -> None:
    """Disabling a user that does not exist fails with a message and exit 1."""
    result = cli.run("user", "disable", "acme", "nobody")
    assert result.returncode == 1
    assert "not found" in result.stderr


def test_user_disable_enable(cli: Cli) -> None:
    """user disable and enable change the state user list shows."""
    cli.ok("user", "add", "acme", "carol")
    cli.ok("user", "disable", "acme", "carol")
    assert "disabled" in cli.ok("user", "list", "acme").split("carol", 1)[1]
    cli.ok("user", "enable", "acme", "carol")
    assert "active" in cli.ok("user", "list", "acme").split("carol", 1)[1]


def _can_log_in(cli: Cli, login: str, password: str) -> bool:
    """Return whether the login and password authenticate, as a registry would."""

    async def attempt(services: Services) -> bool:
        try:
            await services.authenticator.login(login, password, "127.0.0.1")
        except UnauthorizedError:
            return False
        return True

    return _with_services(cli, attempt)


def _with_services(cli: Cli, action: Callable[[Services], Awaitable[T]]) -> T:
    """Run an action on the services of the CLI's data directory and database."""

    async def main() -> T:
        settings = Settings(
            data_dir=Path(cli.env["MOORAGE_DATA_DIR"]),
            database_url=cli.env["MOORAGE_DATABASE_URL"],
        )
        services = await open_services(settings)
        try:
            return await action(services)
        finally:
            await services.close()

    return asyncio.run(main())


def test_user_reset_password(cli: Cli) -> None:
    """user reset-password prints a new password; only the new one logs in."""
    old = cli.ok("user", "add", "acme", "erin").strip().splitlines()[-1]
    output = cli.ok("user", "reset-password", "acme", "erin")
    new = output.strip().splitlines()[-1]
    assert "new password of user erin" in output
    assert len(new) == 32
    assert new != old
    assert _can_log_in(cli, "erin", new)
    assert not _can_log_in(cli, "erin", old)


def test_user_remove(cli: Cli) -> None:
    """user remove deletes the user: gone from the list, its login rejected."""
    password = cli.ok("user", "add", "acme", "frank").strip().splitlines()[-1]
    assert _can_log_in(cli, "frank", password)
    cli.ok("user", "remove", "acme", "frank")
    assert "frank" not in cli.ok("user", "list", "acme")
    assert not _can_log_in(cli, "frank", password)
    result = cli.run("user", "remove", "acme", "frank")
    assert result.returncode == 1
    assert "not found" in result.stderr


def test_user_and_robot_role(cli: Cli) -> None:
    """user role and robot role change the role user list shows."""
    cli.ok("user", "add", "acme", "hank", "--role", "writer")
    cli.ok("robot", "add", "acme", "builder", "--role", "reader")
    assert "is now maintainer" in cli.ok("user", "role", "acme", "hank", "maintainer")
    assert "is now writer" in cli.ok("robot", "role", "acme", "builder", "writer")
    listing = cli.ok("user", "list", "acme")
    assert "maintainer" in listing.split("hank", 1)[1].splitlines()[0]
    assert "writer" in listing.split("acme+builder", 1)[1].splitlines()[0]
    invalid = cli.run("user", "role", "acme", "hank", "admin")
    assert invalid.returncode == 1
    assert "invalid role" in invalid.stderr


def test_customer_show(cli: Cli) -> None:
    """customer show lists the status, namespace and account counts."""
    cli.ok("customer", "add", "initech", "--name", "Initech")
    cli.ok("user", "add", "initech", "gina")
    cli.ok("robot", "add", "initech", "ci")
    cli.ok("robot", "disable", "initech", "ci")
    output = cli.ok("customer", "show", "initech")
    assert "initech (Initech)" in output
    assert "status        active" in output
    assert "namespaces    initech" in output
    assert "1 users, 1 robots, 1 disabled" in output
    missing = cli.run("customer", "show", "nobody")
    assert missing.returncode == 1
    assert "not found" in missing.stderr


def test_token_add_list_revoke(cli: Cli) -> None:
    """A personal access token is printed once, listed without it, revocable."""
    cli.ok("user", "add", "acme", "dave")
    output = cli.ok("token", "add", "acme", "dave", "--name", "laptop")
    token = output.strip().splitlines()[-1]
    assert token.startswith("moorage_pat_")
    token_id = token.split("_")[2]
    listing = cli.ok("token", "list", "acme", "dave")
    assert "laptop" in listing
    assert token not in listing
    output = cli.ok("token", "revoke", "acme", "dave", token_id)
    assert f"token {token_id} revoked" in output
    revoked_row = cli.ok("token", "list", "acme", "dave").split("laptop", 1)[1]
    assert revoked_row.split("│")[3].strip() != "-"
    output = cli.ok("token", "revoke", "acme", "dave", token_id)
    assert f"token {token_id} was already revoked; nothing changed" in output


def test_token_add_owner_rejected(cli: Cli) -> None:
    """`token add --role owner` fails with the roles a token may have, and no
    token is created."""
    cli.ok("user", "add", "acme", "olga", "--role", "owner")
    result = cli.run("token", "add", "acme", "olga", "--role", "owner")
    assert result.returncode == 1
    assert "invalid token role 'owner'" in result.stderr
    assert "reader, writer or maintainer" in result.stderr
    assert "moorage_pat_" not in result.stdout
    assert "owner" not in cli.ok("token", "list", "acme", "olga")


@pytest.mark.parametrize(
    ("command", "message", "forms"),
    [
        (
            ("audit", "list", "--since", "2026-12-05T25:00"),
            "invalid date or time '2026-12-05T25:00' (hour must be in 0..23)",
            ("YYYY-MM-DD", "YYYY-MM-DDTHH:MM"),
        ),
        (
            ("robot", "add", "acme", "r5", "--expires", "-5d"),
            "invalid expiry '-5d'",
            ("90d", "12h", "30m", "YYYY-MM-DD", "YYYY-MM-DDTHH:MM"),
        ),
    ],
)
def test_date_error_lists_forms(
    cli: Cli, command: tuple[str, ...], message: str, forms: tuple[str, ...]
) -> None:
    """An invalid date, time or expiry names the value and every accepted form."""
    result = cli.run(*command)
    assert result.returncode == 2
    assert message in result.stderr
    for form in forms:
        assert form in result.stderr


def test_grant_add_list_remove(cli: Cli) -> None:
    """Grants are added, listed with their end date, and removed by id."""
    output = cli.ok(
        "grant", "add", "acme", "products/*", "reader", "--until", "2030-01-31"
    )
    grant_id = output.split()[1].rstrip(":")
    listing = cli.ok("grant", "list", "acme")
    assert "products/*" in listing
    assert "2030-01-31" in listing
    cli.ok("grant", "remove", "acme", grant_id)
    assert "products/*" not in cli.ok("grant", "list", "acme")


@pytest.mark.parametrize(
    "command",
    [
        ("grant", "add", "acme", "acme/z", "reader", "--until", "2020-01-01"),
        ("customer", "add", "lapsed", "--access-until", "2020-01-01"),
    ],
)
def test_end_date_in_past_rejected(cli: Cli, command: tuple[str, ...]) -> None:
    """A grant or contract that would end in the past is rejected, not added."""
    result = cli.run(*command)
    assert result.returncode == 2
    assert "is in the past" in result.stderr
    assert "acme/z" not in cli.ok("grant", "list", "acme")
    assert "lapsed" not in cli.ok("customer", "list")


@pytest.mark.parametrize(
    "command",
    [
        ("robot", "add", "acme", "late", "--expires", "2020-01-01"),
        ("robot", "add", "acme", "late", "--expires", "0m"),
        ("robot", "rotate", "acme", "steady", "--expires", "2020-01-01"),
        ("token", "add", "acme", "jo", "--name", "late", "--expires", "2020-01-01"),
    ],
)
def test_expiry_in_past_rejected(cli: Cli, command: tuple[str, ...]) -> None:
    """An --expires in the past gets the admin API's message and changes nothing."""
    cli.run("robot", "add", "acme", "steady")
    cli.run("user", "add", "acme", "jo")
    robots = cli.ok("robot", "list", "acme")
    tokens = cli.ok("token", "list", "acme", "jo")

    result = cli.run(*command)

    assert result.returncode == 2
    assert result.stderr.startswith("error: --expires ")
    assert "is in the past: use a later time" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert cli.ok("robot", "list", "acme") == robots
    assert cli.ok("token", "list", "acme", "jo") == tokens


@pytest.mark.parametrize(
    "command",
    [
        ("user", "role", "solo", "ann", "reader"),
        ("user", "disable", "solo", "ann"),
        ("user", "remove", "solo", "ann"),
    ],
)
def test_last_owner_kept(cli: Cli, command: tuple[str, ...]) -> None:
    """A change that leaves a customer without an active owner needs --force."""
    cli.run("customer", "add", "solo")
    cli.run("user", "add", "solo", "ann", "--role", "owner")
    cli.run("user", "enable", "solo", "ann")
    cli.run("user", "role", "solo", "ann", "owner")

    result = cli.run(*command)

    assert result.returncode == 1
    assert result.stderr.startswith(
        "error: user 'ann' is the last active owner of customer 'solo'"
    )
    assert len(result.stderr.strip().splitlines()) == 1
    listing = cli.ok("user", "list", "solo").split("ann", 1)[1]
    assert "owner" in listing.splitlines()[0]
    assert "active" in listing.splitlines()[0]
    cli.ok(*command, "--force")


def test_last_vendor_admin_kept(cli: Cli) -> None:
    """Disabling or removing the last vendor admin needs --force."""

    async def add_admin(services: Services) -> None:
        await admin.add_vendor_user(
            services.identity, "boss", "admin", "a-long-vendor-password"
        )

    _with_services(cli, add_admin)
    for command in (("user", "disable", "-", "boss"), ("user", "remove", "-", "boss")):
        result = cli.run(*command)
        assert result.returncode == 1
        assert result.stderr.startswith("error: 'boss' is the last active vendor admin")
        assert "--force" in result.stderr
    assert _can_log_in(cli, "boss", "a-long-vendor-password")
    cli.ok("user", "remove", "-", "boss", "--force")
    assert not _can_log_in(cli, "boss", "a-long-vendor-password")


def test_grant_every_namespace_needs_force(cli: Cli) -> None:
    """A pattern with `*` in its namespace part is rejected and recorded as a
    failure. With --force it is granted, with a warning."""
    for pattern in ("*", "*/app", "ac*"):
        refused = cli.run("grant", "add", "acme", pattern, "reader")
        assert refused.returncode == 2
        assert f"pattern '{pattern}' matches repositories in every namespace" in (
            refused.stderr
        )
        assert "--force" in refused.stderr
    assert "*" not in cli.ok("grant", "list", "acme")
    failures = cli.ok(
        "audit", "list", "--json", "--action", "grant.add", "--outcome", "failure"
    )
    assert "pattern '*/app' matches" in failures

    granted = cli.run("grant", "add", "acme", "*", "reader", "--force")
    assert granted.returncode == 0, granted.stderr
    assert "reaches every namespace that matches '*'" in granted.stderr
    grant_id = granted.stdout.split()[1].rstrip(":")
    rows = [
        [cell.strip() for cell in line.strip("│").split("│")]
        for line in cli.ok("grant", "list", "acme").splitlines()
        if line.startswith("│")
    ]
    assert [grant_id, "*", "reader", "(customer)", "-"] in rows
    cli.ok("grant", "remove", "acme", grant_id)


def test_grant_in_other_customers_namespace_warns(cli: Cli) -> None:
    """A grant into another customer's namespace is made, with a warning; one
    into the customer's own or a vendor namespace gets none."""
    cli.ok("customer", "add", "warned")
    granted = cli.run("grant", "add", "warned", "acme/app", "reader")
    assert granted.returncode == 0, granted.stderr
    assert "gives warned access to the namespace of customer acme" in granted.stderr
    for pattern in ("warned/app", "products/*"):
        quiet = cli.run("grant", "add", "warned", pattern, "reader")
        assert quiet.returncode == 0, quiet.stderr
        assert "warning" not in quiet.stderr, pattern


def _grant_id(output: str) -> str:
    """Return the id from `grant add` output such as `grant 7: reader on ...`."""
    return output.split(":", 1)[0].removeprefix("grant ").strip()


def test_customer_add_names_grants_on_its_namespace(cli: Cli) -> None:
    """customer add warns about each unexpired grant of another customer that
    reaches its new namespace, and still adds the customer."""
    slug = unique("umbrella")
    cli.ok("robot", "add", "acme", "watcher")
    exact = _grant_id(cli.ok("grant", "add", "acme", f"{slug}/*", "reader"))
    glob = _grant_id(cli.ok("grant", "add", "acme", "*x", "writer", "--force"))
    robot = _grant_id(
        cli.ok(
            "grant", "add", "acme", f"{slug}/app", "reader",
            "--account", "acme+watcher", "--until", "2099-01-01",
        )
    )  # fmt: skip
    elsewhere = _grant_id(cli.ok("grant", "add", "acme", f"{slug}-old/*", "reader"))

    added = cli.run("customer", "add", slug)

    assert added.returncode == 0, added.stderr
    assert added.stdout == f"customer {slug} added, with namespace {slug}/\n"
    assert (
        f"warning: grant {exact} of acme (reader on {slug}/*) gives acme access to "
        f"the new customer's namespace {slug}; remove it with `moorage grant "
        f"remove acme {exact}` unless that is intended"
    ) in added.stderr
    assert f"grant {glob} of acme (writer on *x) gives acme access" in added.stderr
    assert (
        f"grant {robot} of acme (reader on {slug}/app) gives acme+watcher access"
    ) in added.stderr
    assert f"grant {elsewhere} " not in added.stderr
    assert len(added.stderr.strip().splitlines()) == 3
    assert cli.run("customer", "show", slug).returncode == 0

    # The glob reaches every namespace; remove it so that later customers of this
    # module's database are not warned about it.
    cli.ok("grant", "remove", "acme", glob)
    quiet = cli.run("customer", "add", unique("plain"))
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stderr == ""


def _failures(cli: Cli, action: str) -> list[str]:
    """Return the reasons of the failed `action` events, oldest first."""
    output = cli.ok(
        "audit", "list", "--json", "--limit", "1000", "--action", action,
        "--outcome", "failure",
    )  # fmt: skip
    return [json.loads(line)["reason"] for line in output.splitlines()]


@pytest.mark.parametrize(
    ("command", "action", "reason"),
    [
        (
            ("grant", "add", "acme", "acme/r", "reader", "--until", "2020-01-01"),
            "grant.add",
            "grant add: --until 2020-01-01 is in the past; use a later date",
        ),
        (
            ("grant", "add", "acme", "*/app", "reader"),
            "grant.add",
            "grant add: pattern '*/app' matches repositories in every namespace",
        ),
        (
            ("grant", "add", "acme", "Acme/App", "reader"),
            "grant.add",
            "grant add: invalid pattern 'Acme/App'",
        ),
        (
            ("customer", "add", "Initech Ltd"),
            "customer.add",
            "customer add: invalid customer name 'Initech Ltd'",
        ),
        (
            ("user", "add", "acme", "carol!"),
            "user.add",
            "user add: invalid user name 'carol!'",
        ),
        (
            ("user", "add", "-", "bad name"),
            "vendor_user.add",
            "user add: invalid user name 'bad name'",
        ),
        (
            ("robot", "add", "acme", "CI"),
            "robot.add",
            "robot add: invalid robot name 'CI'",
        ),
        (
            ("robot", "add", "acme", "deploy", "--role", "admin"),
            "robot.add",
            "robot add: invalid role 'admin'",
        ),
        (
            ("token", "add", "acme", "nobody", "--repository", "acme/App"),
            "personal_token.add",
            "token add: --repository: invalid pattern 'acme/App'",
        ),
        (
            ("robot", "add", "acme", "r1", "--expires", "soon"),
            "robot.add",
            "robot add: invalid expiry 'soon'",
        ),
        (
            ("customer", "shred", "acme"),
            "customer.shred",
            "customer shred: shredding destroys the key of customer acme",
        ),
        (
            ("signing-key", "rotate", "--overlap", "-1"),
            "signing_key.rotate",
            "signing-key rotate: --overlap must be 0 or more seconds",
        ),
    ],
)
def test_rejected_change_recorded(
    cli: Cli, command: tuple[str, ...], action: str, reason: str
) -> None:
    """A change whose value the command rejects is recorded as a failure."""
    before = _failures(cli, action)
    result = cli.run(*command)
    assert result.returncode == 2
    after = _failures(cli, action)
    assert len(after) == len(before) + 1
    assert after[-1].startswith(reason)


@pytest.mark.parametrize(
    ("command", "message"),
    [
        (
            ("grant", "add", "acme", "acme/App", "reader"),
            "error: invalid pattern 'acme/App': use a namespace (products), a "
            "repository (products/app) or a glob (products/*)",
        ),
        (
            ("customer", "add", "Initech"),
            "error: invalid customer name 'Initech': use up to 64 lowercase "
            "letters, digits and single '.', '_' or '-' between them",
        ),
        (
            ("user", "add", "acme", "ca rol"),
            "error: invalid user name 'ca rol': use up to 128 letters, digits, "
            "'.', '_', '@' and '-', starting with a letter or digit",
        ),
        (
            ("robot", "add", "acme", "C.I"),
            "error: invalid robot name 'C.I': use up to 63 lowercase letters, "
            "digits and single '.', '_' or '-' between them",
        ),
        (
            ("user", "add", "acme", "dave", "--role", "king"),
            "error: invalid role 'king': use one of reader, writer, maintainer, owner",
        ),
        (
            ("user", "add", "-", "dave", "--role", "owner"),
            "error: invalid vendor role 'owner': use one of admin, auditor",
        ),
        (
            ("robot", "add", "acme", "deploy", "--role", "admin"),
            "error: invalid role 'admin': use one of reader, writer, maintainer, owner",
        ),
        (
            ("grant", "add", "acme", "products/*", "god"),
            "error: invalid role 'god': use one of reader, writer, maintainer, owner",
        ),
    ],
)
def test_invalid_name_is_usage_error(
    cli: Cli, command: tuple[str, ...], message: str
) -> None:
    """An invalid name or pattern exits with code 2, as other argument errors
    do, with one line on stderr, and creates nothing."""
    grants_before = cli.ok("grant", "list", "acme")
    customers_before = cli.ok("customer", "list")
    accounts_before = cli.ok("user", "list", "acme")
    result = cli.run(*command)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [message]
    assert result.stdout == ""
    assert cli.ok("grant", "list", "acme") == grants_before
    assert cli.ok("customer", "list") == customers_before
    assert cli.ok("user", "list", "acme") == accounts_before


def test_usage_error_not_recorded(cli: Cli) -> None:
    """A usage error that Click reports (missing argument, unknown option,
    --help) records no event."""
    before = _failures(cli, "grant.add")
    assert cli.run("grant", "add", "acme").returncode == 2
    assert (
        cli.run("grant", "add", "acme", "acme/x", "reader", "--bogus").returncode == 2
    )
    assert cli.run("grant", "add", "--help").returncode == 0
    assert _failures(cli, "grant.add") == before


def test_shred_event_has_counts(cli: Cli) -> None:
    """The customer.shred event gives what the shredding did, as the output does."""
    cli.ok("customer", "add", "shredded")
    cli.ok("user", "add", "shredded", "leaver")
    cli.ok("customer", "suspend", "shredded")
    output = cli.ok("customer", "shred", "shredded", "--confirm")
    listed = cli.ok(
        "audit", "list", "--json", "--action", "customer.shred", "--customer",
        "shredded", "--outcome", "success",
    )  # fmt: skip
    reasons = [json.loads(line)["reason"] for line in listed.splitlines()]
    counts = (
        "data key wraps deleted, 0 objects now unreadable (0 of them blobs), "
        "0 manifests now unreadable"
    )
    assert len(reasons) == 1
    assert reasons[0].startswith("customer shredded key-encryption key: ")
    assert counts in reasons[0]
    assert counts in " ".join(output.split())


def test_grant_invalid_role(cli: Cli) -> None:
    """An unknown role is a usage error (exit 2) that lists the roles."""
    result = cli.run("grant", "add", "acme", "products/*", "superuser")
    assert result.returncode == 2
    assert "reader" in result.stderr


@pytest.mark.parametrize(
    ("command", "returncode", "message"),
    [
        (("grant", "remove", "acme", "9" * 23), 1, "not found"),
        (("token", "revoke", "acme", "ida", "9" * 23), 1, "not found"),
        # Past the 32-bit id columns of PostgreSQL.
        (("grant", "remove", "acme", str(2**31)), 1, "not found"),
        (("token", "revoke", "acme", "ida", str(2**31)), 1, "not found"),
        (("robot", "add", "acme", "r10", "--expires", "99999999999d"), 2, "9999"),
    ],
)
def test_oversized_numbers_rejected(
    cli: Cli, command: tuple[str, ...], returncode: int, message: str
) -> None:
    """Numbers too large for the database or a datetime get a one-line error."""
    cli.run("user", "add", "acme", "ida")
    result = cli.run(*command)
    assert result.returncode == returncode
    assert result.stderr.startswith("error: ")
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_customer_suspend_resume(cli: Cli) -> None:
    """customer suspend and resume change the status customer list shows."""
    cli.ok("customer", "add", "globex")
    cli.ok("customer", "suspend", "globex")
    assert "suspended" in cli.ok("customer", "list").split("globex", 1)[1]
    cli.ok("customer", "resume", "globex")
    assert "active" in cli.ok("customer", "list").split("globex", 1)[1]


def test_no_op_changes_say_so(cli: Cli) -> None:
    """Suspend, resume, disable and enable exit 0 when there is nothing to change,
    and say that nothing changed instead of reporting a change."""
    cli.ok("customer", "add", "hooli")
    output = cli.ok("customer", "resume", "hooli")
    assert "hooli is not suspended; nothing changed" in output
    assert "resumed" not in output
    assert "suspended; its tokens" in cli.ok("customer", "suspend", "hooli")
    output = cli.ok("customer", "suspend", "hooli")
    assert "hooli was already suspended; nothing changed" in output
    assert "resumed;" in cli.ok("customer", "resume", "hooli")

    cli.ok("user", "add", "acme", "grace")
    output = cli.ok("user", "enable", "acme", "grace")
    assert "user grace is not disabled; nothing changed" in output
    assert "user grace disabled" in cli.ok("user", "disable", "acme", "grace")
    output = cli.ok("user", "disable", "acme", "grace")
    assert "user grace was already disabled; nothing changed" in output
    assert "user grace enabled" in cli.ok("user", "enable", "acme", "grace")

    cli.ok("robot", "add", "acme", "idle")
    output = cli.ok("robot", "enable", "acme", "idle")
    assert "robot acme+idle is not disabled; nothing changed" in output
    cli.ok("robot", "disable", "acme", "idle")
    output = cli.ok("robot", "disable", "acme", "idle")
    assert "robot acme+idle was already disabled; nothing changed" in output


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("x" * 201, "too long (201 characters): use at most 200"),
        ("Evil\x1b[31mCo", "control character U+001B"),
        ("two\nlines", "control character U+000A"),
    ],
)
def test_customer_display_name_checked(cli: Cli, name: str, message: str) -> None:
    """customer add rejects a display name that is too long or contains a control
    character with exit code 2 and one line, and adds no customer."""
    slug = unique("named")
    result = cli.run("customer", "add", slug, "--name", name)
    assert result.returncode == 2
    assert result.stderr.startswith("error: --name: ")
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert slug not in cli.ok("customer", "list")

    async def add(services: Services) -> None:
        await admin.add_customer(services.identity, slug, name, None)

    with pytest.raises(InvalidInputError, match="display name"):
        _with_services(cli, add)


def test_customer_display_name_limit(cli: Cli) -> None:
    """A display name of exactly 200 characters, accented ones included, is kept."""
    slug = unique("wide")
    name = "é" * 200
    cli.ok("customer", "add", slug, "--name", name)

    async def stored(services: Services) -> str:
        return (await services.identity.get_customer(slug)).display_name

    assert _with_services(cli, stored) == name


def test_signing_key_rotate(cli: Cli) -> None:
    """signing-key rotate adds a key and schedules the older ones to retire."""
    before = cli.ok("signing-key", "list").count("ES256")
    cli.ok("signing-key", "rotate", "--overlap", "60")
    listing = cli.ok("signing-key", "list")
    assert listing.count("ES256") == max(before, 1) + 1
    result = cli.run("signing-key", "rotate", "--overlap", "-1")
    assert result.returncode == 2


def test_vendor_user_add(cli: Cli) -> None:
    """`user add -` creates a vendor account with a vendor role only."""
    output = cli.ok("user", "add", "-", "auditor-1", "--role", "auditor")
    assert "vendor user auditor-1 added as auditor" in output
    assert "auditor-1" in cli.ok("user", "list", "-")

    refused = cli.run("user", "add", "-", "writer-1", "--role", "writer")
    assert refused.returncode == 2
    assert "invalid vendor role 'writer'" in refused.stderr
    assert "writer-1" not in cli.ok("user", "list", "-")


def test_customer_add_refuses_used_namespace(server: ServerProcess) -> None:
    """A new customer cannot take a namespace where the vendor already pushed."""
    namespace = unique("products")
    with admin_client(server) as client:
        push_image(client, f"{namespace}/app")
    runner = Cli(server.data_dir, server.database_url)

    refused = runner.run("customer", "add", namespace)

    assert refused.returncode == 1
    assert "already contains repositories" in refused.stderr
    assert namespace not in runner.ok("customer", "list")
