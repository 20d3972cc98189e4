"""The ComfyUI nodes of the pack: one module per feature, each exporting ``NODES = [...]``.

Imported only by ComfyUI through the pack's top-level ``comfy_entrypoint()``. Add a feature by importing its
``NODES`` below.
"""
from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from .apply import NODES as APPLY_NODES
from .folders import register_model_folders
from .hooks import NODES as HOOK_NODES
from .idscore import NODES as IDSCORE_NODES
from .inversion import NODES as INVERSION_NODES
from .routes import register_routes
from .space import NODES as SPACE_NODES
from .vae import NODES as VAE_NODES


def collect_nodes() -> list[type[io.ComfyNode]]:
    return [*SPACE_NODES, *APPLY_NODES, *HOOK_NODES, *INVERSION_NODES, *VAE_NODES, *IDSCORE_NODES]


class W2WExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return collect_nodes()


def extension() -> W2WExtension:
    """Register the model folders and the web routes, then hand ComfyUI the extension."""
    register_model_folders()
    register_routes()
    return W2WExtension()
