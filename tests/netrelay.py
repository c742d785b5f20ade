"""A TCP relay between network namespaces through Unix sockets (the file system is shared,
the networks are not); for the two-host stack test, not the product.

    python netrelay.py unix SOCKDIR PORT...       # SOCKDIR/PORT.sock -> 127.0.0.1:PORT
    python netrelay.py tcp ADDR SOCKDIR PORT...   # (in a namespace) ADDR:PORT -> the socket

Each connection is piped both ways until either side closes. Prints "ready" once listening.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from pathlib import Path


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(OSError, RuntimeError):
            writer.write_eof() if writer.can_write_eof() else writer.close()


async def _relay(client_r, client_w, connect) -> None:
    try:
        up_r, up_w = await connect()
    except OSError:
        client_w.close()
        return
    await asyncio.gather(_pipe(client_r, up_w), _pipe(up_r, client_w))
    for w in (client_w, up_w):
        with contextlib.suppress(OSError, RuntimeError):
            w.close()


async def main(argv: list[str]) -> None:
    mode = argv[0]
    servers = []
    if mode == "unix":
        sockdir, ports = Path(argv[1]), [int(p) for p in argv[2:]]
        for port in ports:
            path = sockdir / f"{port}.sock"
            path.unlink(missing_ok=True)

            def connect(port=port):
                return asyncio.open_connection("127.0.0.1", port)

            servers.append(await asyncio.start_unix_server(
                lambda r, w, c=connect: _relay(r, w, c), path=str(path)))
    else:
        addr, sockdir, ports = argv[1], Path(argv[2]), [int(p) for p in argv[3:]]
        for port in ports:
            def connect(port=port):
                return asyncio.open_unix_connection(str(sockdir / f"{port}.sock"))

            servers.append(await asyncio.start_server(
                lambda r, w, c=connect: _relay(r, w, c), addr, port, reuse_address=True))
    print("ready", flush=True)
    await asyncio.gather(*(s.serve_forever() for s in servers))


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main(sys.argv[1:]))
