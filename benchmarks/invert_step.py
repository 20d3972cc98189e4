"""One w2w inversion step vs one plain rank-1 LoRA training step, side by side on the same UNet and batch.

w2w step:  β (pcs,) -> w = (β @ basis) * std + mean (99,648 values) -> 64 rank-1 deltas 27·B@A as weight wrappers
           -> UNet forward + backward -> Adam on β, exactly as w2w.invert.invert runs it (its "auto" precision:
           the basis products in float16 on a CPU where that is fast, β and Adam in float32).
LoRA step: the same 64 rank-1 factors (99,648 values) as free parameters -> the same wrappers, forward, backward
           -> Adam on the factors.
Same full-size SD1.5 UNet (ComfyUI's own classes, random weights, float32), same latents, timestep, noise and
context; steps run in back-to-back pairs of alternating order so both see the same machine load, then the part
of a w2w step a LoRA step does not have (the basis work) is timed alone. The ratio is the cost of optimising in the
space instead of the raw weights. Target: <= 1.05. Three figures: ratio of the medians, median of the pair ratios,
and 1 + basis part / LoRA step (the UNet half of both steps is the same code, so on a noisy machine this third one is
the steadiest estimate).

    nice -n 10 python benchmarks/invert_step.py                 # 256 px, 10,000 PCs (needs ~16 GB RAM)
    nice -n 10 python benchmarks/invert_step.py --precision float32 --unfused
    nice -n 10 python benchmarks/invert_step.py --size 128 --pcs 1000

Needs a ComfyUI checkout ($COMFYUI_PATH, the checkout containing this pack, or ~/ComfyUI). On a CPU the w2w
overhead is reading the basis, memory-bandwidth bound: in float32 one fused pass over 4 GB at 10,000 PCs
(w2w.invert.FusedAdam: gradient, Adam and the next weights block by block; the unfused form reads it twice); in
mixed precision two passes over 2 GB half-precision copies. On a GPU these products take milliseconds.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from demo.locate import HOW_TO_PROVIDE, find_comfyui  # noqa: E402
from demo.standins import SD15_UNET_CONFIG  # noqa: E402


def import_comfyui(path: Path):
    sys.path.insert(0, str(path))
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    import comfy.model_management  # noqa: F401  (reads args.cpu)
    import comfy.model_patcher
    import comfy.supported_models

    return comfy


def build_unet(comfy, seed: int):
    """A full-size SD1.5 BaseModel (float32) with N(0, 1/fan_in) weights, norms 1, biases 0."""
    import torch

    config = comfy.supported_models.SD15(dict(SD15_UNET_CONFIG))
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({}, "")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0 if name.endswith("weight") else 0.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * p[0].numel() ** -0.5)
    model.requires_grad_(False)
    return model


def synthetic_space(pcs: int, seed: int):
    """A space in the released layout: random near-orthonormal basis rows, weights of the released scale."""
    import torch

    from w2w.layout import sd15_layout
    from w2w.space import Space

    layout = sd15_layout()
    gen = torch.Generator().manual_seed(seed)
    basis = torch.randn(pcs, layout.dim, generator=gen)
    basis *= layout.dim ** -0.5
    mean = torch.randn(layout.dim, generator=gen) * 1e-3
    std = torch.rand(layout.dim, generator=gen) * 1e-3 + 1e-4
    return Space(basis, mean, std, layout)


def steady_heap() -> None:
    """Ask glibc to serve large blocks from the heap and never give freed memory back (Linux only)."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        print("--steady-heap: glibc not found, ignored", file=sys.stderr)
        return
    m_trim_threshold, m_top_pad, m_mmap_max = -1, -2, -4
    ok = all(libc.mallopt(ctypes.c_int(option), ctypes.c_int(value)) == 1
             for option, value in ((m_mmap_max, 0), (m_trim_threshold, 2 ** 31 - 1), (m_top_pad, 256 << 20)))
    print(f"steady heap: {'on' if ok else 'mallopt refused, off'}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (latent = size / 8)")
    parser.add_argument("--pcs", type=int, default=10_000, help="coefficients optimised (paper: 10,000)")
    parser.add_argument("--batch", type=int, default=1, help="images per step")
    parser.add_argument("--repeats", type=int, default=6, help="timed steps of each kind (after one warm-up each)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--unfused", action="store_true", help="also time the unfused step (two basis passes)")
    parser.add_argument("--steady-heap", action="store_true",
                        help="keep freed memory in the process (glibc mallopt): without it every step's large "
                             "activations are fresh pages, and page faults add ~1 s and most of the noise on some VMs")
    parser.add_argument("--precision", choices=("auto", "float32", "float16", "bfloat16"), default="auto",
                        help="precision of the basis products in the w2w step (default: what invert() picks)")
    args = parser.parse_args(argv)

    if args.steady_heap:
        steady_heap()
    comfyui = find_comfyui()
    if comfyui is None:
        print("ComfyUI not found: " + HOW_TO_PROVIDE, file=sys.stderr)
        return 2
    comfy = import_comfyui(comfyui)
    import torch

    from w2w.diffusion import ddpm_noise, sd15_alphas_cumprod
    from w2w.invert import FactorBoard, FactorMap, FusedAdam, basis_dtype_for, diffusion_loss

    t0 = time.perf_counter()
    model = build_unet(comfy, args.seed)
    space = synthetic_space(args.pcs, args.seed)
    print(f"setup: full-size SD1.5 UNet + {args.pcs:,} x {space.dim:,} basis in {time.perf_counter() - t0:.1f} s; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, ComfyUI at {comfyui}")

    board = FactorBoard(space.layout)
    patcher = comfy.model_patcher.ModelPatcher(model, torch.device("cpu"), torch.device("cpu"))
    for slot, wrapper in zip(space.layout.modules, board.wrappers):
        patcher.add_weight_wrapper(slot.comfy_key, wrapper)
    comfy.model_management.load_models_gpu([patcher], force_full_load=True)

    gen = torch.Generator().manual_seed(args.seed + 1)
    side = args.size // 8
    x0 = torch.randn(args.batch, 4, side, side, generator=gen)
    noise = torch.randn(x0.shape, generator=gen)
    context = torch.randn(args.batch, 77, 768, generator=gen)
    t = torch.full((args.batch,), 500)
    abar = sd15_alphas_cumprod()
    sigma = ((1 - abar[t]) / abar[t]).sqrt().float()
    x_t = ddpm_noise(x0, t, noise, abar)

    def unet_loss(factors):
        board.factors = factors
        s = sigma.view(-1, 1, 1, 1)
        x = x_t * (1 + s ** 2).sqrt()
        eps = (x - patcher.model.apply_model(x, sigma, c_crossattn=context)) / s
        return diffusion_loss(eps, noise)

    fmap = FactorMap(space, args.pcs)  # float32 products: the unfused and the full-precision fused forms
    basis_dtype = basis_dtype_for(args.precision, "cpu", torch.float32, args.pcs, space.dim)
    t0 = time.perf_counter()
    fmap_run = FactorMap(space, args.pcs, basis_dtype=basis_dtype)
    print(f"basis products in {str(basis_dtype)[6:]} ({fmap_run.products.nbytes / 2**30:.2f} GiB on the device, "
          f"prepared in {time.perf_counter() - t0:.1f} s once per inversion)")
    fused = FusedAdam(fmap_run, torch.zeros(args.pcs), lr=0.1, weight_decay=1e-10)  # what w2w.invert.invert runs
    fused32 = fused if fmap_run.basis_dtype == torch.float32 else FusedAdam(fmap, torch.zeros(args.pcs), lr=0.1,
                                                                             weight_decay=1e-10)
    beta = torch.zeros(args.pcs, requires_grad=True)
    unfused_opt = torch.optim.Adam([beta], lr=0.1, weight_decay=1e-10)
    lora = [(a.detach().clone().requires_grad_(True), b.detach().clone().requires_grad_(True))
            for a, b in fmap.factors(torch.zeros(args.pcs))]
    lora_opt = torch.optim.Adam([p for pair in lora for p in pair], lr=1e-4)

    def w2w_step():
        unet_loss(fused.factors()).backward()
        fused.step()

    def unfused_step():  # autograd through w(β) and torch.optim.Adam: two passes over the basis
        loss = unet_loss(fmap.factors(beta))
        unfused_opt.zero_grad(set_to_none=True)
        loss.backward()
        unfused_opt.step()

    def lora_step():
        loss = unet_loss(lora)
        lora_opt.zero_grad(set_to_none=True)
        loss.backward()
        lora_opt.step()

    def coefficient_part(opt=fused):  # the part of a w2w step that a LoRA step does not have
        opt.w.grad = torch.ones_like(opt.w)
        opt.step()

    def unfused_part():  # the same, unfused: forward product, then its gradient
        w = fmap.weights(beta)
        w.backward(torch.ones_like(w))

    def timed(fn) -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    w2w_step(), lora_step()  # warm-up
    if args.unfused:
        unfused_step()
    w2w_times, lora_times, coef_times, unfused_times, unfused_part_times, coef32_times = [], [], [], [], [], []
    for r in range(args.repeats):  # back-to-back pairs, order alternating so drift cancels
        if r % 2 == 0:
            w2w_times.append(timed(w2w_step))
            lora_times.append(timed(lora_step))
        else:
            lora_times.append(timed(lora_step))
            w2w_times.append(timed(w2w_step))
    for _ in range(args.repeats):  # the parts, after the pairs (the float32 forms read 4-8 GB each)
        coef_times.append(timed(coefficient_part))
        coef32_times.append(timed(lambda: coefficient_part(fused32)))
        unfused_part_times.append(timed(unfused_part))
        if args.unfused:
            unfused_times.append(timed(unfused_step))
    w2w_s, lora_s, coef_s, unfused_part_s, coef32_s = (statistics.median(x) for x in (
        w2w_times, lora_times, coef_times, unfused_part_times, coef32_times))
    print(f"image {args.size}x{args.size} (latent {side}x{side}), batch {args.batch}, {args.repeats} steps each "
          f"(medians; all: w2w {[round(x, 3) for x in w2w_times]}, LoRA {[round(x, 3) for x in lora_times]})")
    print(f"w2w inversion step ({args.pcs:,} coefficients -> {space.dim:,} weights -> UNet fwd+bwd): {w2w_s:.3f} s")
    print(f"plain rank-1 LoRA step ({space.dim:,} parameters -> UNet fwd+bwd):                 {lora_s:.3f} s")
    print(f"  of which the basis part alone (gradient + Adam + next weights, {str(basis_dtype)[6:]}): {coef_s:.3f} s "
          f"(float32 fused pass {coef32_s:.3f} s; float32 unfused, product + its gradient {unfused_part_s:.3f} s)")
    if unfused_times:
        print(f"unfused w2w step (autograd through w(β) + torch.optim.Adam): {statistics.median(unfused_times):.3f} s")
    ratio = w2w_s / lora_s
    pairs = statistics.median(w / lo for w, lo in zip(w2w_times, lora_times))
    spread = max(lora_times) / min(lora_times)
    verdict = "met" if ratio <= 1.05 else "NOT met"
    if spread > 1.25:
        verdict = f"UNRELIABLE: LoRA step times varied x{spread:.1f} (busy machine), rerun when it is quiet"
    print(f"ratio w2w / LoRA = {ratio:.3f} (medians), {pairs:.3f} (median of back-to-back pairs), "
          f"{1 + coef_s / lora_s:.3f} (1 + basis part / LoRA step); target <= 1.05: {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
