"""Soak and chaos: mail for an hour under faults, and every message accounted for (issue 18).

    python bench/soak.py --quick                  # ~4 minutes, every kind of fault once
    python bench/soak.py --duration 3600          # the hour; --workers 2 for the supervisor
    python bench/soak.py --rate 10 --seed 7 --no-postfix --rcpt-mode relay

smtpproxy (``python -m smtpproxy run -c FILE``, a subprocess on free loopback ports) forwards
to a capturing sink (bench/soak_sink.py: records each message it commits, misbehaves on
command) and, for one domain, to a real private Postfix (tests/postfix_instance.py). A seeded
open-loop generator sends a mix at about half of the measured capacity and records, for every
message id (``X-Soak-Id``), what the client was told. Faults run on a seeded schedule: the
sink stopped, slow, stalled past the proxy's timeout, refusing; Postfix stopped; Redis (under
ratelimit and greylist) restarted; SIGHUP every reload interval with valid and invalid files;
one SIGTERM + restart of the proxy; with ``--workers 2`` a worker SIGKILLed. The soak plugins
(bench/soak_plugin.py) raise, time out, block, quarantine or discard the marked messages.

At the end each (message id, recipient) is matched against what the sink and Postfix hold and
what the quarantine holds. Output: ``bench/results/soak-<name>.md`` (one page), ``.png`` and
``.json``; the run exits 1 when anything is unexplained, the proxy log has a traceback, or
the proxy does not stop cleanly. See bench/README.md.
"""

# ruff: noqa: E501  (the report is long Markdown lines built from f-strings; wrapping them hides them)
from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import hashlib
import itertools
import json
import math
import os
import platform
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil
import yaml

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))

from bench.systems import Redis, free_port  # noqa: E402

RESULTS = BENCH / "results"
HOST = "127.0.0.1"
REPLY_TIMEOUT = 120.0  # longer than anything the proxy may take (plugin timeout + upstream)
PLUGIN_TIMEOUT = 2.0
UPSTREAM_DATA_TIMEOUT = 15.0
UPSTREAM_COMMAND_TIMEOUT = 10.0
SHUTDOWN_GRACE = 10.0
MAX_MESSAGE = 10 * 1024 * 1024
LINE = 78  # 76 characters + CRLF


# --------------------------------------------------------------------------- the record


@dataclass
class Msg:
    """One message attempt and what the client was told."""

    id: str
    kind: str
    sender: str
    rcpts: list[str]
    size: int
    sha: str  # SHA-256 of the body as sent (CRLF)
    sha_lf: str  # the same with LF line ends (Postfix's Maildir)
    action: str
    t0: float = 0.0
    t1: float = 0.0
    rcpt_codes: list[int | None] = field(default_factory=list)
    mail_code: int | None = None
    final_code: int | None = None
    final_text: str = ""
    outcome: str = "not-sent"  # 250, 4xx, 5xx, lost, aborted, not-sent
    latency: float | None = None
    error: str = ""


@dataclass
class Conn:
    """A client connection and what happened to it (greeting failures are the workers metric)."""

    t: float
    kind: str
    result: str = "ok"  # ok, refused, reset-before-greeting, no-greeting, greeting-NNN, cut
    error: str = ""


class SmtpError(Exception):
    pass


# --------------------------------------------------------------------------- message content


class Bodies:
    """Deterministic text: a 5.5 MB block of 78-byte lines, every tenth starting with a dot."""

    def __init__(self, rng: random.Random) -> None:
        words = ["mail", "proxy", "soak", "chaos", "relay", "queue", "spool", "fault", "ok",
                 "upstream", "postfix", "redis", "plugin", "message", "header", "body", "the"]
        lines = []
        for i in range(997):
            text = " ".join(rng.choice(words) for _ in range(20))
            text = (("." if i % 10 == 0 else "") + text + " " * 80)[:76]
            lines.append(text.encode("ascii") + b"\r\n")
        count = (6 * 1024 * 1024) // LINE
        self.block = b"".join(lines[i % len(lines)] for i in range(count))
        self.lines = count

    def body(self, rng: random.Random, size: int) -> bytes:
        n = max(1, size // LINE)
        start = rng.randrange(0, self.lines - n)
        return self.block[start * LINE:(start + n) * LINE]


def build(msg_id: str, sender: str, rcpts: list[str], action: str, body: bytes, *,
          extra: bytes = b"") -> bytes:
    head = (f"From: <{sender}>\r\nTo: {', '.join(f'<{r}>' for r in rcpts)}\r\n"
            f"Subject: soak {msg_id}\r\nDate: {time.strftime('%a, %d %b %Y %H:%M:%S +0000', time.gmtime())}\r\n"
            f"Message-ID: <{msg_id}@soak.test>\r\nX-Soak-Id: {msg_id}\r\nX-Soak-Plugin: {action}\r\n"
            ).encode("ascii")
    return head + extra + b"\r\n" + body


def stuffed(message: bytes) -> bytes:
    data = message.replace(b"\r\n.", b"\r\n..")
    if data.startswith(b"."):
        data = b"." + data
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    return data + b".\r\n"


# --------------------------------------------------------------------------- the client


class Client:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.pipelining = False

    @classmethod
    async def open(cls, port: int, conn: Conn) -> Client | None:
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, port), 10)
        except ConnectionRefusedError:
            conn.result = "refused"
            return None
        except (OSError, TimeoutError) as exc:
            conn.result, conn.error = "connect-failed", repr(exc)
            return None
        client = cls(reader, writer)
        try:
            code, text = await client.reply(30)
        except (asyncio.IncompleteReadError, ConnectionResetError) as exc:
            conn.result, conn.error = "reset-before-greeting", repr(exc)
            client.abort()
            return None
        except (OSError, TimeoutError, SmtpError) as exc:
            conn.result, conn.error = "no-greeting", repr(exc)
            client.abort()
            return None
        if code != 220:
            conn.result, conn.error = f"greeting-{code}", text
            client.abort()
            return None
        return client

    async def reply(self, seconds: float = REPLY_TIMEOUT) -> tuple[int, str]:
        lines = []
        while True:
            line = await asyncio.wait_for(self.reader.readuntil(b"\r\n"), seconds)
            if len(line) < 5 or not line[:3].isdigit():
                raise SmtpError(f"malformed reply {line[:80]!r}")
            lines.append(line[4:].decode("utf-8", "replace").strip())
            if line[3:4] != b"-":
                return int(line[:3]), lines[-1]

    async def command(self, line: str | bytes) -> tuple[int, str]:
        self.writer.write(line if isinstance(line, bytes) else line.encode("ascii") + b"\r\n")
        return await self.reply()

    async def ehlo(self) -> int:
        self.writer.write(b"EHLO client.soak\r\n")
        code, _ = await self.reply()
        # reply() keeps only the last line; PIPELINING is advertised by smtpproxy by default
        self.pipelining = code == 250
        return code

    def abort(self) -> None:
        self.writer.transport.abort()

    async def quit(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.command("QUIT"), 10)
        self.writer.close()


async def transaction(client: Client, msg: Msg, data: bytes, pipelined: bool, *,
                      abort_after: int | None = None, abort_rst: bool = True) -> bool:
    """Send one message; fills *msg*. False when the connection is no longer usable."""
    msg.t0 = time.time()
    msg.outcome = "lost"
    try:
        mail = f"MAIL FROM:<{msg.sender}> SIZE={len(data)}"
        rcpts = [f"RCPT TO:<{r}>" for r in msg.rcpts]
        def closing(code: int, text: str) -> bool:  # 421: the server closes the connection
            if code == 421:
                msg.final_code, msg.final_text, msg.outcome = code, text, "4xx"
            return code == 421

        if pipelined:
            client.writer.write(("\r\n".join([mail, *rcpts, "DATA"]) + "\r\n").encode("ascii"))
            msg.mail_code, msg.final_text = await client.reply()
            if closing(msg.mail_code, msg.final_text):
                return False
            for _ in rcpts:
                code, text = await client.reply()
                if closing(code, text):
                    return False
                msg.rcpt_codes.append(code)
            data_code, data_text = await client.reply()
        else:
            msg.mail_code, msg.final_text = await client.command(mail)
            if msg.mail_code != 250:
                msg.final_code = msg.mail_code
                msg.outcome = classify(msg.mail_code)
                return msg.mail_code != 421
            last_rcpt_text = ""
            for rcpt in rcpts:
                code, text = await client.command(rcpt)
                if closing(code, text):
                    return False
                msg.rcpt_codes.append(code)
                last_rcpt_text = text
            if 250 not in msg.rcpt_codes:
                msg.final_code, msg.final_text = msg.rcpt_codes[-1], last_rcpt_text
                msg.outcome = classify(msg.final_code or 500)
                code, text = await client.command("RSET")
                return code == 250
            data_code, data_text = await client.command("DATA")
        if data_code != 354:
            msg.final_code, msg.final_text = data_code, data_text
            msg.outcome = classify(data_code)
            return data_code != 421
        if abort_after is not None:
            client.writer.write(data[:abort_after])
            await client.writer.drain()
            msg.outcome = "aborted"
            if abort_rst:
                client.abort()
            else:
                client.writer.close()
            return False
        client.writer.write(data)
        await client.writer.drain()
        code, text = await client.reply()
        msg.final_code, msg.final_text = code, text
        msg.outcome = classify(code)
        msg.t1 = time.time()
        msg.latency = msg.t1 - msg.t0
        return code != 421
    except (OSError, asyncio.IncompleteReadError, TimeoutError, SmtpError) as exc:
        msg.error = repr(exc)[:200]
        msg.outcome = "lost"
        msg.t1 = time.time()
        return False


def classify(code: int) -> str:
    if code == 250:
        return "250"
    return "4xx" if 400 <= code < 500 else "5xx"


# --------------------------------------------------------------------------- processes


def run_id() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S")


class SinkProcess:
    def __init__(self, workdir: Path, port: int) -> None:
        self.workdir, self.port = workdir, port
        self.records = workdir / "sink.jsonl"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen([sys.executable, str(BENCH / "soak_sink.py"), str(self.port), str(self.records)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=(self.workdir / "sink.log").open("ab"), start_new_session=True)
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != b"ready":
            raise RuntimeError("the sink did not start: " + (self.workdir / "sink.log").read_text()[-500:])

    def mode(self, **mode: Any) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(mode).encode() + b"\n")
        self.proc.stdin.flush()
        self.proc.stdout.readline()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()  # it exits when its stdin closes
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
        self.proc = None


class ProxyProcess:
    """``python -m smtpproxy run -c FILE`` from this checkout, restarted as systemd would."""

    def __init__(self, workdir: Path, config: Path, port: int) -> None:
        self.workdir, self.config, self.port = workdir, config, port
        self.log = workdir / "proxy.log"
        self.proc: subprocess.Popen[bytes] | None = None
        path = workdir / "pythonpath"
        path.mkdir(exist_ok=True)
        link = path / "smtpproxy_plugins"
        if not link.exists():
            link.symlink_to(ROOT / "plugins")
        self.env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{path}")
        self.exit_codes: list[int] = []

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "smtpproxy", "run", "-c", str(self.config)],
                                         stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         cwd=self.workdir, env=self.env, start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"smtpproxy exited ({self.proc.returncode}): " + self.log.read_text()[-2000:])
            with contextlib.suppress(OSError), socket.create_connection((HOST, self.port), 2) as s:
                s.settimeout(5)
                if s.recv(64).startswith(b"220"):
                    s.sendall(b"QUIT\r\n")
                    return
            time.sleep(0.1)  # poll interval
        raise RuntimeError("smtpproxy did not greet within 60 s")

    def terminate(self, timeout: float = SHUTDOWN_GRACE + 20) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            code = self.proc.wait()
            code = -9 if code == 0 else code
        self.exit_codes.append(code)
        return code

    def tree(self) -> list[psutil.Process]:
        if self.proc is None or self.proc.poll() is not None:
            return []
        try:
            root = psutil.Process(self.proc.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []


class PostfixUpstream:
    """tests/postfix_instance.py's private Postfix: dest.test, users bob, alice, carol."""

    def __init__(self) -> None:
        from tests.postfix_instance import PostfixInstance, _make_root

        self.instance = PostfixInstance(root=_make_root(), port=free_port(), domain="dest.test",
                                        users=("bob", "alice", "carol"))

    @property
    def port(self) -> int:
        return self.instance.port

    def delivered(self) -> dict[tuple[str, str], list[str]]:
        """(soak id, recipient) -> body SHA-256s (LF line ends, as the Maildir stores them)."""
        found: dict[tuple[str, str], list[str]] = defaultdict(list)
        for user in self.instance.users:
            for sub in ("new", "cur"):
                folder = self.instance.mail_dir / user / sub
                if not folder.is_dir():
                    continue
                for path in folder.iterdir():
                    data = path.read_bytes()
                    split = data.find(b"\n\n")
                    head, body = data[:split], data[split + 2:]
                    match = re.search(rb"^X-Soak-Id:[ \t]*(\S+)", head, re.MULTILINE | re.IGNORECASE)
                    key = (match.group(1).decode() if match else f"?{path.name}", f"{user}@dest.test")
                    found[key].append(hashlib.sha256(body).hexdigest())
        return found


# --------------------------------------------------------------------------- configuration


def proxy_config(ports: dict[str, int], workdir: Path, args: argparse.Namespace, variant: str) -> dict[str, Any]:
    redis = f"redis://{HOST}:{ports['redis']}/0"
    delivery: dict[str, Any] = {
        "type": "smtp", "host": HOST, "port": ports["sink"], "tls": "none",
        "rcpt_mode": args.rcpt_mode, "connect_timeout": 5, "command_timeout": UPSTREAM_COMMAND_TIMEOUT,
        "data_timeout": UPSTREAM_DATA_TIMEOUT, "down_backoff": 2,
    }
    if "postfix" in ports:
        delivery["routes"] = [{"domains": ["dest.test"], "upstreams": [{"host": HOST, "port": ports["postfix"]}]}]
    return {
        "hostname": "proxy.soak",
        "listeners": [{"address": HOST, "port": ports["proxy"]}],
        "delivery": delivery,
        "relay": {"domains": ["sink.test", "dest.test"], "networks": []},
        "limits": {"max_sessions": 2000, "max_sessions_per_ip": 2000, "max_message_size": MAX_MESSAGE,
                   "shutdown_grace": SHUTDOWN_GRACE, "idle_timeout": 60},
        "quarantine": {"path": str(workdir / "quarantine")},
        "metrics": {"enabled": True, "address": HOST, "port": ports["metrics"]},
        "logging": {"level": "info"},
        "workers": args.workers,
        "event_loop": "asyncio",
        "plugins": [
            {"name": "ratelimit", "settings": {
                "backend": "redis", "redis_url": redis, "redis_failure": "open",
                "rules": [{"name": "conn-per-ip", "key": "client_ip", "what": "connections",
                           "limit": 10_000_000, "window": 60}]}},
            {"name": "greylist", "settings": {
                "backend": "redis", "redis_url": redis, "delay": 0,
                "skip_senders": ["*@fast.test"]}},
            {"name": "soak", "use": "bench.soak_plugin:SoakAsync", "timeout": PLUGIN_TIMEOUT,
             "settings": {"stats": str(workdir / "proxy-stats.jsonl"), "every": args.sample_every,
                          "sleep": PLUGIN_TIMEOUT + 3, "variant": variant}},
            {"name": "soak-blocking", "use": "bench.soak_plugin:SoakBlocking", "timeout": PLUGIN_TIMEOUT,
             "settings": {"block": PLUGIN_TIMEOUT + 3}},
        ],
    }


INVALID_CONFIGS = [
    ("yaml syntax", "listeners: [\n  - address: 127.0.0.1\n    port: {port}\n plugins: oops\n"),
    ("unknown plugin", None),
    ("bad plugin settings", None),
]


def invalid_config(kind: int, valid: dict[str, Any]) -> str:
    name, text = INVALID_CONFIGS[kind % len(INVALID_CONFIGS)]
    if text is not None:
        return text.format(port=valid["listeners"][0]["port"])
    broken = json.loads(json.dumps(valid))
    if name == "unknown plugin":
        broken["plugins"].append({"name": "no-such-plugin-soak"})
    else:
        broken["plugins"][1]["settings"]["delay"] = -5
    return yaml.safe_dump(broken, sort_keys=False)


# --------------------------------------------------------------------------- the load


class Load:
    def __init__(self, args: argparse.Namespace, port: int, postfix: bool) -> None:
        self.args = args
        self.port = port
        self.postfix = postfix
        self.rng = random.Random(args.seed)
        self.bodies = Bodies(random.Random(args.seed + 1))
        self.tag = f"s{args.seed}"
        self.seq = 0
        self.messages: list[Msg] = []
        self.conns: list[Conn] = []
        self.inflight: set[asyncio.Task[None]] = set()
        self.skipped = 0
        self.stop = False

    # -- what a message looks like ----------------------------------------------------------

    def _size(self, rng: random.Random) -> int:
        r = rng.random()
        if r < 0.80:
            return rng.randint(1024, 20 * 1024)
        if r < 0.97:
            return rng.randint(20 * 1024, 500 * 1024)
        return rng.randint(500 * 1024, 5 * 1024 * 1024)

    def _action(self, rng: random.Random, plugin_faults: bool) -> str:
        if not plugin_faults:
            return "none"
        r = rng.random()
        for action, p in (("raise", 0.02), ("sleep", 0.01), ("block", 0.01), ("raise-sync", 0.01),
                          ("quarantine", 0.02), ("discard", 0.02), ("reject", 0.01), ("tempfail", 0.01)):
            if r < p:
                return action
            r -= p
        return "none"

    def new_message(self, rng: random.Random, kind: str, plugin_faults: bool = True) -> tuple[Msg, bytes]:
        self.seq += 1
        msg_id = f"{self.tag}-{self.seq:07d}"
        grey = rng.random() < 0.1
        sender = f"grey{rng.randrange(8)}@grey.test" if grey else f"user{rng.randrange(50)}@fast.test"
        count = rng.choices([1, 2, 3, 4, 5], [50, 20, 15, 10, 5])[0]
        rcpts: list[str] = []
        if self.postfix and rng.random() < 0.15:
            for _ in range(count):
                user = "nobody" if rng.random() < 0.1 else rng.choice(["bob", "alice", "carol"])
                rcpts.append(f"{user}@dest.test")
        else:
            for _ in range(count):
                n = rng.randrange(10 if grey else 1000)
                rcpts.append(f"unknown{n}@sink.test" if rng.random() < 0.04 else f"r{n}@sink.test")
        rcpts = list(dict.fromkeys(rcpts))
        action = self._action(rng, plugin_faults)
        body = self.bodies.body(rng, self._size(rng))
        message = build(msg_id, sender, rcpts, action, body)
        msg = Msg(msg_id, kind, sender, rcpts, len(message), hashlib.sha256(body).hexdigest(),
                  hashlib.sha256(body.replace(b"\r\n", b"\n")).hexdigest(), action)
        self.messages.append(msg)
        return msg, stuffed(message)

    # -- jobs ---------------------------------------------------------------------------------

    JOBS = (("new", 0.35), ("reuse", 0.30), ("pipelined", 0.15), ("abort", 0.07), ("invalid", 0.08),
            ("garbage", 0.05))
    MESSAGES_PER_JOB = 0.35 * 1 + 0.30 * 3.5 + 0.15 * 1.5 + 0.07 * 1 + 0.08 * 1 + 0.05 * 0

    async def job(self, kind: str, seed: int) -> None:
        rng = random.Random(seed)
        conn = Conn(time.time(), kind)
        self.conns.append(conn)
        client = await Client.open(self.port, conn)
        if client is None:
            if kind != "garbage":  # the message it would have sent was never started
                self.new_message(rng, kind)
            return
        try:
            await self._job(client, kind, rng, conn)
        except (OSError, asyncio.IncompleteReadError, TimeoutError, SmtpError) as exc:
            conn.result, conn.error = "cut", repr(exc)[:200]
        finally:
            if not client.writer.transport.is_closing():
                client.abort()

    async def _job(self, client: Client, kind: str, rng: random.Random, conn: Conn) -> None:
        if await client.ehlo() != 250:
            conn.result = "ehlo-refused"
            client.abort()
            return
        if kind == "garbage":
            for line in (b"HELO\r\n", b"FOO bar\r\n", b"MAIL FROM:bad-address\r\n",
                         b"RCPT TO:<r1@sink.test>\r\n", b"MAIL FROM:<" + b"x" * 1500 + b"@fast.test>\r\n",
                         b"\x00\xff\xfe binary\r\n", b"DATA\r\n"):
                code, _ = await client.command(line)
                if code < 400:
                    conn.result = f"garbage-accepted-{code}"
            await client.quit()
            return
        if kind == "invalid":
            self.seq += 1
            msg_id = f"{self.tag}-{self.seq:07d}"
            rcpts = [f"r{rng.randrange(1000)}@sink.test"]
            sender = f"user{rng.randrange(50)}@fast.test"
            if rng.random() < 0.5:  # a bare LF inside the message: refused (bare_newlines: reject)
                body = self.bodies.body(rng, 4096)
                message = build(msg_id, sender, rcpts, "none", body[:1000] + b"bare\nLF\r\n" + body[1000:])
                msg = Msg(msg_id, "bare-lf", sender, rcpts, len(message), "", "", "none")
                self.messages.append(msg)
                await transaction(client, msg, stuffed(message), False)
            else:  # announces more than max_message_size
                msg = Msg(msg_id, "too-big", sender, rcpts, MAX_MESSAGE * 2, "", "", "none")
                self.messages.append(msg)
                msg.t0 = time.time()
                msg.mail_code, msg.final_text = await client.command(
                    f"MAIL FROM:<{sender}> SIZE={MAX_MESSAGE * 2}")
                msg.final_code, msg.outcome = msg.mail_code, classify(msg.mail_code)
            await client.quit()
            return
        count = {"new": 1, "reuse": rng.randint(2, 5), "pipelined": rng.randint(1, 2), "abort": 1}[kind]
        for _ in range(count):
            msg, data = self.new_message(rng, kind)
            abort_after = rng.randrange(1, len(data) - 3) if kind == "abort" else None
            usable = await transaction(client, msg, data, kind == "pipelined",
                                       abort_after=abort_after, abort_rst=rng.random() < 0.5)
            if not usable:
                if msg.outcome == "lost":
                    conn.result, conn.error = "cut", msg.error
                client.abort()
                return
        if rng.random() < 0.1:
            client.abort()  # gone without QUIT
        else:
            await client.quit()

    def spawn(self, kind: str) -> bool:
        if len(self.inflight) >= self.args.max_inflight:
            self.skipped += 1
            return False
        task = asyncio.ensure_future(self.job(kind, self.rng.randrange(1 << 30)))
        self.inflight.add(task)
        task.add_done_callback(self.inflight.discard)
        return True

    async def open_loop(self, rate: float, until: float) -> None:
        """Poisson arrivals of jobs, *rate* messages per second on average."""
        job_rate = rate / self.MESSAGES_PER_JOB
        kinds = [k for k, _ in self.JOBS]
        weights = [w for _, w in self.JOBS]
        next_at = time.monotonic()
        while not self.stop and time.monotonic() < until:
            next_at += self.rng.expovariate(job_rate)
            delay = next_at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            self.spawn(self.rng.choices(kinds, weights)[0])

    async def capacity(self, seconds: float, concurrency: int = 6) -> float:
        """Closed loop, no faults, reused sessions: messages per second the proxy sustains."""
        done = 0
        until = time.monotonic() + seconds

        async def loop(seed: int) -> None:
            nonlocal done
            rng = random.Random(seed)
            while time.monotonic() < until:
                conn = Conn(time.time(), "capacity")
                self.conns.append(conn)
                client = await Client.open(self.port, conn)
                if client is None or await client.ehlo() != 250:
                    return
                for _ in range(20):
                    if time.monotonic() >= until:
                        break
                    msg, data = self.new_message(rng, "capacity", plugin_faults=False)
                    if not await transaction(client, msg, data, False):
                        return
                    done += msg.outcome in ("250", "4xx", "5xx")
                await client.quit()

        started = time.monotonic()
        await asyncio.gather(*(loop(self.rng.randrange(1 << 30)) for _ in range(concurrency)))
        return done / (time.monotonic() - started)


# --------------------------------------------------------------------------- faults


@dataclass
class Fault:
    at: float  # seconds from the start of the load
    kind: str
    duration: float = 0.0
    params: dict[str, Any] = field(default_factory=dict)
    started: float | None = None  # wall clock
    ended: float | None = None
    note: str = ""


def fault_plan(rng: random.Random, duration: float, *, quick: bool, workers: int, postfix: bool,
               reload_every: float) -> list[Fault]:
    warm = min(60.0, duration * 0.1)
    tail = max(20.0, duration * 0.08)
    plan: list[Fault] = []
    t, n = reload_every, 0
    while t < duration - tail:
        plan.append(Fault(t, "reload", params={"valid": n % 2 == 0, "n": n}))
        t += reload_every
        n += 1
    reps = 1 if quick else 3
    k = 0.5 if quick else 1.0  # shorter faults in a few minutes
    sink = []
    for _ in range(reps):
        sink += [("sink-stop", k * rng.uniform(8, 15), {}),
                 ("sink-slow", k * rng.uniform(15, 30), {"delay": rng.uniform(0.5, 2)}),
                 ("sink-refuse-greet", k * rng.uniform(10, 20), {}),
                 ("sink-refuse-data", k * rng.uniform(10, 20), {})]
    sink += [("sink-stall", k * 12.0, {"delay": UPSTREAM_DATA_TIMEOUT + 5})] * (1 if quick else 2)
    sink += [("sink-refuse-mail", k * rng.uniform(10, 20), {})] * (1 if quick else 2)
    rng.shuffle(sink)
    other: list[tuple[str, float, dict[str, Any]]] = [("redis-restart", k * rng.uniform(5, 10), {})] * (1 if quick else 4)
    if postfix:
        other += [("postfix-stop", k * rng.uniform(10, 20), {})] * (1 if quick else 3)
    if workers > 1:
        other += [("worker-kill", 0.0, {})] * (2 if quick else 4)
    rng.shuffle(other)
    for line in (sink, other):
        span = (duration - tail - warm) / len(line)
        for i, (kind, length, params) in enumerate(line):
            start = warm + i * span + rng.uniform(0, max(0.0, span - length - 5))
            plan.append(Fault(start, kind, length, dict(params)))
    restart_at = warm + (duration - tail - warm) * rng.uniform(0.45, 0.6)
    plan.append(Fault(restart_at, "proxy-restart"))
    return sorted(plan, key=lambda f: f.at)


# --------------------------------------------------------------------------- the run


class Soak:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.workdir = Path(tempfile.mkdtemp(prefix="soak-", dir=args.workdir))
        self.ports: dict[str, int] = {"proxy": free_port(), "sink": free_port(), "metrics": free_port()}
        while self.ports["metrics"] + 1 in self.ports.values():
            self.ports["metrics"] = free_port()
        self.redis = Redis(self.workdir)
        self.sink = SinkProcess(self.workdir, self.ports["sink"])
        self.postfix: PostfixUpstream | None = None
        self.config_path = self.workdir / "smtpproxy.yaml"
        self.proxy = ProxyProcess(self.workdir, self.config_path, self.ports["proxy"])
        self.faults: list[Fault] = []
        self.samples: list[dict[str, Any]] = []
        self.proxy_starts: list[float] = []
        self.variant = "a"
        self.started = 0.0
        self.notes: list[str] = []
        self.proxy_lock = threading.Lock()  # a reload, the restart and a worker kill, one at a time

    def write_config(self, valid: bool = True, kind: int = 0) -> None:
        config = proxy_config(self.ports, self.workdir, self.args, self.variant)
        text = yaml.safe_dump(config, sort_keys=False) if valid else invalid_config(kind, config)
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(self.config_path)

    def setup(self) -> None:
        self.redis.start()
        self.ports["redis"] = self.redis.port
        self.sink.start()
        if self.args.postfix:
            if os.geteuid() != 0:
                self.notes.append("Postfix left out: starting it needs root")
            else:
                self.postfix = PostfixUpstream()
                self.postfix.instance.start()
                self.ports["postfix"] = self.postfix.port
        self.write_config()
        self.proxy.start()
        self.proxy_starts.append(time.time())

    def teardown(self) -> None:
        with contextlib.suppress(Exception):
            if self.proxy.proc is not None and self.proxy.proc.poll() is None:
                self.proxy.terminate()
        self.sink.stop()
        self.redis.stop()
        if self.postfix is not None:
            with contextlib.suppress(Exception):
                self.postfix.instance.stop()

    # -- faults ---------------------------------------------------------------------------

    def log_since(self, offset: int) -> str:
        with self.proxy.log.open("rb") as fh:
            fh.seek(offset)
            return fh.read().decode("utf-8", "replace")

    def apply(self, fault: Fault) -> None:
        """Start a fault (blocking; run in a thread). Faults with a duration end in end()."""
        if fault.kind in ("reload", "proxy-restart", "worker-kill"):
            with self.proxy_lock:
                self._apply(fault)
        else:
            self._apply(fault)

    def _apply(self, fault: Fault) -> None:
        kind = fault.kind
        if kind == "reload":
            offset = self.proxy.log.stat().st_size
            if fault.params["valid"]:
                self.variant = "b" if self.variant == "a" else "a"
                self.write_config()
            else:
                self.write_config(valid=False, kind=fault.params["n"] // 2)
            assert self.proxy.proc is not None
            self.proxy.proc.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 20
            results: list[str] = []
            while len(results) < self.args.workers and time.monotonic() < deadline:
                time.sleep(0.05)  # poll the log for every worker's reload line
                results = re.findall(r"event=reload .*?result=(\w+)", self.log_since(offset))
            fault.note = ",".join(results) or "no reload line"
            fault.params["results"] = results
            self.write_config()  # a restart must find a valid file
        elif kind == "sink-stop":
            self.sink.kill()
        elif kind == "sink-slow":
            self.sink.mode(mode="slow", delay=fault.params["delay"])
        elif kind == "sink-stall":
            self.sink.mode(mode="stall", delay=fault.params["delay"])
        elif kind.startswith("sink-refuse"):
            self.sink.mode(mode=kind[len("sink-"):])
        elif kind == "redis-restart":
            self.redis.stop()
        elif kind == "postfix-stop":
            assert self.postfix is not None
            self.postfix.instance.stop()
        elif kind == "proxy-restart":
            code = self.proxy.terminate()
            fault.note = f"exit code {code}"
            time.sleep(1.0)  # systemd's RestartSec=1
            self.proxy.start()
            self.proxy_starts.append(time.time())
        elif kind == "worker-kill":
            tree = self.proxy.tree()
            workers = [p for p in tree if p.pid != self.proxy.proc.pid] if self.proxy.proc else []
            if workers:
                victim = random.Random(fault.at).choice(workers)
                os.kill(victim.pid, signal.SIGKILL)
                fault.note = f"SIGKILL pid {victim.pid}"

    def end(self, fault: Fault) -> None:
        kind = fault.kind
        if kind == "sink-stop":
            self.sink.start()
        elif kind.startswith("sink-"):
            self.sink.mode(mode="normal")
        elif kind == "redis-restart":
            self._redis_on_port(self.ports["redis"])
        elif kind == "postfix-stop":
            assert self.postfix is not None
            self.postfix.instance.start()

    def _redis_on_port(self, port: int) -> None:
        binary = shutil.which("redis-server") or "redis-server"
        log = (self.workdir / "redis.log").open("ab")
        self.redis.proc = subprocess.Popen(
            [binary, "--port", str(port), "--bind", HOST, "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir)], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.redis.port = port
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection((HOST, port), 2) as s:
                s.sendall(b"PING\r\n")
                if s.recv(64).startswith(b"+PONG"):
                    return
            time.sleep(0.05)  # poll interval
        raise RuntimeError("redis did not come back")

    async def run_faults(self, plan: list[Fault]) -> None:
        pending: list[asyncio.Task[None]] = []

        async def one(fault: Fault) -> None:
            delay = self.started + fault.at - time.time()
            if delay > 0:
                await asyncio.sleep(delay)
            fault.started = time.time()
            await asyncio.to_thread(self.apply, fault)
            if fault.duration:
                await asyncio.sleep(fault.duration)
                await asyncio.to_thread(self.end, fault)
            fault.ended = time.time()
            print(f"  [{fault.started - self.started:7.1f}s] {fault.kind} {fault.note}".rstrip(), flush=True)

        # faults on one resource never overlap (the plan spaces them); run them as they come
        for fault in plan:
            pending.append(asyncio.ensure_future(one(fault)))
        await asyncio.gather(*pending)
        self.faults = plan

    # -- resources ------------------------------------------------------------------------

    def _metrics_sessions(self) -> int | None:
        total = None
        for index in range(self.args.workers):
            port = self.ports["metrics"] + (index if self.args.workers > 1 else 0)
            try:
                with urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=2) as response:
                    text = response.read().decode()
            except OSError:
                continue
            match = re.search(r"^smtpproxy_active_sessions ([0-9.e+]+)$", text, re.MULTILINE)
            if match:
                total = (total or 0) + int(float(match.group(1)))
        return total

    def _stats(self, pids: set[int]) -> tuple[int | None, int | None]:
        path = self.workdir / "proxy-stats.jsonl"
        if not path.exists():
            return None, None
        latest: dict[int, dict[str, Any]] = {}
        with path.open("rb") as fh:
            fh.seek(max(0, path.stat().st_size - 20000))
            for raw in fh.read().splitlines()[1:]:
                with contextlib.suppress(ValueError):
                    line = json.loads(raw)
                    latest[line["pid"]] = line
        live = [v for pid, v in latest.items() if pid in pids and time.time() - v["t"] < 3 * self.args.sample_every]
        if not live:
            return None, None
        return sum(v["tasks"] for v in live), sum(v["sessions"] or 0 for v in live)

    def sample(self) -> dict[str, Any]:
        tree = self.proxy.tree()
        rss = fds = threads = 0
        for proc in tree:
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                rss += proc.memory_info().rss
                fds += proc.num_fds()
                threads += proc.num_threads()
        tasks, objects = self._stats({p.pid for p in tree})
        return {"t": time.time(), "rss": rss, "fds": fds, "threads": threads, "procs": len(tree),
                "sessions": self._metrics_sessions(), "tasks": tasks, "session_objects": objects,
                "pid": self.proxy.proc.pid if self.proxy.proc else None}

    async def run_sampler(self) -> None:
        while True:
            self.samples.append(await asyncio.to_thread(self.sample))
            await asyncio.sleep(self.args.sample_every)

    # -- the whole run --------------------------------------------------------------------

    async def main(self) -> Load:
        args = self.args
        load = Load(args, self.ports["proxy"], self.postfix is not None)
        sampler = asyncio.ensure_future(self.run_sampler())
        if args.rate:
            self.capacity, rate = None, args.rate
        else:
            print(f"measuring capacity for {args.capacity_seconds:g} s...", flush=True)
            self.capacity = await load.capacity(args.capacity_seconds)
            rate = min(args.max_rate, self.capacity / 2)
        self.rate = rate
        print(f"capacity {self.capacity or 0:.1f} msg/s -> load {rate:.1f} msg/s for {args.duration:g} s", flush=True)
        plan = fault_plan(random.Random(args.seed + 2), args.duration, quick=args.quick, workers=args.workers,
                          postfix=self.postfix is not None, reload_every=args.reload_every)
        self.faults = plan
        self.started = time.time()
        self.load_started = self.started
        faults = asyncio.ensure_future(self.run_faults(plan))
        await load.open_loop(rate, time.monotonic() + args.duration)
        self.load_ended = time.time()
        await faults
        print(f"load done; waiting for {len(load.inflight)} clients", flush=True)
        if load.inflight:
            await asyncio.wait(set(load.inflight), timeout=REPLY_TIMEOUT + 60)
        sampler.cancel()
        return load


# --------------------------------------------------------------------------- accounting


def read_sink(path: Path) -> tuple[dict[tuple[str, str], list[dict[str, Any]]], set[str], int]:
    at: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    replied: set[str] = set()
    records = 0
    if path.exists():
        for raw in path.read_text().splitlines():
            item = json.loads(raw)
            if "replied" in item:
                replied.add(item["replied"])
                continue
            records += 1
            for rcpt in item["rcpts"]:
                at[(item["id"] or "?", rcpt)].append(item)
    return at, replied, records


def quarantined(path: Path) -> Counter[str]:
    found: Counter[str] = Counter()
    if path.is_dir():
        for eml in path.glob("*.eml"):
            match = re.search(rb"^X-Soak-Id:[ \t]*(\S+)", eml.read_bytes()[:65536], re.MULTILINE | re.IGNORECASE)
            if match:
                found[match.group(1).decode()] += 1
    return found


def account(soak: Soak, load: Load) -> dict[str, Any]:
    sink_at, replied, sink_records = read_sink(soak.sink.records)
    postfix_at = soak.postfix.delivered() if soak.postfix else {}
    quarantine = quarantined(soak.workdir / "quarantine")
    stalls = [f for f in soak.faults if f.kind == "postfix-stop" and f.started]
    restarts = [f for f in soak.faults if f.kind == "proxy-restart" and f.started]
    explained: Counter[str] = Counter()
    unexplained: list[dict[str, Any]] = []
    ok: Counter[str] = Counter()
    mismatch: list[dict[str, Any]] = []
    seen: set[tuple[str, str]] = set()
    known = {m.id for m in load.messages}

    def bad(msg: Msg, rcpt: str, why: str) -> None:
        unexplained.append({"id": msg.id, "rcpt": rcpt, "why": why, "outcome": msg.outcome,
                            "code": msg.final_code, "text": msg.final_text, "action": msg.action,
                            "kind": msg.kind, "error": msg.error})

    for msg in load.messages:
        if msg.outcome == "250" and msg.action in ("raise", "sleep", "block", "raise-sync", "reject", "tempfail"):
            bad(msg, "*", f"client told 250 although the plugin said {msg.action}")
        for i, rcpt in enumerate(msg.rcpts):
            key = (msg.id, rcpt)
            seen.add(key)
            copies = sink_at.get(key, []) + [{"sha": s, "postfix": True} for s in postfix_at.get(key, [])]
            n = len(copies)
            for c in copies:
                expect = msg.sha_lf if c.get("postfix") else msg.sha
                if c["sha"] != expect:
                    bad(msg, rcpt, "body at the upstream differs from what the client sent")
            rcpt_ok = i < len(msg.rcpt_codes) and msg.rcpt_codes[i] == 250
            if msg.outcome == "250" and rcpt_ok:
                if msg.action in ("quarantine", "discard"):
                    want_q = 1 if msg.action == "quarantine" else 0
                    if n == 0 and quarantine.get(msg.id, 0) == want_q:
                        ok[f"250 and {msg.action.rstrip('e')}ed as the plugin said"] += 1
                    else:
                        bad(msg, rcpt, f"{msg.action}: {n} at the upstream, {quarantine.get(msg.id, 0)} quarantined")
                elif n == 1:
                    ok["250 and at the upstream exactly once"] += 1
                elif n == 0:
                    bad(msg, rcpt, "LOST: client told 250, not at the upstream")
                else:
                    bad(msg, rcpt, f"client told 250, at the upstream {n} times")
                continue
            if n == 0:
                ok[f"{msg.outcome if rcpt_ok or msg.outcome != '250' else 'rcpt refused'}: not at the upstream"] += 1
                continue
            # At the upstream although the client was not told 250 for this recipient.
            if n > 1:
                bad(msg, rcpt, f"not accepted, yet at the upstream {n} times")
                continue
            c = copies[0]
            if msg.outcome == "aborted":
                bad(msg, rcpt, "client disconnected mid-DATA, yet the message is at the upstream")
            elif not rcpt_ok and msg.outcome == "250":
                bad(msg, rcpt, f"recipient refused ({msg.rcpt_codes[i] if i < len(msg.rcpt_codes) else None}), yet delivered")
            elif msg.outcome == "lost":
                explained["lost: the connection broke before the client heard the final reply; "
                          "the upstream had it (a retry would duplicate it)"] += 1
            elif (msg.final_code == 421 and "shutting down" in msg.final_text
                  and any(f.started and f.started <= msg.t1 <= f.started + 3 * SHUTDOWN_GRACE + 5 for f in restarts)
                  and (c.get("postfix") or c["t"] <= msg.t1)):
                explained["SIGTERM: the shutdown grace ran out while the proxy waited for the upstream's "
                          "end-of-data reply; the upstream had committed the message before the client "
                          "was told 421"] += 1
            elif not c.get("postfix") and c.get("delay", 0) >= UPSTREAM_DATA_TIMEOUT:
                explained["RFC 1047: the sink committed it but answered after the proxy's "
                          "upstream data_timeout; the client was told 4xx"] += 1
            elif not c.get("postfix") and c["id"] not in replied:
                explained["the sink was killed after committing it and before its 250 went out; "
                          "the client was told 4xx"] += 1
            elif c.get("postfix") and any(f.started and abs(msg.t1 - f.started) < UPSTREAM_DATA_TIMEOUT + 5 for f in stalls):
                explained["Postfix was stopped after queueing it and before its 250 reached the proxy"] += 1
            else:
                bad(msg, rcpt, f"client told {msg.final_code}, yet at the upstream")
    strays = [k for k in list(sink_at) + list(postfix_at) if k not in seen]
    for msg_id, rcpt in strays:
        unexplained.append({"id": msg_id, "rcpt": rcpt, "why": "at the upstream but never sent by the client"
                            if msg_id not in known else "at the upstream for a recipient never given"})
    outcomes = Counter(m.outcome for m in load.messages)
    return {"sink_records": sink_records, "postfix_files": sum(len(v) for v in postfix_at.values()),
            "quarantined": sum(quarantine.values()), "ok": dict(ok), "explained": dict(explained),
            "unexplained": unexplained, "outcomes": dict(outcomes), "mismatch": mismatch,
            "recipients": sum(len(m.rcpts) for m in load.messages)}


# --------------------------------------------------------------------------- figures


def slope_per_hour(points: list[tuple[float, float]]) -> float | None:
    if len(points) < 5:
        return None
    xs = [p[0] for p in points]
    ys = [p[1] for p in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return None if den == 0 else sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den * 3600


def segments(soak: Soak) -> list[dict[str, Any]]:
    """Resource slopes per proxy lifetime (a restart starts a new one), after its warm-up."""
    out = []
    starts = [*soak.proxy_starts, float("inf")]
    # not while the proxy is stopping or starting, nor after the load (the run is winding down)
    quiet = [(f.started or 0, f.ended or 0) for f in soak.faults if f.kind == "proxy-restart"]
    for begin, end in itertools.pairwise(starts):
        span = [s for s in soak.samples if begin <= s["t"] < min(end, soak.load_ended) and s["rss"]
                and not any(a <= s["t"] <= b for a, b in quiet)]
        if len(span) < 5:
            continue
        warm = begin + min(120.0, (span[-1]["t"] - begin) * 0.25)
        steady = [s for s in span if s["t"] >= warm]
        def series(key: str, scale: float = 1.0, steady: list[dict[str, Any]] = steady) -> list[tuple[float, float]]:
            return [(s["t"], s[key] / scale) for s in steady if s.get(key) is not None]
        out.append({
            "from_s": round(begin - soak.started, 1), "warm_s": round(warm - begin, 1),
            "seconds": round(steady[-1]["t"] - steady[0]["t"], 1) if steady else 0,
            "rss_mib_first": round(steady[0]["rss"] / 2**20, 1) if steady else None,
            "rss_mib_last": round(steady[-1]["rss"] / 2**20, 1) if steady else None,
            "rss_mib_max": round(max(s["rss"] for s in steady) / 2**20, 1) if steady else None,
            "rss_mib_per_h": _round(slope_per_hour(series("rss", 2**20))),
            "fds_per_h": _round(slope_per_hour(series("fds"))),
            "fds_max": max((s["fds"] for s in steady), default=None),
            "tasks_per_h": _round(slope_per_hour(series("tasks"))),
            "tasks_max": max((s["tasks"] for s in steady if s["tasks"] is not None), default=None),
            "threads_per_h": _round(slope_per_hour(series("threads"))),
            "session_objects_per_h": _round(slope_per_hour(series("session_objects"))),
        })
    return out


def _round(value: float | None, digits: int = 2) -> float | None:
    return None if value is None else round(value, digits)


def percentile(values: list[float], pct: float) -> float:
    """Nearest rank."""
    values = sorted(values)
    return values[max(1, math.ceil(pct / 100 * len(values))) - 1]


def plot(soak: Soak, load: Load, path: Path, bin_s: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t0 = soak.started
    end = max(soak.load_ended, *(s["t"] for s in soak.samples)) if soak.samples else soak.load_ended
    bins = int((end - t0) // bin_s) + 1
    counts: dict[str, list[int]] = {k: [0] * bins for k in ("250", "4xx", "5xx", "lost")}
    lats: list[list[float]] = [[] for _ in range(bins)]
    for m in load.messages:
        if m.t1 and m.t1 >= t0 and m.outcome in counts:
            b = int((m.t1 - t0) // bin_s)
            if b < bins:
                counts[m.outcome][b] += 1
                if m.outcome == "250" and m.latency is not None:
                    lats[b].append(m.latency * 1000)
    xs = [(i + 0.5) * bin_s / 60 for i in range(bins)]
    fig, axes = plt.subplots(4, 1, figsize=(12, 11), sharex=True)
    ax = axes[0]
    for key, color in (("250", "tab:green"), ("4xx", "tab:orange"), ("5xx", "tab:red"), ("lost", "black")):
        ax.plot(xs, [c / bin_s for c in counts[key]], label=key, color=color, lw=1)
    ax.set_ylabel("messages/s")
    ax.legend(loc="upper right", fontsize=8, ncol=4)
    ax.set_title(f"smtpproxy soak: {soak.args.name} ({soak.args.duration / 60:.0f} min, seed {soak.args.seed}, "
                 f"{soak.rate:.1f} msg/s offered, workers {soak.args.workers})")
    ax = axes[1]
    ax.plot(xs, [percentile(v, 50) if v else float("nan") for v in lats], label="p50", lw=1)
    ax.plot(xs, [percentile(v, 99) if v else float("nan") for v in lats], label="p99", lw=1)
    ax.set_yscale("log")
    ax.set_ylabel("latency ms (250s)")
    ax.legend(loc="upper right", fontsize=8)
    st = [(s["t"] - t0) / 60 for s in soak.samples]
    ax = axes[2]
    ax.plot(st, [s["rss"] / 2**20 if s["rss"] else float("nan") for s in soak.samples], color="tab:purple", lw=1)
    ax.set_ylabel("RSS MiB (proxy tree)")
    ax = axes[3]
    ax.plot(st, [s["fds"] if s["rss"] else float("nan") for s in soak.samples], label="open fds", lw=1)
    ax.plot(st, [s["tasks"] if s["tasks"] is not None else float("nan") for s in soak.samples],
            label="asyncio tasks", lw=1)
    ax.plot(st, [s["sessions"] if s["sessions"] is not None else float("nan") for s in soak.samples],
            label="sessions", lw=1)
    ax.set_ylabel("count")
    ax.set_xlabel("minutes")
    ax.legend(loc="upper right", fontsize=8, ncol=3)
    colors = {"sink": "tab:red", "postfix": "tab:brown", "redis": "tab:blue", "proxy": "black",
              "worker": "black", "reload": "tab:gray"}
    for f in soak.faults:
        if f.started is None:
            continue
        color = colors.get(f.kind.split("-")[0], "gray")
        a, b = (f.started - t0) / 60, ((f.ended or f.started) - t0) / 60
        for ax in axes:
            if f.kind == "reload":
                ax.axvline(a, color=color, lw=0.5, ls=":" if f.params.get("valid") else "--", alpha=0.6)
            elif b - a > 0.05:
                ax.axvspan(a, b, color=color, alpha=0.12)
            else:
                ax.axvline(a, color=color, lw=1.2)
        axes[0].annotate(f.kind.replace("sink-", "s:").replace("reload", ""), (a, 1.0),
                         xycoords=("data", "axes fraction"), fontsize=6, rotation=90, va="top", color=color)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def report(soak: Soak, load: Load, acc: dict[str, Any], out: Path, wall: float) -> tuple[str, bool]:
    args = soak.args
    log = soak.proxy.log.read_text(errors="replace")
    tracebacks = log.count("Traceback (most recent call last)")
    errors = Counter(re.findall(r"level=(?:error|critical) .*?event=(\w+)|event=(\w+) .*?level=error", log))
    error_events = Counter(a or b for a, b in errors.elements())
    lat = sorted(m.latency * 1000 for m in load.messages if m.outcome == "250" and m.latency is not None)
    segs = segments(soak)
    conns = Counter(c.result for c in load.conns)
    kills = [f for f in soak.faults if f.kind == "worker-kill" and f.started]
    restart = next((f for f in soak.faults if f.kind == "proxy-restart" and f.started), None)
    kill_windows: Counter[str] = Counter()
    for c in load.conns:  # (not while the whole proxy restarts: those are refused, and said above)
        if restart and (restart.started or 0) - 1 <= c.t <= (restart.ended or 0) + 1:
            continue
        if any(k.started is not None and k.started - 1 <= c.t <= k.started + 10 for k in kills):
            kill_windows[c.result] += 1
    reloads = [f for f in soak.faults if f.kind == "reload" and f.started]
    reload_ok = sum(1 for f in reloads if f.params.get("valid") and f.params.get("results") and
                    all(r == "ok" for r in f.params["results"]))
    reload_refused = sum(1 for f in reloads if not f.params.get("valid") and f.params.get("results") and
                         all(r == "failed" for r in f.params["results"]))
    exit_codes = soak.proxy.exit_codes
    main_seg = max(segs, key=lambda s: s["seconds"]) if segs else {}
    judged = main_seg.get("seconds", 0) >= args.judge_slopes_after
    rss_flat = not judged or (main_seg.get("rss_mib_per_h") is not None
                              and abs(main_seg["rss_mib_per_h"]) < args.max_rss_slope)
    fds_flat = not judged or (main_seg.get("fds_per_h") is not None
                              and abs(main_seg["fds_per_h"]) < args.max_fd_slope)
    unexplained = acc["unexplained"]
    passed = (not unexplained and tracebacks == 0 and all(c == 0 for c in exit_codes) and rss_flat and fds_flat)
    dup_total = sum(acc["explained"].values())
    n_msgs = len(load.messages)
    lines = [
        f"# Soak: {args.name}",
        "",
        f"**{'PASS' if passed else 'FAIL'}**: {n_msgs:,} messages to {acc['recipients']:,} recipients over "
        f"{args.duration / 60:.0f} min of load ({wall / 60:.0f} min in all), "
        f"{len(unexplained)} unexplained, {dup_total} explained duplicates, {tracebacks} tracebacks in the proxy log, "
        f"proxy exit codes {exit_codes}.",
        "",
        f"`{' '.join(['python', 'bench/soak.py', *sys.argv[1:]])}` on {dt.datetime.fromtimestamp(soak.started, dt.UTC):%Y-%m-%d %H:%M} UTC, "
        f"seed {args.seed}; Python {platform.python_version()}, {os.cpu_count()} cores shared with other work; "
        f"`workers: {args.workers}`, `rcpt_mode: {args.rcpt_mode}`, asyncio loop. "
        f"Capacity (closed loop, 6 reused sessions, no faults): "
        f"{f'{soak.capacity:.1f} msg/s' if soak.capacity else 'not measured (--rate)'}; offered load {soak.rate:.1f} msg/s "
        f"(Poisson arrivals; new connections, reused sessions of 2-5, pipelined, mid-DATA disconnects, invalid input; "
        f"1 KB-5 MB, 1-5 recipients). Upstreams: the capturing sink"
        + (", and Postfix for dest.test" if soak.postfix else " (Postfix left out)") + ".",
        "",
        "| client was told | messages |",
        "|---|--:|",
        *[f"| {k} | {v:,} |" for k, v in sorted(acc["outcomes"].items())],
        "",
        f"Latency of the 250s (MAIL to final reply): p50 {percentile(lat, 50):.0f} ms, p99 {percentile(lat, 99):.0f} ms"
        if lat else "No 250s.",
        "",
        "**Accounting** per (message id, recipient), against the sink's commits "
        f"({acc['sink_records']:,} messages), Postfix's Maildirs ({acc['postfix_files']:,} files) and the "
        f"quarantine ({acc['quarantined']:,}):",
        "",
        "| result | recipients |",
        "|---|--:|",
        *[f"| {k} | {v:,} |" for k, v in sorted(acc["ok"].items(), key=lambda kv: -kv[1])],
        *[f"| explained duplicate: {k} | {v:,} |" for k, v in acc["explained"].items()],
        f"| **unexplained** | **{len(unexplained)}** |",
        "",
    ]
    if unexplained:
        lines += ["Unexplained (first 10):", "", "```text",
                  *[json.dumps(u)[:300] for u in unexplained[:10]], "```", ""]
    lines += [
        "**Faults** (seeded schedule; times from the start of the load):",
        "",
        "| fault | times | detail |",
        "|---|--:|---|",
    ]
    by_kind: dict[str, list[Fault]] = defaultdict(list)
    for f in soak.faults:
        if f.started:
            by_kind[f.kind].append(f)
    for kind, fs in by_kind.items():
        if kind == "reload":
            detail = f"{reload_ok} valid files applied, {reload_refused} invalid files refused (still running)"
        else:
            detail = ", ".join(f"{(f.started or 0) - soak.started:.0f}s" + (f"+{f.duration:.0f}s" if f.duration else "")
                               + (f" ({f.note})" if f.note else "") for f in fs[:6])
        lines.append(f"| {kind} | {len(fs)} | {detail} |")
    lines += [
        "",
        f"Plugins (per message, marked by the generator): raise, sleep past the {PLUGIN_TIMEOUT:g} s timeout, block a "
        "thread past it, raise in a thread, quarantine, discard, reject, tempfail; "
        f"{sum(1 for m in load.messages if m.action != 'none'):,} messages marked. "
        f"Connections: {', '.join(f'{k} {v:,}' for k, v in conns.most_common())}; "
        f"{load.skipped} arrivals skipped (over {args.max_inflight} clients in flight).",
        "",
    ]
    if restart:
        lines.append(f"Proxy SIGTERM + restart at {(restart.started or 0) - soak.started:.0f}s: {restart.note}, "
                     f"greeting again {((restart.ended or 0) - (restart.started or 0)):.1f} s after the signal.")
        lines.append("")
    if args.workers > 1:
        lines += [f"**Workers**: {len(kills)} worker SIGKILLs under load; client connections opened from 1 s "
                  f"before to 10 s after each kill (outside the proxy's restart): "
                  f"{', '.join(f'{k} {v}' for k, v in kill_windows.most_common()) or 'none'} "
                  "(`reset-before-greeting`/`no-greeting` are connections lost by the kill; `cut` are sessions "
                  "that were running on the killed worker).", ""]
    lines += [
        "**Resources** (proxy process tree, every "
        f"{args.sample_every:g} s; slopes by least squares after each start's warm-up):",
        "",
        "| from | steady s | RSS MiB first/last/max | RSS MiB/h | fds max | fds/h | tasks max | tasks/h | threads/h | session objects/h |",
        "|--:|--:|---|--:|--:|--:|--:|--:|--:|--:|",
        *[f"| {s['from_s']:.0f}s | {s['seconds']:.0f} | {s['rss_mib_first']}/{s['rss_mib_last']}/{s['rss_mib_max']} | "
          f"{s['rss_mib_per_h']} | {s['fds_max']} | {s['fds_per_h']} | {s['tasks_max']} | {s['tasks_per_h']} | "
          f"{s['threads_per_h']} | {s['session_objects_per_h']} |" for s in segs],
        "",
        f"Flat means |RSS slope| < {args.max_rss_slope:g} MiB/h and |fd slope| < {args.max_fd_slope:g}/h over the "
        + (f"longest lifetime: RSS {'flat' if rss_flat else 'NOT flat'}, fds {'flat' if fds_flat else 'NOT flat'}. "
           if judged else f"longest lifetime; not judged: its steady part is shorter than "
           f"{args.judge_slopes_after:g} s, where a slope says little. ")
        + f"Proxy log: {tracebacks} tracebacks; error-level events (the invalid reloads are expected): "
        f"{', '.join(f'{k} {v}' for k, v in error_events.most_common(8)) or 'none'}.",
        "",
        f"![soak plot]({out.name}.png)",
        "",
    ]
    lines += [f"Note: {n}" for n in soak.notes]
    return "\n".join(lines) + "\n", passed


# --------------------------------------------------------------------------- command line


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="about 4 minutes, each kind of fault once")
    p.add_argument("--duration", type=float, help="seconds of load (default 3600, --quick 150)")
    p.add_argument("--rate", type=float, help="messages per second (default: half the measured capacity)")
    p.add_argument("--max-rate", type=float, default=20.0, help="cap on the measured half capacity (shared machine)")
    p.add_argument("--seed", type=int, default=18)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--rcpt-mode", choices=["at_data", "relay"], default="at_data")
    p.add_argument("--no-postfix", dest="postfix", action="store_false")
    p.add_argument("--reload-every", type=float, help="seconds between SIGHUPs (default 60, --quick 20)")
    p.add_argument("--sample-every", type=float, help="seconds between resource samples (default 5, --quick 2)")
    p.add_argument("--capacity-seconds", type=float, help="closed-loop capacity measurement (default 20, --quick 8)")
    p.add_argument("--max-inflight", type=int, default=80)
    p.add_argument("--max-rss-slope", type=float, default=10.0, help="MiB per hour")
    p.add_argument("--max-fd-slope", type=float, default=20.0, help="file descriptors per hour")
    p.add_argument("--judge-slopes-after", type=float, default=600.0,
                   help="judge the slopes only when the proxy ran steadily this many seconds")
    p.add_argument("--name", help="report name: bench/results/soak-NAME.md (default quick/hour/workers)")
    p.add_argument("--output-dir", type=Path, default=RESULTS)
    p.add_argument("--workdir", default=None, help="where the run's temporary directory goes")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = p.parse_args(argv)
    args.duration = args.duration or (150.0 if args.quick else 3600.0)
    args.reload_every = args.reload_every or (20.0 if args.quick else 60.0)
    args.sample_every = args.sample_every or (2.0 if args.quick else 5.0)
    args.capacity_seconds = args.capacity_seconds or (8.0 if args.quick else 20.0)
    if args.name is None:
        args.name = ("quick" if args.quick else "hour" if args.duration >= 3600 else f"{args.duration:.0f}s") + (
            f"-workers{args.workers}" if args.workers > 1 else "")
    return args


def main(argv: list[str]) -> int:
    args = parse(argv)
    began = time.time()
    soak = Soak(args)
    print(f"soak {args.name}: workdir {soak.workdir}", flush=True)
    try:
        soak.setup()
        load = asyncio.run(soak.main())
        print("settling: sink normal, Postfix up, queues empty...", flush=True)
        soak.sink.mode(mode="normal")
        if soak.postfix is not None:
            soak.postfix.instance.start()
            deadline = time.monotonic() + 120
            while not soak.postfix.instance.queue_is_empty() and time.monotonic() < deadline:
                time.sleep(0.5)  # poll Postfix's queue until it delivered everything
            if not soak.postfix.instance.queue_is_empty():
                soak.notes.append("Postfix's queue was not empty after 120 s; queued messages count as missing")
        soak.proxy.terminate()
        time.sleep(0.5)
    finally:
        soak.teardown()
    acc = account(soak, load)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    out = args.output_dir / f"soak-{args.name}"
    plot(soak, load, out.with_suffix(".png"), 5.0 if args.quick else 30.0)
    text, passed = report(soak, load, acc, out, time.time() - began)
    out.with_suffix(".md").write_text(text)
    summary = {"args": {k: str(v) for k, v in vars(args).items()}, "capacity": soak.capacity, "rate": soak.rate,
               "accounting": acc, "segments": segments(soak), "samples": soak.samples,
               "faults": [asdict(f) for f in soak.faults], "started": soak.started,
               "connections": Counter(c.result for c in load.conns), "passed": passed}
    out.with_suffix(".json").write_text(json.dumps(summary, indent=1, default=str))
    with (soak.workdir / "messages.jsonl").open("w") as fh:
        for m in load.messages:
            fh.write(json.dumps(asdict(m)) + "\n")
    print(text, flush=True)
    print(f"report: {out.with_suffix('.md')}; per-message records: {soak.workdir / 'messages.jsonl'}", flush=True)
    if not args.keep and passed:
        shutil.rmtree(soak.workdir, ignore_errors=True)
        if soak.postfix is not None:
            shutil.rmtree(soak.postfix.instance.root, ignore_errors=True)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
