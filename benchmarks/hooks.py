"""w2w Identity Hook against the stock Create Hook LoRA (MO) on the same identity exported as a LoRA, in a real ComfyUI
(CPU), and what a second, masked identity costs.

    python benchmarks/hooks.py [--comfyui PATH] [--pcs 1000] [--repeats 3] [--steps 2] [--size 64]

Per sampling step (KSampler, Euler), on the random-weight full-size SD1.5 stand-in, both conditionings hooked:
1. one w2w Identity Hook vs one Create Hook LoRA (MO) on the LoRA Save w2w LoRA wrote (target ratio <= 1.05): the
   hooks carry the same LoRA patches, so the sampler does the same work;
2. two identities under complementary masks vs one unmasked identity: each differently hooked conditioning is one
   more UNet pass per step (plus re-patching the 64 weights when the sampler switches between them);
3. for reference, the plain model and Apply w2w LoRA (patches baked at load).
All variants run interleaved, in the same process, on the same loaded checkpoint; medians and best of --repeats.
Subnormal floats are flushed to zero (the random stand-in's patched attention makes many of them, and CPU arithmetic on
them is many times slower: docs/benchmarks.md); --keep-subnormals measures as ComfyUI runs.
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests" / "comfy"), str(ROOT), str(ROOT / "benchmarks")]


def main(argv=None) -> int:
    from apply import bench_arguments, make_space, start_host

    parser = bench_arguments(__doc__, repeats=3)
    parser.add_argument("--keep-subnormals", action="store_true", help="do not flush subnormal floats to zero")
    args = parser.parse_args(argv)
    host, comfyui = start_host(parser, args.comfyui)
    from comfyhost import SD15_STANDIN_NAME

    import torch
    import folder_paths

    node = host.node_class
    with torch.inference_mode():
        base, clip, _ = node("CheckpointLoaderSimple")().load_checkpoint(SD15_STANDIN_NAME)
        space = make_space(args.pcs)
        first = node("W2WSampleIdentity").execute(space, 5, args.pcs, 1.0).result[0]
        second = node("W2WSampleIdentity").execute(space, 6, args.pcs, 1.0).result[0]
        node("W2WSaveLoRA").execute(space, first, "bench/hook_identity", "float32")
        lora = next(n for n in folder_paths.get_filename_list("loras") if n.startswith("bench/hook_identity_"))

        positive = node("CLIPTextEncode")().encode(clip, "photo of two people, sks person")[0]
        negative = node("CLIPTextEncode")().encode(clip, "low quality, blurry, unfinished")[0]
        latent = node("EmptyLatentImage")().generate(args.size, args.size, 1)[0]
        set_props = node("PairConditioningSetProperties")().set_properties
        combine = node("PairConditioningSetPropertiesAndCombine")().set_properties

        def hooked(hooks, mask=None):
            return set_props(positive, negative, 1.0, "default", mask=mask, hooks=hooks)

        w2w_hook = node("W2WIdentityHook").execute(space, first, 1.0).result[0]
        stock_hook = node("CreateHookLoraModelOnly")().create_hook_model_only(lora, 1.0)[0]
        left = torch.zeros(1, args.size, args.size)
        left[..., : args.size // 2] = 1.0
        pos_a, neg_a = hooked(w2w_hook, left)
        other = node("W2WIdentityHook").execute(space, second, 1.0).result[0]
        two = combine(pos_a, neg_a, positive, negative, 1.0, "default", mask=1.0 - left, hooks=other)
        applied = node("W2WApplyLoRA").execute(base, space, first, 1.0).result[0]
        variants = {"plain model": (base, (positive, negative)), "Apply w2w LoRA": (applied, (positive, negative)),
                    "w2w hook": (base, hooked(w2w_hook)), "Create Hook LoRA (MO)": (base, hooked(stock_hook)),
                    "two masked w2w hooks": (base, two)}

        def sample(model, conds):
            node("KSampler")().sample(model, 5, args.steps, 3.0, "euler", "normal", conds[0], conds[1], latent)

        torch.set_flush_denormal(not args.keep_subnormals)
        for model, conds in variants.values():
            sample(model, conds)  # warm-up: loads, first patching
        times = {name: [] for name in variants}
        for _ in range(args.repeats):
            for name, (model, conds) in variants.items():
                start = time.perf_counter()
                sample(model, conds)
                times[name].append((time.perf_counter() - start) / args.steps)
        torch.set_flush_denormal(False)
    median = {name: statistics.median(v) for name, v in times.items()}
    best = {name: min(v) for name, v in times.items()}
    print(f"ComfyUI {comfyui}; torch {torch.__version__}; {torch.get_num_threads()} threads; space {args.pcs} PCs; "
          f"{args.size}x{args.size}, {args.steps} steps, {args.repeats} repeats, subnormal floats "
          f"{'kept' if args.keep_subnormals else 'flushed'}; seconds per step (median | best)")
    for name in variants:
        print(f"  {name:24s} {median[name]:7.2f} | {best[name]:7.2f}")

    def ratio(a, b):
        return f"{median[a] / median[b]:.3f} (median) | {best[a] / best[b]:.3f} (best)"

    print(f"w2w hook / Create Hook LoRA (MO): {ratio('w2w hook', 'Create Hook LoRA (MO)')}  (target <= 1.05)")
    print(f"two masked identities / one hook: {ratio('two masked w2w hooks', 'w2w hook')}")
    print(f"one hook / plain model: {ratio('w2w hook', 'plain model')}; "
          f"Apply w2w LoRA / plain model: {ratio('Apply w2w LoRA', 'plain model')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
