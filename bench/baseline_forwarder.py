"""The bare forwarder: the least a Python SMTP proxy can do (the benchmark's reference row).

aiosmtpd receives, aiosmtplib sends each message to the upstream over a new connection, and
the client gets the upstream's answer. No plugins, no limits, no pooling, no logging.

    python bench/baseline_forwarder.py LISTEN_PORT UPSTREAM_PORT [--uvloop]
"""

from __future__ import annotations

import asyncio
import sys

import aiosmtplib
from aiosmtpd.smtp import SMTP, Envelope, Session

HOST = "127.0.0.1"


class Forward:
    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        try:
            await aiosmtplib.send(envelope.original_content or b"", sender=envelope.mail_from,
                                  recipients=envelope.rcpt_tos, hostname=HOST,
                                  port=self.upstream_port, start_tls=False, use_tls=False)
        except aiosmtplib.SMTPException as exc:
            return f"451 4.4.0 upstream: {exc}"
        return "250 2.0.0 Ok: forwarded"


async def main(listen_port: int, upstream_port: int) -> None:
    handler = Forward(upstream_port)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(handler, hostname="forwarder.bench", data_size_limit=0), HOST, listen_port,
        backlog=4096)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    if "--uvloop" in sys.argv:
        import uvloop

        uvloop.install()
    asyncio.run(main(int(sys.argv[1]), int(sys.argv[2])))
