"""Verdicts: what a hook tells the proxy to do next.

A hook returns ``None`` to let the chain continue, or a :class:`Verdict`. Verdicts are
plain immutable values so that any transport (the SMTP proxy, a milter) can turn them
into its own replies. Every verdict that reaches an SMTP client carries a code, an
enhanced status code (RFC 3463) and a text; the constructors fill sensible defaults so a
plugin usually only says *why*.

**A verdict cannot say something impossible.** It is checked when it is built:

- ``reject`` carries a 5xx reply and ``tempfail`` a 4xx reply (a refusal without a reply,
  or with a reply of the other class, does not exist);
- ``continue``, ``accept``, ``discard`` and ``quarantine`` carry no reply: the client's
  positive answer is the proxy's to give (``250`` only once the message is delivered,
  quarantined or dropped as the verdict says), never a plugin's;
- the score is a finite number, the reason a string, the tags a tuple of strings.

Anything else raises :class:`ValueError` (or :class:`TypeError`) in the plugin that built
it. Whatever a plugin still returns that is not a valid ``Verdict`` (another type, an
object altered after construction) is that plugin's error, handled by its ``on_error``
policy: by default the client is told ``451 4.3.0`` and retries. A refusal can never
become an acceptance, and no plugin can make the client hear ``250`` for a message that
was not delivered, quarantined or explicitly discarded.
"""

from __future__ import annotations

import enum
import math
import re
from dataclasses import dataclass, field, replace

__all__ = ["Action", "Reply", "Verdict"]

_ENHANCED = re.compile(r"^[245]\.\d{1,3}\.\d{1,3}$")
_CONTROL = re.compile(r"[\x00-\x09\x0b-\x1f\x7f]")  # \n separates lines of a multi-line reply


class Action(enum.Enum):
    """What happens after a verdict."""

    CONTINUE = "continue"
    """Go on with the next plugin (a verdict may still carry a score or a reason)."""
    ACCEPT = "accept"
    """Skip the rest of this phase's chain; the phase succeeds."""
    REJECT = "reject"
    """Refuse with a permanent (5xx) reply."""
    TEMPFAIL = "tempfail"
    """Refuse with a temporary (4xx) reply; the client retries later."""
    DISCARD = "discard"
    """Tell the client 250 but drop the message; always logged."""
    QUARANTINE = "quarantine"
    """Tell the client 250 and store the message in quarantine instead of delivering it."""

    @property
    def is_final(self) -> bool:
        """True when the chain stops at this verdict."""
        return self is not Action.CONTINUE


@dataclass(frozen=True, slots=True)
class Reply:
    """An SMTP reply: ``code enhanced text``, e.g. ``550 5.7.1 Relaying denied``."""

    code: int
    enhanced: str | None
    text: str

    def __post_init__(self) -> None:
        if type(self.code) is not int:
            raise TypeError(f"SMTP reply code must be an int, got {type(self.code).__name__}")
        if self.enhanced is not None and not isinstance(self.enhanced, str):
            raise TypeError(f"enhanced status code must be a str or None, got {type(self.enhanced).__name__}")
        if not isinstance(self.text, str):
            raise TypeError(f"reply text must be a str, got {type(self.text).__name__}")
        if not 200 <= self.code <= 599:
            raise ValueError(f"SMTP reply code must be 200..599, got {self.code}")
        if self.enhanced is not None:
            if not _ENHANCED.match(self.enhanced):
                raise ValueError(f"enhanced status code must look like 5.7.1, got {self.enhanced!r}")
            if self.enhanced[0] != str(self.code)[0]:
                raise ValueError(
                    f"enhanced status {self.enhanced} does not match the class of {self.code}"
                )
        if _CONTROL.search(self.text):
            raise ValueError("reply text must not contain control characters (CR, NUL, ...)")

    @property
    def is_positive(self) -> bool:
        return self.code < 400

    @property
    def is_temporary(self) -> bool:
        return 400 <= self.code < 500

    @property
    def is_permanent(self) -> bool:
        return self.code >= 500

    def lines(self) -> list[str]:
        """The reply as wire lines without CRLF (multi-line when the text has several lines)."""
        texts = self.text.split("\n") if self.text else [""]
        prefix = f"{self.enhanced} " if self.enhanced else ""
        out = []
        for i, text in enumerate(texts):
            sep = " " if i == len(texts) - 1 else "-"
            out.append(f"{self.code}{sep}{prefix}{text}".rstrip())
        return out

    def __str__(self) -> str:
        return "\r\n".join(self.lines())

    @classmethod
    def checked(cls, reply: object) -> Reply:
        """A fresh, validated copy of *reply*; ValueError/TypeError if it is not a valid Reply.

        The chain uses it on what plugins hand back, so a reply altered after construction
        (``object.__setattr__``) or a look-alike subclass cannot slip through.
        """
        if not isinstance(reply, Reply):
            raise TypeError(f"a reply must be a Reply, got {type(reply).__name__}")
        return cls(reply.code, reply.enhanced, reply.text)


@dataclass(frozen=True, slots=True)
class Verdict:
    """A hook's decision. Build one with the class methods, e.g. ``Verdict.reject("no")``."""

    action: Action
    reply: Reply | None = None
    reason: str = ""
    """Why, for logs and traces (not sent to the client unless it is also the reply text)."""
    score: float = 0.0
    """Points added to the transaction's score (spam scoring); any action may carry a score."""
    tags: tuple[str, ...] = field(default=())
    """Short machine-readable labels for other plugins and logs, e.g. ``("spf:fail",)``."""

    def __post_init__(self) -> None:
        # Nearly every verdict (each is built twice: by its plugin and by checked()) has no
        # reply, an exact str reason, a float score and a tuple of str tags: these pass every
        # rule below, checked here by exact type. Anything else takes all the rules.
        action = self.action
        if (self.reply is None and type(action) is Action and action is not Action.REJECT
                and action is not Action.TEMPFAIL and type(self.reason) is str
                and type(self.score) is float and math.isfinite(self.score) and type(self.tags) is tuple):
            for tag in self.tags:
                if type(tag) is not str:
                    break
            else:
                return
        self._check()

    def _check(self) -> None:
        """Every rule of a verdict (see the module's docstring), whatever the types."""
        if not isinstance(self.action, Action):
            raise TypeError(f"action must be an Action, got {self.action!r}")
        if self.reply is not None and not isinstance(self.reply, Reply):
            raise TypeError(f"reply must be a Reply or None, got {type(self.reply).__name__}")
        if self.action is Action.REJECT:
            if self.reply is None or not self.reply.is_permanent:
                raise ValueError(
                    f"a reject verdict needs a 5xx reply, got {self.reply}; use Verdict.reject(...)"
                )
        elif self.action is Action.TEMPFAIL:
            if self.reply is None or not self.reply.is_temporary:
                raise ValueError(
                    f"a tempfail verdict needs a 4xx reply, got {self.reply}; use Verdict.tempfail(...)"
                )
        elif self.reply is not None:
            raise ValueError(
                f"verdict {self.action.value!r} carries no reply (got {self.reply}): only the proxy "
                "answers 2xx, once the message is delivered, quarantined or dropped"
            )
        if not isinstance(self.reason, str):
            raise TypeError(f"reason must be a str, got {type(self.reason).__name__}")
        score = self.score
        if isinstance(score, bool) or not isinstance(score, int | float):
            raise TypeError(f"score must be a number, got {type(score).__name__}")
        if not math.isfinite(score):
            raise ValueError(f"score must be a finite number, got {score}")
        tags = self.tags
        if not isinstance(tags, tuple):
            raise TypeError(f"tags must be a tuple of str, got {tags!r}")
        for tag in tags:  # a loop, not all(<generator>): this runs for every verdict, twice
            if not isinstance(tag, str):
                raise TypeError(f"tags must be a tuple of str, got {tags!r}")

    @classmethod
    def checked(cls, verdict: object) -> Verdict:
        """A fresh, validated copy of what a hook returned; raises if it is not a valid Verdict.

        Building anew re-runs every rule above, so an object changed after construction or
        a subclass that overrides them fails here, in the plugin's name, not later.
        """
        if not isinstance(verdict, Verdict):
            raise TypeError(f"a hook returned {type(verdict).__name__}; return None or a Verdict")
        reply = Reply.checked(verdict.reply) if verdict.reply is not None else None
        return cls(verdict.action, reply, verdict.reason, verdict.score, verdict.tags)

    @property
    def is_refusal(self) -> bool:
        """True for reject and tempfail: the client is refused with :attr:`reply`."""
        return self.action in (Action.REJECT, Action.TEMPFAIL)

    @classmethod
    def cont(cls, *, score: float = 0.0, reason: str = "", tags: tuple[str, ...] = ()) -> Verdict:
        """Continue the chain, recording a score, a reason or tags."""
        return cls(Action.CONTINUE, None, reason, score, tags)

    @classmethod
    def accept(cls, reason: str = "") -> Verdict:
        """Stop this phase's chain here and let the phase succeed."""
        return cls(Action.ACCEPT, None, reason)

    @classmethod
    def reject(
        cls, text: str = "Message rejected", *, code: int = 550, enhanced: str | None = "5.7.1",
        reason: str = "",
    ) -> Verdict:
        """Refuse permanently (5xx)."""
        if not 500 <= code <= 599:
            raise ValueError("reject needs a 5xx code; use tempfail() for 4xx")
        return cls(Action.REJECT, Reply(code, enhanced, text), reason or text)

    @classmethod
    def tempfail(
        cls, text: str = "Try again later", *, code: int = 451, enhanced: str | None = "4.7.1",
        reason: str = "",
    ) -> Verdict:
        """Refuse temporarily (4xx); a well-behaved client retries."""
        if not 400 <= code <= 499:
            raise ValueError("tempfail needs a 4xx code; use reject() for 5xx")
        return cls(Action.TEMPFAIL, Reply(code, enhanced, text), reason or text)

    @classmethod
    def discard(cls, reason: str) -> Verdict:
        """Answer 250 and silently drop the message. The reason is logged; use sparingly."""
        return cls(Action.DISCARD, None, reason)

    @classmethod
    def quarantine(cls, reason: str) -> Verdict:
        """Answer 250 and keep the message in the quarantine store instead of delivering it."""
        return cls(Action.QUARANTINE, None, reason)

    def with_score(self, score: float) -> Verdict:
        return replace(self, score=score)
