"""The miniature w2w world end to end: train it (resumable), save its artifacts, load them back.

``build_world(workdir, out)`` runs the stages in order — base model, judge, one rank-1 LoRA per identity of the model
dataset (the micro ``all_weights``), multi-image LoRAs of held-out people, the w2w space (our own streaming build),
edit directions from the attribute labels (our own fit), w2w++ VAEs (our own trainer) — each resuming from its
checkpoint in ``workdir``, then writes fp16 ``.safetensors`` artifacts to ``out`` (``models/micro/`` in the repo).
``load_world(out)`` reads them back (safetensors only, shapes and metadata checked).

Every checkpoint carries a stamp of the settings it was made with (and of the stages it builds on), so a stage
resumes only its own work and refuses a checkpoint made with other settings.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field, fields, replace

import numpy as np
import torch

from ..build import ArraySource, BuildConfig, attach_labels, build_space
from ..edit import fit_directions
from ..space import Space, load_space, save_space
from ..stfile import write_safetensors
from ..vae import TrainConfig, W2WVAE, chosen_stats, load_vae, save_vae, train_from_space
from .faces import ATTRIBUTES, attributes, identity_params
from .judge import JudgeConfig, JudgeNet, train_judge
from .model import VOCAB, MicroConfig, MicroUNet, TextEncoder, micro_layout
from .train import (HELDOUT_SEEDS, MODEL_SEEDS, BaseConfig, Log, LoraConfig, atomic_save, class_images,
                    identity_images, identity_masks, load_checkpoint, photo_version, resume_stage, stage_stamp,
                    train_base, train_loras)

__all__ = ["WorldConfig", "World", "build_world", "load_world", "save_world", "ARTIFACTS", "toy_config",
           "first_world_config", "DEFAULT_DIR", "make_space", "make_vaes", "vae_artifact",
           "retrain_vaes", "with_directions"]

ARTIFACTS = ("micro-unet.safetensors", "micro-judge.safetensors", "micro-space.safetensors",
             "micro-weights.safetensors")
DEFAULT_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                           "models", "micro")
FORMAT = "w2w-micro-world"


def vae_artifact(latent: int) -> str:
    return f"micro-vae-{latent}.safetensors"


@dataclass(frozen=True)
class WorldConfig:
    """The second miniature world (the defaults): 5,000 identity LoRAs of hard photos, a 240-PC space."""

    base: BaseConfig = BaseConfig()
    judge: JudgeConfig = JudgeConfig()
    lora: LoraConfig = LoraConfig(steps=60, per_step=2, lr=2e-2, parallel=100, shared_noise=True, final_lr=0.1)
    models: int = 5000  # identities in the model dataset (rows of the micro all_weights)
    heldout: int = 40  # people never in the space: inversion and editing targets
    pcs: int = 240  # PCs kept and optimised by inversion: 10 % of the 2,400 LoRA values (paper: 10,000 of 99,648);
    #                 0 = all (models - 1)
    sample_pcs: int = 24  # PCs that sampling draws and directions are fitted on: 1 % (paper: 1,000 of 99,648);
    #                       0 = all of the space's
    raw_models: int = 2000  # training LoRAs shipped as weights (all of them are in the space as coefficients)
    vae_latents: tuple[int, ...] = (8, 16, 32)  # one w2w++ VAE per latent size
    vae_hidden: tuple[int, ...] = (256, 256)
    vae_epochs: int = 60
    vae_beta: float = 1.0  # final KL weight (the ELBO)
    vae_warmup: int = 2  # epochs at KL weight 0, then vae_ramp epochs rising to vae_beta
    vae_ramp: int = 8
    vae_whiten: bool = False  # False: all PCs on one common scale, so the loss weighs them as the weight error does
    vae_keep_best: bool = True  # keep the epoch with the lowest error on the training models the recipe holds back
    seed: int = 0

    def __post_init__(self) -> None:
        if self.base.photos != self.judge.photos:
            raise ValueError(f"the base model learns {self.base.photos!r} photos but the judge reads "
                             f"{self.judge.photos!r} ones: give both the same style")
        if self.models < 3 or self.heldout < 1:
            raise ValueError(f"a world needs >= 3 models and >= 1 held-out person, got {self.models}, {self.heldout}")

    @property
    def photos(self) -> str:
        return self.base.photos

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str, model: MicroConfig | None = None) -> "WorldConfig":
        """Settings saved by :meth:`to_json`; settings the first world's files lack take the first world's values."""
        d = json.loads(text)
        if "vae_keep_best" not in d:  # written before the VAE recipe had these settings: the rule it followed then
            epochs = d.get("vae_epochs", first_world_config().vae_epochs)
            d.update(vae_warmup=max(1, epochs // 10), vae_ramp=max(1, epochs // 5), vae_whiten=True,
                     vae_keep_best=False)
        first = asdict(first_world_config())
        for key in ("base", "judge", "lora"):
            d[key] = {**first[key], **d[key]}
        d = {**first, **d}
        d["base"]["model"] = MicroConfig.from_dict(d["base"]["model"]) if model is None else model
        known = {f.name for f in fields(cls)}
        rest = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()
                if k in known and k not in ("base", "judge", "lora")}
        return cls(base=BaseConfig(**d["base"]), judge=JudgeConfig(**d["judge"]), lora=LoraConfig(**d["lora"]), **rest)


def toy_config() -> WorldConfig:
    """A world small enough for tests (seconds): same code paths, tiny sizes."""
    model = MicroConfig(channels=(8, 16, 16), context=8, heads=2)
    return WorldConfig(base=BaseConfig(steps=3, batch=4, pool=20, model=model, checkpoint_every=2),
                       judge=JudgeConfig(identities=12, steps=3, batch=8, checkpoint_every=2),
                       lora=LoraConfig(images=2, steps=2, per_step=2, parallel=4, shared_noise=True),
                       models=10, heldout=2, pcs=6, sample_pcs=3, raw_models=7, vae_latents=(2,), vae_hidden=(8,),
                       vae_epochs=3, vae_warmup=0, vae_ramp=1)


def first_world_config() -> WorldConfig:
    """The first miniature world: 240 LoRAs of plain photos, every model its own PC (kept for comparison)."""
    return WorldConfig(base=BaseConfig(steps=2400, photos="plain"),
                       judge=JudgeConfig(identities=2000, steps=1200, photos="plain", width=24),
                       lora=LoraConfig(), models=240, heldout=16, pcs=0, sample_pcs=0, raw_models=240,
                       vae_latents=(16,), vae_hidden=(128, 64), vae_epochs=300, vae_beta=1.0, vae_warmup=30,
                       vae_ramp=60, vae_whiten=True, vae_keep_best=False)


@dataclass(eq=False)
class World:
    unet: MicroUNet
    text: TextEncoder
    judge: JudgeNet
    space: Space  # every training LoRA is in it (space.train_coefs, one row per model seed)
    weights: torch.Tensor  # (raw_models, d) float32: the first training LoRAs as weights (the micro all_weights)
    model_seeds: tuple[int, ...]  # identity seed of every training model (space rows)
    heldout_weights: torch.Tensor  # (heldout, d): multi-image LoRAs of the held-out people
    heldout_seeds: tuple[int, ...]
    vaes: dict[int, W2WVAE]  # w2w++ VAEs by latent size
    config: WorldConfig
    info: dict = field(default_factory=dict)  # stage timings etc.

    @property
    def layout(self):
        return self.space.layout

    @property
    def photos(self) -> str:
        return self.config.photos

    @property
    def vae(self) -> W2WVAE | None:
        """The w2w++ VAE with the largest latent (None without VAEs)."""
        return self.vaes[max(self.vaes)] if self.vaes else None

    @property
    def sample_pcs(self) -> int:
        return min(self.config.sample_pcs or self.space.pcs, self.space.pcs)

    def context(self, prompt: str) -> torch.Tensor:
        from .model import tokenize

        with torch.no_grad():
            return self.text(tokenize([prompt]))

    def photos_of(self, seed: int, count: int, start: int = 0, with_masks: bool = False):
        """``count`` photos (count, 3, H, W) of identity ``seed`` from view ``start``, in this world's style;
        ``with_masks``: (photos, their head masks (count, 1, H, W)), drawn once (faces.head_mask)."""
        return identity_images(seed, count, start, self.unet.config.image, self.photos, with_masks=with_masks)

    def masks_of(self, seed: int, count: int, start: int = 0) -> torch.Tensor:
        """The head masks (count, 1, H, W) of the photos :meth:`photos_of` gives (faces.head_mask)."""
        return identity_masks(seed, count, start, self.unet.config.image, self.photos)


def _freeze(*modules: torch.nn.Module) -> None:
    for m in modules:
        m.eval()
        for p in m.parameters():
            p.requires_grad_(False)


def _chunk_path(folder: str, index: int) -> str:
    return os.path.join(folder, f"chunk-{index:05d}.ckpt")


def _train_chunks(states: tuple[dict, dict], model: MicroConfig, chunks: list[tuple[int, list[int]]], folder: str,
                  config: LoraConfig, photos: str, stamp: str, share: float, threads: int = 0) -> None:
    """Train LoRA chunks (index, seeds) and write one checkpoint per chunk (also the body of a worker process)."""
    if threads:
        torch.set_num_threads(threads)
    unet, text = MicroUNet(model), TextEncoder(model.context, model.vocab)
    unet.load_state_dict(states[0]), text.load_state_dict(states[1])
    _freeze(unet, text)
    # prior preservation: the base model's class images, drawn once for all chunks (they are the same every time)
    prior = class_images(unet, text, config) if config.prior_weight > 0 else None
    for index, seeds in chunks:
        t0 = time.perf_counter()
        images = [identity_images(s, config.images, 0, model.image, photos) for s in seeds]
        # with shared noise every chunk draws the same (an identity's LoRA does not depend on its chunk)
        w = train_loras(unet, text, images, config, seed=17 if config.shared_noise else index * config.parallel + 17,
                        prior=prior)
        seconds = time.perf_counter() - t0
        atomic_save({"weights": w, "stamp": stamp, "seconds": seconds * share}, _chunk_path(folder, index))
        print(f"{os.path.basename(folder)}: chunk {index} ({len(seeds)} identities) in {seconds:.0f} s", flush=True)


def _lora_stage(workdir: str, name: str, unet, text, seeds: list[int], config: LoraConfig, photos: str,
                stamp: str, log: Log, workers: int = 1) -> tuple[torch.Tensor, float]:
    """LoRAs for ``seeds`` in chunks of ``config.parallel``, one checkpoint per chunk, by ``workers`` processes
    (one thread each); (weights, seconds of the stage: each chunk's time divided by the processes sharing the work)."""
    folder = os.path.join(workdir, name)
    os.makedirs(folder, exist_ok=True)
    chunks = [(i, seeds[s:s + config.parallel]) for i, s in enumerate(range(0, len(seeds), config.parallel))]
    todo = [c for c in chunks if resume_stage(_chunk_path(folder, c[0]), stamp) is None]
    if len(todo) < len(chunks):
        log(f"{name}: resuming with {len(chunks) - len(todo)}/{len(chunks)} chunks done")
    states = (unet.state_dict(), text.state_dict())
    workers = max(1, min(workers, len(todo)))
    args = (states, unet.config)
    if workers == 1:
        _train_chunks(*args, todo, folder, config, photos, stamp, 1.0)
    elif todo:
        import multiprocessing

        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            pool.starmap(_train_chunks, [(*args, todo[w::workers], folder, config, photos, stamp, 1.0 / workers, 1)
                                         for w in range(workers)])
    parts = [load_checkpoint(_chunk_path(folder, i)) for i, _ in chunks]
    return torch.cat([p["weights"] for p in parts]), sum(float(p["seconds"]) for p in parts)


def lora_stage_stamp(name: str, lora: LoraConfig, base: BaseConfig, first_seed: int, count: int) -> str:
    """The stamp of a LoRA stage: its recipe, the base model it trains on, and its identities."""
    return stage_stamp(name, lora, stage_stamp("base", base, photo_version(base.photos)), first_seed, count)


def _stage_seconds(workdir: str, name: str) -> float:
    state = load_checkpoint(os.path.join(workdir, name))
    return round(float(state.get("seconds", 0.0)), 1) if state is not None else 0.0


def build_world(workdir: str, out: str | None = None, config: WorldConfig = WorldConfig(), log: Log = print,
                workers: int = 1) -> World:
    """Train every stage (resuming what ``workdir`` already holds) and, with ``out``, write the artifacts there.

    ``workers`` > 1 trains the LoRA stages in that many processes of one thread each (the results do not change:
    with shared noise a LoRA does not depend on its chunk); the other stages use torch's thread setting.
    """
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:  # for the record; stages check their own stamps
        f.write(config.to_json())
    info: dict = {}
    torch.manual_seed(config.seed)
    unet, text = train_base(workdir, config.base, log)
    info["seconds_base"] = _stage_seconds(workdir, "base.ckpt")
    judge = train_judge(workdir, config.judge, log)
    info["seconds_judge"] = _stage_seconds(workdir, "judge.ckpt")
    model_seeds = [MODEL_SEEDS + i for i in range(config.models)]
    heldout_seeds = [HELDOUT_SEEDS + i for i in range(config.heldout)]
    weights, secs = _lora_stage(workdir, "loras", unet, text, model_seeds, config.lora, config.photos,
                                lora_stage_stamp("loras", config.lora, config.base, MODEL_SEEDS, config.models), log,
                                workers)
    info["seconds_loras"] = round(secs, 1)
    heldout, secs = _lora_stage(workdir, "heldout", unet, text, heldout_seeds, config.lora, config.photos,
                                lora_stage_stamp("heldout", config.lora, config.base, HELDOUT_SEEDS, config.heldout),
                                log, workers)
    info["seconds_heldout_loras"] = round(secs, 1)
    t0 = time.perf_counter()
    space = make_space(unet, weights, model_seeds, config.pcs, config.sample_pcs)
    info["seconds_space"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    vaes = make_vaes(space, config, log)
    info["seconds_vae"] = round(time.perf_counter() - t0, 1)
    info["vae_heldout_error"] = {str(k): chosen_stats(v).heldout_error for k, v in vaes.items()}
    world = World(unet, text, judge, space, weights[: config.raw_models], tuple(model_seeds), heldout,
                  tuple(heldout_seeds), vaes, config, info)
    log(f"stage seconds: {json.dumps(info)}")
    if out is not None:
        save_world(world, out)
        log(f"artifacts written to {out}")
        return load_world(out)  # what the files hold (fp16), so tables after a rebuild are the shipped world's
    return world


def make_space(unet: MicroUNet, weights: torch.Tensor, seeds: list[int], pcs: int = 0, sample_pcs: int = 0) -> Space:
    """The w2w space of LoRA rows (our streaming build) with labels, and directions fitted on ``sample_pcs`` PCs.

    ``pcs`` PCs are kept (0 or more than the rows allow: models − 1). Directions are least squares on the first
    ``sample_pcs`` coefficients (0: all), as the paper fits them on 1,000 of its 10,000 PCs.
    """
    layout = micro_layout(unet)
    names = [f"id{s}" for s in seeds]
    n = weights.shape[0]
    k = min(n - 1, layout.dim) if not pcs else min(pcs, n - 1, layout.dim)
    result = build_space(ArraySource(weights.numpy(), names, layout), BuildConfig(pcs=k, power_iters=3),
                         base_model="w2w-micro")
    labels = torch.from_numpy(np.stack([attributes(identity_params(s)) for s in seeds]))
    space = attach_labels(result.space, labels, ATTRIBUTES)
    return with_directions(space, sample_pcs)


def with_directions(space: Space, sample_pcs: int = 0, debias: bool = False) -> Space:
    """``space`` with least-squares directions for every attribute its training models vary in (both classes
    present), fitted on the first ``sample_pcs`` coefficients (0: all). ``debias``: each direction minus, one after
    another, its projection on every other attribute's direction (the reference code's debiasing), so an edit moves
    the other attributes' least-squares scores less."""
    labels = space.labels
    n = labels.shape[0]
    varied = [a for a, col in zip(space.attribute_names, labels.T) if 0 < float(col.sum()) < n]
    k = space.train_coefs.shape[1]
    m = min(sample_pcs or k, k)
    head = replace(space, train_coefs=space.train_coefs[:, :m], pinverse=None, coef_cov=None, directions={})
    others = {a: [b for b in varied if b != a] for a in varied} if debias else None
    return replace(space, directions=fit_directions(head, varied, method="lstsq", debias=others).directions)


def vae_recipe(config: WorldConfig) -> TrainConfig:
    """The world's w2w++ VAE training settings."""
    return TrainConfig(epochs=config.vae_epochs, batch_size=64, lr=2e-3,
                       beta=config.vae_beta, warmup_epochs=config.vae_warmup,
                       ramp_epochs=config.vae_ramp, holdout=0.1, seed=config.seed, keep_best=config.vae_keep_best)


def make_vaes(space: Space, config: WorldConfig, log: Log = print) -> dict[int, W2WVAE]:
    """One w2w++ VAE per latent size, on the training models' coefficients (all PCs; whitened or on one common
    scale as the config says), 10 % of the training models held back for the held-out error (and early stopping)."""
    out = {}
    for latent in config.vae_latents:
        vae = train_from_space(space, input="coefs", latent=latent, hidden=config.vae_hidden,
                               train=vae_recipe(config), whiten=config.vae_whiten).vae
        stats = chosen_stats(vae)
        log(f"w2w++ VAE, latent {latent}: held-out error {stats.heldout_error:.3f} (epoch {stats.epoch}), "
            f"{stats.active} active units")
        out[latent] = vae
    return out


def retrain_vaes(folder: str, config: WorldConfig | None = None, log: Log = print) -> World:
    """Train the w2w++ VAEs of the artifacts in ``folder`` anew with ``config``'s VAE settings (default: the code's)
    and write them, and the settings, back; every other artifact keeps its tensors (and the judge, space and weights
    files their bytes)."""
    world = load_world(folder)
    new = WorldConfig() if config is None else config
    vae_fields = {f.name: getattr(new, f.name) for f in fields(WorldConfig) if f.name.startswith("vae_")}
    world = replace(world, config=replace(world.config, **vae_fields))
    t0 = time.perf_counter()
    world.vaes = make_vaes(world.space, world.config, log)
    world.info = {**world.info, "seconds_vae": round(time.perf_counter() - t0, 1),
                  "vae_heldout_error": {str(k): chosen_stats(v).heldout_error for k, v in world.vaes.items()}}
    _save_model(world, folder)  # the same tensors; the settings and the stage record in its metadata are new
    _save_vaes(world, folder)
    return load_world(folder)


# ---- artifacts ----------------------------------------------------------------------------------------------
def _half(state: dict) -> dict:
    return {k: (v.detach().half() if v.is_floating_point() else v.detach()).contiguous() for k, v in state.items()}


def save_world(world: World, out: str) -> None:
    os.makedirs(out, exist_ok=True)
    _save_model(world, out)
    write_safetensors(os.path.join(out, ARTIFACTS[1]), _half(world.judge.state_dict()),
                      {"format": FORMAT, "attributes": json.dumps(ATTRIBUTES)})
    save_space(world.space, os.path.join(out, ARTIFACTS[2]), dtype=torch.float16)
    write_safetensors(os.path.join(out, ARTIFACTS[3]),
                      {"weights": world.weights.half().contiguous(), "heldout": world.heldout_weights.half().contiguous()},
                      {"format": FORMAT, "model_seeds": json.dumps(list(world.model_seeds)),
                       "heldout_seeds": json.dumps(list(world.heldout_seeds)),
                       "layout": world.layout.to_json()})
    _save_vaes(world, out)


def _save_model(world: World, out: str) -> None:
    """The base model and text encoder, with the world's settings and stage record in the file's metadata."""
    meta = {"format": FORMAT, "format_version": "2", "vocab": json.dumps(VOCAB[: world.unet.config.vocab]),
            "model_config": json.dumps(world.unet.config.to_dict()), "world_config": world.config.to_json(),
            "info": json.dumps(world.info), "prompt": world.config.lora.prompt}
    tensors = {f"unet.{k}": v for k, v in _half(world.unet.state_dict()).items()}
    tensors.update({f"text.{k}": v for k, v in _half(world.text.state_dict()).items()})
    write_safetensors(os.path.join(out, ARTIFACTS[0]), tensors, meta)


def _save_vaes(world: World, out: str) -> None:
    for name in os.listdir(out):  # VAEs of other latent sizes are stale
        if name.startswith("micro-vae") and name.endswith(".safetensors") and \
                name not in {vae_artifact(k) for k in world.vaes}:
            os.remove(os.path.join(out, name))
    for latent, vae in world.vaes.items():
        save_vae(vae, os.path.join(out, vae_artifact(latent)), dtype=torch.float16)


def _read(path: str) -> tuple[dict, dict]:
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise FileNotFoundError(f"micro-world artifact missing: {path} (rebuild with `python benchmarks/micro_world.py "
                                f"--rebuild`, or restore models/micro/ from the repository)")
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path} is not a micro-world artifact (format {meta.get('format')!r})")
        return {k: f.get_tensor(k) for k in f.keys()}, meta


def load_world(folder: str = DEFAULT_DIR) -> World:
    """The world in ``folder`` (default: the shipped ``models/micro``), frozen and ready to sample, edit and invert."""
    tensors, meta = _read(os.path.join(folder, ARTIFACTS[0]))
    model_config = MicroConfig.from_dict(json.loads(meta["model_config"]))
    if json.loads(meta["vocab"]) != list(VOCAB[: model_config.vocab]):
        raise ValueError(f"{folder}: the artifacts were made with another vocabulary; rebuild them")
    config = WorldConfig.from_json(meta["world_config"], model_config)
    unet, text = MicroUNet(model_config), TextEncoder(model_config.context, model_config.vocab)
    unet.load_state_dict({k[5:]: v.float() for k, v in tensors.items() if k.startswith("unet.")})
    text.load_state_dict({k[5:]: v.float() for k, v in tensors.items() if k.startswith("text.")})
    jt, _ = _read(os.path.join(folder, ARTIFACTS[1]))
    judge = JudgeNet(width=config.judge.width)
    judge.load_state_dict({k: (v.float() if v.is_floating_point() else v) for k, v in jt.items()})
    _freeze(unet, text, judge)
    space = load_space(os.path.join(folder, ARTIFACTS[2]))
    if space.layout != micro_layout(unet):
        raise ValueError(f"{folder}: the space's layout does not match the micro UNet")
    wt, wmeta = _read(os.path.join(folder, ARTIFACTS[3]))
    model_seeds = tuple(json.loads(wmeta["model_seeds"]))
    if space.train_coefs is None or space.train_coefs.shape[0] != len(model_seeds):
        raise ValueError(f"{folder}: the space does not hold one training row per model seed; rebuild the artifacts")
    vaes = {k: load_vae(os.path.join(folder, vae_artifact(k))) for k in config.vae_latents
            if os.path.isfile(os.path.join(folder, vae_artifact(k)))}
    legacy = os.path.join(folder, "micro-vae.safetensors")  # the first world's single VAE
    if not vaes and os.path.isfile(legacy):
        vae = load_vae(legacy)
        vaes = {vae.latent: vae}
    return World(unet, text, judge, space, wt["weights"].float(), model_seeds, wt["heldout"].float(),
                 tuple(json.loads(wmeta["heldout_seeds"])), vaes, config, json.loads(meta.get("info", "{}")))
