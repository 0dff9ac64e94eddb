"""Big messages: spooled to disk while received, parsed in place, streamed out without copies."""

from __future__ import annotations

import itertools
import mmap
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from smtpproxy import Verdict, hookimpl
from smtpproxy.datareader import DataReader
from smtpproxy.delivery.stream import dot_stuffed
from smtpproxy.message import Message
from smtpproxy.spool import Spool
from tests.conftest import ProxyFactory, Talk, maildir_messages, port_of, start_sink

# -- the spool ------------------------------------------------------------------------


def test_small_content_stays_in_memory_as_bytes() -> None:
    spool = Spool(threshold=100)
    spool.write(b"a" * 60)
    spool.write(b"b" * 40)
    assert not spool.on_disk
    content = spool.finish()
    assert isinstance(content, bytes)
    assert content == b"a" * 60 + b"b" * 40


def test_big_content_goes_to_an_unlinked_file_and_comes_back_mapped(tmp_path: Path) -> None:
    spool = Spool(threshold=100, directory=str(tmp_path))
    for i in range(50):
        spool.write(b"line %03d\r\n" % i)
    assert spool.on_disk
    assert list(tmp_path.iterdir()) == []  # unlinked: nothing to clean up after a crash
    content = spool.finish()
    assert isinstance(content, mmap.mmap)
    assert content[:] == b"".join(b"line %03d\r\n" % i for i in range(50))
    assert spool.size == 500


def test_discard_forgets_everything() -> None:
    spool = Spool(threshold=10)
    spool.write(b"x" * 50)
    spool.discard()
    assert not spool.on_disk
    assert spool.finish() == b""


def test_reader_spools_above_the_threshold() -> None:
    reader = DataReader(10**7, 1000, spool_threshold=64)
    for i in range(20):
        reader.feed(b"..dot line %d\r\n" % i)
    assert reader.feed(b".\r\n")
    content = reader.content()
    assert isinstance(content, mmap.mmap)
    assert content[:].startswith(b".dot line 0\r\n")


# -- the message over a mapping --------------------------------------------------------


def mapped(data: bytes, tmp_path: Path) -> mmap.mmap:
    path = tmp_path / "spool"
    path.write_bytes(data)
    with open(path, "rb") as fh:
        return mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)


def test_message_parses_a_mapping_in_place_and_edits_stream_as_parts(tmp_path: Path) -> None:
    raw = b"Subject: big\r\nFrom: a@example.org\r\n\r\n" + b"body line\r\n" * 1000
    message = Message(mapped(raw, tmp_path))
    assert message.get("Subject") == "big"
    assert message.size == len(raw)
    assert b"".join(message.parts()) == raw  # unmodified: the mapping itself
    message.add_header("X-Scanned", "yes")
    parts = message.parts()
    assert b"".join(parts) == message.raw == b"X-Scanned: yes\r\n" + raw
    assert isinstance(parts[-1], memoryview)  # the body is a view of the mapping, not a copy


def test_a_mapping_with_a_bare_lf_is_refused(tmp_path: Path) -> None:
    try:
        Message(mapped(b"Subject: x\r\n\r\nbare\nlf\r\n", tmp_path))
    except ValueError as exc:
        assert "bare CR or LF" in str(exc)
    else:
        raise AssertionError("a bare LF was accepted")


# -- dot-stuffing block by block ---------------------------------------------------------

lines = st.lists(
    st.builds(lambda dots, text: b"." * dots + text, st.integers(0, 3),
              st.binary(max_size=40).map(
                  lambda b: b.replace(b"\r", b"").replace(b"\n", b"").replace(b"\x00", b""))),
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(lines=lines, final_crlf=st.booleans(), cuts=st.lists(st.integers(0, 2000), max_size=4),
       block=st.integers(1, 64))
def test_dot_stuffing_round_trips_through_the_data_reader(
    lines: list[bytes], final_crlf: bool, cuts: list[int], block: int
) -> None:
    message = b"\r\n".join(lines) + (b"\r\n" if final_crlf and lines else b"")
    edges = sorted({0, len(message), *(c % (len(message) + 1) for c in cuts)})
    parts = [message[a:b] for a, b in itertools.pairwise(edges)]
    blocks = list(dot_stuffed(parts, block))
    # One write per block: only the last may be short, however the message was cut in parts.
    assert all(len(b) >= block for b in blocks[:-1])
    wire = b"".join(blocks)
    assert wire.endswith(b".\r\n")
    reader = DataReader(10**7, 10**6)
    chunks = wire.split(b"\r\n")[:-1]
    ended = [reader.feed(chunk + b"\r\n") for chunk in chunks]
    assert ended[-1] and not any(ended[:-1]), "the terminator must be the only end of data"
    expected = message if not message or message.endswith(b"\r\n") else message + b"\r\n"
    assert reader.content() == expected


def test_a_small_message_in_parts_goes_out_in_one_write() -> None:
    """A plugin's header edit makes three parts (head, separator, body): still one block,
    one system call, one segment for the upstream to wake up for."""
    head, body = b"Authentication-Results: x; none\r\nSubject: hi\r\n", b".dot\r\nbody\r\n"
    assert list(dot_stuffed([head, b"\r\n", body])) == [head + b"\r\n..dot\r\nbody\r\n.\r\n"]


# -- end to end ------------------------------------------------------------------------------


class Stamp:
    @hookimpl
    def data(self, message: Message) -> Verdict | None:
        message.add_header("X-Stamp", "seen")
        return None


def big_message(lines: int) -> tuple[bytes, bytes]:
    """(what the client sends, what the upstream must receive) for a dot-heavy message."""
    body = b"".join(b".line %06d with a leading dot\r\n" % i for i in range(lines))
    original = b"Subject: big\r\n\r\n" + body
    return original.replace(b"\r\n.", b"\r\n.."), original


async def test_a_spooled_message_reaches_the_upstream_byte_exact(proxy_factory: ProxyFactory) -> None:
    sink = await start_sink()
    proxy = await proxy_factory(Stamp(), upstream=sink.port, limits={"spool_threshold": 4096})
    wire, original = big_message(20000)  # about 700 KB, far above the threshold
    client = await Talk.open(port_of(proxy))
    await client.hello()
    code, text = await client.send_message("a@example.org", ["b@dest.test"], wire)
    assert code == 250, text
    assert sink.messages[0].content == b"X-Stamp: seen\r\n" + original
    await client.close()
    sink.server.close()


async def test_a_spooled_message_lands_in_the_maildir_byte_exact(proxy_factory: ProxyFactory, tmp_path: Path) -> None:
    proxy = await proxy_factory(limits={"spool_threshold": 0}, relay={"domains": ["dest.test"]})
    wire, original = big_message(3000)
    client = await Talk.open(port_of(proxy))
    await client.hello()
    code, text = await client.send_message("a@example.org", ["b@dest.test"], wire)
    assert code == 250, text
    [stored] = maildir_messages(tmp_path / "mail")
    assert stored.endswith(b"\r\n" + original)
    await client.close()
