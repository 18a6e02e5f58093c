"""Accounts shared by the integration tests of one module."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from tests.support.registry import Account, open_account
from tests.support.server import ServerProcess


@pytest.fixture(scope="module")
def customer(server: ServerProcess) -> str:
    """A customer of the module's own; its slug is also its namespace."""
    return server.add_customer()


@pytest.fixture(scope="module")
def writer(server: ServerProcess, customer: str) -> Iterator[Account]:
    """A user with the writer role in the module's customer."""
    account = open_account(server, customer, "writer")
    yield account
    account.client.close()


@pytest.fixture(scope="module")
def reader(server: ServerProcess, customer: str) -> Iterator[Account]:
    """A user with the reader role in the module's customer."""
    account = open_account(server, customer, "reader")
    yield account
    account.client.close()


@pytest.fixture(scope="module")
def maintainer(server: ServerProcess, customer: str) -> Iterator[Account]:
    """A user with the maintainer role (writer plus delete) in the customer."""
    account = open_account(server, customer, "maintainer")
    yield account
    account.client.close()


@pytest.fixture
def new_account(server: ServerProcess) -> Iterator[Callable[..., Account]]:
    """A factory of extra accounts, closed after the test: (customer, role)."""
    opened: list[Account] = []

    def factory(customer: str | None = None, role: str = "writer") -> Account:
        account = open_account(server, customer or server.add_customer(), role)
        opened.append(account)
        return account

    yield factory
    for account in opened:
        account.client.close()
