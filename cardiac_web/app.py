"""The local web server: one static page and the JSON API it calls.

Uploads are checked by decoding their content (never by name), size-limited, and written only
into a per-request temporary folder with server-chosen names (video and DICOM decoders need a
file). Bad input answers a one-line JSON error with an HTTP 4xx status; the server stays up.

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
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from tavr_jax.infer import postprocess, streams

STATIC = pathlib.Path(__file__).parent / "static"
MiB = 1 << 20


class BadInput(Exception):
    """A client error: answered as {"error": message} with `status`."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status


@dataclasses.dataclass
class Limits:
    max_upload_mb: float = 64.0
    max_frames: int = 300  # frames of a video/cine returned to the page
    cached_results: int = 8  # TAVR results kept for re-gating


def png_data_url(rgb: np.ndarray) -> str:
    bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR) if rgb.ndim == 3 else rgb
    ok, buf = cv2.imencode(".png", bgr)
    return "data:image/png;base64," + base64.b64encode(buf.tobytes()).decode()


def jpeg_data_url(gray: np.ndarray) -> str:
    ok, buf = cv2.imencode(".jpg", gray, [cv2.IMWRITE_JPEG_QUALITY, 90])
    return "data:image/jpeg;base64," + base64.b64encode(buf.tobytes()).decode()


def _decode_image(data: bytes, what: str) -> np.ndarray:
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) if data else None
    if image is None:
        raise BadInput(f"{what}: not an image (could not decode it)", 415)
    return image


async def _read_upload(upload: UploadFile | None, field: str, limits: Limits) -> bytes:
    if upload is None or not hasattr(upload, "read"):
        raise BadInput(f"missing form file {field!r}", 400)
    limit = int(limits.max_upload_mb * MiB)
    data = await upload.read(limit + 1)
    if len(data) > limit:
        raise BadInput(f"{field}: upload larger than {limits.max_upload_mb:g} MiB", 413)
    if not data:
        raise BadInput(f"{field}: empty upload", 400)
    return data


def _sniff_media(data: bytes) -> str:
    """'image', 'dicom' or 'video' from the bytes themselves."""
    if len(data) > 132 and data[128:132] == b"DICM":
        return "dicom"
    if cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED) is not None:
        return "image"
    return "video"


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

                self.tavr = KeypointEngine.from_workdir(tavr_workdir, batch_size=8)
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
    for vis, xy, rep in zip(out["visibility"], out["coords"], reported, strict=True):
        points = []
        for k, name in enumerate(schema.point_names):
            p = {"name": name, "group": groups[k], "visibility": round(float(vis[k]), 4),
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
) -> FastAPI:
    """The FastAPI app; models are passed as objects (tests) or loaded from folders (serve.py)."""
    limits = limits or Limits()
    models = Models(perfusion_model=perfusion_model, perfusion_dir=perfusion_dir,
                    tavr_engine=tavr_engine, tavr_workdir=tavr_workdir)  # fmt: skip
    results: collections.OrderedDict[str, dict] = collections.OrderedDict()
    lock = threading.Lock()  # one inference at a time: the engine's buffers are shared
    app = FastAPI(title="cardiac-jax", docs_url="/api/docs", redoc_url=None)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.exception_handler(BadInput)
    async def _bad_input(request: Request, exc: BadInput):
        return JSONResponse({"error": str(exc)}, status_code=exc.status)

    @app.middleware("http")
    async def _limit_body(request: Request, call_next):
        size = request.headers.get("content-length")
        if size and size.isdigit() and int(size) > limits.max_upload_mb * MiB + MiB:
            return JSONResponse(
                {"error": f"upload larger than {limits.max_upload_mb:g} MiB"}, status_code=413
            )
        return await call_next(request)

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
            },
            "limits": dataclasses.asdict(limits),
        }  # fmt: skip

    @app.post("/api/perfusion/analyze")
    async def perfusion_analyze(request: Request):
        if models.perfusion is None:
            raise BadInput(models.errors["perfusion"], 503)
        form = await request.form()
        from perfusion import analyze, studies

        with tempfile.TemporaryDirectory(prefix="cardiac-web-") as tmp:
            paths = {}
            fields = ("study",) if form.get("study") is not None else ("stress", "rest")
            for field in fields:
                data = await _read_upload(form.get(field), field, limits)
                _decode_image(data, field)  # content check before anything else sees it
                paths[field] = pathlib.Path(tmp) / f"{field}.png"
                paths[field].write_bytes(data)
            model = models.perfusion
            try:
                if "study" in paths:
                    study = studies.read_study_image(
                        paths["study"], colormap=model.colormap, size=model.size
                    )
                else:
                    study = studies.read_study_pair(
                        paths["stress"], paths["rest"], colormap=model.colormap, size=model.size
                    )
            except ValueError as e:  # no disk, one disk where two are expected ...
                raise BadInput(str(e).replace(f"{tmp}/", ""), 422) from None
        study.name, study.path = "upload", ""
        reports, raw = analyze.analyze_arrays(model, [study])
        report = {"file": "upload", **reports[0]}
        overlay = analyze.draw_overlay(study, report, raw["blackout"][0])
        return {
            "report": report,
            "images": {
                "stress": png_data_url(study.stress_rgb),
                "rest": png_data_url(study.rest_rgb),
                "overlay": png_data_url(overlay),
            },
        }

    def _gated(entry: dict, expect: str | None) -> list[list[dict]]:
        engine = models.tavr
        # "none" = the user expects no group at this stage; absent/empty = no stage prior.
        expect_groups = [] if expect == "none" else expect
        try:
            gate = postprocess.Gate.from_meta(engine.meta, engine.schema, expect=expect_groups)
        except ValueError as e:
            raise BadInput(str(e).replace("--expect", "expect"), 422) from None
        reported = gate(entry["out"]["visibility"], entry["out"]["group"])
        return _tavr_points(engine, entry["out"], reported, entry["spacing"])

    def _tavr_json(result_id: str, entry: dict, expect, *, images: bool) -> dict:
        schema = models.tavr.schema
        points = _gated(entry, expect)
        frames = []
        for i, pts in enumerate(points):
            frame = {
                "index": i,
                "time_s": entry["times"][i],
                "groups": {g: round(float(p), 4)
                           for g, p in zip(schema.group_names, entry["out"]["group"][i],
                                           strict=True)},
                "points": pts,
            }  # fmt: skip
            if images:
                frame["image"] = jpeg_data_url(entry["frames"][i])
            frames.append(frame)
        return {
            "result_id": result_id,
            "kind": entry["kind"],
            "n_frames": len(frames),
            "truncated": entry["truncated"],
            "fps": entry["fps"],
            "pixel_spacing_mm": entry["spacing"],
            "expect": expect or "",
            "frames": frames,
        }

    @app.post("/api/tavr/predict")
    async def tavr_predict(request: Request):
        if models.tavr is None:
            raise BadInput(models.errors["tavr"], 503)
        form = await request.form()
        data = await _read_upload(form.get("media"), "media", limits)
        expect = str(form.get("expect") or "") or None
        kind = _sniff_media(data)
        with tempfile.TemporaryDirectory(prefix="cardiac-web-") as tmp:
            path = pathlib.Path(tmp) / {"image": "frame.png", "dicom": "cine.dcm",
                                        "video": "clip.video"}[kind]  # fmt: skip
            path.write_bytes(data)
            try:
                source = streams.open_source(path)
                frames, times = [], []
                for frame in source:
                    if len(frames) == limits.max_frames:
                        break
                    frames.append(frame.image)
                    times.append(frame.time_s)
            except (ValueError, FileNotFoundError) as e:
                message = str(e).replace(str(path), "upload")
                if kind == "video":
                    message = "media: not an image, a video or a DICOM file (" + message + ")"
                raise BadInput(message, 415 if kind == "video" else 422) from None
        if not frames:
            raise BadInput("media: no frames could be decoded", 422)
        if len({f.shape for f in frames}) != 1:
            raise BadInput("media: frames of different sizes in one sequence", 422)
        with lock:
            out = models.tavr(np.stack(frames))
        entry = {"out": out, "frames": frames, "times": times, "kind": source.kind,
                 "fps": source.fps, "spacing": source.pixel_spacing_mm,
                 "truncated": len(frames) < len(source)}  # fmt: skip
        result_id = secrets.token_hex(8)
        response = _tavr_json(result_id, entry, expect, images=True)  # validates expect
        results[result_id] = entry
        while len(results) > limits.cached_results:
            results.popitem(last=False)
        return response

    @app.get("/api/tavr/result/{result_id}")
    def tavr_result(result_id: str, expect: str = ""):
        entry = results.get(result_id)
        if entry is None:
            raise BadInput(f"unknown or expired result id {result_id[:32]!r}", 404)
        return _tavr_json(result_id, entry, expect or None, images=False)

    return app
