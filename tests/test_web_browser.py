"""The GP's page in a real browser (Debian's chromium, driven through chromedriver by
selenium): sign in, open a case on a simulated device, press the device's button, see the
capture's thumbnail and verdict appear without reloading, close the case. Screenshots of
each step are saved (their folder is printed, and kept under the test's tmp folder)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.ui import Select, WebDriverWait

from clinic_gateway.gateway import Gateway
from clinic_gateway.web.auth import Staff, hash_password
from clinic_gateway.web.server import WebServer, beside
from sim.device import SimDevice, sim_config

DEVICE = "sim-0001"
USER, PASSWORD = "dr.hansen", "correct horse battery"
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
WAIT = 30.0


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[webdriver.Chrome]:
    # Debian's packages (tools/system-deps.sh installs them): selenium-manager is never asked
    # to download a browser or a driver.
    for path in (CHROMIUM, CHROMEDRIVER):
        assert os.access(path, os.X_OK), f"{path} is missing: run make system-deps"
    options = Options()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,900", "--no-first-run", "--disable-extensions",
                f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER, log_output=str(tmp_path /
                                                                            "chromedriver.log")),
                              options=options)
    driver.set_page_load_timeout(WAIT)
    try:
        yield driver
    finally:
        driver.quit()


def test_a_gp_opens_a_case_and_sees_the_press_arrive(tmp_path: Path, broker, gateway: Gateway,
                                                     browser: webdriver.Chrome) -> None:
    shots = tmp_path / "screenshots"
    shots.mkdir()

    def shot(name: str) -> None:
        assert browser.save_screenshot(str(shots / f"{name}.png"))

    parts = beside(gateway, Staff({USER: hash_password(PASSWORD)}, {}))
    assert parts.board.wait_ready(10)
    config = sim_config(tmp_path / "device", broker.port, DEVICE)
    wait = WebDriverWait(browser, WAIT)
    try:
        with WebServer(parts.app) as server, SimDevice(config) as device:
            device.wait_online()
            browser.get(f"{server.url}/devices/{DEVICE}")
            wait.until(ec.presence_of_element_located((By.ID, "sign-in")))  # sent to sign in
            browser.find_element(By.ID, "username").send_keys(USER)
            browser.find_element(By.ID, "password").send_keys(PASSWORD)
            shot("1-sign-in")
            browser.find_element(By.ID, "sign-in").click()
            wait.until(ec.text_to_be_present_in_element((By.ID, "user"), USER))
            # The devices' page shows the simulated device online (from its status).
            row = f'tr[data-device-id="{DEVICE}"]'
            wait.until(ec.text_to_be_present_in_element((By.CSS_SELECTOR, row), "online"))
            shot("2-devices")
            browser.find_element(By.LINK_TEXT, DEVICE).click()
            wait.until(ec.presence_of_element_located((By.ID, "open-case")))
            browser.find_element(By.ID, "case_token").send_keys("TD-2026-000888")
            Select(browser.find_element(By.ID, "anatomic_site")).select_by_visible_text(
                "posterior torso")
            shot("3-open-case")
            browser.find_element(By.ID, "open-case").click()
            wait.until(ec.presence_of_element_located((By.ID, "close-case")))
            assert "TD-2026-000888" not in browser.current_url
            assert "TD-2026-000888" not in browser.page_source  # never shown back
            assert device.agent.session.case().token == "TD-2026-000888"
            assert browser.find_element(By.ID, "case-site").text == "posterior torso"

            # The clinician presses the device's button; the page is not reloaded.
            marker = browser.execute_script("return (window.__stay = performance.now());")
            device.show(None, seed=3)
            outcome = device.press()
            assert outcome.verdict == "accept"
            figure = f'figure.capture[data-capture-id="{outcome.capture_id}"]'
            wait.until(ec.text_to_be_present_in_element(
                (By.CSS_SELECTOR, f"{figure} .verdict"), "accept"))
            wait.until(lambda d: d.execute_script(
                "const i = document.querySelector(arguments[0] + ' img');"
                "return i !== null && i.complete && i.naturalWidth > 0;", figure))
            assert browser.execute_script("return window.__stay;") == marker  # live, no reload
            width = browser.execute_script(
                f"return document.querySelector('{figure} img').naturalWidth;")
            assert width == 320
            light = browser.find_element(By.CSS_SELECTOR, f"{figure} .light").text
            assert light == "polarised"
            shot("4-capture-arrived")

            browser.find_element(By.ID, "close-case").click()
            wait.until(ec.presence_of_element_located((By.ID, "open-case")))
            assert device.agent.session.case() is None
            # The closed case's capture stays on the page, under the last case.
            assert browser.find_elements(By.CSS_SELECTOR, figure)
            shot("5-case-closed")
    finally:
        parts.board.stop()

    saved = sorted(p.name for p in shots.iterdir())
    assert saved == ["1-sign-in.png", "2-devices.png", "3-open-case.png",
                     "4-capture-arrived.png", "5-case-closed.png"]
    keep = os.environ.get("WEB_SCREENSHOTS")
    if keep:  # a folder outside pytest's tmp, for a person to look at
        shutil.copytree(shots, keep, dirs_exist_ok=True)
        shots = Path(keep)
    print(f"screenshots: {shots}")
