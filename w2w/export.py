"""An identity as a standard LoRA file that ComfyUI's LoraLoader, A1111/Forge, kohya tools, PEFT and diffusers load."""
from __future__ import annotations

import json
import os
import shutil
import tempfile

import torch

from .identity import Identity
from .layout import ModuleSlot
from .space import Space
from .stfile import _umask, atomic_path, write_safetensors

__all__ = ["identity_factors", "lora_state_dict", "export_lora", "FORMATS"]

FORMATS = ("kohya", "peft", "diffusers")


def identity_factors(space: Space, identity: Identity) -> list[tuple[ModuleSlot, torch.Tensor, torch.Tensor]]:
    """(module, A (rank, in), B (out, rank)) float32 of every module: ΔW = alpha/rank · B @ A (paper §3).

    The one owner of an identity's LoRA factors: the exports below and the MODEL patches use it.
    """
    identity.check_space(space)
    layout = space.layout
    weights = space.weights(identity.coefficients)  # (d,)
    return [(slot, a.contiguous(), b.contiguous()) for slot, (a, b) in zip(layout.modules, layout.factors(weights))]


def lora_state_dict(space: Space, identity: Identity, fmt: str = "kohya", dtype: torch.dtype = torch.float32,
                    strength: float = 1.0) -> dict[str, torch.Tensor]:
    """Factors of ``identity`` keyed for ``fmt``. ``up @ down · alpha/rank`` (kohya/PEFT) equals ΔW of the space.

    kohya: ``lora_unet_<path>.lora_down.weight`` (rank, in), ``.lora_up.weight`` (out, rank), ``.alpha``.
    peft: ``base_model.model.<path>.lora_A.weight`` / ``lora_B.weight`` (alpha in adapter_config.json).
    diffusers: ``unet.<path>.lora_A.weight`` / ``lora_B.weight`` with alpha/rank folded into B (no alpha key).
    ``strength`` scales B (and so ΔW) linearly.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown LoRA format {fmt!r}; choose one of {', '.join(FORMATS)}")
    layout = space.layout
    out: dict[str, torch.Tensor] = {}
    for m, a, b in identity_factors(space, identity):
        b = b * strength
        if fmt == "kohya":
            out[f"{m.kohya_name}.lora_down.weight"] = a.to(dtype).contiguous()
            out[f"{m.kohya_name}.lora_up.weight"] = b.to(dtype).contiguous()
            out[f"{m.kohya_name}.alpha"] = torch.tensor(float(layout.alpha), dtype=dtype)
        elif fmt == "peft":
            out[f"{m.peft_prefix}.lora_A.weight"] = a.to(dtype).contiguous()
            out[f"{m.peft_prefix}.lora_B.weight"] = b.to(dtype).contiguous()
        else:
            out[f"unet.{m.name}.lora_A.weight"] = a.to(dtype).contiguous()
            out[f"unet.{m.name}.lora_B.weight"] = (b * layout.scale).to(dtype).contiguous()
    return out


def export_lora(space: Space, identity: Identity, out: str, fmt: str = "kohya", dtype: torch.dtype = torch.float32,
                strength: float = 1.0) -> str:
    """Write the LoRA; kohya/diffusers: one .safetensors file; peft: a folder with adapter_model.safetensors and
    adapter_config.json. Returns the path written."""
    sd = lora_state_dict(space, identity, fmt, dtype, strength)
    meta = {"w2w_space": space.fingerprint, "w2w_identity": identity.name, "w2w_history": json.dumps(list(identity.history)),
            "ss_network_module": "networks.lora", "ss_network_dim": str(space.layout.rank),
            "ss_network_alpha": str(space.layout.alpha), "ss_base_model_version": "sd_v1"}
    if fmt != "peft":
        if not out.endswith(".safetensors"):
            raise ValueError(f"{out}: a {fmt} LoRA is written as a .safetensors file")
        write_safetensors(out, sd, meta)
        return out
    targets = sorted({m.name.rsplit(".", 1)[-1] for m in space.layout.modules})
    config = {"peft_type": "LORA", "r": space.layout.rank, "lora_alpha": space.layout.alpha, "target_modules": targets,
              "lora_dropout": 0.0, "bias": "none", "init_lora_weights": True}

    def write(folder: str) -> None:
        write_safetensors(os.path.join(folder, "adapter_model.safetensors"), sd, meta)
        with atomic_path(os.path.join(folder, "adapter_config.json")) as tmp, open(tmp, "w") as f:
            json.dump(config, f, indent=2)

    out = os.path.abspath(out)
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"{out} is a file; a peft adapter is a folder (adapter_model.safetensors + "
                         "adapter_config.json): give a folder name")
    if os.path.isdir(out):  # an adapter folder written before: each file is replaced whole
        write(out)
        return out
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="." + os.path.basename(out)[:40] + ".", suffix=".partial", dir=parent)
    try:  # a new folder appears whole, with both files, or not at all
        write(tmp)
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's folder is private; give it the mode makedirs would
        os.rename(tmp, out)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return out
