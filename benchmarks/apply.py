"""Apply w2w LoRA against the stock LoraLoader on the same identity exported as a LoRA, in a real ComfyUI (CPU).

    python benchmarks/apply.py [--comfyui PATH] [--pcs 1000] [--repeats 5] [--steps 2] [--size 64]

1. Time to a patched, loaded model: (Apply w2w LoRA | LoraLoaderModelOnly on the exported file) + the load that bakes
   the patches (`load_models_gpu`), median over interleaved repeats. Target ratio ≤ 1.0.
2. Time per extra sampling step (KSampler, Euler: an (N+1)-step run minus a 1-step run, so per-call costs cancel) on
   the base model, the w2w-patched model and, for information, the delayed-injection model, with subnormal floats
   flushed to zero and kept. Target overhead of the patched model: 0 % (patches are baked at load).
Both sides run side by side in the same process on the same random-weight full-size SD1.5 stand-in.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests" / "comfy"), str(ROOT)]


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def make_space(pcs: int):
    """An in-memory space in the released layout (random, not orthonormalised: cheap to build at 1000 PCs)."""
    import torch

    from w2w.layout import sd15_layout
    from w2w.space import Space

    layout = sd15_layout()
    gen = torch.Generator().manual_seed(0)
    d = layout.dim
    return Space(torch.randn(pcs, d, generator=gen) / d ** 0.5, torch.randn(d, generator=gen) * 0.02,
                 torch.rand(d, generator=gen) * 0.02 + 0.002, layout,
                 coef_mean=torch.zeros(pcs), coef_std=torch.linspace(3.0, 0.5, pcs))


def bench_arguments(doc: str, repeats: int) -> argparse.ArgumentParser:
    """The options every real-host benchmark here takes."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--comfyui", type=Path)
    parser.add_argument("--pcs", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--size", type=int, default=64)
    return parser


def start_host(parser: argparse.ArgumentParser, comfyui: Path | None):
    """ComfyUI in this process (the test harness's host) with the SD1.5 stand-in staged: (host, ComfyUI path)."""
    from comfyhost import SD15_STANDIN_NAME, ComfyHost
    from demo import standins
    from demo.locate import PACK_DIRNAME, find_comfyui, pack_root

    comfyui = comfyui or find_comfyui()
    if comfyui is None:
        parser.error("ComfyUI not found (set COMFYUI_PATH)")
    host = ComfyHost.start(comfyui, Path(tempfile.mkdtemp(prefix="w2w-bench-")), pack_root(), PACK_DIRNAME)
    host.stage_model("checkpoints", standins.ensure_sd15_standin(comfyui), SD15_STANDIN_NAME)
    return host, comfyui


def main(argv=None) -> int:
    parser = bench_arguments(__doc__, repeats=5)
    args = parser.parse_args(argv)
    host, comfyui = start_host(parser, args.comfyui)
    from comfyhost import SD15_STANDIN_NAME

    import torch
    import comfy.model_management as mm
    import folder_paths

    node = host.node_class
    with torch.inference_mode():
        base, clip, _ = node("CheckpointLoaderSimple")().load_checkpoint(SD15_STANDIN_NAME)
        space = make_space(args.pcs)
        identity = node("W2WSampleIdentity").execute(space, 5, args.pcs, 1.0).result[0]
        edited = node("W2WSampleIdentity").execute(space, 6, args.pcs, 1.0).result[0]
        node("W2WSaveLoRA").execute(space, identity, "bench/identity", "float32")
        lora = next(n for n in folder_paths.get_filename_list("loras") if n.startswith("bench/identity_"))

        def w2w():
            mm.load_models_gpu([node("W2WApplyLoRA").execute(base, space, identity, 1.0).result[0]], force_full_load=True)

        def stock():
            mm.load_models_gpu([node("LoraLoaderModelOnly")().load_lora_model_only(base, lora, 1.0)[0]], force_full_load=True)

        w2w(), stock()  # warm-up: first load, file cache
        times = {"w2w": [], "stock": []}
        for _ in range(args.repeats):
            for name, fn in (("w2w", w2w), ("stock", stock)):
                mm.unload_all_models()
                times[name].append(timed(fn))
        t_w2w, t_stock = statistics.median(times["w2w"]), statistics.median(times["stock"])
        # the node alone (no load): reconstruction from the space vs reading the LoRA file and mapping its keys
        node_only = {"w2w": [], "stock": []}
        for _ in range(args.repeats):
            node_only["w2w"].append(timed(lambda: node("W2WApplyLoRA").execute(base, space, identity, 1.0)))
            node_only["stock"].append(timed(lambda: node("LoraLoaderModelOnly")().load_lora_model_only(base, lora, 1.0)))
        n_w2w, n_stock = statistics.median(node_only["w2w"]), statistics.median(node_only["stock"])
        best_w2w, best_stock = min(times["w2w"]), min(times["stock"])

        positive = node("CLIPTextEncode")().encode(clip, "sks person")[0]
        negative = node("CLIPTextEncode")().encode(clip, "low quality, blurry, unfinished")[0]
        latent = node("EmptyLatentImage")().generate(args.size, args.size, 1)[0]
        models = {"base": base, "w2w": node("W2WApplyLoRA").execute(base, space, identity, 1.0).result[0],
                  "delayed": node("W2WApplyLoRA").execute(base, space, identity, 1.0, edited, 0.3).result[0]}

        def sample(model, steps):
            node("KSampler")().sample(model, 5, steps, 3.0, "euler", "simple", positive, negative, latent)

        def per_extra_step(model) -> float:
            """(time of an N-step run − time of a 1-step run) / (N − 1): what one more step costs, with the
            per-call costs (model load check, conditioning, the first step's set-up) cancelled out."""
            mm.load_models_gpu([model], force_full_load=True)  # load outside the timing, as in a long run
            one = timed(lambda: sample(model, 1))
            mm.load_models_gpu([model], force_full_load=True)
            many = timed(lambda: sample(model, args.steps + 1))
            return (many - one) / args.steps

        for model in models.values():
            sample(model, 1)  # warm-up and load
        steps = {(name, flush): [] for name in models for flush in (True, False)}
        wrapped = {}
        for _ in range(args.repeats):
            for flush in (True, False):
                torch.set_flush_denormal(flush)
                for name, model in models.items():
                    steps[(name, flush)].append(per_extra_step(model))
                    wrapped[name] = sum(1 for m in model.model.modules() if getattr(m, "weight_function", None))
        torch.set_flush_denormal(False)
    print(f"ComfyUI {comfyui}; torch {torch.__version__}; {torch.get_num_threads()} threads; space {args.pcs} PCs; "
          f"{args.repeats} repeats")
    print(f"time to patched, loaded model (median | best of {args.repeats}): Apply w2w LoRA {t_w2w * 1000:.0f} | "
          f"{best_w2w * 1000:.0f} ms, stock LoraLoader {t_stock * 1000:.0f} | {best_stock * 1000:.0f} ms "
          f"-> ratio {t_w2w / t_stock:.2f} | {best_w2w / best_stock:.2f} (target <= 1.0)")
    print(f"  of which the node alone (median): Apply w2w LoRA {n_w2w * 1000:.0f} ms (weights from {args.pcs} PCs), "
          f"LoraLoaderModelOnly {n_stock * 1000:.0f} ms")
    print("modules whose weight is recomputed at every call (the only per-step cost a patch can add): "
          + ", ".join(f"{name} {count}" for name, count in wrapped.items()))
    for flush, label in ((True, "subnormal floats flushed to zero (the operations alone)"),
                         (False, "subnormal floats kept (as ComfyUI runs on a CPU)")):
        base_med, base_best = statistics.median(steps[("base", flush)]), min(steps[("base", flush)])
        for name in ("w2w", "delayed"):
            med, best = statistics.median(steps[(name, flush)]), min(steps[(name, flush)])
            print(f"per extra step at {args.size}x{args.size}, {label} (median | best): base {base_med:.2f} | "
                  f"{base_best:.2f} s, {name} {med:.2f} | {best:.2f} s -> overhead {100 * (med / base_med - 1):+.1f} % "
                  f"| {100 * (best / base_best - 1):+.1f} %" + (" (target 0 %)" if name == "w2w" and flush else ""))
    print("Subnormal (denormal) floats make CPU arithmetic many times slower; the random stand-in's attention with the "
          "synthetic space's patch produces more of them than the base model, so the 'kept' figures measure the "
          "weights' values, not the patch mechanism (same modules, no per-call weight function, same layout).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
