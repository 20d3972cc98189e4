"""weights2weights core: spaces of LoRA weights, identities, sampling, edits, export. Plain PyTorch, no ComfyUI.

Nothing is imported eagerly: ``import w2w`` is cheap; names resolve on first use.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "Layout": "layout", "ModuleSlot": "layout", "LayoutError": "layout", "sd15_layout": "layout",
    "W2WFileError": "safeload",
    "Space": "space", "Direction": "space", "load_space": "space", "save_space": "space", "convert_release": "convert",
    "Identity": "identity", "IdentityMismatch": "identity", "save_identity": "identity", "load_identity": "identity",
    "sample_identity": "sampling",
    "apply_edit": "edit", "get_direction": "edit", "fit_directions": "edit", "blend": "edit", "nearest_training": "edit",
    "export_lora": "export", "lora_state_dict": "export", "identity_factors": "export",
}
__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'w2w' has no attribute {name!r}")
