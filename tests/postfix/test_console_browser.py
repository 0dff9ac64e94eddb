"""The web console in a real browser: Debian's headless Chromium driven by Selenium (with
Debian's chromedriver: Selenium Manager downloads nothing), ``smtpproxy web`` as its own
process on loopback, an SQLite store, and the tests' private Postfix behind the releases.
One browser for the module; each test signs in afresh. Screenshots go to docs/img/ when
SMTPPROXY_SCREENSHOTS=1 (docs/console.md shows them)."""

from __future__ import annotations

import asyncio
import http.server
import json
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import bcrypt
import httpx
import pytest

from smtpproxy.links import Link, LinkSigner
from smtpproxy.store import Held, HistoryEntry, open_store
from tests.console_server import web_process
from tests.daemons import free_port
from tests.postfix_instance import PostfixInstance, _make_root, require_postfix

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
pytestmark = pytest.mark.skipif(
    not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()),
    reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)",
)
webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (pip install selenium)")
from selenium.common.exceptions import WebDriverException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.expected_conditions import staleness_of  # noqa: E402
from selenium.webdriver.support.wait import WebDriverWait  # noqa: E402

KEY = b"c" * 64
SHOTS = Path(__file__).parents[2] / "docs" / "img"
HOSTILE = (
    "From: Prize Team <win@bad.example>\r\nTo: bob@dest.test, alice@dest.test\r\nSubject: You won!\r\n"
    "Message-ID: <hostile@bad.example>\r\nMIME-Version: 1.0\r\n"
    "Content-Type: multipart/mixed; boundary=b\r\n\r\n"
    "--b\r\nContent-Type: text/plain\r\n\r\nClaim your prize today.\r\n"
    "--b\r\nContent-Type: text/html\r\n\r\n"
    "<html><head><link rel=stylesheet href=\"http://127.0.0.1:{trap}/style.css\"></head><body>"
    "<h1 id=\"won\">You won!</h1><script>fetch('http://127.0.0.1:{trap}/script');console.log('pwned')</script>"
    "<img src=\"http://127.0.0.1:{trap}/pixel.gif\" onerror=\"console.log('pwned')\">"
    "<div style=\"background:url(http://127.0.0.1:{trap}/css)\">Act now</div>"
    "<svg onload=\"fetch('http://127.0.0.1:{trap}/svg')\"></svg>"
    "<iframe src=\"http://127.0.0.1:{trap}/frame\"></iframe>"
    "<a href=\"http://127.0.0.1:{trap}/click\">claim</a></body></html>\r\n"
    "--b\r\nContent-Type: application/x-msdownload; name=\"invoice.exe\"\r\n"
    "Content-Disposition: attachment; filename=\"invoice.exe\"\r\nContent-Transfer-Encoding: base64\r\n\r\n"
    "TVqQAAMAAAAEAAAA\r\n--b--\r\n"
)


def plain(subject: str, to: str) -> bytes:
    return (f"From: s@bad.example\r\nTo: {to}\r\nSubject: {subject}\r\n\r\nHeld text.\r\n").encode()


class Trap(http.server.BaseHTTPRequestHandler):
    """Records every request: none may come from a preview. /attack is a cross-site form."""

    seen: ClassVar[list[str]] = []
    target = ""

    def do_GET(self) -> None:
        Trap.seen.append(self.path)
        body = (f"<form method=post action=\"{Trap.target}\"><button id=go>win</button></form>"
                if self.path == "/attack" else "").encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@dataclass
class Console:
    base: str
    root: Path
    postfix: PostfixInstance
    driver: Any
    trap: int
    log: Path

    def sign_in(self, name: str, password: str) -> None:
        self.driver.delete_all_cookies()
        self.driver.get(f"{self.base}/console/login")
        self.driver.find_element(By.NAME, "name").send_keys(name)
        self.driver.find_element(By.NAME, "password").send_keys(password)
        self.click(By.CSS_SELECTOR, "button[type=submit]")

    def click(self, by: str, what: str) -> None:
        """Click what submits a form, and wait for the next page."""
        self.navigate(lambda: self.driver.find_element(by, what).click())

    def navigate(self, action: Any) -> None:
        old = self.driver.find_element(By.TAG_NAME, "html")
        action()

        def replaced(driver: Any) -> bool:
            try:
                return bool(staleness_of(old)(driver))
            except WebDriverException:  # "Node ... does not belong to the document": replaced too
                return True

        WebDriverWait(self.driver, 30).until(replaced)

    def title(self) -> str:
        return str(self.driver.find_element(By.TAG_NAME, "h1").text)

    def held(self, qid: str) -> dict[str, str]:
        async def get() -> dict[str, str]:
            store = open_store(sqlite=self.root / "store.db")
            try:
                found = await store.get(qid)
                return dict(found.recipients) if found else {}
            finally:
                await store.close()

        return asyncio.run(get())

    def audit_text(self) -> str:
        async def get() -> str:
            store = open_store(sqlite=self.root / "store.db")
            try:
                return "\n".join(f"{a.actor} {a.action} {a.qid} {' '.join(a.recipients)}"
                                 for a in await store.audit_log())
            finally:
                await store.close()

        return asyncio.run(get())

    def shot(self, name: str) -> None:
        if os.environ.get("SMTPPROXY_SCREENSHOTS"):
            self.driver.save_screenshot(str(SHOTS / f"{name}.png"))


async def _fill(root: Path, trap: int) -> None:
    store = open_store(sqlite=root / "store.db")
    now = time.time()

    async def hold(qid: str, content: bytes, recipients: list[str], *, by: str = "score",
                   subject: str = "", admin_only: bool = False) -> None:
        record = {"id": qid, "sender": "win@bad.example", "recipients": recipients, "node": "mx1",
                  "client": {"ip": "192.0.2.7", "port": 4000, "hostname": None, "helo": "bad.example"},
                  "session": "S1", "sender_params": {}, "reason": "spam", "decided_by": by}
        await store.hold(Held(id=qid, node="mx1", time=now, expires=now + 86400, sender="win@bad.example",
                              size=len(content), record=record, recipients=dict.fromkeys(recipients, "held"),
                              subject=subject, reason="score 9.5: PRIZE" if by == "score" else "Eicar-Test",
                              decided_by=by, score=9.5, admin_only=admin_only), [content])

    await hold("q-hostile", HOSTILE.replace("{trap}", str(trap)).encode(), ["bob@dest.test", "alice@dest.test"],
               subject="You won!")
    await hold("q-alice", plain("Cheap pills", "alice@dest.test"), ["alice@dest.test"], subject="Cheap pills")
    await hold("q-bob", plain("Bob's private", "bob@dest.test"), ["bob@dest.test"], subject="Bob's private")
    await hold("q-virus", plain("invoice", "alice@dest.test"), ["alice@dest.test"], by="clamav",
               subject="invoice", admin_only=True)
    await hold("q-link", plain("by link", "carol@dest.test"), ["carol@dest.test"], subject="by link")
    await hold("q-forged", plain("keep me", "bob@dest.test"), ["bob@dest.test"], subject="keep me")
    newsletter = (b"From: Partner News <news@partner.example>\r\nTo: dave@dest.test\r\n"
                  b"Subject: Partner newsletter\r\n\r\nThis month at Partner.\r\n")
    await hold("q-allow", newsletter, ["dave@dest.test"], subject="Partner newsletter")
    for qid, subject in (("q-bulk1", "bulk one"), ("q-bulk2", "bulk two")):
        await hold(qid, plain(subject, "dave@dest.test"), ["dave@dest.test"], subject=subject)
    await hold("q-bulkvirus", plain("bulk virus", "dave@dest.test"), ["dave@dest.test"], by="clamav",
               subject="bulk virus", admin_only=True)
    entries = []
    # What the proxy records (Decision.disposition, its reply and reason), as a screenshot shows it.
    for i, (decision, sender, by, reply, reason) in enumerate([
        ("quarantined", "win@bad.example", "score", "250 2.0.0", "score 12.5 >= 10 (quarantine)"),
        ("delivered", "news@good.example", None, "250 2.0.0", ""),
        ("rejected", "spam@bad.example", "dnsbl", "554 5.7.1", "listed in zen.example (127.0.0.2)"),
        ("delivered", "news@good.example", None, "250 2.0.0", ""),
        ("quarantined", "virus@bad.example", "clamav", "250 2.0.0", "Eicar-Test-Signature"),
    ]):
        recipient = "bob@dest.test" if i % 2 else "alice@dest.test"
        entries.append(HistoryEntry(id=f"h{i}", time=now - 3600 * i * 10, node="mx1", sender=sender,
                                    recipients=[recipient], decision=decision, decided_by=by,
                                    subject=f"message {i}", client="192.0.2.7", helo="bad.example",
                                    reason=reason or None, message_id=f"<m{i}@x>", size=1000 + i,
                                    session=f"S{i}", reply=reply, score=12.5 if by == "score" else None,
                                    policy_group="default", groups={recipient: "default"}))
    await store.add_history(entries)
    await store.close()


def _chromium(profile: str) -> Any:
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--window-size=1000,900"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    return webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))


@pytest.fixture(scope="module")
def console() -> Iterator[Console]:
    require_postfix()
    root = Path(tempfile.mkdtemp(prefix="console-"))
    postfix = PostfixInstance(root=_make_root(), port=free_port(), users=("bob", "alice", "carol", "dave"))
    postfix.start()
    trap_server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Trap)
    threading.Thread(target=trap_server.serve_forever, daemon=True).start()
    trap = trap_server.server_address[1]
    port = free_port()
    (root / "link.key").write_bytes(KEY)
    hashed = bcrypt.hashpw(b"admin-pw", bcrypt.gensalt(4)).decode()
    (root / "accounts").write_text(
        f"root:{hashed}:admin\nalice@dest.test:{hashed}:recipient\ndave@dest.test:{hashed}:recipient\n")
    (root / "cfg.yaml").write_text(
        f"delivery:\n  type: smtp\n  host: 127.0.0.1\n  port: {postfix.port}\n  tls: none\n"
        "quarantine:\n  admin_only: [clamav]\nstore:\n  sqlite: store.db\n  node: mx1\n"
        f"digest:\n  domains: [dest.test]\n  base_url: http://127.0.0.1:{port}\n  keys: [link.key]\n"
        f"  port: {port}\nconsole:\n  users: accounts\n"
        "login_throttle:\n  initial_delay: 0.01\n  max_delay: 0.1\n  lockout_after: 10\n  lockout_seconds: 2.0\n"
        "tables:\n  allow: {type: file, file: allow}\nplugins:\n  - {name: lists, settings: {allow: allow}}\n")
    (root / "allow").write_text("# allow lists, written by the console\n")
    asyncio.run(_fill(root, trap))
    log = root / "web.log"
    Trap.target = f"http://127.0.0.1:{port}/console/quarantine/q-forged/delete"
    try:
        with web_process(root / "cfg.yaml", port, log) as base:
            driver = _chromium(str(root / "profile"))
            try:
                yield Console(base, root, postfix, driver, trap, log)
            finally:
                driver.quit()
    finally:
        trap_server.shutdown()
        postfix.stop()
        shutil.rmtree(postfix.root, ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)


def test_admin_searches_previews_hostile_html_and_releases_one_recipient(console: Console) -> None:
    driver = console.driver
    console.sign_in("root", "admin-pw")
    assert console.title() == "Overview"
    assert "news@good.example" in driver.page_source  # the top senders, from the history
    console.shot("console-overview")
    driver.get(f"{console.base}/console/history")
    driver.find_element(By.NAME, "sender").send_keys("spam@bad.example")
    console.click(By.CSS_SELECTOR, "form.search button")
    assert "/console/history?" in driver.current_url
    rows = driver.find_elements(By.CSS_SELECTOR, "tbody tr")
    assert len(rows) == 1 and "dnsbl" in rows[0].text and "<m2@x>" in rows[0].text
    console.shot("console-history")

    driver.get_log("performance")  # start the network record here
    Trap.seen.clear()
    driver.get(f"{console.base}/console/quarantine/q-hostile")
    assert console.title() == "You won!"
    assert "invoice.exe — application/x-msdownload" in driver.find_element(By.CSS_SELECTOR, "ul.attachments").text
    assert "Claim your prize today." in driver.find_element(By.CSS_SELECTOR, "pre.text").text
    frame = driver.find_element(By.CSS_SELECTOR, "iframe.html")
    assert frame.get_attribute("sandbox") == ""
    driver.execute_script("arguments[0].scrollIntoView()", driver.find_element(By.CSS_SELECTOR, "pre.text"))
    console.shot("console-preview")
    driver.switch_to.frame(frame)
    assert driver.find_element(By.TAG_NAME, "h1").text == "You won!"  # the sanitised HTML is shown
    assert driver.find_elements(By.CSS_SELECTOR, "script, img, iframe, link, svg") == []
    driver.switch_to.default_content()
    time.sleep(0.5)  # let anything that would load have a go; the assertions below are about what did
    requests = [json.loads(e["message"])["message"] for e in driver.get_log("performance")]
    urls = {m["params"]["request"]["url"] for m in requests if m["method"] == "Network.requestWillBeSent"}
    assert urls and all(u.startswith(console.base) or u.startswith("about:") for u in urls), urls
    assert Trap.seen == []
    assert not [e for e in driver.get_log("browser") if "pwned" in e["message"]]

    alice = driver.find_element(By.CSS_SELECTOR, "input[name=recipient][value='alice@dest.test']")
    alice.click()  # untick: release bob's copy only
    console.click(By.XPATH, "//button[text()='Release']")
    assert console.title() == "Done"
    assert "q-hostile: released for bob@dest.test" in driver.page_source
    [delivered] = console.postfix.wait_for_messages("bob", 1)
    assert b"Subject: You won!" in delivered and b"<hostile@bad.example>" in delivered
    assert console.held("q-hostile") == {"alice@dest.test": "held", "bob@dest.test": "released"}

    driver.get(f"{console.base}/console/audit?qid=q-hostile")
    audit = driver.find_element(By.TAG_NAME, "tbody").text
    assert "admin:root release q-hostile bob@dest.test" in audit
    assert "admin:root preview q-hostile" in audit  # an admin opening someone's mail is recorded
    console.shot("console-audit")


def test_a_recipient_signs_in_by_digest_link_and_sees_only_their_own_mail(console: Console) -> None:
    driver = console.driver
    driver.delete_all_cookies()
    token = LinkSigner([KEY]).sign(Link("alice@dest.test", "q-alice", "release", time.time() + 600))
    driver.get(f"{console.base}/link/{token}")
    console.click(By.XPATH, "//button[text()='Open my quarantine']")
    assert console.title() == "Quarantine"
    listed = driver.find_element(By.TAG_NAME, "tbody").text
    assert "Cheap pills" in listed and "invoice" in listed and "You won!" in listed
    assert "Bob's private" not in listed and "keep me" not in listed
    assert "bob@dest.test" not in listed  # not even the other recipient of a shared message
    console.shot("console-recipient")
    assert "Audit log" not in driver.page_source
    for other in ("q-bob", "q-forged", "no-such-id"):  # another recipient's id, or none: the same 404
        driver.get(f"{console.base}/console/quarantine/{other}")
        assert console.title() == "Not found"
    driver.get(f"{console.base}/console/audit")
    assert console.title() == "Not found"

    driver.get(f"{console.base}/console/quarantine/q-virus")
    assert "only an administrator can release it" in driver.page_source
    assert driver.find_elements(By.XPATH, "//button[text()='Release']") == []
    # The button is not there; a hand-made POST with the session's own CSRF token is refused too.
    console.navigate(lambda: driver.execute_script(
        "const f = document.querySelector('form[action$=\"/delete\"]');"
        "f.action = '/console/quarantine/q-virus/release'; f.submit();"))
    assert console.title() == "Not allowed"
    assert console.held("q-virus") == {"alice@dest.test": "held"}
    assert console.postfix.messages("alice") == []


def test_a_recipient_releases_and_allows_the_sender(console: Console) -> None:
    """"Release and allow sender": the copy arrives at Postfix, and the From: address is on the
    recipient's allow list in the lists plugin's file table (what the proxy reads at reload)."""
    driver = console.driver
    console.sign_in("dave@dest.test", "admin-pw")
    driver.get(f"{console.base}/console/quarantine/q-allow")
    assert console.title() == "Partner newsletter"
    assert driver.find_elements(By.NAME, "scope") == []  # a recipient allows for herself only
    assert driver.find_elements(By.XPATH, "//button[text()='Not spam: release']")
    console.shot("console-allow")
    console.click(By.XPATH, "//button[text()='Release and allow sender']")
    assert console.title() == "Done", driver.page_source
    done = driver.find_element(By.TAG_NAME, "main").text
    assert "q-allow: released for dave@dest.test" in done
    assert "news@partner.example is now on the allow list of dave@dest.test." in done
    [delivered] = console.postfix.wait_for_messages("dave", 1)
    assert b"Subject: Partner newsletter" in delivered
    assert console.held("q-allow") == {"dave@dest.test": "released"}
    allow = (console.root / "allow").read_text()
    assert allow == "# allow lists, written by the console\ndave@dest.test  news@partner.example\n"
    audit = console.audit_text()
    assert "recipient:dave@dest.test release q-allow dave@dest.test" in audit
    assert "recipient:dave@dest.test allow_sender q-allow dave@dest.test" in audit


def test_a_release_link_works_in_a_real_browser(console: Console) -> None:
    """The release link's own POST passes its Origin check (this site's pages send their Origin)."""
    driver = console.driver
    driver.delete_all_cookies()
    token = LinkSigner([KEY]).sign(Link("carol@dest.test", "q-link", "release", time.time() + 600))
    driver.get(f"{console.base}/link/{token}")
    console.click(By.XPATH, "//button[text()='Release']")
    assert console.title() == "Done"
    [delivered] = console.postfix.wait_for_messages("carol", 1)
    assert b"Subject: by link" in delivered
    assert "link:carol@dest.test release q-link" in console.audit_text()


def test_a_forged_cross_site_post_is_refused_and_the_cookie_is_locked_down(console: Console) -> None:
    driver = console.driver
    console.sign_in("root", "admin-pw")
    [cookie] = driver.get_cookies()
    assert cookie["name"] == "smtpproxy_console"
    assert cookie["httpOnly"] is True and cookie["secure"] is True and cookie["sameSite"] == "Strict"
    assert driver.execute_script("return document.cookie") == ""  # scripts cannot read it
    # A page on another site (localhost is not 127.0.0.1) posts to the console.
    driver.get(f"http://localhost:{console.trap}/attack")
    console.click(By.ID, "go")
    assert console.title() == "Refused"
    assert console.held("q-forged") == {"bob@dest.test": "held"}
    # Without the CSRF token, even from a signed-in session on this site, nothing happens.
    driver.get(f"{console.base}/console/quarantine/q-forged")
    console.navigate(lambda: driver.execute_script(
        "document.querySelector('input[name=csrf]').remove();"
        "document.querySelector('form[action$=\"/release\"] input[name=csrf]')?.remove();"
        "document.querySelector('form[action$=\"/release\"]').submit();"))
    assert console.title() == "Refused"
    assert console.held("q-forged") == {"bob@dest.test": "held"}


def test_ten_wrong_passwords_slow_the_login_down(console: Console) -> None:
    for attempt in range(10):
        console.sign_in("root", f"guess-{attempt}")
        assert console.title() == "Sign in" and "Name or password is wrong." in console.driver.page_source
    console.sign_in("root", "admin-pw")  # the right password, too late: the address is locked out
    assert "Too many failed sign-ins" in console.driver.page_source
    log = console.log.read_text()
    assert "event=auth_delayed" in log and "mechanism=console" in log
    assert "event=auth_locked" in log
    deadline = time.monotonic() + 30
    while "Too many failed sign-ins" in console.driver.page_source:  # the lockout ends (2 s here)
        assert time.monotonic() < deadline
        time.sleep(0.2)
        console.sign_in("root", "admin-pw")
    assert console.title() == "Overview"


def test_a_recipient_releases_and_deletes_ticked_messages_from_the_list(console: Console) -> None:
    """The quarantine list's bulk form: each ticked message for the viewer's own copy, a virus
    hold refused in its line while the others are done."""
    driver = console.driver
    before = len(console.postfix.messages("dave"))
    console.sign_in("dave@dest.test", "admin-pw")
    driver.get(f"{console.base}/console/quarantine")
    for qid in ("q-bulk1", "q-bulkvirus"):
        driver.find_element(By.CSS_SELECTOR, f"input[name=qid][value='{qid}']").click()
    console.click(By.XPATH, "//button[text()='Release selected']")
    assert console.title() == "Done"
    lines = [li.text for li in driver.find_elements(By.CSS_SELECTOR, "main li")]
    assert lines == ["q-bulk1: released for dave@dest.test",
                     "q-bulkvirus: held by clamav; only an administrator can release it"]
    delivered = console.postfix.wait_for_messages("dave", before + 1)
    assert any(b"Subject: bulk one" in m for m in delivered)
    driver.get(f"{console.base}/console/quarantine")
    listed = driver.find_element(By.TAG_NAME, "tbody").text
    assert "bulk one" not in listed and "bulk two" in listed and "bulk virus" in listed
    driver.find_element(By.CSS_SELECTOR, "input[name=qid][value='q-bulk2']").click()
    console.click(By.XPATH, "//button[text()='Delete selected']")
    assert [li.text for li in driver.find_elements(By.CSS_SELECTOR, "main li")] == [
        "q-bulk2: deleted for dave@dest.test"]
    assert console.held("q-bulk2") == {"dave@dest.test": "deleted"}
    assert console.held("q-bulkvirus") == {"dave@dest.test": "held"}
    assert len(console.postfix.messages("dave")) == before + 1  # nothing else was delivered


def _other_browser_signs_in(base: str, name: str) -> str:
    """Sign *name* in from another client; its session cookie (sent by hand below: the
    cookie is Secure, which httpx keeps to HTTPS)."""
    reply = httpx.post(f"{base}/console/login", data={"name": name, "password": "admin-pw"})
    assert reply.status_code == 303, reply.text
    return str(reply.cookies["smtpproxy_console"])


def _opens(base: str, cookie: str) -> bool:
    reply = httpx.get(f"{base}/console/quarantine", headers={"Cookie": f"smtpproxy_console={cookie}"})
    return reply.status_code == 200


def test_an_admin_ends_a_session_and_a_signed_out_cookie_opens_nothing(console: Console) -> None:
    driver = console.driver
    alice = _other_browser_signs_in(console.base, "alice@dest.test")
    assert _opens(console.base, alice)
    console.sign_in("root", "admin-pw")
    console.click(By.LINK_TEXT, "Sessions")
    assert console.title() == "Sessions"
    rows = driver.find_elements(By.CSS_SELECTOR, "tbody tr")
    assert rows[0].text.startswith("root (this session) admin password 127.0.0.1")
    alices = [r for r in rows if r.text.startswith("alice@dest.test")]  # earlier tests' too
    row = alices[0]  # the most recently seen: the one just used
    assert "recipient password 127.0.0.1" in row.text
    console.shot("console-sessions")
    console.navigate(lambda: row.find_element(By.TAG_NAME, "button").click())
    assert "Ended 1 session of alice@dest.test." in driver.page_source
    left = [r for r in driver.find_elements(By.CSS_SELECTOR, "tbody tr") if r.text.startswith("alice")]
    assert len(left) == len(alices) - 1
    assert not _opens(console.base, alice)
    assert "admin:root end_session None" in console.audit_text()
    # Signing out ends the browser's session on the server: a copy of its cookie opens nothing.
    [cookie] = driver.get_cookies()
    assert _opens(console.base, cookie["value"])
    console.click(By.XPATH, "//button[text()='Sign out']")
    assert console.title() == "Sign in"
    assert not _opens(console.base, cookie["value"])
