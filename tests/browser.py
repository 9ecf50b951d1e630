"""Headless Chromium for browser tests (Selenium), shared by tests/test_report.py and test_label.py.

Browser tests are part of the default suite. They are skipped only when Chromium, chromedriver or
Selenium are absent, with the install command in the skip message; a browser that is present but
fails to start fails the test. CI installs them with:

    apt-get install -y chromium chromium-driver && pip install selenium

`CHROMIUM_BIN` / `CHROMEDRIVER` override the binaries. With `PPO_RLHF_SCREENSHOTS=docs` the tests
write their screenshots (docs/report.png, docs/label.png) into that directory, relative to the repo
root unless absolute.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ppo_rlhf.fileio import atomic_write_bytes

REPO_ROOT = Path(__file__).resolve().parents[1]
INSTALL_HINT = "apt-get install -y chromium chromium-driver && pip install selenium"
_CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
    "--force-device-scale-factor=1",
)


def find_binaries() -> tuple[str | None, str | None]:
    """(chromium, chromedriver) paths, from the environment or PATH; None where not found."""
    chromium = os.environ.get("CHROMIUM_BIN") or next(
        filter(None, (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome"))),
        None,
    )
    driver = os.environ.get("CHROMEDRIVER") or shutil.which("chromedriver")
    return chromium, driver


def start_driver(width: int = 1280, height: int = 900) -> tuple[Any | None, str]:
    """A headless Chromium WebDriver with a fresh profile, or (None, why) if the tools are absent.

    The profile directory is removed by the driver's `quit()`.
    """
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        return None, f"selenium is not installed; to run browser tests: {INSTALL_HINT}"
    chromium, driver_path = find_binaries()
    if chromium is None or driver_path is None:
        missing = "Chromium" if chromium is None else "chromedriver"
        return None, f"{missing} not found on PATH; to run browser tests: {INSTALL_HINT}"
    profile = tempfile.mkdtemp(prefix="ppo-rlhf-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in _CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--window-size={width},{height}")
    options.add_argument(f"--user-data-dir={profile}")
    try:
        driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    except BaseException:
        shutil.rmtree(profile, ignore_errors=True)
        raise
    quit_driver = driver.quit

    def quit_and_clean() -> None:
        try:
            quit_driver()
        finally:
            shutil.rmtree(profile, ignore_errors=True)

    driver.quit = quit_and_clean
    return driver, ""


@pytest.fixture
def chromium() -> Iterator[Any]:
    """Pytest fixture: a headless Chromium driver (1280×900), skipped with a reason when absent."""
    driver, reason = start_driver()
    if driver is None:
        pytest.skip(reason)
    try:
        yield driver
    finally:
        driver.quit()


def set_viewport(driver: Any, width: int, height: int) -> None:
    """Make the page viewport exactly width×height CSS pixels (window chrome differs by platform)."""
    driver.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
    )


def save_screenshot(driver: Any, name: str) -> Path | None:
    """Save the viewport as `name` in $PPO_RLHF_SCREENSHOTS (if set); return the path written."""
    target = os.environ.get("PPO_RLHF_SCREENSHOTS")
    if not target:
        return None
    directory = Path(target) if Path(target).is_absolute() else REPO_ROOT / target
    path = directory / name
    atomic_write_bytes(path, driver.get_screenshot_as_png())
    return path
