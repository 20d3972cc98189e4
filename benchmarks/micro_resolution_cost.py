"""What a miniature world with finer photos would cost: training steps of the micro UNet at 32 px and larger, side by side.

    python benchmarks/micro_resolution_cost.py [--sizes 32 64] [--repeats 3] [--threads 2]

A rebuild of the world spends nearly all its time in two kinds of step: the base model's (a batch of 32 photos,
forward, backward and Adam over all weights) and the identity LoRAs' (100 identities side by side, 4 photos each,
forward and backward through the frozen UNet into the per-identity rank-1 factors). Both are timed here for the
world's UNet (`MicroConfig`, the same channels and attention blocks) at each photo size, on random tensors of the
right shapes, alternating the sizes within one process. Printed: the median seconds per step and the ratio to the
first size. The world's UNet keeps its three levels at any size, so at 64 px its attention runs on 4 × the tokens.
A 64-px design with an extra convolution-only level would cost less; it is not built here, but its cost can be
estimated: the last lines time the work the UNet does at full photo size in a LoRA step (conv_in and down0 forward;
up0, norm_out and conv_out forward and backward), at each size, as a share of that size's LoRA step. An extra
level of the same convolutions at twice the size does about 4 × that work on top of the whole step.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from w2w.micro.model import MicroConfig, MicroUNet, micro_layout  # noqa: E402

BASE_BATCH = 32  # BaseConfig.batch
LORA_IDENTITIES, LORA_PHOTOS = 100, 4  # the second world's LoRAs per pass and photos per identity per step
CONTEXT_TOKENS = 4


def _steps(size: int, seed: int):
    """Two closures, one base-model step and one LoRA step at ``size`` px, on fixed random inputs."""
    gen = torch.Generator().manual_seed(seed)
    cfg = MicroConfig(image=size)
    torch.manual_seed(seed)
    unet = MicroUNet(cfg)
    opt = torch.optim.Adam(unet.parameters(), lr=1e-3)

    def batch(n):
        return (torch.randn(n, 3, size, size, generator=gen), torch.randint(0, 1000, (n,), generator=gen),
                torch.randn(n, CONTEXT_TOKENS, cfg.context, generator=gen))

    x, t, c = batch(BASE_BATCH)

    def base():
        unet.train()
        for p in unet.parameters():
            p.requires_grad_(True)
        opt.zero_grad(set_to_none=True)
        unet(x, t, c).square().mean().backward()
        opt.step()

    layout = micro_layout(unet)
    w = (torch.randn(LORA_IDENTITIES, layout.dim, generator=gen) * 0.01).requires_grad_(True)
    lora_opt = torch.optim.Adam([w], lr=1e-2)
    owner = torch.arange(LORA_IDENTITIES).repeat_interleave(LORA_PHOTOS)
    xl, tl, cl = batch(LORA_IDENTITIES * LORA_PHOTOS)

    def lora():
        for p in unet.parameters():
            p.requires_grad_(False)
        factors = [(a[owner], b[owner]) for a, b in layout.factors(w)]
        with unet.patched(factors, layout.scale):
            loss = unet(xl, tl, cl).square().mean()
        lora_opt.zero_grad(set_to_none=True)
        loss.backward()
        lora_opt.step()

    temb_dim = cfg.channels[0] * 4
    c0, c1 = cfg.channels[0], cfg.channels[1]
    n = LORA_IDENTITIES * LORA_PHOTOS
    emb = torch.randn(n, temb_dim, generator=gen)
    skip_in = torch.randn(n, c1 + c0, size, size, generator=gen)  # what up0 receives: upsampled level 1 + h0

    def top():
        with torch.no_grad():  # nothing before h0 needs a gradient in a LoRA step
            unet.down0(unet.conv_in(xl), emb)
        u = skip_in.clone().requires_grad_(True)  # the gradient flows back through the top level to the LoRAs
        unet.conv_out(torch.nn.functional.silu(unet.norm_out(unet.up0(u, emb)))).square().mean().backward()

    return base, lora, top


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[32, 64], help="photo sizes in px (the first is the baseline)")
    p.add_argument("--repeats", type=int, default=3, help="timed steps per kind and size (after one warm-up)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = p.parse_args()
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    if any(s < 8 or s % 4 for s in args.sizes):
        p.error("--sizes must be multiples of 4, at least 8 (the UNet halves the image twice)")
    torch.set_num_threads(args.threads)
    steps = {s: _steps(s, seed=i) for i, s in enumerate(args.sizes)}
    kinds = ("base", "lora", "top")
    times = {(s, k): [] for s in args.sizes for k in kinds}
    for s in args.sizes:  # warm-up
        for fn in steps[s]:
            fn()
    for _ in range(args.repeats):
        for s in args.sizes:  # alternate the sizes, so a slow spell of the machine falls on all of them
            for k, fn in zip(kinds, steps[s]):
                t0 = time.perf_counter()
                fn()
                times[(s, k)].append(time.perf_counter() - t0)
    first = args.sizes[0]
    print(f"micro UNet training steps, {args.threads} threads, median of {args.repeats} (min..max):")
    for k, label in (("base", f"base model step ({BASE_BATCH} photos)"),
                     ("lora", f"LoRA step ({LORA_IDENTITIES} identities x {LORA_PHOTOS} photos)")):
        ref = statistics.median(times[(first, k)])
        for s in args.sizes:
            v = times[(s, k)]
            med = statistics.median(v)
            print(f"  {label}, {s:3d} px: {med:7.3f} s ({min(v):.3f}..{max(v):.3f}), {med / ref:5.2f} x {first} px")
    for s in args.sizes:
        top = statistics.median(times[(s, "top")])
        share = top / statistics.median(times[(s, "lora")])
        print(f"  full-size level's work in a LoRA step, {s:3d} px: {top:7.3f} s = {100 * share:4.1f} % of the step;"
              f" an extra convolution-only level at {2 * s} px: about {1 + 4 * share:.2f} x the step")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
