"""The ASGI app: POST /predict, GET /health, GET /info, GET / (the page). FastAPI (Starlette).

Limits, each answered with one JSON line {"error": "..."} naming the problem and the fix:
- body over `max_body` bytes: 413, from the Content-Length header before anything is read, or
  while the body streams in (chunked uploads) - never after buffering it;
- not an image, truncated, a decompression bomb: 422 (the same decoders and pixel limit as
  predict; decoding runs in a thread pool, never on the event loop);
- a Content-Type that is neither an image nor a form: 415;
- more images waiting than the queue holds: 503 with Retry-After; shutting down: 503;
- slower than `timeout` seconds: 408 while the body arrives, 504 while waiting for the model.
No endpoint reads a path from the request: images arrive as bytes, the page is packaged.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from importlib.resources import files
from typing import Any

import torch
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from cifar_transfer.serving.batcher import Batcher, Closed, QueueFull
from cifar_transfer.serving.limits import Limits
from cifar_transfer.serving.model import BadUpload, ServedModel, decode_upload

SEND_AN_IMAGE = (
    "send the image's bytes with Content-Type image/jpeg (or image/png ...), e.g. "
    "`curl --data-binary @cat.jpg -H 'Content-Type: image/jpeg' URL`, or files as "
    "multipart/form-data, e.g. `curl -F image=@cat.jpg -F image=@dog.png URL`"
)
RAW_TYPES = ("image/", "application/octet-stream")
PAGE_CSP = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "img-src blob: data:; connect-src 'self'; form-action 'none'; frame-ancestors 'none'"
)


class ApiError(Exception):
    """An error response: status, message, extra headers."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


class BodyTooLarge(Exception):
    """Raised from receive() once a body grows past the limit."""


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    """One JSON line {"error": message}."""
    body = json.dumps({"error": message}, ensure_ascii=False) + "\n"
    return Response(body, status_code=status, media_type="application/json", headers=headers)


def _too_large(limit: int) -> Response:
    """413. The connection stays open: uvicorn passes the rest of the body through its parser
    and drops it (never stored), so the client, still sending, can read this answer. Closing
    at once would reset the connection under the client's unsent bytes and lose the 413
    (measured: httpx then sees a ReadError, not the status)."""
    return error_response(413, (
        f"request body over {limit:,} bytes: send smaller images (or fewer per request), or "
        f"start the server with a larger --max-body"
    ))  # fmt: skip


class BodyLimit:
    """ASGI middleware: 413 from Content-Length at once, or as soon as the streamed body passes
    the limit; the body is never buffered beyond the limit."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            await _too_large(self.limit)(scope, receive, send)
            return
        received, started = 0, False

        async def limited_receive() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise BodyTooLarge
            return message

        async def tracking_send(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge:
            if started:
                raise
            await _too_large(self.limit)(scope, receive, send)


class Server:
    """The model, the batcher and the decode pool behind the app's endpoints."""

    def __init__(self, served: ServedModel, limits: Limits) -> None:
        self.served, self.limits = served, limits
        self.batcher = Batcher(self._forward, limits.max_batch, limits.max_wait_ms / 1000,
                               limits.max_queue)  # fmt: skip
        self.decoder: ThreadPoolExecutor | None = None
        self.shutting_down = False

    def _forward(self, images: list[torch.Tensor]) -> list[torch.Tensor]:
        """One batch on the inference thread: probabilities (temperature, TTA applied) per image."""
        with torch.inference_mode():
            probs = self.served.predictor.logits(torch.stack(images)).softmax(1)
        return list(probs)

    async def start(self) -> None:
        self.decoder = ThreadPoolExecutor(self.limits.decode_threads, thread_name_prefix="decode")
        self.batcher.start()

    async def stop(self) -> None:
        """Graceful: refuse new work, answer everything accepted, then stop the threads."""
        self.shutting_down = True
        await self.batcher.drain()
        if self.decoder is not None:
            self.decoder.shutdown(wait=True)

    async def decode(self, uploads: list[tuple[str, bytes]]) -> list[torch.Tensor]:
        """Decode every upload in the thread pool; the first bad one fails the request (422)."""
        loop = asyncio.get_running_loop()
        geometry = self.served.geometry
        jobs = [loop.run_in_executor(self.decoder, decode_upload, raw, geometry) for _, raw in uploads]
        results = await asyncio.gather(*jobs, return_exceptions=True)
        for (name, _), result in zip(uploads, results):
            if isinstance(result, BadUpload):
                where = f"{name}: " if len(uploads) > 1 or name else ""
                raise ApiError(422, f"{where}{result}")
            if isinstance(result, BaseException):
                raise result
        return results  # type: ignore[return-value]

    @contextlib.contextmanager
    def refusals(self):
        """QueueFull and Closed from the batcher as 503 with Retry-After."""
        try:
            yield
        except QueueFull as e:
            raise ApiError(503, f"server busy: {e}: retry after a second (or start it with a "
                           f"larger --max-queue)", {"Retry-After": "1"}) from None
        except Closed:
            raise ApiError(503, "the server is shutting down: retry in a few seconds",
                           {"Retry-After": "5"}) from None

    async def predict(
        self, uploads: list[tuple[str, bytes]], top: int, min_confidence: float | None,
        deadline: float,
    ) -> dict:  # fmt: skip
        futures: list[asyncio.Future] = []
        try:
            async with asyncio.timeout_at(deadline):  # decoding and the model's answer
                images = await self.decode(uploads)
                with self.refusals():
                    futures = self.batcher.submit_many(images)
                rows = await asyncio.gather(*futures)
        except TimeoutError:
            for future in futures:  # dropped from the queue: nobody waits for them any more
                future.cancel()
            raise ApiError(504, f"no answer from the model within {self.limits.timeout:g} s: the "
                           f"server is overloaded; retry later, or start it with a larger "
                           f"--timeout or a smaller --max-queue") from None
        k = min(top, len(self.served.classes))
        threshold = self.limits.min_confidence if min_confidence is None else min_confidence
        out = []
        for (name, _), probs in zip(uploads, rows):
            values, indices = probs.topk(k)
            ranked = [(self.served.classes[int(c)], float(v)) for v, c in zip(values, indices)]
            label = ranked[0][0] if threshold is None or ranked[0][1] > threshold else None
            out.append({
                "file": name or None, "class": label,
                "top": [{"class": c, "prob": p} for c, p in ranked],
            })  # fmt: skip
        return {"model": self.served.model_id, "predictions": out}


async def _read_uploads(request: Request, limits: Limits) -> list[tuple[str, bytes]]:
    """(file name or "", bytes) of each image in the request: a raw body or multipart files."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        try:
            form = await request.form(max_files=limits.max_files, max_fields=limits.max_files)
        except StarletteHTTPException as e:  # malformed multipart, too many parts
            raise ApiError(400, f"unreadable multipart form ({e.detail}): {SEND_AN_IMAGE}") from None
        uploads = []
        try:
            for _, value in form.multi_items():
                if hasattr(value, "read"):  # an UploadFile; plain text fields are ignored
                    uploads.append((value.filename or "", await value.read()))
        finally:
            await form.close()
        if not uploads:
            raise ApiError(422, f"the form holds no files: {SEND_AN_IMAGE}")
        return uploads
    if not ctype.startswith(RAW_TYPES):
        got = f"Content-Type {ctype}" if ctype else "no Content-Type"
        raise ApiError(415, f"{got} is not an image or a form: {SEND_AN_IMAGE}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
    return [("", bytes(body))]


def create_app(served: ServedModel, limits: Limits | None = None) -> FastAPI:
    """The app serving `served`; start/stop of the batcher follow the app's lifespan."""
    limits = limits or Limits()
    server = Server(served, limits)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        await server.start()
        try:
            yield
        finally:
            await server.stop()

    app = FastAPI(
        title="cifar-transfer serve", lifespan=lifespan, docs_url=None, redoc_url=None,
        openapi_url=None,  # the interactive docs load scripts from a CDN: none here
    )  # fmt: skip
    app.state.server = server
    app.add_middleware(BodyLimit, limit=limits.max_body)

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, e: ApiError) -> Response:
        return error_response(e.status, e.message, e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException) -> Response:
        hint = {404: "the endpoints are POST /predict, GET /info, GET /health and GET /",
                405: "POST images to /predict; GET /info, /health and /"}.get(e.status_code, "")
        detail = f"{request.method} {request.url.path}: {e.detail}"
        return error_response(e.status_code, f"{detail}: {hint}" if hint else detail)

    @app.exception_handler(RequestValidationError)
    async def _bad_query(_: Request, e: RequestValidationError) -> Response:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'][1:])}: {err['msg']}" for err in e.errors()
        )
        return error_response(
            422, f"bad query parameter ({problems}): e.g. /predict?top=3&min_confidence=0.5"
        )

    @app.exception_handler(Exception)
    async def _internal(_: Request, e: Exception) -> Response:
        first = (str(e).strip().splitlines() or [""])[0][:200]
        return error_response(500, f"internal error ({type(e).__name__}: {first}): see the server log")

    @app.post("/predict")
    async def predict(
        request: Request,
        top: int = Query(3, ge=1, le=1000),
        min_confidence: float | None = Query(None, ge=0.0, le=1.0),
    ) -> JSONResponse:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limits.timeout
        with server.refusals():  # a full queue refuses before the body is read and decoded
            server.batcher.check_room(1)
        try:
            async with asyncio.timeout_at(deadline):
                uploads = await _read_uploads(request, limits)
        except TimeoutError:
            raise ApiError(408, f"the request body did not arrive within {limits.timeout:g} s: "
                           f"send it faster, or start the server with a larger --timeout") from None
        return JSONResponse(await server.predict(uploads, top, min_confidence, deadline))

    @app.get("/health")
    async def health() -> JSONResponse:
        body = {
            "status": "shutting down" if server.shutting_down else "ok",
            "model": served.model_id, "queued": server.batcher.queued,
            "max_queue": limits.max_queue, **server.batcher.stats.to_json(),
        }  # fmt: skip
        return JSONResponse(body, status_code=503 if server.shutting_down else 200)

    @app.get("/info")
    async def info() -> JSONResponse:
        settings = {k: v for k, v in asdict(limits).items() if not (isinstance(v, float) and math.isnan(v))}
        return JSONResponse({**served.info, "serving": settings})

    @app.get("/", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        html = files("cifar_transfer.serving").joinpath("static/index.html").read_text("utf-8")
        return HTMLResponse(html, headers={
            "Content-Security-Policy": PAGE_CSP, "X-Content-Type-Options": "nosniff",
            "Cache-Control": "no-store",
        })  # fmt: skip

    return app
