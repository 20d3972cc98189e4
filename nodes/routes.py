"""Server routes and UI events of the pack, for the web extension in ``web/js``.

- ``GET /w2w/spaces`` -> ``{"spaces": [name, ...]}``: the choices of Load w2w Space.
- ``GET /w2w/spaces/{name}`` -> the summary of one space (``space_summary``): PCs, attributes, base model, layout,
  file size, whether training coefficients are present. 404 with ``{"error": ...}`` for an unknown name.
- ``send_event(event, data)``: a message to the browser that queued the running prompt (no-op outside a server).

Importing this file has no effect; ``register_routes()`` (called when ComfyUI loads the pack) adds the routes
once, and only when a ``PromptServer`` exists (not in a plain in-process executor).
"""
from __future__ import annotations

import asyncio
import logging
import os
import threading

from ..w2w.safeload import W2WFileError
from ..w2w.space import load_space
from .folders import file_fingerprint, list_spaces, resolve_space

log = logging.getLogger(__name__)

STRENGTH_UNITS = "training-spread units, 1.0 = one standard deviation of training identities along the direction"
_CACHE: dict[str, tuple[tuple, dict]] = {}  # full path -> (file fingerprint, summary)
_LOCK = threading.Lock()
_REGISTERED = False


def _file_size(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if os.path.isfile(os.path.join(path, f)))


def space_summary(name: str) -> dict:
    """What the UI shows about space ``name``: read once per file version (one PC and the training data)."""
    path = resolve_space(name)  # W2WFileError naming the folders when unknown
    stamp = file_fingerprint(path)
    with _LOCK:
        cached = _CACHE.get(path)
        if cached is not None and cached[0] == stamp:
            return cached[1]
    space = load_space(path, pcs=1)
    info = space.describe()
    layout = space.layout
    summary = {
        "name": name,
        "base_model": space.base_model,
        "pcs": space.total_pcs,
        "attributes": list(space.attributes),
        "training_coefficients": space.has_training,
        "training_models": info["training_models"],
        "sampling_pcs": info["sampling_pcs"],
        "layout": {"modules": len(layout.modules), "rank": layout.rank, "alpha": layout.alpha, "dim": layout.dim},
        "file_size": _file_size(path),
        "kind": "folder of released files" if os.path.isdir(path) else "w2w .safetensors",
        "fingerprint": space.fingerprint,
        "strength_units": STRENGTH_UNITS,
    }
    with _LOCK:
        _CACHE[path] = (stamp, summary)
    return summary


def _server():
    try:
        from server import PromptServer
    except ImportError:
        return None
    return getattr(PromptServer, "instance", None)


def send_event(event: str, data: dict) -> None:
    """Send ``data`` as ``event`` to the client of the running prompt; does nothing without a server."""
    server = _server()
    if server is not None and getattr(server, "client_id", None) is not None:
        server.send_sync(event, data, server.client_id)


def register_routes() -> bool:
    """Add the /w2w routes to the running PromptServer (once); False when there is none."""
    global _REGISTERED
    server = _server()
    if server is None or _REGISTERED:
        return _REGISTERED
    from aiohttp import web

    @server.routes.get("/w2w/spaces")
    async def spaces(request):
        return web.json_response({"spaces": list_spaces()})

    @server.routes.get("/w2w/spaces/{name:.+}")
    async def space(request):
        name = request.match_info["name"]
        try:
            summary = await asyncio.get_running_loop().run_in_executor(None, space_summary, name)
        except W2WFileError as exc:
            return web.json_response({"error": str(exc)}, status=404)
        except (ValueError, OSError) as exc:
            log.warning("w2w: cannot summarise space %s: %s", name, exc)
            return web.json_response({"error": f"space {name!r} could not be read: {exc}"}, status=422)
        return web.json_response(summary)

    _REGISTERED = True
    return True
