"""The soak run's capturing upstream: an SMTP server that records every message it commits.

    python bench/soak_sink.py PORT RECORDS.jsonl      (commands on stdin, one JSON per line)

Why not smtp-sink: the soak needs to know *which* messages the upstream took, byte for byte,
and to misbehave on command. Each message is committed (one JSON line: its X-Soak-Id, the
recipients, the SHA-256 of its body, the reply delay it is about to get) *before* the 250 is
written, like an MTA that fsyncs before answering; after the 250 went out a second line
``{"replied": ID}`` follows. A sink killed between the two, or a reply delayed past the
proxy's timeout, is the protocol's unavoidable duplicate (RFC 1047), and the records say so.

Recipients whose local part starts with ``unknown`` get ``550 5.1.1`` at RCPT.

Modes (stdin ``{"mode": ...}``, answered ``ok`` on stdout): ``normal``; ``slow`` (every
reply ``delay`` seconds late); ``stall`` (only the end-of-data reply, ``delay`` seconds
late); ``refuse-greet`` (``421`` instead of the greeting); ``refuse-mail`` (``451`` at
MAIL); ``refuse-data`` (``451`` after the whole message was received, nothing committed).
Stopping and starting is done from outside: the soak SIGKILLs this process and starts
another on the same port.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import sys
import time
from typing import IO, Any

SOAK_ID = re.compile(rb"^X-Soak-Id:[ \t]*(\S+)", re.MULTILINE | re.IGNORECASE)


class Sink:
    def __init__(self, records: IO[str]) -> None:
        self.records = records
        self.mode: dict[str, Any] = {"mode": "normal"}

    def record(self, item: dict[str, Any]) -> None:
        self.records.write(json.dumps(item, separators=(",", ":")) + "\n")
        self.records.flush()  # in the kernel's page cache: survives SIGKILL of this process

    async def control(self) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        while line := await reader.readline():
            self.mode = json.loads(line)
            sys.stdout.write("ok\n")
            sys.stdout.flush()
        # stdin closed: the soak is gone, so are we

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self._converse(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()

    async def _reply(self, writer: asyncio.StreamWriter, text: str, delay: float = 0.0) -> None:
        if self.mode["mode"] == "slow":
            delay = max(delay, float(self.mode.get("delay", 1.0)))
        if delay:
            await asyncio.sleep(delay)
        writer.write(text.encode("ascii") + b"\r\n")
        await writer.drain()

    async def _converse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.mode["mode"] == "refuse-greet":
            await self._reply(writer, "421 4.3.2 soak sink refusing connections")
            return
        await self._reply(writer, "220 sink.soak ESMTP")
        sender: str | None = None
        rcpts: list[str] = []
        while True:
            line = await reader.readuntil(b"\r\n")
            verb = line[:4].upper()
            if verb in (b"EHLO", b"HELO"):
                sender, rcpts = None, []
                await self._reply(writer, "250-sink.soak\r\n250-PIPELINING\r\n250-8BITMIME\r\n"
                                          "250-SIZE 52428800\r\n250 ENHANCEDSTATUSCODES")
            elif verb == b"MAIL":
                if self.mode["mode"] == "refuse-mail":
                    await self._reply(writer, "451 4.3.2 soak sink refusing mail")
                    continue
                sender, rcpts = line.decode("utf-8", "replace").strip(), []
                await self._reply(writer, "250 2.1.0 ok")
            elif verb == b"RCPT":
                match = re.search(rb"<([^>]*)>", line)
                address = match.group(1).decode("utf-8", "replace") if match else ""
                if sender is None:
                    await self._reply(writer, "503 5.5.1 need MAIL")
                elif address.lower().startswith("unknown"):
                    await self._reply(writer, "550 5.1.1 no such user here")
                else:
                    rcpts.append(address.lower())
                    await self._reply(writer, "250 2.1.5 ok")
            elif verb == b"DATA":
                if sender is None or not rcpts:
                    await self._reply(writer, "503 5.5.1 need RCPT")
                    continue
                await self._reply(writer, "354 go ahead")
                await self._data(reader, writer, rcpts)
                sender, rcpts = None, []
            elif verb == b"RSET":
                sender, rcpts = None, []
                await self._reply(writer, "250 2.0.0 ok")
            elif verb == b"NOOP":
                await self._reply(writer, "250 2.0.0 ok")
            elif verb == b"QUIT":
                await self._reply(writer, "221 2.0.0 bye")
                return
            else:
                await self._reply(writer, "502 5.5.2 not implemented")

    async def _data(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    rcpts: list[str]) -> None:
        raw = await reader.readuntil(b"\r\n.\r\n")  # the limit is set at 64 MiB in main()
        content = raw[:-3]
        if content.startswith(b"."):
            content = content[1:]
        content = content.replace(b"\r\n..", b"\r\n.")
        if self.mode["mode"] == "refuse-data":
            await self._reply(writer, "451 4.3.2 soak sink refusing this message")
            return
        split = content.find(b"\r\n\r\n")
        head, body = (content[:split], content[split + 4:]) if split >= 0 else (content, b"")
        match = SOAK_ID.search(head)
        soak_id = match.group(1).decode("ascii", "replace") if match else None
        delay = float(self.mode.get("delay", 0.0)) if self.mode["mode"] in ("stall", "slow") else 0.0
        self.record({"id": soak_id, "rcpts": rcpts, "sha": hashlib.sha256(body).hexdigest(),
                     "size": len(content), "t": time.time(), "delay": delay})
        stall = delay if self.mode["mode"] == "stall" else 0.0  # (slow: _reply adds it)
        await self._reply(writer, f"250 2.0.0 ok queued as {soak_id}", stall)
        self.record({"replied": soak_id, "t": time.time()})


async def main(port: int, path: str) -> None:
    with open(path, "a", encoding="utf-8") as records:  # noqa: ASYNC230 (before serving)
        sink = Sink(records)
        server = await asyncio.start_server(sink.handle, "127.0.0.1", port, reuse_address=True,
                                            limit=64 * 1024 * 1024, backlog=512)
        sys.stdout.write("ready\n")
        sys.stdout.flush()
        control = asyncio.ensure_future(sink.control())
        async with server:
            await control


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), sys.argv[2]))
