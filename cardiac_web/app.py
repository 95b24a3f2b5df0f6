"""The local web server: one static page and the JSON API it calls.

Uploads are recognised by their content (never by name), bounded before they are decoded
(request bytes while they stream, pixels and frames from headers: see guards.py and
media.py), and written only into a per-request temporary folder with server-chosen names
(video and DICOM decoders need a file). Decoding, inference and analysis run in a bounded
worker pool, off the event loop. Every error, FastAPI's own included, is a one-line JSON
{"error": ...} with its HTTP status; the server stays up.

Endpoints (see README "Web page and JSON API"):
  GET  /api/status                      which models are loaded, the keypoint schema, limits
  POST /api/perfusion/analyze           form files: `study` (one image, stress left / rest
                                        right) or `stress` + `rest`
  POST /api/tavr/predict                form file `media` (image, video or DICOM cine),
                                        form field `expect` (comma-separated group names)
  GET  /api/tavr/result/{id}?expect=..  the same result re-gated for other expected groups
                                        (`expect` absent or empty: every group; "none": none)
"""

from __future__ import annotations

import base64
import collections
import dataclasses
import pathlib
import secrets
import tempfile
import threading

import cv2
import numpy as np
from fastapi import FastAPI, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

from cardiac_core import images
from cardiac_web.guards import BadInput, BodyLimit, HeavyWork, Limits, one_line
from cardiac_web.live import LiveOptions, live_router
from cardiac_web.media import decode_media, decoding
from tavr_jax import reporting

STATIC = pathlib.Path(__file__).parent / "static"


def _data_url(image: np.ndarray, ext: str, mime: str, params=()) -> str:
    ok, buf = cv2.imencode(ext, image, list(params))
    if not ok:
        raise RuntimeError(f"OpenCV could not encode a {image.shape} image as {ext}")
    return f"data:{mime};base64," + base64.b64encode(buf.tobytes()).decode()


def png_data_url(rgb: np.ndarray) -> str:
    bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR) if rgb.ndim == 3 else rgb
    return _data_url(bgr, ".png", "image/png")


def jpeg_data_url(gray: np.ndarray) -> str:
    return _data_url(gray, ".jpg", "image/jpeg", (cv2.IMWRITE_JPEG_QUALITY, 90))


# The page's player is 560 CSS pixels wide: frames are shown at most 1024 pixels a side, and a
# sequence's images together at most 80 Mpx (300 frames of 512 x 512 are shown as they are),
# which bounds the answer's size whatever the upload holds.
SHOWN_MAX_SIDE = 1024
SHOWN_MAX_PIXELS = 80 * 2**20


def shown_size(n_frames: int, height: int, width: int) -> tuple[int, int]:
    """(height, width) of the JPEG images of the frames sent to the page (never larger)."""
    scale = min(1.0, SHOWN_MAX_SIDE / max(height, width),
                (SHOWN_MAX_PIXELS / (n_frames * height * width)) ** 0.5)  # fmt: skip
    return max(1, round(height * scale)), max(1, round(width * scale))


async def _read_form(request: Request):
    # A handful of parts is all the API takes; more is a malformed (or hostile) form.
    return await request.form(max_files=4, max_fields=8)


async def _read_upload(upload: UploadFile | None, field: str) -> bytes:
    if upload is None or not hasattr(upload, "read"):
        raise BadInput(f"missing form file {field!r}", 400)
    data = await upload.read()  # bounded: BodyLimit stopped the body at the limit
    if not data:
        raise BadInput(f"{field}: empty upload", 400)
    return data


def _http_error_message(request: Request, exc: HTTPException) -> str:
    path = request.url.path[:200]
    if exc.status_code == 404:
        return f"not found: {path}"
    if exc.status_code == 405:
        return f"method {request.method} not allowed for {path}"
    if exc.status_code == 400:  # Starlette's form parser: a broken multipart body
        return one_line(f"malformed form upload: {exc.detail}")
    return one_line(f"{exc.detail}")


class Models:
    """The loaded models (either may be missing: the page then says which and why)."""

    def __init__(self, *, perfusion_model=None, perfusion_dir=None, tavr_engine=None,
                 tavr_workdir=None):  # fmt: skip
        self.perfusion = perfusion_model
        self.tavr = tavr_engine
        self.errors = {}
        if self.perfusion is None and perfusion_dir:
            try:
                from perfusion import analyze

                self.perfusion = analyze.load_model(perfusion_dir)
            except (OSError, ValueError) as e:
                self.errors["perfusion"] = str(e)
        if self.tavr is None and tavr_workdir:
            try:
                from tavr_jax.infer.engine import KeypointEngine

                # the second stage, when one was trained into the workdir, halves the error
                refine = (pathlib.Path(tavr_workdir) / "refiner" / "refiner.json").is_file()
                self.tavr = KeypointEngine.from_workdir(tavr_workdir, batch_size=8, refine=refine)
            except (OSError, ValueError) as e:
                self.errors["tavr"] = str(e)
        if self.perfusion is None:
            self.errors.setdefault(
                "perfusion", "no perfusion model: start the server with --perfusion_model=DIR"
            )
        if self.tavr is None:
            self.errors.setdefault("tavr", "no TAVR model: start the server with --tavr_workdir=W")


def _tavr_points(engine, out: dict, reported: np.ndarray, spacing) -> list[list[dict]]:
    schema = engine.schema
    groups = [schema.group_names[g] for g in schema.point_group]
    frames = []
    for probability, xy, rep in zip(out["visibility"], out["coords"], reported, strict=True):
        points = []
        for k, name in enumerate(schema.point_names):
            p = {"name": name, "group": groups[k], "visibility": round(float(probability[k]), 4),
                 "x": round(float(xy[k, 0]), 2), "y": round(float(xy[k, 1]), 2),
                 "reported": bool(rep[k])}  # fmt: skip
            if spacing:
                p["x_mm"], p["y_mm"] = round(p["x"] * spacing, 3), round(p["y"] * spacing, 3)
            points.append(p)
        frames.append(points)
    return frames


def create_app(
    *,
    perfusion_model=None,
    perfusion_dir=None,
    tavr_engine=None,
    tavr_workdir=None,
    limits: Limits | None = None,
    live: LiveOptions | None = None,
) -> FastAPI:
    """The FastAPI app; models are passed as objects (tests) or loaded from folders (serve.py).
    live: what the Live tab may open (cardiac_web/live.py; default: nothing)."""
    limits = limits or Limits()
    models = Models(perfusion_model=perfusion_model, perfusion_dir=perfusion_dir,
                    tavr_engine=tavr_engine, tavr_workdir=tavr_workdir)  # fmt: skip
    heavy = HeavyWork(limits.max_heavy, limits.busy_wait_s)
    results: collections.OrderedDict[str, dict] = collections.OrderedDict()
    results_lock = threading.Lock()  # worker threads add results, request threads read them
    engine_lock = threading.Lock()  # one inference at a time: the engine's buffers are shared
    # No docs UI: FastAPI's loads its scripts from a CDN, and the page must work offline.
    app = FastAPI(title="cardiac-jax", docs_url=None, redoc_url=None,
                  openapi_url="/api/openapi.json")  # fmt: skip
    app.add_middleware(BodyLimit, limits=limits)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.include_router(live_router(models.tavr, live, engine_error=models.errors.get("tavr")))

    @app.exception_handler(BadInput)
    async def _bad_input(request: Request, exc: BadInput):
        return JSONResponse({"error": str(exc)}, status_code=exc.status)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException):
        return JSONResponse({"error": _http_error_message(request, exc)},
                            status_code=exc.status_code, headers=exc.headers)  # fmt: skip

    @app.exception_handler(RequestValidationError)
    async def _invalid_request(request: Request, exc: RequestValidationError):
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first.get("loc", ()))
        return JSONResponse({"error": one_line(f"{where}: {first.get('msg')}")}, status_code=422)

    @app.exception_handler(Exception)
    async def _server_error(request: Request, exc: Exception):
        # Reached only by a bug (bad input is a BadInput); the traceback goes to the log.
        return JSONResponse(
            {"error": f"internal server error ({type(exc).__name__}); see the server log"},
            status_code=500,
        )

    @app.get("/", include_in_schema=False)
    def index():
        return FileResponse(STATIC / "index.html")

    @app.get("/api/status")
    def status():
        schema = models.tavr.schema if models.tavr is not None else None
        return {
            "perfusion": {"loaded": models.perfusion is not None,
                          "error": models.errors.get("perfusion")},
            "tavr": {
                "loaded": models.tavr is not None,
                "error": models.errors.get("tavr"),
                "schema": schema.to_json() if schema else None,
                "backbone": models.tavr.meta.get("backbone") if models.tavr else None,
                "image_size": models.tavr.meta.get("image_size") if models.tavr else None,
                "refiner": bool(models.tavr.meta.get("refiner")) if models.tavr else None,
            },
            "limits": dataclasses.asdict(limits),
        }  # fmt: skip

    def analyze_perfusion(uploads: dict[str, bytes]) -> JSONResponse:
        """Worker thread: decode, read the disks, score, draw (the heavy part of a request)."""
        from perfusion import analyze, studies

        model = models.perfusion
        with tempfile.TemporaryDirectory(prefix="cardiac-web-") as tmp:
            paths = {}
            for field, data in uploads.items():
                with decoding(field, 415):  # a content check before anything else sees it
                    images.decode(data, field, color=True, max_pixels=limits.max_pixels)
                paths[field] = pathlib.Path(tmp) / f"{field}.png"
                paths[field].write_bytes(data)
            with decoding("study", 422, tmp):  # no disk, one disk where two are expected ...
                if "study" in paths:
                    study = studies.read_study_image(
                        paths["study"], colormap=model.colormap, size=model.size
                    )
                else:
                    study = studies.read_study_pair(
                        paths["stress"], paths["rest"], colormap=model.colormap, size=model.size
                    )
        study.name, study.path = "upload", ""
        reports, raw = analyze.analyze_arrays(model, [study])
        report = {"file": "upload", **reports[0]}
        overlay = analyze.draw_overlay(study, report, raw["blackout"][0])
        return JSONResponse({
            "report": report,
            "images": {
                "stress": png_data_url(study.stress_rgb),
                "rest": png_data_url(study.rest_rgb),
                "overlay": png_data_url(overlay),
            },
        })  # fmt: skip

    @app.post("/api/perfusion/analyze")
    async def perfusion_analyze(request: Request):
        if models.perfusion is None:
            raise BadInput(models.errors["perfusion"], 503)
        form = await _read_form(request)
        pair = [f for f in ("stress", "rest") if form.get(f) is not None]
        if form.get("study") is not None and pair:
            # Which maps to read would be a guess: the command line takes one form, so here too.
            raise BadInput(
                f"give either study or stress + rest, not both (got study, {', '.join(pair)})", 422
            )
        fields = ("study",) if form.get("study") is not None else ("stress", "rest")
        uploads = {field: await _read_upload(form.get(field), field) for field in fields}
        return await heavy.run(analyze_perfusion, uploads)

    def gate_for(expect: str | None) -> reporting.Gate:
        engine = models.tavr
        # "none" = the user expects no group at this stage; absent/empty = no stage prior.
        expect_groups = [] if expect == "none" else expect
        try:
            return reporting.Gate.from_meta(engine.meta, engine.schema, expect=expect_groups)
        except ValueError as e:
            raise BadInput(str(e).replace("--expect", "expect"), 422) from None

    def tavr_json(result_id: str, entry: dict, expect: str | None) -> dict:
        engine = models.tavr
        schema = engine.schema
        out = entry["out"]
        reported = gate_for(expect)(out["visibility"], out["group"])
        points = _tavr_points(engine, out, reported, entry["spacing"])
        frames = []
        for i, pts in enumerate(points):
            frames.append({
                "index": i,
                "time_s": entry["times"][i],
                "groups": {g: round(float(p), 4)
                           for g, p in zip(schema.group_names, out["group"][i], strict=True)},
                "points": pts,
            })  # fmt: skip
        return {
            "result_id": result_id,
            "kind": entry["kind"],
            "width": entry["width"],
            "height": entry["height"],
            "n_frames": len(frames),
            "total_frames": entry["total_frames"],
            "truncated": len(frames) < entry["total_frames"],
            "warning": entry["warning"],
            "fps": entry["fps"],
            "pixel_spacing_mm": entry["spacing"],
            "expect": expect or "",
            "frames": frames,
        }

    def predict_tavr(data: bytes, expect: str | None) -> JSONResponse:
        """Worker thread: decode within the limits, run the engine, encode the answer."""
        engine = models.tavr
        with tempfile.TemporaryDirectory(prefix="cardiac-web-") as tmp:
            media = decode_media(data, pathlib.Path(tmp), limits)
        frames, bs = media.frames, engine.batch_size
        # Batch by batch: no second copy of the whole sequence as one array.
        batches = ((i, np.stack(frames[i : i + bs])) for i in range(0, len(frames), bs))
        with engine_lock:
            outs = [out for _, out in engine.run_batches(batches)]
        height, width = frames[0].shape
        entry = {"out": {k: np.concatenate([o[k] for o in outs]) for k in outs[0]},
                 "times": media.times, "kind": media.kind, "fps": media.fps,
                 "spacing": media.pixel_spacing_mm, "total_frames": media.total_frames,
                 "warning": media.warning, "width": width, "height": height}  # fmt: skip
        result_id = secrets.token_hex(8)
        response = tavr_json(result_id, entry, expect)
        shown = shown_size(len(frames), height, width)
        for i, frame in enumerate(response["frames"]):
            image, frames[i] = frames[i], None  # each decoded frame is freed once encoded
            if shown != (height, width):
                image = cv2.resize(image, shown[::-1], interpolation=cv2.INTER_AREA)
            frame["image"] = jpeg_data_url(image)
        with results_lock:  # the cache keeps outputs only: re-gating needs no pixels
            results[result_id] = entry
            while len(results) > limits.cached_results:
                results.popitem(last=False)
        return JSONResponse(response)  # rendered here, in the worker, not on the event loop

    @app.post("/api/tavr/predict")
    async def tavr_predict(request: Request):
        if models.tavr is None:
            raise BadInput(models.errors["tavr"], 503)
        form = await _read_form(request)
        data = await _read_upload(form.get("media"), "media")
        expect = str(form.get("expect") or "") or None
        gate_for(expect)  # an unknown group is refused before any decoding
        return await heavy.run(predict_tavr, data, expect)

    @app.get("/api/tavr/result/{result_id}")
    def tavr_result(result_id: str, expect: str = ""):
        with results_lock:
            entry = results.get(result_id)
        if entry is None:
            raise BadInput(f"unknown or expired result id {result_id[:32]!r}", 404)
        return tavr_json(result_id, entry, expect or None)

    return app
