"""Where each rank-r LoRA factor lives inside a flat w2w weight vector, and how its module is named elsewhere.

A w2w model is one flat vector ``w`` of length ``Layout.dim``. For every target Linear module it holds
``A`` (rank, in) and ``B`` (out, rank), each flattened row-major at its own offset; the weight change is
``ΔW = alpha / rank · B @ A`` (LoRA, Hu et al. 2021). The released SD1.5 space uses rank 1, alpha 27 and
64 modules (to_q and to_v of attn1 and attn2 in the 16 transformer blocks), 99,648 values in all.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from functools import cached_property

import torch

__all__ = ["ModuleSlot", "Layout", "LayoutError", "sd15_layout", "diffusers_to_ldm", "module_path_from_key"]


class LayoutError(ValueError):
    """A module layout that is inconsistent or that does not match a file or model."""


# SD1.5 transformer blocks in diffusers order, with their channel width.
_SD15_BLOCKS: tuple[tuple[str, int], ...] = (
    ("down_blocks.0.attentions.0", 320), ("down_blocks.0.attentions.1", 320),
    ("down_blocks.1.attentions.0", 640), ("down_blocks.1.attentions.1", 640),
    ("down_blocks.2.attentions.0", 1280), ("down_blocks.2.attentions.1", 1280),
    ("mid_block.attentions.0", 1280),
    ("up_blocks.1.attentions.0", 1280), ("up_blocks.1.attentions.1", 1280), ("up_blocks.1.attentions.2", 1280),
    ("up_blocks.2.attentions.0", 640), ("up_blocks.2.attentions.1", 640), ("up_blocks.2.attentions.2", 640),
    ("up_blocks.3.attentions.0", 320), ("up_blocks.3.attentions.1", 320), ("up_blocks.3.attentions.2", 320),
)
SD15_CONTEXT_DIM = 768
SD15_TARGETS = ("attn1.to_q", "attn1.to_v", "attn2.to_q", "attn2.to_v")

_BLOCK_RE = re.compile(r"^(down_blocks\.(\d+)\.attentions\.(\d+)|mid_block\.attentions\.0|up_blocks\.(\d+)\.attentions\.(\d+))\.(.+)$")


def diffusers_to_ldm(path: str) -> str | None:
    """Map a diffusers UNet module path to the original (ldm) path ComfyUI uses, or None if it is not SD-style."""
    match = _BLOCK_RE.match(path)
    if match is None:
        return None
    rest = match.group(6)
    if match.group(2) is not None:
        return f"input_blocks.{3 * int(match.group(2)) + int(match.group(3)) + 1}.1.{rest}"
    if match.group(4) is not None:
        return f"output_blocks.{3 * int(match.group(4)) + int(match.group(5))}.1.{rest}"
    return f"middle_block.1.{rest}"


_PEFT_SUFFIX_RE = re.compile(r"\.(lora_A|lora_B|lora_down|lora_up)(?:\.[A-Za-z0-9_]+)?\.weight$")
_PREFIXES = ("base_model.model.", "unet.", "lora_unet.")


def module_path_from_key(key: str) -> tuple[str, str]:
    """Split a LoRA tensor key into (diffusers module path, 'A' or 'B').

    Accepts PEFT keys (``base_model.model.<path>.lora_A.weight``, ``...lora_A.identity1.weight``,
    ``...lora_A.default.weight``), diffusers keys (``unet.<path>.lora_A.weight``) and kohya keys
    (``lora_unet_<path with underscores>.lora_down.weight``).
    """
    match = _PEFT_SUFFIX_RE.search(key)
    if match is None:
        raise LayoutError(f"key {key!r} is not a LoRA factor key (expected '.lora_A.weight', '.lora_B.weight', "
                          "'.lora_down.weight' or '.lora_up.weight' at its end)")
    which = "A" if match.group(1) in ("lora_A", "lora_down") else "B"
    path = key[: match.start()]
    if path.startswith("lora_unet_"):
        return _kohya_to_diffusers(path), which
    for prefix in _PREFIXES:
        if path.startswith(prefix):
            path = path[len(prefix):]
            break
    return path, which


_KOHYA_RE = re.compile(r"^lora_unet_(down_blocks_\d+_attentions_\d+|mid_block_attentions_0|up_blocks_\d+_attentions_\d+)"
                       r"_transformer_blocks_(\d+)_(attn[12])_(to_q|to_k|to_v|to_out_0)$")


def _kohya_to_diffusers(name: str) -> str:
    match = _KOHYA_RE.match(name)
    if match is None:
        raise LayoutError(f"kohya key {name!r} does not name a transformer attention projection of an SD-style UNet")
    block = match.group(1).replace("_", ".").replace("mid.block", "mid_block").replace("down.blocks", "down_blocks")
    block = block.replace("up.blocks", "up_blocks")
    proj = match.group(4).replace("to_out_0", "to_out.0")
    return f"{block}.transformer_blocks.{match.group(2)}.{match.group(3)}.{proj}"


@dataclass(frozen=True)
class ModuleSlot:
    """One target Linear module: its diffusers path, its shape and where its factors sit in the vector."""

    name: str  # diffusers path, e.g. "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    in_features: int
    out_features: int
    a_offset: int  # A (rank, in) row-major at w[a_offset : a_offset + rank * in]
    b_offset: int  # B (out, rank) row-major at w[b_offset : b_offset + out * rank]

    @property
    def ldm_path(self) -> str | None:
        return diffusers_to_ldm(self.name)

    @property
    def comfy_key(self) -> str | None:
        """State-dict key of the patched weight in a ComfyUI MODEL (``diffusion_model.<ldm path>.weight``)."""
        ldm = self.ldm_path
        return None if ldm is None else f"diffusion_model.{ldm}.weight"

    @property
    def kohya_name(self) -> str:
        return "lora_unet_" + self.name.replace(".", "_")

    @property
    def peft_prefix(self) -> str:
        return "base_model.model." + self.name


@dataclass(frozen=True)
class Layout:
    """The ordered modules of a w2w weight vector, with LoRA rank and alpha (ΔW = alpha/rank · B @ A)."""

    modules: tuple[ModuleSlot, ...]
    rank: int = 1
    alpha: float = 27.0

    def __post_init__(self) -> None:
        if not self.modules:
            raise LayoutError("a layout needs at least one module")
        if self.rank < 1:
            raise LayoutError(f"rank must be >= 1, got {self.rank}")
        if not math.isfinite(self.alpha) or self.alpha <= 0:
            raise LayoutError(f"alpha must be a positive finite number, got {self.alpha}")
        names = [m.name for m in self.modules]
        if len(set(names)) != len(names):
            raise LayoutError("a layout lists the same module twice")
        spans = []
        for m in self.modules:
            if m.in_features < 1 or m.out_features < 1:
                raise LayoutError(f"module {m.name}: in/out features must be positive")
            spans.append((m.a_offset, m.a_offset + self.rank * m.in_features))
            spans.append((m.b_offset, m.b_offset + self.rank * m.out_features))
        spans.sort()
        position = 0
        for start, end in spans:
            if start != position:
                raise LayoutError(f"layout does not add up: a factor starts at {start} but the previous one ends at "
                                  f"{position} (factors must tile the vector without gaps or overlaps)")
            position = end

    @cached_property
    def dim(self) -> int:
        return sum(self.rank * (m.in_features + m.out_features) for m in self.modules)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def module(self, name: str) -> ModuleSlot:
        for m in self.modules:
            if m.name == name:
                return m
        raise KeyError(name)

    # ---- factors ---------------------------------------------------------------------------------------
    def factors(self, w: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Split weight vectors (..., dim) into per-module (A (..., rank, in), B (..., out, rank)) views."""
        if w.shape[-1] != self.dim:
            raise LayoutError(f"weight vector has {w.shape[-1]} values; this layout needs {self.dim}")
        lead = w.shape[:-1]
        r = self.rank
        out = []
        for m in self.modules:
            a = w[..., m.a_offset: m.a_offset + r * m.in_features].reshape(*lead, r, m.in_features)
            b = w[..., m.b_offset: m.b_offset + r * m.out_features].reshape(*lead, m.out_features, r)
            out.append((a, b))
        return out

    def deltas(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-module ΔW = alpha/rank · B @ A, computed in float32. w: (..., dim) -> {name: (..., out, in)}."""
        w = w.float()
        return {m.name: self.scale * (b @ a) for m, (a, b) in zip(self.modules, self.factors(w))}

    def flatten(self, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Inverse of :meth:`factors`: {name: (A (rank, in), B (out, rank))} -> w (dim,) float32."""
        w = torch.empty(self.dim, dtype=torch.float32)
        missing = [m.name for m in self.modules if m.name not in factors]
        if missing:
            raise LayoutError(f"{len(missing)} modules of the layout are missing, e.g. {missing[0]}")
        for m in self.modules:
            a, b = factors[m.name]
            if tuple(a.shape) != (self.rank, m.in_features) or tuple(b.shape) != (m.out_features, self.rank):
                raise LayoutError(f"module {m.name}: factors have shapes {tuple(a.shape)} and {tuple(b.shape)}; "
                                  f"expected {(self.rank, m.in_features)} and {(m.out_features, self.rank)}")
            w[m.a_offset: m.a_offset + a.numel()] = a.reshape(-1).float()
            w[m.b_offset: m.b_offset + b.numel()] = b.reshape(-1).float()
        return w

    # ---- (de)serialisation -----------------------------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps({
            "rank": self.rank, "alpha": self.alpha,
            "modules": [[m.name, m.in_features, m.out_features, m.a_offset, m.b_offset] for m in self.modules],
        }, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> "Layout":
        try:
            data = json.loads(text)
            modules = tuple(ModuleSlot(str(n), int(i), int(o), int(a), int(b)) for n, i, o, a, b in data["modules"])
            return cls(modules, rank=int(data["rank"]), alpha=float(data["alpha"]))
        except LayoutError:
            raise
        except (ValueError, KeyError, TypeError) as exc:
            raise LayoutError(f"layout metadata is malformed: {exc}") from exc

    @classmethod
    def from_weight_dimensions(cls, dims: dict, alpha: float = 27.0) -> "Layout":
        """Read the released ``weight_dimensions`` dict: key -> (numel info, torch.Size), in flattening order."""
        if not isinstance(dims, dict) or not dims:
            raise LayoutError("weight_dimensions must be a non-empty dict of key -> (numel, shape)")
        offset = 0
        found: dict[str, dict[str, tuple[int, tuple[int, ...]]]] = {}
        order: list[str] = []
        for key, value in dims.items():
            if not isinstance(key, str):
                raise LayoutError(f"weight_dimensions key {key!r} is not a string")
            numel, shape = _parse_dim_value(key, value)
            path, which = module_path_from_key(key)
            if path not in found:
                found[path] = {}
                order.append(path)
            if which in found[path]:
                raise LayoutError(f"weight_dimensions lists factor {which} of {path} twice")
            found[path][which] = (offset, shape)
            offset += numel
        ranks = set()
        modules = []
        for path in order:
            parts = found[path]
            if set(parts) != {"A", "B"}:
                raise LayoutError(f"module {path} has only its {''.join(parts)} factor in weight_dimensions")
            (a_off, a_shape), (b_off, b_shape) = parts["A"], parts["B"]
            if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != b_shape[1]:
                raise LayoutError(f"module {path}: factor shapes {a_shape} and {b_shape} are not (rank, in) and (out, rank)")
            ranks.add(a_shape[0])
            modules.append(ModuleSlot(path, a_shape[1], b_shape[0], a_off, b_off))
        if len(ranks) != 1:
            raise LayoutError(f"modules have different ranks {sorted(ranks)}; one rank per space is supported")
        return cls(tuple(modules), rank=ranks.pop(), alpha=alpha)

    def to_weight_dimensions(self, key_style: str = "peft") -> dict:
        """The released-style dict (key -> ((numel,), torch.Size)) in flattening order."""
        entries = []
        for m in self.modules:
            for which, offset, shape in (("A", m.a_offset, (self.rank, m.in_features)),
                                         ("B", m.b_offset, (m.out_features, self.rank))):
                if key_style == "peft":
                    key = f"{m.peft_prefix}.lora_{which}.weight"
                else:
                    raise ValueError(f"unknown key style {key_style!r}")
                entries.append((offset, key, shape))
        entries.sort()
        return {key: ((shape[0] * shape[1],), torch.Size(shape)) for _, key, shape in entries}


def _parse_dim_value(key: str, value) -> tuple[int, tuple[int, ...]]:
    try:
        numel_info, shape = value
        shape = tuple(int(s) for s in shape)
        numel = int(numel_info[0]) if isinstance(numel_info, (tuple, list, torch.Size)) else int(numel_info)
    except (TypeError, ValueError) as exc:
        raise LayoutError(f"weight_dimensions[{key!r}] = {value!r} is not (numel, shape)") from exc
    if numel != math.prod(shape) or numel <= 0:
        raise LayoutError(f"weight_dimensions[{key!r}]: numel {numel} does not match shape {shape}")
    return numel, shape


def sd15_layout(rank: int = 1, alpha: float = 27.0) -> Layout:
    """The released w2w layout: to_q/to_v of attn1 and attn2 in all 16 SD1.5 transformer blocks (sorted PEFT order)."""
    modules = []
    offset = 0
    for block, width in _SD15_BLOCKS:
        for target in SD15_TARGETS:
            in_features = SD15_CONTEXT_DIM if target == "attn2.to_v" else width
            name = f"{block}.transformer_blocks.0.{target}"
            a_offset = offset
            offset += rank * in_features
            modules.append(ModuleSlot(name, in_features, width, a_offset, offset))
            offset += rank * width
    return Layout(tuple(modules), rank=rank, alpha=alpha)
