"""The miniature w2w world end to end: train it (resumable), save its artifacts, load them back.

``build_world(workdir, out)`` runs the stages in order — base model, judge, one rank-1 LoRA per identity of the model
dataset (the micro ``all_weights``), multi-image LoRAs of held-out people, the w2w space (our own streaming build),
edit directions from the attribute labels (our own fit), a w2w++ VAE (our own trainer) — each resuming from its
checkpoint in ``workdir``, then writes fp16 ``.safetensors`` artifacts to ``out`` (``models/micro/`` in the repo).
``load_world(out)`` reads them back (safetensors only, shapes and metadata checked).
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch

from ..build import ArraySource, BuildConfig, attach_labels, build_space
from ..edit import fit_directions
from ..space import Space, load_space, save_space
from ..stfile import write_safetensors
from ..vae import TrainConfig, W2WVAE, load_vae, save_vae, train_from_space
from .faces import ATTRIBUTES, attributes, identity_params
from .judge import JudgeConfig, JudgeNet, train_judge
from .model import VOCAB, MicroConfig, MicroUNet, TextEncoder, micro_layout
from .train import (HELDOUT_SEEDS, MODEL_SEEDS, BaseConfig, Log, LoraConfig, atomic_save, identity_images,
                    load_checkpoint, train_base, train_loras)

__all__ = ["WorldConfig", "World", "build_world", "load_world", "save_world", "ARTIFACTS", "toy_config",
           "DEFAULT_DIR"]

ARTIFACTS = ("micro-unet.safetensors", "micro-judge.safetensors", "micro-space.safetensors",
             "micro-weights.safetensors", "micro-vae.safetensors")
DEFAULT_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                           "models", "micro")
FORMAT = "w2w-micro-world"


@dataclass(frozen=True)
class WorldConfig:
    base: BaseConfig = BaseConfig()
    judge: JudgeConfig = JudgeConfig()
    lora: LoraConfig = LoraConfig()
    models: int = 240  # identities in the model dataset (rows of the micro all_weights)
    heldout: int = 16  # people never in the space: inversion targets
    vae_latent: int = 16
    vae_hidden: tuple[int, ...] = (128, 64)
    vae_epochs: int = 300
    seed: int = 0

    def to_json(self) -> str:
        return json.dumps(asdict(self))


def toy_config() -> WorldConfig:
    """A world small enough for tests (seconds): same code paths, tiny sizes."""
    model = MicroConfig(channels=(8, 16, 16), context=8, heads=2)
    return WorldConfig(base=BaseConfig(steps=3, batch=4, pool=20, model=model, checkpoint_every=2),
                       judge=JudgeConfig(identities=12, steps=3, batch=8, checkpoint_every=2),
                       lora=LoraConfig(images=2, steps=2, per_step=2, parallel=4),
                       models=10, heldout=2, vae_latent=2, vae_hidden=(8,), vae_epochs=3)


@dataclass(eq=False)
class World:
    unet: MicroUNet
    text: TextEncoder
    judge: JudgeNet
    space: Space
    weights: torch.Tensor  # (models, d) float32: the micro all_weights
    model_seeds: tuple[int, ...]
    heldout_weights: torch.Tensor  # (heldout, d): multi-image LoRAs of the held-out people
    heldout_seeds: tuple[int, ...]
    vae: W2WVAE | None
    config: WorldConfig
    info: dict = field(default_factory=dict)  # stage timings etc.

    @property
    def layout(self):
        return self.space.layout

    def context(self, prompt: str) -> torch.Tensor:
        from .model import tokenize

        with torch.no_grad():
            return self.text(tokenize([prompt]))


def _freeze(*modules: torch.nn.Module) -> None:
    for m in modules:
        m.eval()
        for p in m.parameters():
            p.requires_grad_(False)


def _lora_stage(workdir: str, name: str, unet, text, seeds: list[int], config: LoraConfig, log: Log,
                start_view: int = 0) -> torch.Tensor:
    """LoRAs for ``seeds`` in chunks of ``config.parallel``, checkpointed after every chunk."""
    path = os.path.join(workdir, f"{name}.ckpt")
    state = load_checkpoint(path)
    done = state["weights"] if state is not None else torch.zeros(0, micro_layout(unet).dim)
    if done.shape[0]:
        log(f"{name}: resuming after {done.shape[0]}/{len(seeds)} identities")
    t0 = time.perf_counter()
    while done.shape[0] < len(seeds):
        chunk = seeds[done.shape[0]: done.shape[0] + config.parallel]
        images = [identity_images(s, config.images, start_view, unet.config.image) for s in chunk]
        w = train_loras(unet, text, images, config, seed=done.shape[0] + 17)
        done = torch.cat([done, w])
        atomic_save({"weights": done}, path)
        log(f"{name}: {done.shape[0]}/{len(seeds)} identities ({time.perf_counter() - t0:.0f} s)")
    return done


def build_world(workdir: str, out: str | None = None, config: WorldConfig = WorldConfig(), log: Log = print) -> World:
    """Train every stage (resuming what ``workdir`` already holds) and, with ``out``, write the artifacts there."""
    os.makedirs(workdir, exist_ok=True)
    stamp = os.path.join(workdir, "config.json")
    if os.path.isfile(stamp):
        with open(stamp) as f:
            if f.read() != config.to_json():
                raise ValueError(f"{workdir} holds checkpoints of a world with another configuration: use an empty "
                                 "work folder (or the same settings) to resume")
    else:
        with open(stamp, "w") as f:
            f.write(config.to_json())
    info: dict = {}
    timer = time.perf_counter()

    def lap(what: str) -> None:
        nonlocal timer
        now = time.perf_counter()
        info[f"seconds_{what}"] = round(now - timer, 1)
        timer = now

    torch.manual_seed(config.seed)
    unet, text = train_base(workdir, config.base, log)
    lap("base")
    judge = train_judge(workdir, config.judge, log)
    lap("judge")
    model_seeds = [MODEL_SEEDS + i for i in range(config.models)]
    heldout_seeds = [HELDOUT_SEEDS + i for i in range(config.heldout)]
    weights = _lora_stage(workdir, "loras", unet, text, model_seeds, config.lora, log)
    lap("loras")
    heldout = _lora_stage(workdir, "heldout", unet, text, heldout_seeds, config.lora, log)
    lap("heldout_loras")
    space = make_space(unet, weights, model_seeds)
    lap("space")
    vae = make_vae(space, config)
    lap("vae")
    world = World(unet, text, judge, space, weights, tuple(model_seeds), heldout, tuple(heldout_seeds), vae, config,
                  info)
    if out is not None:
        save_world(world, out)
        log(f"artifacts written to {out}")
    return world


def make_space(unet: MicroUNet, weights: torch.Tensor, seeds: list[int], pcs: int | None = None) -> Space:
    """The w2w space of LoRA rows (our streaming build; exact here: the matrix is tiny) with labels and directions."""
    layout = micro_layout(unet)
    names = [f"id{s}" for s in seeds]
    n = weights.shape[0]
    k = min(n - 1, layout.dim) if pcs is None else pcs
    result = build_space(ArraySource(weights.numpy(), names, layout), BuildConfig(pcs=k, power_iters=2),
                         base_model="w2w-micro")
    labels = torch.from_numpy(np.stack([attributes(identity_params(s)) for s in seeds]))
    space = attach_labels(result.space, labels, ATTRIBUTES)
    varied = [a for a, col in zip(ATTRIBUTES, labels.T) if 0 < float(col.sum()) < n]  # both classes present
    return fit_directions(space, varied, method="lstsq")


def make_vae(space: Space, config: WorldConfig) -> W2WVAE:
    train = TrainConfig(epochs=config.vae_epochs, batch_size=32, lr=2e-3, warmup_epochs=max(1, config.vae_epochs // 10),
                        ramp_epochs=max(1, config.vae_epochs // 5), holdout=0.1, seed=config.seed)
    return train_from_space(space, input="coefs", latent=config.vae_latent, hidden=config.vae_hidden, train=train).vae


# ---- artifacts ----------------------------------------------------------------------------------------------
def _half(state: dict) -> dict:
    return {k: (v.detach().half() if v.is_floating_point() else v.detach()).contiguous() for k, v in state.items()}


def save_world(world: World, out: str) -> None:
    os.makedirs(out, exist_ok=True)
    meta = {"format": FORMAT, "format_version": "1", "vocab": json.dumps(VOCAB),
            "model_config": json.dumps(world.unet.config.to_dict()), "world_config": world.config.to_json(),
            "info": json.dumps(world.info), "prompt": world.config.lora.prompt}
    tensors = {f"unet.{k}": v for k, v in _half(world.unet.state_dict()).items()}
    tensors.update({f"text.{k}": v for k, v in _half(world.text.state_dict()).items()})
    write_safetensors(os.path.join(out, ARTIFACTS[0]), tensors, meta)
    write_safetensors(os.path.join(out, ARTIFACTS[1]), _half(world.judge.state_dict()),
                      {"format": FORMAT, "attributes": json.dumps(ATTRIBUTES)})
    save_space(world.space, os.path.join(out, ARTIFACTS[2]), dtype=torch.float16)
    write_safetensors(os.path.join(out, ARTIFACTS[3]),
                      {"weights": world.weights.half().contiguous(), "heldout": world.heldout_weights.half().contiguous()},
                      {"format": FORMAT, "model_seeds": json.dumps(list(world.model_seeds)),
                       "heldout_seeds": json.dumps(list(world.heldout_seeds)),
                       "layout": world.layout.to_json()})
    if world.vae is not None:
        save_vae(world.vae, os.path.join(out, ARTIFACTS[4]))


def _read(path: str) -> tuple[dict, dict]:
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise FileNotFoundError(f"micro-world artifact missing: {path} (rebuild with `python benchmarks/micro_world.py "
                                f"--rebuild`, or restore models/micro/ from the repository)")
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT and not path.endswith(("space.safetensors", "vae.safetensors")):
            raise ValueError(f"{path} is not a micro-world artifact (format {meta.get('format')!r})")
        return {k: f.get_tensor(k) for k in f.keys()}, meta


def load_world(folder: str = DEFAULT_DIR) -> World:
    tensors, meta = _read(os.path.join(folder, ARTIFACTS[0]))
    if json.loads(meta["vocab"]) != list(VOCAB):
        raise ValueError(f"{folder}: the artifacts were made with another vocabulary; rebuild them")
    model_config = MicroConfig.from_dict(json.loads(meta["model_config"]))
    wc = json.loads(meta["world_config"])
    config = WorldConfig(base=BaseConfig(**{**wc["base"], "model": model_config}),
                         judge=JudgeConfig(**wc["judge"]), lora=LoraConfig(**wc["lora"]),
                         **{k: (tuple(v) if isinstance(v, list) else v) for k, v in wc.items()
                            if k not in ("base", "judge", "lora")})
    unet, text = MicroUNet(model_config), TextEncoder(model_config.context)
    unet.load_state_dict({k[5:]: v.float() for k, v in tensors.items() if k.startswith("unet.")})
    text.load_state_dict({k[5:]: v.float() for k, v in tensors.items() if k.startswith("text.")})
    jt, _ = _read(os.path.join(folder, ARTIFACTS[1]))
    judge = JudgeNet()
    judge.load_state_dict({k: (v.float() if v.is_floating_point() else v) for k, v in jt.items()})
    _freeze(unet, text, judge)
    space = load_space(os.path.join(folder, ARTIFACTS[2]))
    if space.layout != micro_layout(unet):
        raise ValueError(f"{folder}: the space's layout does not match the micro UNet")
    wt, wmeta = _read(os.path.join(folder, ARTIFACTS[3]))
    vae_path = os.path.join(folder, ARTIFACTS[4])
    vae = load_vae(vae_path) if os.path.isfile(vae_path) else None
    return World(unet, text, judge, space, wt["weights"].float(), tuple(json.loads(wmeta["model_seeds"])),
                 wt["heldout"].float(), tuple(json.loads(wmeta["heldout_seeds"])), vae, config,
                 json.loads(meta.get("info", "{}")))
