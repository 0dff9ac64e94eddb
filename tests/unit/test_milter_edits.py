"""The milter's header diff (smtpproxy/milter/edits.py): the shortcut for fields that plugins
only added gives what the sequence diff gives, and header_edits turns every diff into
actions that rebuild the final list on a model of the MTA's."""

from __future__ import annotations

from hypothesis import given, settings
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


_HIDDEN = b"Received: (the MTA's own, never sent to the milter)\r\n"


def _applied(original: list[bytes], actions: list[codec.Response], hidden_top: bool) -> list[bytes]:
    """The MTA's header list after the actions (Postfix's rules as edits.py models them: a
    change or delete counts the n-th field of its name among those it sent; an insert's
    position counts the hidden field above them; an add appends), without the hidden field."""
    fields = ([_HIDDEN] if hidden_top else []) + list(original)

    def nth(name: str, index: int) -> int:
        seen = 0
        for position, raw in enumerate(fields):
            if raw is not _HIDDEN and raw.split(b":", 1)[0].decode().lower() == name.lower():
                seen += 1
                if seen == index:
                    return position
        raise AssertionError(f"no field {name} #{index}")

    for action in actions:
        if isinstance(action, codec.ChangeHeader):
            position = nth(action.name, action.index)
            if action.value:
                fields[position] = f"{action.name}:{action.value}\r\n".encode()
            else:
                del fields[position]
        elif isinstance(action, codec.InsertHeader):
            fields.insert(action.index, f"{action.name}:{action.value}\r\n".encode())
        else:
            assert isinstance(action, codec.AddHeader)
            fields.append(f"{action.name}:{action.value}\r\n".encode())
    return [raw for raw in fields if raw is not _HIDDEN]


@settings(max_examples=500)
@given(st.lists(FIELDS, max_size=6), st.lists(FIELDS, max_size=3), st.lists(FIELDS, max_size=3),
       st.lists(FIELDS, max_size=6), st.integers(0, 6), st.sampled_from(["added", "inserted", "other"]),
       st.booleans())
def test_the_actions_rebuild_the_final_fields_on_the_mta(  # noqa: PLR0917 - hypothesis' arguments
        original: list[bytes], top: list[bytes], bottom: list[bytes], other: list[bytes], cut: int,
        shape: str, hidden_top: bool) -> None:
    """Applied to a model of the MTA's list (with its hidden field above the ones it sent), the
    actions give exactly the final fields: fields only added (the shortcut), fields inserted
    among the original ones, any other list."""
    if shape == "added":
        final = top + original + bottom
    elif shape == "inserted":
        final = original[:cut] + top + original[cut:]
    else:
        final = other
    actions = header_edits(original, final, leading_space=True, hidden_top=hidden_top)
    assert _applied(original, actions, hidden_top) == final
