"""A real headless Chromium for the dashboard's end-to-end tests: Debian's `chromium` and
`chromium-driver` (scripts/ensure-test-tools.sh installs them), driven with Selenium.

    def test_x(browser: WebDriver) -> None: ...   # one browser for the session

Started with `--headless --no-sandbox --disable-gpu --disable-background-networking`.
Without Chromium the tests fail when `CI` is set, and are skipped (saying why) elsewhere.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from typing import Any

import pytest

CHROMIUM = os.environ.get("ABLAUF_CHROMIUM", "/usr/bin/chromium")
ARGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-dev-shm-usage",
    "--window-size=1280,900",
)


def _driver_path() -> str | None:
    return shutil.which("chromedriver") or (
        "/usr/bin/chromedriver" if os.path.exists("/usr/bin/chromedriver") else None
    )


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    """A Chromium driven by Selenium (closed at the end of the session)."""
    driver_path = _driver_path()
    missing = None
    if not os.path.exists(CHROMIUM):
        missing = f"no Chromium at {CHROMIUM}"
    elif driver_path is None:
        missing = "no chromedriver on PATH"
    if missing is not None:
        if os.environ.get("CI"):
            pytest.fail(f"Chromium is required in CI: {missing}", pytrace=False)
        pytest.skip(f"Chromium not available: {missing} (scripts/ensure-test-tools.sh)")
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for arg in ARGS:
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()
