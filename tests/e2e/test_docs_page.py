"""The admin API's /docs page in a real browser: Debian's Chromium, headless,
driven through ChromeDriver by Selenium.

The page must render the API's operations with every file it loads coming
from the registry itself, because registries often run where browsers cannot
reach the internet.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import WebDriverWait

from tests.support.browser import headless_chromium, needs_chromium
from tests.support.server import ServerProcess

RENDER_SECONDS = 30

pytestmark = needs_chromium


@pytest.fixture
def browser() -> Iterator[webdriver.Chrome]:
    with headless_chromium() as driver:
        yield driver


def test_docs_page_renders_operations(
    server: ServerProcess, browser: webdriver.Chrome
) -> None:
    """Swagger UI lists the admin operations, loaded from the registry alone."""
    browser.get(f"{server.url}/api/v1/docs")
    WebDriverWait(browser, RENDER_SECONDS).until(
        expected_conditions.presence_of_element_located((By.CSS_SELECTOR, ".opblock"))
    )
    paths = [
        element.text
        for element in browser.find_elements(By.CSS_SELECTOR, ".opblock-summary-path")
    ]
    assert "/customers/{customer}/users" in paths
    assert "/me/tokens" in paths
    loaded = browser.execute_script(
        "return performance.getEntriesByType('resource').map(entry => entry.name)"
    )
    assert loaded
    for address in loaded:
        assert address.startswith(f"{server.url}/api/v1/")
