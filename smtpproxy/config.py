"""Configuration: the YAML schema, loading, and error reporting with file/line/key.

Every problem with a configuration file is reported as a :class:`ConfigError` whose
string form is one line per problem::

    config/smtpproxy.yaml:14:5: limits.max_sessions: Input should be a valid integer (got 'lots')

Loading rules (see :func:`load_config`):

* YAML is parsed with a :class:`yaml.SafeLoader` subclass that records the position of
  every mapping key and sequence item and reports duplicate keys.
* Environment variables are interpolated in string *values* (not keys):
  ``${NAME}``, ``${NAME:-default}`` (default used when NAME is unset or empty) and
  ``$$`` for a literal ``$``.  A ``$`` followed by anything else is literal, but a ``${``
  that does not form a valid reference is an error.  An *unquoted* value is typed after
  interpolation exactly as if its text had been written in the file, so
  ``port: ${SMTP_PORT}`` yields an integer; a quoted value always stays a string.
* A key whose value is empty/``null`` means "use the default" (so a section whose
  entries are all commented out is fine).
* Relative paths are resolved against the configuration file's directory (or the
  current directory for the embedded default).
"""

import difflib
import ipaddress
import json
import os
import re
import types
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainValidator,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

__all__ = [
    "Config",
    "ConfigError",
    "ConfigSource",
    "Limits",
    "Listener",
    "ListenerAuth",
    "ListenerTLS",
    "Logging",
    "MaildirDelivery",
    "Metrics",
    "Milter",
    "PluginSpec",
    "Problem",
    "Quarantine",
    "Relay",
    "SmtpDelivery",
    "SmtpPolicy",
    "format_key",
    "load_config",
]

PathElement = str | int

MAX_WORKERS = 64
"""Most proxy processes ``workers`` may ask for (and what ``auto`` is capped at)."""


def cpu_count() -> int:
    """Cores this process may run on (its CPU affinity, not the machine's), 1..MAX_WORKERS."""
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        usable = os.cpu_count() or 1
    return max(1, min(usable, MAX_WORKERS))

# --------------------------------------------------------------------------- problems


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a configuration, located as precisely as possible."""

    file: str
    line: int | None
    column: int | None
    key: str
    message: str

    def __str__(self) -> str:
        where = self.file
        if self.line is not None:
            where += f":{self.line}"
            if self.column is not None:
                where += f":{self.column}"
        parts = [where, self.key, self.message] if self.key else [where, self.message]
        return ": ".join(parts)


class ConfigError(Exception):
    """Configuration that cannot be used; str() is one or more lines 'file:line:col: key.path: message'."""

    problems: list[Problem]

    def __init__(self, problems: Iterable[Problem]) -> None:
        self.problems = list(problems)
        super().__init__(str(self))

    def __str__(self) -> str:
        return "\n".join(str(problem) for problem in self.problems)

    def __reduce__(self) -> tuple[type["ConfigError"], tuple[list[Problem]]]:
        return (type(self), (self.problems,))


_PLAIN_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*\Z")


def format_key(path: Sequence[PathElement]) -> str:
    """Render a key path for humans: ``("listeners", 0, "port")`` -> ``"listeners[0].port"``.

    Keys that are not simple identifiers are quoted (``settings["a.b"]``).
    """
    out = ""
    for element in path:
        if isinstance(element, int) and not isinstance(element, bool):
            out += f"[{element}]"
        elif isinstance(element, str) and _PLAIN_KEY.match(element):
            out += f".{element}" if out else element
        elif isinstance(element, str):
            out += f"[{json.dumps(element, ensure_ascii=False)}]"
        else:
            out += f"[{element!r}]"
    return out


def _describe(value: object) -> str:
    """Short rendering of an offending input value for error messages."""
    if isinstance(value, str):
        text = repr(value)
        return text if len(text) <= 60 else text[:56] + "...'"
    if value is None or isinstance(value, bool | int | float):
        return repr(value)
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    return f"a {type(value).__name__}"


# --------------------------------------------------------------------------- source map


@dataclass
class _Entry:
    """Position of a mapping key / sequence item, plus the positions inside its value."""

    line: int
    column: int
    sub: "dict[Hashable, _Entry] | list[_Entry] | None" = None


def _child(sub: "dict[Hashable, _Entry] | list[_Entry] | None", element: object) -> _Entry | None:
    if isinstance(sub, dict):
        try:
            return sub.get(element)
        except TypeError:  # unhashable
            return None
    if (
        isinstance(sub, list)
        and isinstance(element, int)
        and not isinstance(element, bool)
        and 0 <= element < len(sub)
    ):
        return sub[element]
    return None


_DISCRIMINATOR = re.compile(r"'([^']+)'\Z")
_NO_INPUT_TYPES = frozenset(
    {"missing", "extra_forbidden", "union_tag_invalid", "union_tag_not_found", "invalid_key"}
)


class ConfigSource:
    """Where each value of a loaded YAML document came from, so any later validation
    (including a plugin's own settings) can point at a line."""

    file: str

    def __init__(self, file: str, root: _Entry) -> None:
        self.file = file
        self._root = root

    def __repr__(self) -> str:
        return f"ConfigSource({self.file!r})"

    def locate(self, path: Sequence[PathElement]) -> tuple[int, int] | None:
        """(line, column), 1-based, of the key or list item at *path*.

        Falls back to the nearest ancestor that exists in the document (ultimately the
        start of the document).
        """
        entry = self._root
        for element in path:
            child = _child(entry.sub, element)
            if child is None:
                break
            entry = child
        return entry.line, entry.column

    def problem(self, path: Sequence[PathElement], message: str) -> Problem:
        """A :class:`Problem` for *path*, located in this document."""
        where = self.locate(path)
        line, column = where if where is not None else (None, None)
        return Problem(self.file, line, column, format_key(path), message)

    def _clean(self, base: tuple[Any, ...], loc: tuple[Any, ...]) -> tuple[tuple[Any, ...], bool]:
        """Drop the elements pydantic adds to error locations that are not keys of the
        document (union member tags such as ``'smtp'`` or ``'int'``, ``'[key]'``).

        Returns the cleaned path and whether anything was dropped.
        """
        entry: _Entry | None = self._root
        for element in base:
            entry = _child(entry.sub, element) if entry is not None else None
        if entry is None:  # base is not in the document: nothing to check against
            return base + loc, False
        sub = entry.sub
        out = list(base)
        dropped = False
        for index, element in enumerate(loc):
            child = _child(sub, element)
            if child is not None:
                out.append(element)
                sub = child.sub
            elif isinstance(sub, dict) and index == len(loc) - 1:
                out.append(element)  # a missing key (or one added by loc_suffix)
            else:
                dropped = True  # a union tag or similar: not part of the document
        return tuple(out), dropped

    def problems_from_validation_error(
        self,
        error: ValidationError,
        base: Sequence[PathElement] = (),
        *,
        model: type[BaseModel] | None = None,
    ) -> list[Problem]:
        """Turn each error of *error* into a :class:`Problem` located at ``base + loc``.

        *base* is where the validated data sits in this document, e.g.
        ``("plugins", 3, "settings")`` for a plugin's settings.  *model* is the model that
        was validated; it is used to suggest a field name for unknown keys (when omitted
        it is looked up by the error's title).

        Custom errors (:class:`pydantic_core.PydanticCustomError`) may put these in their
        context: ``loc_suffix`` (a tuple appended to the error location, to point at a
        key below the validated object) and ``show_input=False`` (do not append
        "(got ...)" to the message).
        """
        root_model = model if model is not None else _model_named(error.title)
        base_t = tuple(base)
        problems: list[Problem] = []
        merged: dict[str, int] = {}
        for err in error.errors(include_url=False):
            loc = tuple(err["loc"])
            ctx: Mapping[str, Any] = err.get("ctx") or {}
            suffix = ctx.get("loc_suffix")
            if isinstance(suffix, tuple | list):
                loc += tuple(suffix)
            kind = err["type"]
            message = err["msg"]
            value = err.get("input")
            if kind == "extra_forbidden":
                message = "unknown key"
                guess = _suggest_field(root_model, loc)
                if guess is not None:
                    message += f" (did you mean {guess!r}?)"
            elif kind in ("union_tag_invalid", "union_tag_not_found"):
                match = _DISCRIMINATOR.match(str(ctx.get("discriminator", "")))
                tag_field = match.group(1) if match else None
                expected = ctx.get("expected_tags") or _expected_tags(root_model, loc, tag_field)
                if tag_field is not None:
                    loc += (tag_field,)
                if kind == "union_tag_invalid":
                    got = value.get(tag_field) if isinstance(value, Mapping) else value
                    message = f"must be one of {expected} (got {_describe(got)})"
                elif expected:
                    message = f"Field required; must be one of {expected}"
                else:
                    message = "Field required"
            elif kind == "value_error":
                message = message.removeprefix("Value error, ")
            elif kind in ("model_type", "model_attributes_type"):
                message = "Input should be a mapping of settings"
            if kind not in _NO_INPUT_TYPES and ctx.get("show_input", True):
                message += f" (got {_describe(value)})"
            path, dropped = self._clean(base_t, loc)
            problem = self.problem(path, message)
            if dropped and problem.key in merged:
                # several members of a union failed for the same value: one problem.
                index = merged[problem.key]
                previous = problems[index]
                if message not in previous.message.split("; or "):
                    problems[index] = Problem(
                        previous.file,
                        previous.line,
                        previous.column,
                        previous.key,
                        f"{previous.message}; or {message}",
                    )
                continue
            if problem in problems:
                continue
            if dropped:
                merged[problem.key] = len(problems)
            problems.append(problem)
        problems.sort(key=_problem_order)
        return problems


def _problem_order(problem: Problem) -> tuple[bool, int, int]:
    return (problem.line is None, problem.line or 0, problem.column or 0)


# -------------------------------------------------------------- type walking (suggestions)


def _model_named(name: str) -> type[BaseModel] | None:
    """The unique BaseModel subclass called *name*, if there is exactly one."""
    found: list[type[BaseModel]] = []
    seen: set[type[BaseModel]] = set()
    stack: list[type[BaseModel]] = [BaseModel]
    while stack:
        for sub in stack.pop().__subclasses__():
            if sub not in seen:
                seen.add(sub)
                stack.append(sub)
                if sub.__name__ == name:
                    found.append(sub)
    return found[0] if len(found) == 1 else None


def _unwrap(tp: Any) -> Any:
    while True:
        if get_origin(tp) is Annotated:
            tp = get_args(tp)[0]
            continue
        if get_origin(tp) in (Union, types.UnionType):
            members = [arg for arg in get_args(tp) if arg is not type(None)]
            if len(members) == 1:
                tp = members[0]
                continue
        return tp


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _literal_values(tp: Any) -> tuple[Any, ...]:
    tp = _unwrap(tp)
    return get_args(tp) if get_origin(tp) is Literal else ()


def _step(tp: Any, element: object) -> Any:
    """The type found at *element* inside a value of type *tp* (None if unknown)."""
    tp = _unwrap(tp)
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        for member in (_unwrap(arg) for arg in get_args(tp)):
            if getattr(member, "__name__", None) == element:
                return member
            if _is_model(member):
                for info in member.model_fields.values():
                    if element in _literal_values(info.annotation):
                        return member
        return None
    if _is_model(tp):
        for name, info in tp.model_fields.items():
            if element in (name, info.alias):
                return info.annotation
        return None
    args = get_args(tp)
    if isinstance(element, int) and origin in (list, set, frozenset, Sequence) and args:
        return args[0]
    if isinstance(element, int) and origin is tuple and args:
        if len(args) == 2 and args[1] is Ellipsis:
            return args[0]
        return args[element] if 0 <= element < len(args) else None
    if origin in (dict, Mapping) and len(args) == 2:
        return args[1]
    return None


def _type_at(model: type[BaseModel] | None, loc: Sequence[object]) -> Any:
    tp: Any = model
    for element in loc:
        if tp is None:
            return None
        tp = _step(tp, element)
    return tp


def _suggest_field(model: type[BaseModel] | None, loc: Sequence[object]) -> str | None:
    if not loc:
        return None
    owner = _unwrap(_type_at(model, loc[:-1]))
    if not _is_model(owner):
        return None
    names = [info.alias or name for name, info in owner.model_fields.items()]
    matches = difflib.get_close_matches(str(loc[-1]), names, n=1, cutoff=0.6)
    return matches[0] if matches else None


def _expected_tags(model: type[BaseModel] | None, loc: Sequence[object], tag_field: str | None) -> str:
    if tag_field is None:
        return ""
    union = _unwrap(_type_at(model, loc))
    tags: list[Any] = []
    for arg in get_args(union):
        member = _unwrap(arg)
        if _is_model(member) and tag_field in member.model_fields:
            tags.extend(_literal_values(member.model_fields[tag_field].annotation))
    return ", ".join(repr(tag) for tag in tags)


# --------------------------------------------------------------------------- environment

_REFERENCE = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?::-(?P<default>[^}]*))?\}")


def _interpolate(text: str, environ: Mapping[str, str]) -> tuple[str, list[str]]:
    """Expand ``${NAME}``, ``${NAME:-default}`` and ``$$``; returns (result, errors)."""
    out: list[str] = []
    errors: list[str] = []
    pos = 0
    while (dollar := text.find("$", pos)) >= 0:
        out.append(text[pos:dollar])
        following = text[dollar + 1 : dollar + 2]
        if following == "$":
            out.append("$")
            pos = dollar + 2
        elif following == "{":
            match = _REFERENCE.match(text, dollar)
            if match is None:
                close = text.find("}", dollar)
                snippet = text[dollar : close + 1] if 0 <= close < dollar + 40 else text[dollar : dollar + 20]
                errors.append(
                    f"invalid environment variable reference {snippet!r}: use ${{NAME}}, "
                    "${NAME:-default}, or $$ for a literal '$'"
                )
                out.append("${")
                pos = dollar + 2
                continue
            name, default = match.group("name"), match.group("default")
            value = environ.get(name)
            if default is not None:
                if not value:
                    value = default
            elif value is None:
                errors.append(f"environment variable {name} is not set")
                value = ""
            out.append(value)
            pos = match.end()
        else:
            out.append("$")
            pos = dollar + 1
    out.append(text[pos:])
    return "".join(out), errors


# --------------------------------------------------------------------------- YAML loading

_MAP_TAG = "tag:yaml.org,2002:map"
_SEQ_TAG = "tag:yaml.org,2002:seq"
_STR_TAG = "tag:yaml.org,2002:str"
_MERGE_TAG = "tag:yaml.org,2002:merge"
_SCALAR_ERRORS = (yaml.YAMLError, ValueError, TypeError, OverflowError, ArithmeticError)


def _short_tag(tag: str) -> str:
    return tag.replace("tag:yaml.org,2002:", "!!")


@dataclass
class _Loaded:
    data: Any
    root: _Entry
    problems: list[Problem] = field(default_factory=list)
    # Paths whose value is unknown because interpolation failed.
    tainted: list[tuple[Any, ...]] = field(default_factory=list)


class _Loader(yaml.SafeLoader):
    """A SafeLoader that builds plain data plus a map of the position of every mapping
    key and sequence item, reports duplicate keys, and interpolates the environment."""

    def __init__(self, text: str, file: str, environ: Mapping[str, str]) -> None:
        super().__init__(text)
        self._file = file
        self._environ = environ
        self._plain_untagged: set[int] = set()
        self._memo: dict[int, tuple[Any, dict[Hashable, _Entry] | list[_Entry] | None]] = {}
        self._active: set[int] = set()
        self.problems: list[Problem] = []
        self.tainted: list[tuple[Any, ...]] = []

    def compose_scalar_node(self, anchor: Any) -> yaml.ScalarNode:
        event = self.peek_event()  # type: ignore[no-untyped-call]
        node = super().compose_scalar_node(anchor)
        if event.tag is None and event.implicit[0]:
            self._plain_untagged.add(id(node))
        return node

    # -- building

    def load(self) -> _Loaded | None:
        node = self.get_single_node()
        if node is None:
            return None
        data, sub = self._build(node, ())
        root = _Entry(node.start_mark.line + 1, node.start_mark.column + 1, sub)
        return _Loaded(data, root, self.problems, self.tainted)

    def _add(self, node: yaml.Node, path: tuple[Any, ...], message: str, *, taint: bool = True) -> None:
        """Record a problem; unless *taint* is false, the value at *path* is unknown and
        validation errors about it are not reported."""
        if taint:
            self.tainted.append(path)
        mark = node.start_mark
        self.problems.append(Problem(self._file, mark.line + 1, mark.column + 1, format_key(path), message))

    def _build(
        self, node: yaml.Node, path: tuple[Any, ...]
    ) -> tuple[Any, dict[Hashable, _Entry] | list[_Entry] | None]:
        key = id(node)
        if key in self._memo:
            return self._memo[key]
        if key in self._active:
            self._add(node, path, "recursive alias: a value cannot contain itself")
            return None, None
        result: tuple[Any, dict[Hashable, _Entry] | list[_Entry] | None] = (None, None)
        if isinstance(node, yaml.ScalarNode):
            result = (self._scalar(node, path), None)
        else:
            self._active.add(key)
            try:
                if isinstance(node, yaml.MappingNode) and node.tag == _MAP_TAG:
                    result = self._mapping(node, path)
                elif isinstance(node, yaml.SequenceNode) and node.tag == _SEQ_TAG:
                    result = self._sequence(node, path)
                else:
                    self._add(node, path, f"unsupported YAML tag {_short_tag(node.tag)!r}")
            finally:
                self._active.discard(key)
        self._memo[key] = result
        return result

    def _construct(self, node: yaml.ScalarNode, path: tuple[Any, ...]) -> tuple[bool, Any]:
        try:
            return True, self.construct_object(node, deep=True)
        except _SCALAR_ERRORS as exc:
            reason = getattr(exc, "problem", None) or str(exc) or type(exc).__name__
            self._add(node, path, f"cannot read value {node.value!r}: {reason}")
            return False, None

    def _scalar(self, node: yaml.ScalarNode, path: tuple[Any, ...]) -> Any:
        ok, value = self._construct(node, path)
        if not ok or not isinstance(value, str) or "$" not in value:
            return value
        text, errors = _interpolate(value, self._environ)
        for error in errors:
            self._add(node, path, error)
        if errors:
            return text
        if id(node) in self._plain_untagged and text != value:
            # Unquoted: type the result as YAML would have typed that text.
            tag = self.resolve(yaml.ScalarNode, text, (True, False))  # type: ignore[no-untyped-call]
            if tag != _STR_TAG:
                retyped = yaml.ScalarNode(tag, text, node.start_mark, node.end_mark)
                ok, typed = self._construct(retyped, path)
                return typed if ok else text
        return text

    def _sequence(self, node: yaml.SequenceNode, path: tuple[Any, ...]) -> tuple[list[Any], list[_Entry]]:
        data: list[Any] = []
        entries: list[_Entry] = []
        for index, item in enumerate(node.value):
            value, sub = self._build(item, (*path, index))
            data.append(value)
            entries.append(_Entry(item.start_mark.line + 1, item.start_mark.column + 1, sub))
        return data, entries

    def _mapping(
        self, node: yaml.MappingNode, path: tuple[Any, ...]
    ) -> tuple[dict[Any, Any], dict[Hashable, _Entry]]:
        merged_data: dict[Any, Any] = {}
        merged_entries: dict[Hashable, _Entry] = {}
        data: dict[Any, Any] = {}
        entries: dict[Hashable, _Entry] = {}
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG:
                self._merge(value_node, path, merged_data, merged_entries)
                continue
            if not isinstance(key_node, yaml.ScalarNode):
                self._add(key_node, path, "mapping keys must be simple values such as names")
                continue
            ok, key = self._construct(key_node, path)
            if not ok:
                continue
            try:
                hash(key)
            except TypeError:
                self._add(key_node, path, f"key {key_node.value!r} cannot be used as a key")
                continue
            key_path = (*path, key)
            if key in entries:
                first = entries[key].line
                self._add(key_node, key_path, f"duplicate key (first defined at line {first})", taint=False)
            value, sub = self._build(value_node, key_path)
            data[key] = value
            entries[key] = _Entry(key_node.start_mark.line + 1, key_node.start_mark.column + 1, sub)
        if merged_data:
            merged_data.update(data)
            merged_entries.update(entries)
            return merged_data, merged_entries
        return data, entries

    def _merge(
        self,
        node: yaml.Node,
        path: tuple[Any, ...],
        into_data: dict[Any, Any],
        into_entries: dict[Hashable, _Entry],
    ) -> None:
        if isinstance(node, yaml.MappingNode):
            sources: list[yaml.Node] = [node]
        elif isinstance(node, yaml.SequenceNode) and all(
            isinstance(item, yaml.MappingNode) for item in node.value
        ):
            sources = list(node.value)
        else:
            self._add(node, path, "'<<' (merge) needs a mapping or a list of mappings")
            return
        for source in reversed(sources):  # earlier mappings take precedence
            data, sub = self._build(source, path)
            if isinstance(data, dict) and isinstance(sub, dict):
                into_data.update(data)
                into_entries.update(sub)


def _syntax_problem(file: str, text: str, exc: yaml.YAMLError) -> Problem:
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        message = exc.problem or exc.context or "invalid YAML"
        context_mark = exc.context_mark
        if exc.problem and exc.context and context_mark is not None:
            if mark is None or (context_mark.line, context_mark.column) != (mark.line, mark.column):
                message += (
                    f" ({exc.context} started at line {context_mark.line + 1}, "
                    f"column {context_mark.column + 1})"
                )
            if exc.problem.startswith("found unexpected end of stream"):
                mark = context_mark  # the unterminated construct is what needs fixing
        if mark is None:
            return Problem(file, None, None, "", f"YAML syntax error: {message}")
        return Problem(file, mark.line + 1, mark.column + 1, "", f"YAML syntax error: {message}")
    if isinstance(exc, yaml.reader.ReaderError):
        position = exc.position if isinstance(exc.position, int) else 0
        line = text.count("\n", 0, position) + 1
        column = position - (text.rfind("\n", 0, position) + 1) + 1
        character = exc.character
        what = f"#x{character:04x}" if isinstance(character, int) else repr(character)
        return Problem(
            file, line, column, "", f"YAML syntax error: unacceptable character {what}: {exc.reason}"
        )
    return Problem(file, None, None, "", f"YAML error: {exc}")


def _parse(file: str, text: str, environ: Mapping[str, str]) -> _Loaded:
    try:
        loader = _Loader(text, file, environ)  # the reader checks characters right away
        try:
            loaded = loader.load()
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        raise ConfigError([_syntax_problem(file, text, exc)]) from None
    except RecursionError:
        raise ConfigError([Problem(file, None, None, "", "document is nested too deeply")]) from None
    if loaded is None:
        raise ConfigError([Problem(file, None, None, "", "file is empty: expected a mapping of settings")])
    if not isinstance(loaded.data, dict):
        raise ConfigError(
            [
                Problem(
                    file,
                    loaded.root.line,
                    loaded.root.column,
                    "",
                    f"the top level must be a mapping of settings (got {_describe(loaded.data)})",
                )
            ]
        )
    return loaded


# --------------------------------------------------------------------------- validators


def _error(kind: str, message: str, *, loc_suffix: tuple[PathElement, ...] = ()) -> PydanticCustomError:
    """A validation error with a fixed message (no "(got ...)" appended)."""
    context: dict[str, Any] = {"message": message, "show_input": False}
    if loc_suffix:
        context["loc_suffix"] = loc_suffix
    return PydanticCustomError(kind, "{message}", context)


_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\Z")


def _normalize_hostname(name: str) -> str | None:
    """Lower-case ASCII (IDNA) form of a DNS name, or None if it is not one."""
    name = name.lower()
    if name.endswith("."):
        name = name[:-1]
    if not name.isascii():
        try:
            name = name.encode("idna").decode("ascii")
        except UnicodeError:
            return None
    if not name or len(name) > 253:
        return None
    if all(_LABEL.match(label) for label in name.split(".")):
        return name
    return None


def _check_ip_address(value: str) -> str:
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise _error(
            "ip_address",
            f"must be an IP address such as '127.0.0.1', '0.0.0.0' or '::' "
            f"(host names are not allowed; got {_describe(value)})",
        ) from None


def _check_host(value: str) -> str:
    """A host to connect to or verify: DNS name or IP address."""
    try:
        ipaddress.ip_address(value)
    except ValueError:
        if _normalize_hostname(value) is None:
            raise _error(
                "host",
                f"must be a host name such as 'mx.example.com' or an IP address (got {_describe(value)})",
            ) from None
    return value


def _check_helo_name(value: str) -> str:
    """A name for EHLO/HELO and banners: DNS name or address literal like '[192.0.2.1]'."""
    if value.startswith("[") and value.endswith("]"):
        inner = value[1:-1]
        inner = inner[5:] if inner.lower().startswith("ipv6:") else inner
        try:
            ipaddress.ip_address(inner)
        except ValueError:
            pass
        else:
            return value
    elif _normalize_hostname(value) is not None:
        return value
    raise _error(
        "hostname",
        f"must be a host name such as 'mail.example.com' or an address literal such as "
        f"'[192.0.2.1]' (got {_describe(value)})",
    )


def _check_relay_domain(value: str) -> str:
    wildcard = value.startswith("*.")
    normalized = _normalize_hostname(value[2:] if wildcard else value)
    if normalized is None:
        raise _error(
            "relay_domain",
            f"must be a domain such as 'example.com' or a wildcard such as '*.example.com' "
            f"(got {_describe(value)})",
        )
    return f"*.{normalized}" if wildcard else normalized


def _parse_network(value: object) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    if isinstance(value, ipaddress.IPv4Network | ipaddress.IPv6Network):
        return value
    usage = "must be a network such as '192.0.2.0/24', '2001:db8::/32' or a single address"
    if not isinstance(value, str):
        raise _error("network", f"{usage} (got {_describe(value)})")
    try:
        return ipaddress.ip_network(value, strict=True)
    except ValueError:
        pass
    try:
        loose = ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise _error("network", f"{usage} (got {_describe(value)})") from None
    if loose.prefixlen == loose.max_prefixlen:  # e.g. '10.0.0.1/32' cannot have host bits
        raise _error("network", f"{usage} (got {_describe(value)})")
    raise _error(
        "network_host_bits",
        f"{value!r} has host bits set; did you mean {str(loose)!r}?",
    )


def _check_path_input(value: object) -> object:
    if not isinstance(value, str | os.PathLike):
        raise _error("path", f"must be a path written as a string (got {_describe(value)})")
    if isinstance(value, str):
        if not value:
            raise _error("path", "must not be empty")
        if "\0" in value:
            raise _error("path", "must not contain NUL characters")
    return value


def _check_file(value: Path, info: ValidationInfo) -> Path:
    """The file must exist; relative paths are checked against context['base_dir']."""
    base = info.context.get("base_dir") if isinstance(info.context, dict) else None
    target = value if value.is_absolute() or base is None else Path(base) / value
    target = target.absolute()
    if not target.is_file():
        what = "not a regular file" if target.exists() else "file not found"
        raise _error("file_not_found", f"{what}: {target}")
    if not os.access(target, os.R_OK):
        raise _error("file_not_readable", f"file not readable: {target}")
    return value


_USE_SPEC = re.compile(
    r"(?:[A-Za-z0-9_.-]+|[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)\Z"
)
_PLUGIN_NAME = re.compile(r"[a-z0-9_.-]+\Z")

ConfigPath = Annotated[Path, BeforeValidator(_check_path_input)]
ExistingFile = Annotated[Path, BeforeValidator(_check_path_input), AfterValidator(_check_file)]
IPAddress = Annotated[str, AfterValidator(_check_ip_address)]
Host = Annotated[str, AfterValidator(_check_host)]
HeloName = Annotated[str, AfterValidator(_check_helo_name)]
Network = Annotated[
    ipaddress.IPv4Network | ipaddress.IPv6Network,
    PlainValidator(_parse_network, json_schema_input_type=str),
]
RelayDomain = Annotated[str, AfterValidator(_check_relay_domain)]


def _seconds(default: float, description: str) -> Any:
    return Field(default=default, strict=True, gt=0, allow_inf_nan=False, description=description)


# --------------------------------------------------------------------------- schema


class _Model(BaseModel):
    """Base of all configuration sections: unknown keys are errors, instances are immutable,
    and a key whose value is null/empty means "use the default"."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        if isinstance(data, dict) and any(
            value is None and key in cls.model_fields for key, value in data.items()
        ):
            return {
                key: value for key, value in data.items() if not (value is None and key in cls.model_fields)
            }
        return data


class ListenerTLS(_Model):
    """TLS material for STARTTLS (or implicit TLS) on a listener."""

    cert: ExistingFile = Field(
        description="PEM file with the server certificate chain; relative to the config file."
    )
    key: ExistingFile = Field(
        description="PEM file with the private key for the certificate; relative to the config file."
    )
    min_version: Literal["TLSv1.2", "TLSv1.3"] = Field(
        default="TLSv1.2", description="Oldest TLS protocol version clients may negotiate."
    )


class ListenerAuth(_Model):
    """SMTP AUTH (PLAIN and LOGIN) on a submission listener; offered only over TLS."""

    users_file: ExistingFile = Field(
        description=(
            "File of 'user:hash' lines (bcrypt '$2b$...' or Argon2 '$argon2id$...'; '#' starts a "
            "comment line), read at startup; relative to the config file."
        )
    )
    require: bool = Field(
        default=True,
        strict=True,
        description="Refuse MAIL FROM with 530 5.7.0 until the client has authenticated.",
    )

    @field_validator("users_file")
    @classmethod
    def _users_file_loads(cls, value: Path, info: ValidationInfo) -> Path:
        from smtpproxy.auth import PasswordFile, PasswordFileError

        base = info.context.get("base_dir") if isinstance(info.context, dict) else None
        target = value if value.is_absolute() or base is None else Path(base) / value
        try:
            PasswordFile.load(target)
        except PasswordFileError as exc:
            raise _error("users_file", str(exc)) from None
        return target


class Listener(_Model):
    """An address and port on which the proxy accepts SMTP connections."""

    address: IPAddress = Field(
        default="127.0.0.1",
        description="IP address to listen on; '0.0.0.0' or '::' for all addresses (no host names).",
    )
    port: int = Field(
        default=2525, strict=True, ge=0, le=65535,
        description="TCP port to listen on; 0 picks a free port (the log line 'listening' tells which).",
    )
    banner: str = Field(
        default="ESMTP smtpproxy",
        max_length=400,
        description="Text after the host name in the 220 greeting (printable ASCII).",
    )
    tls: ListenerTLS | None = Field(
        default=None,
        description="Certificate and key; when set, STARTTLS is offered (or TLS is implicit: implicit_tls).",
    )
    require_starttls: bool = Field(
        default=False,
        strict=True,
        description="Refuse mail transactions until the client has issued STARTTLS (needs tls).",
    )
    implicit_tls: bool = Field(
        default=False,
        strict=True,
        description="Speak TLS from the first byte (port 465 style; needs tls); STARTTLS is not offered.",
    )
    proxy_protocol: bool = Field(
        default=False,
        strict=True,
        description=(
            "Expect a PROXY protocol v1/v2 header (HAProxy, load balancers) before SMTP and treat "
            "the client it names as the real client."
        ),
    )
    proxy_protocol_from: list[Network] = Field(
        default=[],
        description=(
            "Networks of the proxies allowed to send a PROXY header (required with proxy_protocol); "
            "other peers are disconnected without a banner."
        ),
    )
    proxy_protocol_timeout: float = _seconds(
        5, "Seconds the PROXY header may take to arrive before the connection is closed."
    )
    auth: ListenerAuth | None = Field(
        default=None,
        description="SMTP AUTH for a submission listener (port 587/465 style); needs tls.",
    )

    @field_validator("banner")
    @classmethod
    def _banner_is_printable(cls, value: str) -> str:
        if not all(" " <= char <= "~" for char in value):
            raise _error(
                "banner",
                "must be printable ASCII text without control characters or line breaks",
            )
        return value

    @field_validator("require_starttls")
    @classmethod
    def _starttls_needs_tls(cls, value: bool, info: ValidationInfo) -> bool:
        if value and "tls" in info.data and info.data["tls"] is None:
            raise _error(
                "starttls_without_tls",
                "require_starttls needs a 'tls' section (cert and key) on this listener",
            )
        return value

    @field_validator("implicit_tls")
    @classmethod
    def _implicit_tls_needs_tls(cls, value: bool, info: ValidationInfo) -> bool:
        if value and "tls" in info.data and info.data["tls"] is None:
            raise _error(
                "implicit_tls_without_tls",
                "implicit_tls needs a 'tls' section (cert and key) on this listener",
            )
        if value and info.data.get("require_starttls"):
            raise _error(
                "implicit_tls_with_starttls",
                "implicit_tls and require_starttls exclude each other: with implicit_tls every "
                "connection is encrypted from the start",
            )
        return value

    @field_validator("auth")
    @classmethod
    def _auth_needs_tls(cls, value: ListenerAuth | None, info: ValidationInfo) -> ListenerAuth | None:
        if value is not None and "tls" in info.data and info.data["tls"] is None:
            raise _error(
                "auth_without_tls",
                "auth needs a 'tls' section (cert and key) on this listener: "
                "AUTH is only offered over TLS",
            )
        return value

    @model_validator(mode="after")
    def _proxy_protocol_consistent(self) -> "Listener":
        if self.proxy_protocol and not self.proxy_protocol_from:
            raise _error(
                "proxy_protocol_from_missing",
                "proxy_protocol needs proxy_protocol_from: the networks of the proxies allowed "
                "to send a PROXY header (e.g. ['10.0.0.5/32'])",
                loc_suffix=("proxy_protocol_from",),
            )
        if self.proxy_protocol and self.implicit_tls:
            raise _error(
                "proxy_protocol_with_implicit_tls",
                "proxy_protocol cannot be combined with implicit_tls (the PROXY header comes before "
                "the TLS handshake); use STARTTLS on this listener or terminate TLS at the proxy",
                loc_suffix=("proxy_protocol",),
            )
        return self


class Limits(_Model):
    """Resource limits that protect the proxy from misbehaving or hostile clients."""

    max_message_size: int = Field(
        default=26214400,
        strict=True,
        gt=0,
        description="Largest accepted message in bytes, advertised via SIZE.",
    )
    max_recipients: int = Field(
        default=100, strict=True, gt=0, description="Most RCPT TO commands accepted per message."
    )
    max_line_length: int = Field(
        default=1000,
        strict=True,
        ge=1000,
        le=1_000_000,
        description="Longest message text line in bytes including CRLF (RFC 5321 minimum is 1000).",
    )
    max_command_line: int = Field(
        default=512,
        strict=True,
        ge=512,
        le=65536,
        description="Longest SMTP command line in bytes including CRLF (RFC 5321 minimum is 512).",
    )
    max_commands: int = Field(
        default=10000, strict=True, gt=0,
        description=(
            "Most commands accepted in one session since its last accepted message "
            "(then 421); a session that keeps delivering mail is never cut off."
        ),
    )
    max_errors: int = Field(
        default=20,
        strict=True,
        gt=0,
        description="Protocol errors allowed per session before the proxy replies 421 and closes.",
    )
    max_sessions: int = Field(
        default=1000, strict=True, gt=0, description="Most concurrent sessions across all listeners."
    )
    max_sessions_per_ip: int = Field(
        default=20,
        strict=True,
        gt=0,
        description="Most concurrent sessions from one client IP address (at most max_sessions).",
    )
    idle_timeout: float = Field(
        default=300,
        strict=True,
        gt=0,
        allow_inf_nan=False,
        description="Seconds to wait for the next command before closing.",
    )
    data_timeout: float = Field(
        default=600,
        strict=True,
        gt=0,
        allow_inf_nan=False,
        description="Seconds of silence allowed while receiving message data.",
    )
    session_timeout: float = Field(
        default=3600,
        strict=True,
        gt=0,
        allow_inf_nan=False,
        description="Longest total lifetime of one session in seconds.",
    )
    shutdown_grace: float = Field(
        default=30,
        strict=True,
        gt=0,
        allow_inf_nan=False,
        description="Seconds open sessions get to finish after SIGTERM before they are closed.",
    )
    spool_threshold: int = Field(
        default=1048576,
        strict=True,
        ge=0,
        description=(
            "Messages larger than this many bytes are spooled to an unlinked temporary file "
            "while they are received and filtered, instead of held in memory (0: always)."
        ),
    )
    spool_directory: Path | None = Field(
        default=None,
        description="Where spool files go; the system temporary directory (TMPDIR) by default.",
    )

    @field_validator("max_sessions_per_ip")
    @classmethod
    def _per_ip_within_total(cls, value: int, info: ValidationInfo) -> int:
        total = info.data.get("max_sessions")
        if isinstance(total, int) and value > total:
            raise _error(
                "limit_order",
                f"must not be larger than max_sessions ({total}) (got {value})",
            )
        return value


class SmtpPolicy(_Model):
    """SMTP protocol behaviour towards clients."""

    bare_newlines: Literal["reject", "normalize"] = Field(
        default="reject",
        description="What to do with a bare CR or LF in message data: reject it or convert it to CRLF.",
    )
    smtputf8: bool = Field(
        default=True, strict=True, description="Advertise SMTPUTF8 and accept internationalized addresses."
    )
    pipelining: bool = Field(default=True, strict=True, description="Advertise PIPELINING (RFC 2920).")


class Relay(_Model):
    """Which recipients and clients the proxy accepts mail for."""

    domains: list[RelayDomain] = Field(
        default=["localhost", "*.localhost", "*.test", "*.example", "*.invalid"],
        description="Recipient domains accepted; '*.example.com' matches any subdomain of example.com.",
    )
    networks: list[Network] = Field(
        default=[],
        description="Client networks (CIDR, no host bits) allowed to relay to any domain.",
    )
    allow_authenticated: bool = Field(
        default=True, strict=True, description="Let authenticated clients relay to any domain."
    )


class MaildirDelivery(_Model):
    """Deliver accepted mail into a local Maildir."""

    type: Literal["maildir"] = Field(default="maildir", description="Selects Maildir delivery.")
    path: ConfigPath = Field(
        default=Path("mail"), description="Maildir directory; relative to the config file."
    )


class Upstream(_Model):
    """One next-hop SMTP server."""

    host: Host = Field(description="Host name or IP address of the server.")
    port: int = Field(default=25, strict=True, ge=1, le=65535, description="TCP port of the server.")
    priority: int = Field(
        default=10, strict=True, ge=0,
        description="Lower is tried first; servers of equal priority share the load by weight.",
    )
    weight: int = Field(
        default=1, strict=True, ge=1, description="Share of messages among servers of equal priority."
    )


class Route(_Model):
    """Recipients of these domains go to their own upstream servers."""

    domains: list[RelayDomain] = Field(
        min_length=1, description="Recipient domains ('example.com' or '*.example.com') for this route."
    )
    upstreams: list[Upstream] = Field(min_length=1, description="The servers for this route.")


class UpstreamAuth(_Model):
    """Credentials for a smarthost that requires SMTP AUTH (sent only over TLS)."""

    username: str = Field(min_length=1, description="User name; use ${ENV_VAR} to keep it out of the file.")
    password: str = Field(min_length=1, description="Password; use ${ENV_VAR} to keep it out of the file.")


class UpstreamPool(_Model):
    """Reuse of idle upstream connections."""

    max_idle: int = Field(
        default=32, strict=True, ge=0,
        description=(
            "Idle connections kept per server; 0 turns reuse off. Enough for the deliveries in "
            "flight at 100 concurrent sessions: fewer would close and reopen connections per "
            "message (bench/README.md: 25 % more CPU per message at concurrency 100 with 4)."
        ),
    )
    idle_timeout: float = Field(
        default=30, strict=True, gt=0, allow_inf_nan=False,
        description="Seconds an idle connection is kept before it is closed.",
    )
    max_messages: int = Field(
        default=100, strict=True, ge=1, description="Messages sent over one connection before it is closed."
    )


class SmtpDelivery(_Model):
    """Forward accepted mail to other SMTP servers (Postfix, Exchange, a smarthost)."""

    type: Literal["smtp"] = Field(description="Selects SMTP forwarding.")
    host: Host | None = Field(
        default=None, description="Host name or IP address of the single next-hop server (or use upstreams)."
    )
    port: int = Field(default=25, strict=True, ge=1, le=65535, description="TCP port of `host`.")
    upstreams: list[Upstream] = Field(
        default_factory=list,
        description="Several next-hop servers with priority and weight, tried in order on failure.",
    )
    routes: list[Route] = Field(
        default_factory=list,
        description=(
            "Per-domain routes; recipients of other domains use the default upstreams. A transaction "
            "goes to one route: recipients of another route get 452 4.5.3 and are sent again by the client."
        ),
    )
    rcpt_mode: Literal["at_data", "relay"] = Field(
        default="at_data",
        description=(
            "'relay': each RCPT is asked of the upstream at once and its answer relayed; 'at_data': "
            "the upstream is contacted only after the plugins accepted the whole message."
        ),
    )
    client_identity: Literal["auto", "xclient", "xforward", "none"] = Field(
        default="auto",
        description=(
            "Pass the original client to the upstream: XCLIENT (Postfix), XFORWARD, or 'auto' "
            "(XCLIENT when offered, else XFORWARD when offered)."
        ),
    )
    auth: UpstreamAuth | None = Field(default=None, description="SMTP AUTH to the upstream (smarthost).")
    pool: UpstreamPool = Field(default=UpstreamPool(), description="Connection reuse.")
    down_backoff: float = Field(
        default=30, strict=True, gt=0, allow_inf_nan=False,
        description="Seconds a server that failed to connect or greet is skipped before it is tried again.",
    )
    tls: Literal["none", "opportunistic", "starttls", "implicit"] = Field(
        default="opportunistic",
        description=(
            "'none': plaintext only; 'opportunistic': STARTTLS when offered, certificate not "
            "verified; 'starttls': STARTTLS required and verified; 'implicit': TLS from connect, "
            "verified."
        ),
    )
    tls_verify: bool = Field(
        default=True,
        strict=True,
        description="Verify the server certificate and name in 'starttls' and 'implicit' modes.",
    )
    ca_file: ExistingFile | None = Field(
        default=None,
        description="PEM bundle of CAs to trust instead of the system store; relative to the config file.",
    )
    tls_hostname: Host | None = Field(
        default=None, description="Name expected in the server certificate; defaults to host."
    )
    client_cert: ExistingFile | None = Field(
        default=None,
        description="PEM client certificate (with key, or see client_key) for TLS to the upstream.",
    )
    client_key: ExistingFile | None = Field(default=None, description="PEM key for client_cert.")
    helo_name: HeloName | None = Field(
        default=None, description="Name sent in EHLO/HELO; defaults to the top-level hostname."
    )
    connect_timeout: float = Field(
        default=30,
        strict=True,
        gt=0,
        allow_inf_nan=False,
        description="Seconds allowed to connect and read the greeting.",
    )
    command_timeout: float = Field(
        default=60,
        strict=True,
        gt=0,
        allow_inf_nan=False,
        description="Seconds allowed for each SMTP command's reply.",
    )
    data_timeout: float = Field(
        default=600,
        strict=True,
        gt=0,
        allow_inf_nan=False,
        description="Seconds allowed to send the message and get the reply.",
    )

    @model_validator(mode="after")
    def _one_destination(self) -> "SmtpDelivery":
        if (self.host is None) == (not self.upstreams):
            both = self.host is not None
            raise PydanticCustomError(
                "delivery_destination",
                "give either 'host' (one server) or 'upstreams' (several)" + (", not both" if both else ""),
                {"loc_suffix": ("upstreams" if both else "host",), "show_input": False},
            )
        if self.auth is not None and self.tls == "none":
            raise PydanticCustomError(
                "auth_needs_tls",
                "upstream auth needs tls other than 'none' (passwords never go in plaintext)",
                {"loc_suffix": ("auth",), "show_input": False},
            )
        return self

    def default_upstreams(self) -> list[Upstream]:
        """The servers for recipients no route claims."""
        if self.host is not None:
            return [Upstream(host=self.host, port=self.port)]
        return list(self.upstreams)


class Quarantine(_Model):
    """Where messages that plugins quarantine are stored."""

    path: ConfigPath = Field(
        default=Path("quarantine"), description="Quarantine directory; relative to the config file."
    )


class PluginSpec(_Model):
    """One plugin in the filter chain; plugins run in the order listed."""

    name: str = Field(
        description="Unique name of this plugin instance (lower-case letters, digits, '_', '.', '-')."
    )
    use: str | None = Field(
        default=None,
        description=(
            "Entry point name in group 'smtpproxy.plugins' or 'package.module:Class'; defaults to name."
        ),
    )
    enabled: bool = Field(default=True, strict=True, description="Set to false to skip this plugin.")
    timeout: float = Field(
        default=10,
        strict=True,
        gt=0,
        allow_inf_nan=False,
        description="Seconds each hook call of this plugin may take.",
    )
    on_error: Literal["tempfail", "continue"] = Field(
        default="tempfail",
        description="When the plugin fails or times out: answer with a temporary failure, or skip it.",
    )
    settings: dict[str, Any] = Field(
        default={}, description="Plugin-specific settings, validated by the plugin itself."
    )

    @field_validator("name")
    @classmethod
    def _name_valid(cls, value: str) -> str:
        if not _PLUGIN_NAME.match(value):
            raise _error(
                "plugin_name",
                f"must consist of lower-case letters, digits, '_', '.' and '-' (got {_describe(value)})",
            )
        return value

    @field_validator("use")
    @classmethod
    def _use_valid(cls, value: str | None) -> str | None:
        if value is not None and not _USE_SPEC.match(value):
            raise _error(
                "plugin_use",
                f"must be an entry point name or 'package.module:Class' (got {_describe(value)})",
            )
        return value


class DNS(_Model):
    """The resolver every plugin shares (SPF, DKIM, DMARC, DNSBL, reverse DNS)."""

    nameservers: list[IPAddress] | None = Field(
        default=None, description="Resolver addresses; default: those in /etc/resolv.conf."
    )
    port: int = Field(default=53, strict=True, ge=1, le=65535, description="Resolver port.")
    timeout: float = Field(
        default=5, strict=True, gt=0, allow_inf_nan=False,
        description="Seconds a lookup may take before it counts as a temporary error.",
    )
    cache_size: int = Field(
        default=10000, strict=True, ge=0, description="Answers cached (by their TTL); 0 turns the cache off."
    )


class Logging(_Model):
    """Log output."""

    level: Literal["debug", "info", "warning", "error"] = Field(
        default="info", description="Least severe level that is logged."
    )
    format: Literal["kv", "json"] = Field(
        default="kv", description="Line format: 'kv' (key=value pairs) or 'json' (one object per line)."
    )


class Metrics(_Model):
    """The HTTP endpoint for Prometheus metrics, /healthz and /readyz (see docs/operations.md)."""

    enabled: bool = Field(
        default=False, strict=True,
        description="Serve /metrics, /healthz and /readyz; needs `pip install 'smtpproxy[metrics]'`.",
    )
    address: IPAddress = Field(
        default="127.0.0.1", description="Address to serve on; keep it private (no authentication)."
    )
    port: int = Field(default=9125, strict=True, ge=0, le=65535, description="TCP port (0: any free port).")
    ready_cache: float = Field(
        default=5, strict=True, gt=0, allow_inf_nan=False,
        description="Seconds a /readyz upstream probe is reused (so scrapers cannot hammer the upstream).",
    )


def _check_milter_listen(value: str) -> str:
    from smtpproxy.milter.endpoint import parse_listen  # the one parser, shared with the server

    try:
        parse_listen(value)
    except ValueError as exc:
        raise _error("milter_listen", str(exc)) from None
    return value


class Milter(_Model):
    """Milter mode (`smtpproxy milter`): the plugin chain served to Postfix or Sendmail."""

    listen: Annotated[str, AfterValidator(_check_milter_listen)] = Field(
        default="inet:127.0.0.1:8890",
        description="Where the MTA connects: `inet:HOST:PORT` (`inet:[::1]:PORT`) or `unix:/PATH`.",
    )
    socket_mode: str = Field(
        default="0660", pattern=r"^0?[0-7]{3}$",
        description="Permissions of the Unix socket (octal); the MTA's user must be able to write it.",
    )
    default_action: Literal["tempfail", "accept", "reject"] = Field(
        default="tempfail",
        description=(
            "What a plugin error (exception, timeout) becomes: tempfail (451), reject (550) "
            "or accept (the message passes unfiltered), like Postfix's milter_default_action."
        ),
    )
    max_packet_size: int = Field(
        default=262144, strict=True, ge=65536, le=16777216,
        description="Largest packet accepted from the MTA (bytes); bigger ones close the connection.",
    )
    timeout: float = _seconds(
        300, "Seconds to wait for the MTA's next command before closing the connection."
    )
    progress_interval: float = _seconds(
        10, "While plugins work, tell the MTA every this many seconds that we are alive."
    )


class Config(_Model):
    """The complete smtpproxy configuration."""

    listeners: list[Listener] = Field(
        default=[Listener()], min_length=1, description="Addresses and ports to accept SMTP on."
    )
    limits: Limits = Field(default=Limits(), description="Resource limits.")
    smtp: SmtpPolicy = Field(default=SmtpPolicy(), description="SMTP protocol behaviour.")
    relay: Relay = Field(default=Relay(), description="Accepted recipient domains and relay clients.")
    delivery: MaildirDelivery | SmtpDelivery = Field(
        default=MaildirDelivery(),
        discriminator="type",
        description="Where accepted mail goes: a local Maildir or another SMTP server.",
    )
    quarantine: Quarantine = Field(default=Quarantine(), description="Quarantine storage.")
    plugins: list[PluginSpec] = Field(
        default=[], description="Filter plugins, called in this order for every message."
    )
    dns: DNS = Field(default=DNS(), description="DNS resolver settings shared by all plugins.")
    milter: Milter = Field(default=Milter(), description="Milter mode (`smtpproxy milter`).")
    logging: Logging = Field(default=Logging(), description="Log level and format.")
    workers: Annotated[int, Field(strict=True, ge=1, le=MAX_WORKERS)] | Literal["auto"] = Field(
        default=1,
        description=(
            "Proxy processes sharing each listening port (SO_REUSEPORT): a number, or 'auto' "
            f"for one per core this process may run on (at most {MAX_WORKERS}). More than one "
            "(and 'auto' always) needs a fixed port on every listener; each worker has its own "
            "metrics port (metrics.port + worker index)."
        ),
    )
    event_loop: Literal["auto", "asyncio", "uvloop"] = Field(
        default="auto",
        description=(
            "The asyncio event loop: 'uvloop' (faster; installed with smtpproxy on CPython on "
            "Linux and macOS), 'asyncio' (the standard one), or 'auto' (uvloop when it can be "
            "imported, else asyncio's)."
        ),
    )
    metrics: Metrics = Field(default=Metrics(), description="Metrics and health endpoints.")
    pid_file: ConfigPath | None = Field(
        default=None,
        description="Write the process id here while running; `smtpproxy reload` signals it.",
    )
    hostname: HeloName | None = Field(
        default=None,
        description=(
            "This host's name for the banner, EHLO and Received headers; "
            "defaults to the machine's host name (set it to the public FQDN)."
        ),
    )

    @field_validator("listeners")
    @classmethod
    def _listeners_unique(cls, value: list[Listener]) -> list[Listener]:
        seen: dict[tuple[str, int], int] = {}
        for index, listener in enumerate(value):
            if listener.port == 0:
                continue  # each port-0 listener gets its own free port
            first = seen.setdefault((listener.address, listener.port), index)
            if first != index:
                raise _error(
                    "duplicate_listener",
                    f"{listener.address} port {listener.port} is already used by listeners[{first}]",
                    loc_suffix=(index, "port"),
                )
        return value

    @property
    def worker_count(self) -> int:
        """How many proxy processes ``workers`` asks for here ('auto': the usable cores)."""
        if self.workers == "auto":
            return cpu_count()
        return self.workers

    @field_validator("workers")
    @classmethod
    def _workers_need_fixed_ports(cls, value: int | Literal["auto"], info: ValidationInfo,
                                  ) -> int | Literal["auto"]:
        if value == "auto" or value > 1:
            for index, listener in enumerate(info.data.get("listeners") or []):
                if listener.port == 0:
                    raise _error(
                        "workers_need_fixed_ports",
                        f"workers: {value} needs a fixed port on every listener, but "
                        f"listeners[{index}] has port 0 (each worker would pick its own free port)",
                    )
        return value

    @field_validator("plugins")
    @classmethod
    def _plugin_names_unique(cls, value: list[PluginSpec]) -> list[PluginSpec]:
        seen: dict[str, int] = {}
        for index, plugin in enumerate(value):
            first = seen.setdefault(plugin.name, index)
            if first != index:
                raise _error(
                    "duplicate_plugin",
                    f"plugin name {plugin.name!r} is already used by plugins[{first}]",
                    loc_suffix=(index, "name"),
                )
        return value


# --------------------------------------------------------------------------- loading


def _resolve_paths(config: Config, base: Path) -> Config:
    """Copy of *config* with every relative path made absolute against *base*."""

    def resolve(path: Path) -> Path:
        return path if path.is_absolute() else base / path

    listeners = [
        listener.model_copy(
            update={
                "tls": listener.tls.model_copy(
                    update={"cert": resolve(listener.tls.cert), "key": resolve(listener.tls.key)}
                )
            }
        )
        if listener.tls is not None
        else listener
        for listener in config.listeners
    ]
    delivery: MaildirDelivery | SmtpDelivery
    if isinstance(config.delivery, MaildirDelivery):
        delivery = config.delivery.model_copy(update={"path": resolve(config.delivery.path)})
    elif config.delivery.ca_file is not None:
        delivery = config.delivery.model_copy(update={"ca_file": resolve(config.delivery.ca_file)})
    else:
        delivery = config.delivery
    quarantine = config.quarantine.model_copy(update={"path": resolve(config.quarantine.path)})
    pid_file = resolve(config.pid_file) if config.pid_file is not None else None
    limits = config.limits
    if limits.spool_directory is not None:
        limits = limits.model_copy(update={"spool_directory": resolve(limits.spool_directory)})
    return config.model_copy(update={"listeners": listeners, "delivery": delivery, "quarantine": quarantine,
                                     "pid_file": pid_file, "limits": limits})


def _read_text(file: str) -> str:
    try:
        raw = Path(file).read_bytes()
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ConfigError(
            [Problem(file, None, None, "", f"cannot read configuration file: {reason}")]
        ) from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise ConfigError([Problem(file, line, column, "", "file is not valid UTF-8 text")]) from None


def load_config(
    path: str | os.PathLike[str] | None, *, environ: Mapping[str, str] | None = None
) -> tuple[Config, ConfigSource | None]:
    """Load and validate a configuration file.

    ``path=None`` returns the embedded default :class:`Config` (relative paths resolved
    against the current directory) and no source.  Otherwise the YAML file is read,
    environment variables from *environ* (default ``os.environ``) are interpolated, and
    the result is validated.  All problems found are raised together as a
    :class:`ConfigError`; the returned config has absolute paths.
    """
    if path is None:
        return _resolve_paths(Config(), Path.cwd()), None
    file = os.fspath(path)
    env: Mapping[str, str] = os.environ if environ is None else environ
    text = _read_text(file)
    loaded = _parse(file, text, env)
    source = ConfigSource(file, loaded.root)
    base_dir = Path(file).absolute().parent
    problems = list(loaded.problems)
    config: Config | None = None
    try:
        config = Config.model_validate(loaded.data, context={"base_dir": base_dir})
    except ValidationError as exc:
        tainted = [format_key(p) for p in loaded.tainted]
        for problem in source.problems_from_validation_error(exc, model=Config):
            # A value whose interpolation failed is already reported; its follow-on
            # validation errors are noise.
            if any(problem.key == key or problem.key.startswith((key + ".", key + "[")) for key in tainted):
                continue
            problems.append(problem)
    if problems or config is None:
        problems.sort(key=_problem_order)
        raise ConfigError(problems)
    return _resolve_paths(config, base_dir), source
