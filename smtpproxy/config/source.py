"""The YAML source map, environment interpolation and suggestions.

Loads YAML with the position of every key and item, interpolates ``${NAME}`` in values,
and turns pydantic's errors into :class:`~smtpproxy.config.problems.Problem` lines with
file, line, column and a "did you mean" where one fits. No smtpproxy imports besides
:mod:`smtpproxy.config.problems`.
"""

import difflib
import re
import types
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import (
    BaseModel,
    ValidationError,
)

from smtpproxy.config.problems import ConfigError, PathElement, Problem, describe_value, format_key

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

    def __init__(self, file: str, root: _Entry, *, positions: bool = True) -> None:
        self.file = file
        self._root = root
        self._positions = positions

    @classmethod
    def detached(cls, file: str) -> "ConfigSource":
        """A source for data that came from no document (a test's keyword arguments): its
        problems name the key and say what is wrong, without a line."""
        return cls(file, _Entry(0, 0), positions=False)

    def __repr__(self) -> str:
        return f"ConfigSource({self.file!r})"

    def locate(self, path: Sequence[PathElement]) -> tuple[int, int] | None:
        """(line, column), 1-based, of the key or list item at *path*.

        Falls back to the nearest ancestor that exists in the document (ultimately the
        start of the document); None for a detached source.
        """
        if not self._positions:
            return None
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
        errors = error.errors(include_url=False)
        # A required key missing because it was misspelt is said once, by the misspelling's
        # "unknown key (did you mean ...?)".
        misspelt = {
            (*err["loc"][:-1], guess)
            for err in errors
            if err["type"] == "extra_forbidden"
            and (guess := _suggest_field(root_model, tuple(err["loc"]))) is not None
        }
        for err in errors:
            loc = tuple(err["loc"])
            if err["type"] == "missing" and loc in misspelt:
                continue
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
                    message = f"must be one of {expected} (got {describe_value(got)})"
                elif expected:
                    message = f"Field required; must be one of {expected}"
                else:
                    message = "Field required"
            elif kind == "value_error":
                message = message.removeprefix("Value error, ")
            elif kind in ("model_type", "model_attributes_type"):
                message = "Input should be a mapping of settings"
            if kind not in _NO_INPUT_TYPES and ctx.get("show_input", True):
                message += f" (got {describe_value(value)})"
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
        problems.sort(key=problem_order)
        return problems


def problem_order(problem: Problem) -> tuple[bool, int, int]:
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


def parse_document(file: str, text: str, environ: Mapping[str, str]) -> _Loaded:
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
                    f"the top level must be a mapping of settings (got {describe_value(loaded.data)})",
                )
            ]
        )
    return loaded
