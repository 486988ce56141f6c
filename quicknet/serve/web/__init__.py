"""The web front: a page at `/` that classifies images from a browser, and the API docs (`/docs`
Swagger UI, `/redoc` ReDoc). Every script, style sheet and icon they load is served from `static/`
in this package, none from a CDN, so both work on a machine without internet (the docs' assets are
vendored in `static/vendor/`; its README.md gives versions, sources and checksums).

With API keys on, these routes answer without a key (`open_path`): they are the same static bytes
for everyone and hold no data, and a browser sends no `Authorization` header when it loads a page,
so a closed page could never show the field where the key is pasted. `/classify` stays closed; the
page asks for a key when it is answered 401.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, Response

from quicknet.serve.runtime import Runtime
from quicknet.serve.transport.http import open_path

PROTOCOL = "web"
OPENAPI_SCHEMAS = ()
STATIC = Path(__file__).parent / "static"
PREFIX = "/static/"

# What is served, by extension; anything else under static/ (licenses, the vendor README) is not.
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".png": "image/png",
    ".svg": "image/svg+xml",
}
# The page may load only its own files and talk only to its own server: a browser-side guarantee
# that it works offline, and no inline script for an injected string to become.
PAGE_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
# The docs pages run inline script and style (FastAPI's HTML, Redoc's styled components), so this
# one only fences hosts: nothing but this server, or data:/blob:. ReDoc's bundle shows a logo from
# Redocly's CDN unasked; refused here, it hides itself, and no view of the docs reaches another host.
DOCS_POLICY = "default-src 'self' 'unsafe-inline' data: blob:; base-uri 'none'; frame-ancestors 'none'"
SWAGGER_JS = "vendor/swagger-ui/swagger-ui-bundle.js"
SWAGGER_CSS = "vendor/swagger-ui/swagger-ui.css"
DOCS_ICON = "vendor/swagger-ui/favicon-32x32.png"
REDOC_JS = "vendor/redoc/redoc.standalone.js"


@dataclass(frozen=True)
class Asset:
    body: bytes
    content_type: str
    etag: str

    @classmethod
    def load(cls, path: Path) -> Asset:
        body = path.read_bytes()
        return cls(body, CONTENT_TYPES[path.suffix], '"' + hashlib.sha256(body).hexdigest()[:32] + '"')

    def response(self, request: Request, headers: dict[str, str] | None = None) -> Response:
        """The bytes, or 304 when the browser holds this version; `no-cache` makes it ask each time,
        so an upgraded service is never shown with a stale script."""
        common = {"ETag": self.etag, "Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}
        if self.etag in (tag.strip() for tag in request.headers.get("if-none-match", "").split(",")):
            return Response(status_code=304, headers=common)
        return Response(self.body, media_type=self.content_type, headers={**common, **(headers or {})})


def assets() -> dict[str, Asset]:
    """Every servable file under static/ by its path there (read once: ~3 MB, mostly the docs' bundles)."""
    return {
        path.relative_to(STATIC).as_posix(): Asset.load(path)
        for path in sorted(STATIC.rglob("*"))
        if path.is_file() and path.suffix in CONTENT_TYPES
    }


def _root(request: Request) -> str:
    """The prefix a proxy mounts us under (`root_path`), as FastAPI's own docs routes use it."""
    return request.scope.get("root_path", "").rstrip("/")


def router(runtime: Runtime) -> APIRouter:
    api = APIRouter(include_in_schema=False)
    files = assets()
    page = files.pop("index.html")

    @api.get("/")
    @open_path
    async def index(request: Request) -> Response:
        return page.response(request, {"Content-Security-Policy": PAGE_POLICY})

    def serve(asset: Asset):
        @open_path
        async def static_file(request: Request) -> Response:
            return asset.response(request)

        return static_file

    for name, asset in files.items():  # one exact route per file: auth's open paths are exact paths
        api.add_api_route(PREFIX + name, serve(asset), methods=["GET"], name=f"static:{name}")

    @api.get("/docs")
    @open_path
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = _root(request)
        html = get_swagger_ui_html(
            openapi_url=root + request.app.openapi_url,
            title=f"{request.app.title} - Swagger UI",
            swagger_js_url=root + PREFIX + SWAGGER_JS,
            swagger_css_url=root + PREFIX + SWAGGER_CSS,
            swagger_favicon_url=root + PREFIX + DOCS_ICON,
            # no badge from the online validator: it would send the schema's URL to another host
            swagger_ui_parameters={"validatorUrl": None},
        )
        html.headers["Content-Security-Policy"] = DOCS_POLICY
        return html

    @api.get("/redoc")
    @open_path
    async def redoc(request: Request) -> HTMLResponse:
        root = _root(request)
        html = get_redoc_html(
            openapi_url=root + request.app.openapi_url,
            title=f"{request.app.title} - ReDoc",
            redoc_js_url=root + PREFIX + REDOC_JS,
            redoc_favicon_url=root + PREFIX + DOCS_ICON,
            with_google_fonts=False,
        )
        html.headers["Content-Security-Policy"] = DOCS_POLICY
        return html

    return api
