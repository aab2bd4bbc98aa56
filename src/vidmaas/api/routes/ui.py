"""The web page: ``GET /`` and ``GET /static/*``, served from the installed package.

Guarantees:
- Files come from ``vidmaas/api/static`` through ``importlib.resources``, so the page
  works from a wheel as well as from a checkout; nothing is read at import time.
- Only plain files directly under that folder are served (no ``..``, no sub-folders,
  no hidden files); anything else is a JSON 404 like every other unknown route.
- Every response carries a strict Content-Security-Policy: scripts, styles, media and
  connections only from the page's own origin (WebSocket to the same host included),
  images also from ``blob:``/``data:`` for the upload preview; nothing external loads,
  except videos and posters from the object store's origin when downloads redirect
  to presigned S3 URLs.
- ``index.html`` is never cached (so a deploy takes effect at the next load); the
  static assets are revalidated with an ETag on every load (``no-cache``), which is
  cheap and never serves a stale ``app.js`` against a new ``index.html``.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import re
from urllib.parse import urlsplit

from fastapi import APIRouter, FastAPI, Request, Response

from vidmaas.config import Settings
from vidmaas.errors import NotFound

_PACKAGE = "vidmaas.api"
_FOLDER = "static"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,100}$")

CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".json": "application/json",
    ".webmanifest": "application/manifest+json",
}

# 'self' does not cover ws:/wss: in every browser, so the WebSocket origin is added
# per request from the Host header (same origin only). Videos and posters may answer
# with a redirect to a presigned object-store URL: that origin is added for media and
# images only.
_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; "
        "img-src 'self' blob: data:{store}; media-src 'self' blob:{store}; "
        "connect-src 'self'{ws}; font-src 'self'; manifest-src 'self'; base-uri 'none'; "
        "form-action 'self'; frame-ancestors 'none'")


def _origin(url: str) -> str | None:
    parsed = urlsplit(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        return None
    return f"{parsed.scheme}://{parsed.netloc}"


def store_origin(settings: Settings | None) -> str | None:
    """Where presigned download URLs point, when downloads redirect to S3."""
    if settings is None or not settings.storage.redirect_downloads \
            or not settings.storage.url.startswith("s3://"):
        return None
    st = settings.storage
    endpoint = st.s3_public_endpoint_url or st.s3_endpoint_url
    return _origin(endpoint) if endpoint else "https://*.amazonaws.com"


def csp_for(request: Request) -> str:
    store = store_origin(getattr(request.app.state, "settings", None))
    store_src = f" {store}" if store else ""
    host = request.headers.get("host", "")
    if not re.fullmatch(r"[A-Za-z0-9.\-:\[\]]{1,300}", host):
        return _CSP.format(ws="", store=store_src)
    scheme = "wss" if request.url.scheme == "https" else "ws"
    return _CSP.format(ws=f" {scheme}://{host}", store=store_src)


def _read(name: str) -> bytes:
    if not _NAME.fullmatch(name) or ".." in name:
        raise NotFound("no such file", code="not_found")
    resource = importlib.resources.files(_PACKAGE).joinpath(_FOLDER, name)
    if not resource.is_file():
        raise NotFound("no such file", code="not_found")
    return resource.read_bytes()


def _respond(request: Request, name: str, *, cache: str) -> Response:
    body = _read(name)
    suffix = name[name.rfind("."):] if "." in name else ""
    etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
    headers = {
        "Cache-Control": cache,
        "ETag": etag,
        "Content-Security-Policy": csp_for(request),
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "X-Frame-Options": "DENY",
    }
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers=headers)
    return Response(body, media_type=CONTENT_TYPES.get(suffix, "application/octet-stream"),
                    headers=headers)


router = APIRouter(include_in_schema=False)


@router.get("/")
async def index(request: Request) -> Response:
    return _respond(request, "index.html", cache="no-store")


@router.get("/static/{name}")
async def static(request: Request, name: str) -> Response:
    return _respond(request, name, cache="no-cache")


def install(app: FastAPI) -> None:
    """Mount the page on ``app`` (called by the app factory)."""
    app.include_router(router)
