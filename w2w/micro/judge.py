"""The miniature world's "FaceNet" and "CLIP": one small CNN with an identity embedding and attribute logits.

Trained on synthetic faces of identities that appear nowhere else (CosFace loss over identities + binary
cross-entropy over :data:`~w2w.micro.faces.ATTRIBUTES`), with blur, noise and colour jitter so that it also reads
the generator's softer images. ID score of two images = cosine of their embeddings.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .faces import ATTRIBUTES, attributes, identity_params, render_batch
from .train import JUDGE_SEEDS, HELDOUT_SEEDS, Log, atomic_save, photo_version, resume_stage, stage_stamp

__all__ = ["JudgeNet", "JudgeConfig", "train_judge", "judge_quality", "id_score"]


def _block(cin: int, cout: int, convs: int = 2) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(convs):
        layers += [nn.Conv2d(cin if i == 0 else cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]
    return nn.Sequential(*layers, nn.MaxPool2d(2))


class JudgeNet(nn.Module):
    def __init__(self, embed: int = 64, width: int = 24):
        super().__init__()
        self.features = nn.Sequential(_block(3, width, 1), _block(width, 2 * width), _block(2 * width, 4 * width),
                                      nn.Flatten(), nn.Linear(4 * width * 16, 256), nn.ReLU())
        self.embed = nn.Linear(256, embed)
        self.attrs = nn.Linear(256, len(ATTRIBUTES))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (N, 3, 32, 32) in [-1, 1] -> (unit embeddings (N, E), attribute logits (N, A))."""
        h = self.features(x)
        return F.normalize(self.embed(h), dim=1), self.attrs(h)

    @torch.no_grad()
    def embed_images(self, x: torch.Tensor, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
        """Eval-mode embeddings and attribute probabilities."""
        was = self.training
        self.eval()
        outs = [self(x[i:i + batch]) for i in range(0, x.shape[0], batch)]
        self.train(was)
        return torch.cat([o[0] for o in outs]), torch.sigmoid(torch.cat([o[1] for o in outs]))


def id_score(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean cosine over all pairs of two sets of unit embeddings."""
    return float((a @ b.T).mean())


@dataclass(frozen=True)
class JudgeConfig:
    identities: int = 5000
    steps: int = 4000
    batch: int = 96  # 48 identities x 2 photos
    lr: float = 2e-3
    margin: float = 0.25
    scale: float = 16.0
    seed: int = 0
    checkpoint_every: int = 500
    photos: str = "hard"  # photo style it learns to read (faces.STYLES)
    width: int = 32  # channels of the first convolution (doubled twice)


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    n, _, hh, ww = x.shape
    sigma = torch.rand(n, generator=gen) * 1.2
    k = torch.arange(-2, 3, dtype=torch.float32)
    kern = torch.exp(-k[None] ** 2 / (2 * sigma[:, None].clamp_min(1e-3) ** 2))
    kern = kern / kern.sum(1, keepdim=True)  # (n, 5)
    xp = F.pad(x, (2, 2, 2, 2), mode="replicate")
    # separable blur, one kernel per image
    cols = torch.stack([xp[..., :, i:i + ww] for i in range(5)], -1)  # (n, 3, H+4, W, 5)
    x = (cols * kern[:, None, None, None]).sum(-1)
    rows = torch.stack([x[..., i:i + hh, :] for i in range(5)], -1)
    x = (rows * kern[:, None, None, None]).sum(-1)
    x = x * (1 + 0.15 * (torch.rand(n, 3, 1, 1, generator=gen) - 0.5)) + 0.1 * (torch.rand(n, 1, 1, 1, generator=gen) - 0.5)
    return (x + torch.randn(x.shape, generator=gen) * torch.rand(n, 1, 1, 1, generator=gen) * 0.15).clamp(-1.2, 1.2)


def train_judge(workdir: str, config: JudgeConfig = JudgeConfig(), log: Log = print) -> JudgeNet:
    path = os.path.join(workdir, "judge.ckpt")
    stamp = stage_stamp("judge", config, photo_version(config.photos))
    torch.manual_seed(config.seed)
    net = JudgeNet(width=config.width)
    classes = nn.Parameter(torch.randn(config.identities, net.embed.out_features) * 0.1)
    opt = torch.optim.AdamW(list(net.parameters()) + [classes], lr=config.lr, weight_decay=1e-4)
    step, spent = 0, 0.0
    state = resume_stage(path, stamp)
    if state is not None:
        spent = float(state["seconds"])
        net.load_state_dict(state["net"])
        with torch.no_grad():
            classes.copy_(state["classes"])
        opt.load_state_dict(state["opt"])
        step = int(state["step"])
        log(f"judge: resuming at step {step}/{config.steps}")
    faces = [identity_params(JUDGE_SEEDS + i) for i in range(config.identities)]
    attrs = torch.from_numpy(np.stack([attributes(p) for p in faces]))
    rng = np.random.default_rng([config.seed, step, 7])
    gen = torch.Generator().manual_seed(config.seed + step)
    t0 = time.perf_counter()
    while step < config.steps:
        ids = np.repeat(rng.choice(config.identities, config.batch // 2, replace=False), 2)
        x = torch.from_numpy(render_batch([faces[i] for i in ids], [int(v) for v in rng.integers(0, 2**31, len(ids))],
                                          style=config.photos))
        emb, logits = net(_augment(x, gen))
        cos = emb @ F.normalize(classes, dim=1).T
        target = torch.from_numpy(ids)
        cos = cos - config.margin * F.one_hot(target, config.identities)
        loss_id = F.cross_entropy(config.scale * cos, target)
        loss_attr = F.binary_cross_entropy_with_logits(logits, attrs[target])
        loss = loss_id + loss_attr
        lr = config.lr * min(1.0, 2 * (1 - step / config.steps))
        for g in opt.param_groups:
            g["lr"] = lr
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if step % 100 == 0:
            log(f"judge: step {step}/{config.steps} id loss {float(loss_id.detach()):.3f} attribute loss "
                f"{float(loss_attr.detach()):.3f} ({time.perf_counter() - t0:.0f} s)")
        if step % config.checkpoint_every == 0 or step == config.steps:
            atomic_save({"net": net.state_dict(), "classes": classes.detach(), "opt": opt.state_dict(), "step": step,
                         "stamp": stamp, "seconds": spent + time.perf_counter() - t0}, path)
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net


def judge_quality(net: JudgeNet, identities: int = 64, photos: int = 4, offset: int = HELDOUT_SEEDS + 100_000,
                  style: str = "hard") -> dict:
    """On unseen identities: same/different-person ID scores, verification AUC and attribute accuracy."""
    faces = [identity_params(offset + i) for i in range(identities)]
    ids = np.repeat(np.arange(identities), photos)
    x = torch.from_numpy(render_batch([faces[i] for i in ids], [int(offset + 7919 * i + k) for i, k in
                                                                 zip(ids, np.tile(np.arange(photos), identities))],
                                      style=style))
    emb, prob = net.embed_images(x)
    sim = emb @ emb.T
    same = torch.from_numpy(ids[:, None] == ids[None, :])
    off = ~torch.eye(len(ids), dtype=torch.bool)
    pos, neg = sim[same & off], sim[~same]
    auc = float((pos[:, None] > neg[None, :]).float().mean())
    truth = torch.from_numpy(np.stack([attributes(faces[i]) for i in ids]))
    acc = ((prob > 0.5).float() == truth).float().mean(0)
    return {"same_person": float(pos.mean()), "different_person": float(neg.mean()), "verification_auc": auc,
            "attribute_accuracy": {a: float(v) for a, v in zip(ATTRIBUTES, acc)}}
