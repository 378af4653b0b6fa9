"""Stop the work of a client that went away.

uvicorn keeps running a handler whose client has hung up; for a detect request that is seconds
of decoding, text encoding and model time nobody will read. `DisconnectMiddleware` runs the
app in a task and, once the request body has been read, watches the connection: a
`http.disconnect` before the response is complete cancels the task. The cancellation reaches
the route where it waits (decode pool, text tower, batcher), which drops its queued work and
counts it (`ovd_abandoned_requests_total`, `ovd_abandoned_jobs_total`); the request is recorded
with status 499 (client closed request).
"""

from __future__ import annotations

import asyncio
import contextlib

#: scope key set when the client left before its response was complete
CLIENT_GONE = "ovd.client_gone"


class DisconnectMiddleware:
    """Cancel a request's handler when its client disconnects (for the paths in `paths`)."""

    def __init__(self, app, paths: tuple[str, ...]):
        self.app = app
        self.paths = paths

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] not in self.paths:
            return await self.app(scope, receive, send)
        body_read = asyncio.Event()
        gone = asyncio.Event()
        responded = False

        async def app_receive():
            if body_read.is_set():  # later calls (Starlette's disconnect checks) see what the watcher saw
                await gone.wait()
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.disconnect":
                gone.set()
            elif not message.get("more_body", False):
                body_read.set()
            return message

        async def app_send(message):
            nonlocal responded
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                responded = True
            await send(message)

        task = asyncio.create_task(self.app(scope, app_receive, app_send))

        async def watch():
            await body_read.wait()
            message = await receive()
            if message["type"] == "http.disconnect" and not responded:
                scope[CLIENT_GONE] = True
                gone.set()
                task.cancel()

        watcher = asyncio.create_task(watch())
        try:
            await task
        except asyncio.CancelledError:
            if not scope.get(CLIENT_GONE):
                raise  # this middleware's own caller was cancelled (shutdown)
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
            if not task.done():
                task.cancel()
