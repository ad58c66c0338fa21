"""The page at ``GET /`` of the Serve endpoint: one HTML file with plain CSS and JS, no build step.

``static/index.html`` (package data) calls the public API only (``GET v1/labels``,
``POST v1/recognize``) and loads nothing from any other host: a user's machine is often offline.
It is tested in headless Chromium by ``tests/browser/test_page.py``.
"""

from __future__ import annotations

from functools import cache
from importlib.resources import files

STATIC = files("mer_ray.serve") / "static"


@cache
def index_html() -> str:
    """The page's HTML, read once from the package's ``static/`` folder."""
    return (STATIC / "index.html").read_text(encoding="utf-8")
