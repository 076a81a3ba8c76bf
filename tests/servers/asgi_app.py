"""An ASGI app for uvicorn under `handoff run`: `GET /` answers `pid=<pid>`.

`asgi_app:hung` is a deploy gone wrong: its startup never completes (a
database that does not answer), so uvicorn never serves; whoever answers on
the shared socket meanwhile is the old version."""
import asyncio
import os


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    body = f"pid={os.getpid()}\n".encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def hung(scope, receive, send):
    if scope["type"] == "lifespan":
        await receive()
        await asyncio.Event().wait()  # startup never completes
    await app(scope, receive, send)
