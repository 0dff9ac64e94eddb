"""The milter's header diff (smtpproxy/milter/edits.py): the shortcut for fields that plugins
only added gives what the sequence diff gives, and header_edits turns every diff into
actions that rebuild the final list on a model of the MTA's."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from smtpproxy.milter import codec
from smtpproxy.milter.edits import _compared, _only_added, header_edits

FIELDS = st.sampled_from([b"From: a\r\n", b"To: b\r\n", b"Subject: s\r\n", b"Received: x\r\n",
                          b"Received: y\r\n", b"X-A: 1\r\n", b"X-A: 2\r\n"])


@given(st.lists(FIELDS, max_size=6), st.lists(FIELDS, max_size=3), st.lists(FIELDS, max_size=3))
def test_added_fields_diff_as_the_sequence_diff_does(original: list[bytes], top: list[bytes],
                                                     bottom: list[bytes]) -> None:
    final = top + original + bottom
    shortcut = _only_added(original, final)
    if set(top + bottom).isdisjoint(original):
        assert shortcut is not None
    if shortcut is not None:
        assert shortcut == _compared(original, final)


@given(st.lists(FIELDS, max_size=6), st.lists(FIELDS, max_size=6))
def test_no_shortcut_unless_only_added(original: list[bytes], final: list[bytes]) -> None:
    shortcut = _only_added(original, final)
    if shortcut is not None:
        assert shortcut == _compared(original, final)


def test_a_field_added_on_top_is_inserted_below_the_hidden_one() -> None:
    original = [b"From: a\r\n", b"To: b\r\n"]
    final = [b"Authentication-Results: mx; spf=pass\r\n", *original]
    assert header_edits(original, final, leading_space=True, hidden_top=True) == [
        codec.InsertHeader(0, "Authentication-Results", " mx; spf=pass")]
    assert header_edits(original, final, leading_space=True, hidden_top=False) == [
        codec.InsertHeader(0, "Authentication-Results", " mx; spf=pass")]
