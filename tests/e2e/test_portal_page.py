"""The customer portal in a real browser: Debian's Chromium, headless, driven
through ChromeDriver by Selenium, against a real server.

A customer's users log in with the credentials they already have and see
their own repositories only, commands with this registry's address, and (for
owners) their robots, whose secrets they rotate through the audited admin API.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import WebDriverWait

from moorage.db.audit_store import AuditFilter
from tests.support.audit import wait_for_events
from tests.support.browser import headless_chromium, needs_chromium
from tests.support.identity import admin_client, push_image
from tests.support.receivers import wait_until
from tests.support.server import ServerProcess

# Logins run argon2id, which takes seconds on a loaded test machine.
WAIT_SECONDS = 30
TIMEOUT = 30
# A personal access token name that is HTML which would run a script if the
# page parsed it: the portal must show it as text.
HTML_NAME = "<img src=x onerror=\"document.title='injected'\">"

pytestmark = needs_chromium


@dataclass(frozen=True)
class Setup:
    acme: str
    globex: str
    acme_repository: str
    globex_repository: str
    owner: tuple[str, str]
    reader: tuple[str, str]
    robot_name: str
    robot_secret: str

    @property
    def robot_login(self) -> str:
        return f"{self.acme}+{self.robot_name}"


@pytest.fixture(scope="module")
def setup(server: ServerProcess) -> Setup:
    acme = server.add_customer()
    globex = server.add_customer()
    acme_repository = f"{acme}/app"
    globex_repository = f"{globex}/private"
    with admin_client(server) as client:
        push_image(client, acme_repository, "1.0")
        push_image(client, globex_repository, "1.0")
        robot = client.post(
            f"/api/v1/customers/{acme}/robots", json={"name": "ci", "role": "reader"}
        )
        assert robot.status_code == 201, robot.text
    reader = server.add_user(acme, "reader")
    created = httpx.post(
        f"{server.url}/api/v1/me/tokens",
        json={"name": HTML_NAME},
        auth=reader,
        timeout=TIMEOUT,
    )
    assert created.status_code == 201, created.text
    return Setup(
        acme=acme,
        globex=globex,
        acme_repository=acme_repository,
        globex_repository=globex_repository,
        owner=server.add_user(acme, "owner"),
        reader=reader,
        robot_name="ci",
        robot_secret=robot.json()["secret"],
    )


@pytest.fixture
def browser() -> Iterator[webdriver.Chrome]:
    with headless_chromium(console_log=True) as driver:
        yield driver


def wait_visible(browser: webdriver.Chrome, selector: str) -> WebElement:
    element: WebElement = WebDriverWait(browser, WAIT_SECONDS).until(
        expected_conditions.visibility_of_element_located((By.CSS_SELECTOR, selector))
    )
    return element


def log_in(
    server: ServerProcess, browser: webdriver.Chrome, login: str, password: str
) -> None:
    """Open the portal, log in, and wait until the repositories are listed."""
    browser.get(f"{server.url}/portal")
    browser.find_element(By.ID, "login").send_keys(login)
    browser.find_element(By.ID, "password").send_keys(password)
    browser.find_element(By.CSS_SELECTOR, "#login-form button").click()
    wait_visible(browser, "#account")
    WebDriverWait(browser, WAIT_SECONDS).until(
        lambda driver: (
            driver.find_elements(By.CSS_SELECTOR, "#repositories tbody tr")
            or driver.find_element(By.ID, "no-repositories").is_displayed()
        )
    )


def column_texts(browser: webdriver.Chrome, table: str, column: int) -> list[str]:
    """Return one column of a table's rows, read in one script run, so that a
    table that the page rebuilds meanwhile cannot leave stale elements."""
    texts: list[str] = browser.execute_script(
        "return Array.from(document.querySelectorAll(arguments[0]))"
        ".map(row => row.cells[arguments[1]].textContent)",
        f"#{table} tbody tr",
        column,
    )
    return texts


def test_portal_lists_own_repositories(
    server: ServerProcess, browser: webdriver.Chrome, setup: Setup
) -> None:
    """A customer's reader sees its repository and tag, not another customer's."""
    log_in(server, browser, *setup.reader)
    assert column_texts(browser, "repositories", 0) == [setup.acme_repository]
    tags = browser.find_elements(By.CSS_SELECTOR, "#repositories button.tag")
    assert [tag.text for tag in tags] == ["1.0"]
    page_text = browser.find_element(By.TAG_NAME, "body").text
    assert setup.globex_repository not in page_text
    assert setup.globex not in page_text


def test_portal_loads_nothing_blocked(
    server: ServerProcess, browser: webdriver.Chrome, setup: Setup
) -> None:
    """Every file and request of the page goes to the registry itself, and its
    Content-Security-Policy blocks nothing the page needs."""
    log_in(server, browser, *setup.reader)
    loaded = browser.execute_script(
        "return performance.getEntriesByType('resource').map(entry => entry.name)"
    )
    assert f"{server.url}/portal/portal.js" in loaded
    assert f"{server.url}/api/v1/me/repositories" in loaded
    for address in loaded:
        assert address.startswith(f"{server.url}/"), address
    messages = [entry["message"] for entry in browser.get_log("browser")]
    blocked = [text for text in messages if "Content Security Policy" in text]
    assert blocked == []


def test_portal_requests_all_succeed(
    server: ServerProcess, browser: webdriver.Chrome, setup: Setup
) -> None:
    """Every request of the page and of the browser for it, the favicon
    included, succeeds, and the console shows no error."""
    logged_before = len(server.log())
    log_in(server, browser, *setup.reader)
    icon = browser.execute_script(
        "return document.querySelector('link[rel=icon]').href"
    )
    assert icon == f"{server.url}/portal/favicon.svg"
    # Chromium fetches the icon after the page loads, and the server logs each
    # request after its response; wait for the icon's line.
    assert wait_until(
        lambda: "/portal/favicon.svg" in server.log()[logged_before:],
        timeout=WAIT_SECONDS,
    )

    requests = [
        json.loads(line)
        for line in server.log()[logged_before:].splitlines()
        if line.startswith("{") and '"event": "request"' in line
    ]
    paths = {request["path"] for request in requests}
    assert "/portal/favicon.svg" in paths
    assert "/favicon.ico" not in paths
    failed = [request for request in requests if request["status"] >= 400]
    assert failed == []
    errors = [
        entry["message"]
        for entry in browser.get_log("browser")
        if entry["level"] == "SEVERE"
    ]
    assert errors == []


def test_portal_commands_name_host(
    server: ServerProcess, browser: webdriver.Chrome, setup: Setup
) -> None:
    """The commands use the address the page was loaded from, the login and
    the selected image."""
    log_in(server, browser, *setup.reader)
    host = server.url.removeprefix("http://")
    login = setup.reader[0]
    image = f"{host}/{setup.acme_repository}:1.0"

    def text(element_id: str) -> str:
        return browser.find_element(By.ID, element_id).text

    assert f"docker login {host} --username {login}" in text("docker-commands")
    assert f"docker pull {image}" in text("docker-commands")
    assert f"podman login {host} --username {login}" in text("podman-commands")
    assert f"skopeo copy docker://{image} " in text("skopeo-commands")
    kubernetes = text("kubernetes-commands")
    assert "kubectl create secret docker-registry" in kubernetes
    assert f"--docker-server={host}" in kubernetes
    assert f"--docker-username={setup.acme}+ROBOT" in kubernetes
    assert f"helm registry login {host} --username {login}" in text("helm-commands")
    assert browser.find_element(By.ID, "plain-http").is_displayed()


def test_portal_owner_rotates_robot_secret(
    server: ServerProcess, browser: webdriver.Chrome, setup: Setup
) -> None:
    """An owner rotates a robot's secret: the page shows the new secret once,
    it works, the old one fails, and the rotation is an audit event."""
    log_in(server, browser, *setup.owner)
    wait_visible(browser, "#robots tbody tr")
    row = browser.find_element(
        By.CSS_SELECTOR, f'#robots tr[data-login="{setup.robot_login}"]'
    )
    button = row.find_element(By.CSS_SELECTOR, "button.rotate")
    button.click()
    assert button.text == "Confirm: rotate now"
    button.click()
    secret = wait_visible(browser, "#new-secret-value").text
    assert browser.find_element(By.ID, "new-secret-login").text == setup.robot_login
    assert secret
    assert secret != setup.robot_secret
    new_login = httpx.get(
        f"{server.url}/v2/", auth=(setup.robot_login, secret), timeout=TIMEOUT
    )
    assert new_login.status_code == 200
    old_login = httpx.get(
        f"{server.url}/v2/",
        auth=(setup.robot_login, setup.robot_secret),
        timeout=TIMEOUT,
    )
    assert old_login.status_code == 401
    where = AuditFilter(action="robot.rotate", account=setup.owner[0])
    events = wait_for_events(server, where, lambda found: len(found) >= 1)
    assert len(events) == 1
    assert events[0].event.outcome == "success"
    assert "HeadlessChrome" in (events[0].event.user_agent or "")


def test_portal_reader_has_no_robot_controls(
    server: ServerProcess, browser: webdriver.Chrome, setup: Setup
) -> None:
    """A reader sees no robot section, and the API rejects the rotation."""
    log_in(server, browser, *setup.reader)
    assert not browser.find_element(By.ID, "robots-section").is_displayed()
    assert browser.find_elements(By.CSS_SELECTOR, "button.rotate") == []
    response = httpx.post(
        f"{server.url}/api/v1/customers/{setup.acme}/robots/{setup.robot_name}/secret",
        auth=setup.reader,
        timeout=TIMEOUT,
    )
    assert response.status_code == 403


def test_portal_shows_html_as_text(
    server: ServerProcess, browser: webdriver.Chrome, setup: Setup
) -> None:
    """A token name made of HTML is shown as its literal text, and no element
    or script comes from it."""
    log_in(server, browser, *setup.reader)
    wait_visible(browser, "#tokens tbody tr")
    assert HTML_NAME in column_texts(browser, "tokens", 0)
    assert browser.find_elements(By.CSS_SELECTOR, "#tokens img") == []
    assert browser.find_elements(By.CSS_SELECTOR, "main img") == []
    assert browser.title == "Registry portal"


def test_portal_wrong_password_rejected(
    server: ServerProcess, browser: webdriver.Chrome, setup: Setup
) -> None:
    """A wrong password shows the error and keeps the login form."""
    browser.get(f"{server.url}/portal")
    browser.find_element(By.ID, "login").send_keys(setup.reader[0])
    browser.find_element(By.ID, "password").send_keys("not-the-password")
    browser.find_element(By.CSS_SELECTOR, "#login-form button").click()
    message = wait_visible(browser, "#message").text
    assert message.startswith("Login failed:")
    assert browser.find_element(By.ID, "login-section").is_displayed()
    assert not browser.find_element(By.ID, "account").is_displayed()


def test_portal_creates_and_revokes_token(
    server: ServerProcess, browser: webdriver.Chrome, setup: Setup
) -> None:
    """A user creates a personal access token, which works at once, and
    revokes it, after which it fails. Both are audit events."""
    login, password = server.add_user(setup.acme, "reader")
    log_in(server, browser, login, password)
    browser.find_element(By.ID, "token-name").send_keys("laptop")
    browser.find_element(By.CSS_SELECTOR, "#token-form button").click()
    token = wait_visible(browser, "#new-token-value").text
    assert token
    WebDriverWait(browser, WAIT_SECONDS).until(
        lambda driver: column_texts(driver, "tokens", 0) == ["laptop"]
    )
    status = httpx.get(f"{server.url}/v2/", auth=(login, token), timeout=TIMEOUT)
    assert status.status_code == 200
    wait_visible(browser, "#tokens button.revoke").click()
    WebDriverWait(browser, WAIT_SECONDS).until(
        lambda driver: column_texts(driver, "tokens", 4) == ["revoked"]
    )
    status = httpx.get(f"{server.url}/v2/", auth=(login, token), timeout=TIMEOUT)
    assert status.status_code == 401
    for action in ("personal_token.add", "personal_token.revoke"):
        where = AuditFilter(action=action, account=login)
        events = wait_for_events(server, where, lambda found: len(found) == 1)
        assert len(events) == 1, action


def test_portal_changes_password(
    server: ServerProcess, browser: webdriver.Chrome, setup: Setup
) -> None:
    """A user changes its password; the new one works, the old one fails, and
    the change is an audit event."""
    login, password = server.add_user(setup.acme, "reader")
    new_password = "portal-new-password-" + password[:8]
    log_in(server, browser, login, password)
    browser.find_element(By.ID, "new-password").send_keys(new_password)
    browser.find_element(By.ID, "repeat-password").send_keys(new_password)
    browser.find_element(By.CSS_SELECTOR, "#password-form button").click()
    message = wait_visible(browser, "#message").text
    assert message.startswith("Changed your password"), message
    new = httpx.get(f"{server.url}/v2/", auth=(login, new_password), timeout=TIMEOUT)
    assert new.status_code == 200
    old = httpx.get(f"{server.url}/v2/", auth=(login, password), timeout=TIMEOUT)
    assert old.status_code == 401
    where = AuditFilter(action="account.password_change", account=login)
    events = wait_for_events(server, where, lambda found: len(found) == 1)
    assert len(events) == 1
