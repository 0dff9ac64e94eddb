"""The console's session table (smtpproxy/web/sessions.py) without a server, on a clock the
test moves: a session's lifetime, its idle time, and the bound on sessions per name."""

from __future__ import annotations

from smtpproxy.web.accounts import Viewer
from smtpproxy.web.sessions import PER_NAME, SessionTable


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def test_a_session_ends_at_its_lifetime_however_busy() -> None:
    clock = Clock()
    table = SessionTable(lifetime=3600, clock=clock)
    live = table.start(Viewer("root", "admin"), "password", "127.0.0.1")
    for _ in range(5):
        clock.now += 700
        assert table.find(live.id) is live and live.seen == clock.now
    clock.now = live.started + 3600
    assert table.find(live.id) is None and table.live() == []
    assert table.find(None) is None and table.find(["x"]) is None


def test_a_session_left_alone_for_its_idle_time_ends() -> None:
    clock = Clock()
    table = SessionTable(lifetime=8 * 3600, idle=3600, clock=clock)
    kept = table.start(Viewer("root", "admin"), "password", "127.0.0.1")
    left = table.start(Viewer("bob@a.test", "recipient"), "link", "192.0.2.1")
    clock.now += 3599
    assert table.find(kept.id) is kept
    clock.now += 1
    assert table.live() == [kept]  # the idle one is dropped, the one used a second ago is not
    assert table.find(left.id) is None


def test_a_name_keeps_its_most_recently_used_sessions_and_no_more() -> None:
    clock = Clock()
    table = SessionTable(lifetime=3600, clock=clock)
    other = table.start(Viewer("root", "admin"), "password", "127.0.0.1")
    bob = Viewer("bob@a.test", "recipient")
    started = []
    for _ in range(PER_NAME):
        clock.now += 1
        started.append(table.start(bob, "link", "192.0.2.1"))
    clock.now += 1
    assert table.find(started[0].id) is started[0]  # used: now the most recent of bob's
    newest = table.start(bob, "link", "192.0.2.1")
    mine = [s for s in table.live() if s.viewer == bob]
    assert len(mine) == PER_NAME and newest in mine and started[0] in mine and started[1] not in mine
    assert table.find(other.id) is other  # another name's session is not touched
    assert len({s.handle for s in table.live()} | {s.id for s in table.live()}) == 2 * (PER_NAME + 1)


def test_a_password_sessions_account_is_due_for_a_lookup_every_recheck_seconds() -> None:
    clock = Clock()
    table = SessionTable(lifetime=8 * 3600, recheck=300, clock=clock)
    typed = table.start(Viewer("ann@example.test", "admin"), "password", "127.0.0.1", login="ann", stamp="s")
    link = table.start(Viewer("bob@a.test", "recipient"), "link", "192.0.2.1")
    assert typed.login == "ann" and typed.checked == clock.now  # the sign-in was its lookup
    clock.now += 299
    assert not table.due(typed)
    clock.now += 1
    assert table.due(typed) and not table.due(typed)  # marked: the next one is 300 s on
    clock.now += 3000
    assert not table.due(link)  # a digest link's session has no account to look up


def test_ending_counts_only_live_sessions() -> None:
    """The Sessions page says "Ended 1 session" only for one that was still live."""
    clock = Clock()
    table = SessionTable(lifetime=3600, idle=600, clock=clock)
    old = table.start(Viewer("bob@a.test", "recipient"), "link", "192.0.2.1")
    clock.now += 500
    fresh = table.start(Viewer("bob@a.test", "recipient"), "link", "192.0.2.2")
    clock.now += 200  # old has been idle 700 s: past its idle time
    assert table.end_handle(old.handle) is None
    assert table.end_all("bob@a.test") == [fresh]
    assert table.end_handle(fresh.handle) is None and table.live() == []
