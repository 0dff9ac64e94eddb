"""The allow and block list pages in a real browser (Debian's headless Chromium, as in
tests/postfix/test_console_browser.py): a domain admin adds and removes entries with the
page's own forms, and a form edited in the page to name another domain's list changes nothing.
With SMTPPROXY_SCREENSHOTS=1 the page goes to docs/img/console-lists.png (docs/console.md)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.console_server import HASH, console_files, web_process
from tests.daemons import free_port
from tests.postfix.test_console_browser import CHROMEDRIVER, CHROMIUM, _chromium

pytestmark = pytest.mark.skipif(
    not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()),
    reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)",
)
webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (pip install selenium)")
from selenium.common.exceptions import WebDriverException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.expected_conditions import staleness_of  # noqa: E402
from selenium.webdriver.support.wait import WebDriverWait  # noqa: E402

SHOTS = Path(__file__).parents[2] / "docs" / "img"
BLOCK = ("# recipient            blocked senders\n"
         "example.com            @spam-house.example, *.bulk-mailer.example\n"
         "alice@example.com      ex-partner@old.example\n"
         "bob@example.com        newsletter@shop.example\n"
         "other.example          @rival.example\n")
ALLOW = ("example.com            partner.example, *.bank.example\n"
         "alice@example.com      friend@family.example\n")


@pytest.fixture
def web(tmp_path: Path) -> Iterator[tuple[str, Any, Path]]:
    port = free_port()
    (tmp_path / "block").write_text(BLOCK)
    (tmp_path / "allow").write_text(ALLOW)
    console_files(
        tmp_path, port, accounts=f"hostmaster:{HASH}:domain:example.com\n",
        more="tables:\n  block: {type: file, file: block}\n  allow: {type: file, file: allow}\n"
        "plugins:\n  - name: lists\n    settings: {allow: allow, block: block}\n")
    with web_process(tmp_path / "cfg.yaml", port, tmp_path / "web.log") as base:
        driver = _chromium(str(tmp_path / "profile"))
        try:
            yield base, driver, tmp_path
        finally:
            driver.quit()


def _navigate(driver: Any, action: Any) -> None:
    old = driver.find_element(By.TAG_NAME, "html")
    action()

    def replaced(d: Any) -> bool:
        try:
            return bool(staleness_of(old)(d))
        except WebDriverException:
            return True

    WebDriverWait(driver, 30).until(replaced)


def test_a_domain_admin_edits_lists_in_the_browser(web: tuple[str, Any, Path]) -> None:
    base, driver, root = web
    driver.get(f"{base}/console/login")
    driver.find_element(By.NAME, "name").send_keys("hostmaster")
    driver.find_element(By.NAME, "password").send_keys("pw")
    _navigate(driver, lambda: driver.find_element(By.CSS_SELECTOR, "button[type=submit]").click())
    _navigate(driver, lambda: driver.find_element(By.LINK_TEXT, "Lists").click())
    assert driver.find_element(By.TAG_NAME, "h1").text == "Allow and block lists"
    block = driver.find_element(By.XPATH, "//h2[@id='block']/following-sibling::div[1]").text
    assert "@spam-house.example" in block and "@rival.example" not in block  # another domain's list

    form = driver.find_element(By.CSS_SELECTOR, "form[action='/console/lists/block/add']")
    form.find_element(By.NAME, "key").send_keys("bob@example.com")
    form.find_element(By.NAME, "entry").send_keys("deals@coupons.example")
    _navigate(driver, lambda: form.find_element(By.TAG_NAME, "button").click())
    status = driver.find_element(By.CSS_SELECTOR, "p.done").text
    assert "deals@coupons.example added to the block list of bob@example.com" in status
    assert "bob@example.com  newsletter@shop.example, deals@coupons.example" in (root / "block").read_text()

    button = driver.find_element(
        By.CSS_SELECTOR, "button[aria-label='remove ex-partner@old.example from alice@example.com']")
    _navigate(driver, button.click)
    assert "ex-partner@old.example removed from the block list of alice@example.com" in driver.page_source
    assert "ex-partner" not in (root / "block").read_text()
    if os.environ.get("SMTPPROXY_SCREENSHOTS"):
        driver.set_window_size(1000, 1250)
        driver.save_screenshot(str(SHOTS / "console-lists.png"))

    # An attacker edits the page: a remove form now names another domain's list. Refused.
    _navigate(driver, lambda: driver.execute_script(
        "const f = document.querySelector('form[action=\"/console/lists/block/remove\"]');"
        "f.querySelector('input[name=key]').value = 'other.example';"
        "f.querySelector('input[name=entry]').value = '@rival.example'; f.submit();"))
    assert driver.find_element(By.TAG_NAME, "h1").text == "Not allowed"
    assert "other.example          @rival.example" in (root / "block").read_text()
