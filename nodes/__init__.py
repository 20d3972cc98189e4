"""The ComfyUI nodes of the pack: one module per feature, each exporting ``NODES = [...]``.

Imported only by ComfyUI through the pack's top-level ``comfy_entrypoint()``. Add a feature by listing its
module in ``FEATURES``.
"""
from __future__ import annotations

import importlib

from comfy_api.latest import ComfyExtension, io

from .common import register_model_folders

FEATURES = ("space", "apply", "invert", "vae", "idscore")


def collect_nodes() -> list[type[io.ComfyNode]]:
    nodes: list[type[io.ComfyNode]] = []
    for feature in FEATURES:
        nodes.extend(importlib.import_module(f".{feature}", __name__).NODES)
    return nodes


class W2WExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return collect_nodes()


def extension() -> W2WExtension:
    """Register the model folders and the web routes, then hand ComfyUI the extension."""
    from .routes import register_routes

    register_model_folders()
    register_routes()
    return W2WExtension()
