"""The miniature text-to-image diffusion model: a small pixel-space UNet with SD1.5-style transformer blocks.

Like SD1.5, every transformer block has self-attention ``attn1`` and cross-attention ``attn2`` (to the text) with
``to_q``/``to_k``/``to_v``/``to_out``; a w2w model is a rank-1 LoRA on ``to_q``/``to_v`` of both (the released layout,
scaled down: :func:`micro_layout`). The text encoder is learned token embeddings plus one transformer layer.

LoRA factors are injected per forward pass (``unet.set_factors``): one set for the whole batch, or one set per
batch item (factors with a leading batch axis), which is how many identities' LoRAs train side by side.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..layout import Layout, ModuleSlot

__all__ = ["VOCAB", "BASE_VOCAB", "SCENE_WORDS", "MicroConfig", "TextEncoder", "MicroUNet", "LoRALinear",
           "micro_layout", "tokenize", "alphas_cumprod", "ddim_sample", "MicroDenoiser", "v_target", "eps_from_v"]

# the words of the first two worlds' text encoders; later words are appended, so a text encoder knowing the first
# n words (MicroConfig.vocab) reads any caption made of them
BASE_VOCAB = ("<pad>", "photo", "person", "man", "woman", "sks", "beard", "glasses", "blond", "chubby", "young", "old")
# words for what a hard photo shows besides the person: head turn, expression, headwear (faces.scene_words)
SCENE_WORDS = ("left", "right", "smiling", "cap")
VOCAB = BASE_VOCAB + SCENE_WORDS
TOKENS = 8
TIMESTEPS = 1000


def tokenize(words_list: list[list[str]] | list[str]) -> torch.Tensor:
    """Captions (lists of words, or strings) -> (N, TOKENS) int64 ids; unknown words are an error."""
    out = torch.zeros(len(words_list), TOKENS, dtype=torch.long)
    for i, words in enumerate(words_list):
        words = words.split() if isinstance(words, str) else words
        if len(words) > TOKENS:
            raise ValueError(f"caption {' '.join(words)!r} has more than {TOKENS} words")
        for j, w in enumerate(words):
            if w not in VOCAB:
                raise ValueError(f"unknown word {w!r} in caption; the vocabulary is {', '.join(VOCAB[1:])}")
            out[i, j] = VOCAB.index(w)
    return out


@dataclass(frozen=True)
class MicroConfig:
    channels: tuple[int, int, int] = (32, 64, 64)  # at 32, 16 and 8 pixels
    context: int = 32  # text embedding width (attn2's key/value input, like SD1.5's 768)
    heads: int = 4
    image: int = 32
    vocab: int = len(BASE_VOCAB)  # the text encoder knows the first `vocab` words of VOCAB

    def __post_init__(self) -> None:
        if not len(BASE_VOCAB) <= self.vocab <= len(VOCAB):
            raise ValueError(f"vocab must be {len(BASE_VOCAB)}..{len(VOCAB)} words, got {self.vocab}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "MicroConfig":
        """A saved config; files from before the vocabulary grew lack ``vocab`` and know the first worlds' words."""
        return cls(channels=tuple(d["channels"]), context=int(d["context"]), heads=int(d["heads"]),
                   image=int(d["image"]), vocab=int(d.get("vocab", len(BASE_VOCAB))))


class TextEncoder(nn.Module):
    def __init__(self, width: int, vocab: int = len(BASE_VOCAB)):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.pos = nn.Parameter(torch.randn(TOKENS, width) * 0.02)
        self.layer = nn.TransformerEncoderLayer(width, 2, width * 2, dropout=0.0, batch_first=True, norm_first=True)
        self.norm = nn.LayerNorm(width)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        known = self.embed.num_embeddings
        if tokens.numel() and int(tokens.max()) >= known:
            word = VOCAB[int(tokens.max())]
            raise ValueError(f"this text encoder does not know the word {word!r}: it was trained with "
                             f"{', '.join(VOCAB[1:known])}")
        return self.norm(self.layer(self.embed(tokens) + self.pos))


class LoRALinear(nn.Linear):
    """nn.Linear plus an optional rank-r update ``scale · B @ A``, shared by the batch or one per batch item."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.factors: tuple[torch.Tensor, torch.Tensor] | None = None
        self.scale = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        if self.factors is None:
            return y
        a, b = self.factors  # (r, in), (out, r)  or  (N, r, in), (N, out, r)
        if a.dim() == 2:
            return y + self.scale * F.linear(F.linear(x, a), b)
        return y + self.scale * torch.bmm(torch.bmm(x, a.transpose(1, 2)), b.transpose(1, 2))


class Attention(nn.Module):
    def __init__(self, dim: int, context: int, heads: int):
        super().__init__()
        self.heads = heads
        self.to_q = LoRALinear(dim, dim, bias=False)
        self.to_k = nn.Linear(context, dim, bias=False)
        self.to_v = LoRALinear(context, dim, bias=False)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        n, l, c = x.shape
        h = self.heads
        q = self.to_q(x).view(n, l, h, c // h).transpose(1, 2)
        k = self.to_k(context).view(n, -1, h, c // h).transpose(1, 2)
        v = self.to_v(context).view(n, -1, h, c // h).transpose(1, 2)
        return self.to_out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, l, c))


class TransformerBlock(nn.Module):
    """GroupNorm → proj_in → [LN → attn1 (self), LN → attn2 (text), LN → GEGLU FF] → proj_out, residual."""

    def __init__(self, dim: int, context: int, heads: int):
        super().__init__()
        self.norm = nn.GroupNorm(8, dim)
        self.proj_in = nn.Linear(dim, dim)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn1 = Attention(dim, dim, heads)
        self.attn2 = Attention(dim, context, heads)
        self.ff_in = nn.Linear(dim, dim * 4)
        self.ff_out = nn.Linear(dim * 2, dim)
        self.proj_out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        n, c, hh, ww = x.shape
        h = self.proj_in(self.norm(x).flatten(2).transpose(1, 2))
        y = self.norm1(h)
        h = h + self.attn1(y, y)
        h = h + self.attn2(self.norm2(h), context)
        g, gate = self.ff_in(self.norm3(h)).chunk(2, dim=-1)
        h = h + self.ff_out(g * F.gelu(gate))
        return x + self.proj_out(h).transpose(1, 2).reshape(n, c, hh, ww)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, temb: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(8, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.time = nn.Linear(temb, cout)
        self.norm2 = nn.GroupNorm(8, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x))) + self.time(t)[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class MicroUNet(nn.Module):
    """v-prediction UNet over (N, 3, 32, 32) pixels: 32 → 16 → 8 → 16 → 32, transformer blocks at 16 and 8 px.

    It predicts v = sqrt(ᾱ)·ε − sqrt(1−ᾱ)·x0 (Salimans & Ho 2022), which trains faster and samples better in few
    steps than ε; :func:`eps_from_v` gives ε for the inversion engine's ε loss.
    """

    def __init__(self, config: MicroConfig = MicroConfig()):
        super().__init__()
        self.config = config
        c0, c1, c2 = config.channels
        ctx, heads = config.context, config.heads
        temb = c0 * 4
        self.time_mlp = nn.Sequential(nn.Linear(c0, temb), nn.SiLU(), nn.Linear(temb, temb))
        self.conv_in = nn.Conv2d(3, c0, 3, padding=1)
        self.down0 = ResBlock(c0, c0, temb)
        self.pool0 = nn.Conv2d(c0, c0, 3, stride=2, padding=1)
        self.down1 = ResBlock(c0, c1, temb)
        self.down1_attn = TransformerBlock(c1, ctx, heads)
        self.pool1 = nn.Conv2d(c1, c1, 3, stride=2, padding=1)
        self.down2 = ResBlock(c1, c2, temb)
        self.down2_attn = TransformerBlock(c2, ctx, heads)
        self.mid1 = ResBlock(c2, c2, temb)
        self.mid_attn = TransformerBlock(c2, ctx, heads)
        self.mid2 = ResBlock(c2, c2, temb)
        self.up2 = ResBlock(c2 + c2, c2, temb)
        self.up2_attn = TransformerBlock(c2, ctx, heads)
        self.up1 = ResBlock(c2 + c1, c1, temb)
        self.up1_attn = TransformerBlock(c1, ctx, heads)
        self.up0 = ResBlock(c1 + c0, c0, temb)
        self.norm_out = nn.GroupNorm(8, c0)
        self.conv_out = nn.Conv2d(c0, 3, 3, padding=1)

    def transformer_blocks(self) -> list[tuple[str, TransformerBlock]]:
        return [(n, m) for n, m in self.named_modules() if isinstance(m, TransformerBlock)]

    def lora_modules(self) -> list[tuple[str, LoRALinear]]:
        """The LoRA targets in layout order: to_q, to_v of attn1 and attn2 in every transformer block."""
        out = []
        for name, block in self.transformer_blocks():
            for target in ("attn1.to_q", "attn1.to_v", "attn2.to_q", "attn2.to_v"):
                out.append((f"{name}.{target}", block.get_submodule(target)))
        return out

    def set_factors(self, factors, scale: float = 1.0) -> None:
        """Per layout module (A, B) — or None to remove all LoRA updates."""
        modules = self.lora_modules()
        if factors is None:
            for _, m in modules:
                m.factors = None
            return
        if len(factors) != len(modules):
            raise ValueError(f"{len(factors)} factor pairs for {len(modules)} LoRA modules")
        for (_, m), f in zip(modules, factors):
            m.factors, m.scale = f, scale

    @contextmanager
    def patched(self, factors, scale: float = 1.0):
        self.set_factors(factors, scale)
        try:
            yield self
        finally:
            self.set_factors(None)

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        temb = self.time_mlp(timestep_embedding(t, self.config.channels[0]))
        h0 = self.down0(self.conv_in(x), temb)
        h1 = self.down1_attn(self.down1(self.pool0(h0), temb), context)
        h2 = self.down2_attn(self.down2(self.pool1(h1), temb), context)
        m = self.mid2(self.mid_attn(self.mid1(h2, temb), context), temb)
        u = self.up2_attn(self.up2(torch.cat([m, h2], 1), temb), context)
        u = F.interpolate(u, scale_factor=2.0, mode="nearest")
        u = self.up1_attn(self.up1(torch.cat([u, h1], 1), temb), context)
        u = F.interpolate(u, scale_factor=2.0, mode="nearest")
        u = self.up0(torch.cat([u, h0], 1), temb)
        return self.conv_out(F.silu(self.norm_out(u)))


def micro_layout(unet: MicroUNet, rank: int = 1, alpha: float = 1.0) -> Layout:
    """The w2w layout of a micro UNet: per target, A (rank, in) then B (out, rank), in :meth:`lora_modules` order."""
    modules, offset = [], 0
    for name, m in unet.lora_modules():
        a_offset = offset
        offset += rank * m.in_features
        modules.append(ModuleSlot(name, m.in_features, m.out_features, a_offset, offset))
        offset += rank * m.out_features
    return Layout(tuple(modules), rank=rank, alpha=alpha)


def v_target(x0: torch.Tensor, noise: torch.Tensor, abar_t: torch.Tensor) -> torch.Tensor:
    a = abar_t.view(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
    return a.sqrt() * noise - (1 - a).sqrt() * x0


def eps_from_v(x_t: torch.Tensor, v: torch.Tensor, abar_t: torch.Tensor) -> torch.Tensor:
    a = abar_t.view(-1, *([1] * (x_t.dim() - 1))).to(x_t.dtype)
    return (1 - a).sqrt() * x_t + a.sqrt() * v


def alphas_cumprod(steps: int = TIMESTEPS) -> torch.Tensor:
    """ᾱ_t (float64) of the cosine schedule (Nichol & Dhariwal 2021), used in pixel space."""
    s = 0.008
    x = torch.linspace(0, steps, steps + 1, dtype=torch.float64)
    f = torch.cos((x / steps + s) / (1 + s) * math.pi / 2) ** 2
    betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
    return torch.cumprod(1 - betas, 0)


@torch.no_grad()
def ddim_sample(unet: MicroUNet, context: torch.Tensor, *, seeds: list[int], steps: int = 25, cfg: float = 1.0,
                uncond: torch.Tensor | None = None, factors=None, scale: float = 1.0,
                abar: torch.Tensor | None = None) -> torch.Tensor:
    """Deterministic DDIM (η = 0) images (N, 3, H, W) in [-1, 1]; one noise seed per image.

    ``context`` (1 or N, TOKENS, width); ``uncond`` (1, TOKENS, width) enables classifier-free guidance with ``cfg``;
    ``factors`` as in :meth:`MicroUNet.set_factors` (shared or per image).
    """
    size = unet.config.image
    n = len(seeds)
    x = torch.stack([torch.randn(3, size, size, generator=torch.Generator().manual_seed(int(s))) for s in seeds])
    abar = (alphas_cumprod() if abar is None else abar).float()
    ts = torch.linspace(len(abar) - 1, 0, steps).round().long()
    ctx = context.expand(n, -1, -1) if context.shape[0] == 1 else context
    with unet.patched(factors, scale):
        for i, t in enumerate(ts):
            tt = t.repeat(n)
            v = unet(x, tt, ctx)
            if uncond is not None and cfg != 1.0:
                v_u = unet(x, tt, uncond.expand(n, -1, -1))
                v = v_u + cfg * (v - v_u)
            a = abar[t]
            a_prev = abar[ts[i + 1]] if i + 1 < len(ts) else torch.tensor(1.0)
            x0 = (a.sqrt() * x - (1 - a).sqrt() * v).clamp(-1, 1)
            eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
            x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    return x.clamp(-1, 1)


class MicroDenoiser:
    """A :class:`w2w.invert.Denoiser` over a frozen micro UNet: ε̂ from the v that unet_{W + scale·B@A} predicts."""

    def __init__(self, unet: MicroUNet, scale: float = 1.0, abar: torch.Tensor | None = None):
        self.unet = unet
        self.scale = scale
        self.abar = (alphas_cumprod() if abar is None else abar).float()

    def __call__(self, x_t, t, cond, factors):
        return self.predict(x_t, t, cond, factors)[0]

    def predict(self, x_t, t, cond, factors) -> tuple[torch.Tensor, torch.Tensor]:
        """(ε̂, x̂0): the noise and the clean image the patched UNet predicts; x̂0 = sqrt(ᾱ)·x_t − sqrt(1−ᾱ)·v, well
        conditioned at every timestep (clamped to the pixels' range [-1, 1], as the sampler does)."""
        ctx = cond.expand(x_t.shape[0], -1, -1) if cond.shape[0] == 1 else cond
        a = self.abar.to(x_t.device)[t]
        with self.unet.patched(factors, self.scale):
            v = self.unet(x_t, t, ctx)
        ab = a.view(-1, *([1] * (x_t.dim() - 1))).to(x_t.dtype)
        return eps_from_v(x_t, v, a), (ab.sqrt() * x_t - (1 - ab).sqrt() * v).clamp(-1, 1)
