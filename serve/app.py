"""The explorer's web routes (FastAPI): slides, Deep Zoom tiles, nucleus, transition, export, datasets.

    app = create_app(explorer, worker)       # served by uvicorn in `mitosis-ldm serve`

Every failure is a 4xx (or a 503 when the model queue is full) with a one-line
JSON body `{"error": "..."}`; nothing a client sends reaches a traceback.
Request bodies above `max_body` bytes are refused (413) before they are parsed.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated, Literal

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from mitosis_ldm.errors import UserError
from serve.explorer import MAX_CONDITIONS, Explorer
from serve.tiles import NotFound
from serve.worker import Busy, ModelWorker

STATIC = Path(__file__).parent / "static"
Finite = Annotated[float, Field(allow_inf_nan=False)]
Name = Annotated[str, Field(min_length=1, max_length=256)]


class NucleusRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    slide: Name
    x: Finite
    y: Finite


class TransitionRequest(BaseModel):
    """A slide point (slide, x, y) or a dataset patch (dataset, index), and how to render it."""

    model_config = ConfigDict(extra="forbid")
    slide: Name | None = None
    x: Finite | None = None
    y: Finite | None = None
    dataset: Name | None = None
    index: int | None = None
    conditions: Annotated[list[Finite], Field(min_length=1, max_length=MAX_CONDITIONS)] | \
        Annotated[str, Field(max_length=64)] | None = None
    mode: Literal["invert", "sdedit"] = "invert"
    strength: Finite | None = None
    guidance: Finite | None = None
    steps: int | None = None
    inversion_iters: int | None = None


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": " ".join(str(message).split())[:300]}, status_code=status)


class BodyLimit:
    """ASGI middleware: read at most `max_body` bytes of a request body, else answer 413 without parsing."""

    def __init__(self, app, max_body: int):
        self.app, self.max_body = app, max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD"):
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        too_big = error(413, f"request body larger than {self.max_body} bytes")
        try:
            if declared is not None and int(declared) > self.max_body:
                return await too_big(scope, receive, send)
        except ValueError:
            return await error(400, "malformed Content-Length header")(scope, receive, send)
        chunks, total, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > self.max_body:
                return await too_big(scope, receive, send)
            chunks.append(chunk)
            more = message.get("more_body", False)
        body, sent = b"".join(chunks), False

        async def replay():
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        return await self.app(scope, replay, send)


def create_app(explorer: Explorer, worker: ModelWorker | None = None, max_body: int = 16_384) -> FastAPI:
    worker = worker or ModelWorker()
    app = FastAPI(title="mitosis-ldm slide explorer", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.explorer, app.state.worker = explorer, worker

    # -- errors: one line of JSON each ----------------------------------------------------------------
    @app.exception_handler(RequestValidationError)
    async def invalid(_request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "body"
        if first.get("type") == "json_invalid":
            return error(400, "body: not valid JSON")
        return error(422, f"field '{where}': {first.get('msg', 'invalid')}")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request, exc: StarletteHTTPException):
        return error(exc.status_code, exc.detail if exc.status_code != 404 else "not found")

    @app.exception_handler(NotFound)
    async def not_found(_request, exc: NotFound):
        return error(404, str(exc))

    @app.exception_handler(UserError)
    async def user_error(_request, exc: UserError):
        return error(400, str(exc))

    @app.exception_handler(Busy)
    async def busy(_request, exc: Busy):
        return JSONResponse({"error": str(exc)}, status_code=503, headers={"Retry-After": "1"})

    @app.exception_handler(Exception)
    async def internal(_request, exc: Exception):  # a bug, not the client's fault; the server stays up
        return error(500, f"internal error ({type(exc).__name__})")

    async def on_worker(fn, *args):
        return await asyncio.wrap_future(worker.submit(fn, *args))

    # -- page, health, info ----------------------------------------------------------------------------
    @app.get("/")
    def index():
        return FileResponse(STATIC / "index.html")

    @app.get("/healthz")
    def healthz():
        return {"status": "ok", "slides": len(explorer.slides.names()), "datasets": len(explorer.datasets),
                "queue": worker.pending, "queue_limit": worker.max_pending, "cached_transitions":
                len(explorer.transitions)}

    @app.get("/api/info")
    def info():
        return {"slides": [explorer.slides.get(n).describe() for n in explorer.slides.names()],
                "datasets": [{"name": n, "patches": len(ds)} for n, (_, ds) in explorer.datasets.items()],
                "pipeline": explorer.pipeline_path, "classifier": explorer.classifier_path,
                "patch_size": explorer.patch_size, "defaults": explorer.defaults("invert"),
                "sdedit_strength": explorer.defaults("sdedit")["strength"],
                "traced": explorer.eager_reason is None, "eager_reason": explorer.eager_reason,
                "device": str(explorer.pipeline.device)}

    # -- slides and tiles ------------------------------------------------------------------------------
    @app.get("/slides")
    def slides():
        return [explorer.slides.get(n).describe() for n in explorer.slides.names()]

    @app.get("/slides/{name}.dzi")
    def dzi(name: str):
        return Response(explorer.slides.dzi(name), media_type="application/xml")

    @app.get("/slides/{name}_files/{level:int}/{col:int}_{row:int}.jpeg")
    def tile(name: str, level: int, col: int, row: int):
        return Response(explorer.slides.tile(name, level, col, row), media_type="image/jpeg",
                        headers={"Cache-Control": "max-age=3600"})

    # -- the models ------------------------------------------------------------------------------------
    @app.post("/nucleus")
    async def nucleus(req: NucleusRequest):
        explorer.check_point(req.slide, req.x, req.y)
        # detection is not a model call: it runs beside the worker, so a queued render does not hold it up
        await run_in_threadpool(explorer.locate, req.slide, req.x, req.y)
        return await on_worker(explorer.nucleus, req.slide, req.x, req.y)

    async def resolve(req: TransitionRequest) -> dict:
        settings = explorer.settings(req.conditions, req.mode, req.strength, req.guidance, req.steps,
                                     req.inversion_iters)
        if req.dataset is not None:
            if req.slide is not None or req.index is None:
                raise UserError("body: give either {dataset, index} or {slide, x, y}")
            source = explorer.dataset_source(req.dataset, req.index)
        else:
            if req.slide is None or req.x is None or req.y is None:
                raise UserError("body: give either {slide, x, y} or {dataset, index}")
            explorer.check_point(req.slide, req.x, req.y)
            source = await run_in_threadpool(explorer.slide_source, req.slide, req.x, req.y)
        hit = explorer.cached(source, settings)
        if hit is not None:
            return {**hit, "cached": True}
        return {**(await on_worker(explorer.transition, source, settings)), "cached": False}

    def public(result: dict) -> dict:
        return {k: v for k, v in result.items() if not k.startswith("_")}

    @app.post("/transition")
    async def transition(req: TransitionRequest):
        return public(await resolve(req))

    @app.post("/export")
    async def export(req: TransitionRequest):
        result = await resolve(req)
        return explorer.export(result)

    @app.get("/exports/{name}")
    def exported(name: str):
        path = explorer.export_file(name)
        return FileResponse(path, media_type="image/png" if name.endswith(".png") else "application/json")

    # -- datasets --------------------------------------------------------------------------------------
    @app.get("/datasets")
    def datasets():
        return [{"name": n, "patches": len(ds)} for n, (_, ds) in explorer.datasets.items()]

    @app.get("/datasets/{name}/grid")
    def grid(name: str, per_bin: int = 24):
        if not 1 <= per_bin <= 200:
            raise UserError(f"field 'per_bin': must be in [1, 200], got {per_bin}")
        return explorer.dataset_grid(name, per_bin)

    @app.get("/datasets/{name}/patch/{index:int}.png")
    def dataset_patch(name: str, index: int):
        return Response(explorer.dataset_patch(name, index), media_type="image/png")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.add_middleware(BodyLimit, max_body=max_body)
    return app
