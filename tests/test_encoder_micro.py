"""The face encoder in the miniature world, on a toy world (seconds): pairs, the diffusion term against the inversion
engine's own loss, the command, the measurements behind the targets, the contact-sheet rows, and the shipped file."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from w2w.cli import main as w2w_main
from w2w.encoder import EncoderTrainConfig, build_encoder, load_encoder, read_encoder_metadata
from w2w.encoder_micro import (AUX_POOL, AUX_SEEDS, VALIDATION_SEEDS, DiffusionTerm, MicroEncoderConfig, Scorer,
                               TargetConfig, choose_retrieval, contact_sheet_rows, denoising_score, encode_person,
                               encoder_identity_scores, invert_from, measure_targets, micro_pairs,
                               nearest_training_identity, pcs_curve, photos01, refinement_sweep, sweep_markdown,
                               targets_markdown, train_micro_encoder)
from w2w.invert import FactorMap, step_loss
from w2w.micro.faces import identity_params, render_batch
from w2w.micro.model import MicroDenoiser, alphas_cumprod
from w2w.micro.world import DEFAULT_DIR, build_world, load_world, toy_config
from w2w.sampling import sample_identity


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("micro-encoder")
    build_world(str(root / "work"), str(root / "out"), toy_config(), log=lambda s: None)
    return root, load_world(str(root / "out"))


TINY = MicroEncoderConfig(rendered=3, renders_per_identity=2, render_steps=2, photo_views=2, width=8, hidden=16,
                          diffusion_weight=1.0, diffusion_batch=2,
                          train=EncoderTrainConfig(steps=3, batch=4, holdout=0.2, eval_every=3, checkpoint_every=3))


def test_pairs_are_rendered_samples_and_photos_of_the_training_people(toy):
    _, world = toy
    pairs = micro_pairs(world, TINY)
    models = len(world.model_seeds)
    assert len(pairs) == 3 * 2 + models * 2 and pairs.images.shape[1:] == (3, 32, 32)
    space = world.space
    for i in range(3):  # rendered: the sampled identity of seed 50,000,000 + i, twice
        expected = sample_identity(space, 50_000_000 + i, pcs=space.pcs).coefficients
        assert torch.equal(pairs.targets[2 * i], expected) and torch.equal(pairs.targets[2 * i + 1], expected)
    assert not torch.equal(pairs.images[0], pairs.images[1])  # two noise seeds
    torch.testing.assert_close(pairs.targets[6:], space.train_coefs.repeat_interleave(2, 0))
    assert len(torch.unique(pairs.groups)) == 3 + models


def test_diffusion_term_is_the_inversion_engines_loss_at_the_predicted_identity(toy):
    """For one person the term is the ε-loss inversion optimises (w2w.invert.step_loss through FactorMap, another code
    path to the factors), at the encoder's β, with the draws the term makes; and it trains the encoder."""
    _, world = toy
    encoder = build_encoder(world.space, world.space.pcs, "conv", image_size=32, width=8, hidden=16, seed=1)
    with torch.no_grad():
        encoder.head[-1].weight.normal_(0, 0.1, generator=torch.Generator().manual_seed(2))
    term = DiffusionTerm(world, batch=1)
    value = term(encoder, 0, torch.Generator().manual_seed(5))
    gen = torch.Generator().manual_seed(5)  # the same draws, in the term's order
    person = AUX_SEEDS + int(torch.randint(AUX_POOL, (1,), generator=gen))
    views = torch.randint(0, 1_000_000, (1, 2), generator=gen).tolist()[0]
    params = [identity_params(person)]
    photo = torch.from_numpy(render_batch(params, [views[0]], 32))
    target = torch.from_numpy(render_batch(params, [views[1] + 1_000_000], 32))
    abar = alphas_cumprod()
    t = torch.randint(0, len(abar), (1,), generator=gen)
    noise = torch.randn(target.shape, generator=gen)
    with torch.no_grad():
        beta = encoder(photos01(photo))[0]
        reference = step_loss(FactorMap(world.space, world.space.pcs), MicroDenoiser(world.unet, world.layout.scale),
                              beta, target, t, noise, world.context(world.config.lora.prompt), abar.float())
    # float32 throughout; the two paths order the β @ basis sums differently: a few float32 ulps of the loss
    torch.testing.assert_close(value.detach(), reference, rtol=1e-5, atol=1e-7)
    value.backward()
    assert encoder.backbone.net[0].weight.grad.abs().sum() > 0


def test_training_and_the_command(toy, tmp_path, capsys):
    root, world = toy
    result = train_micro_encoder(world, TINY, str(tmp_path / "work"), log=lambda s: None)
    assert result.encoder.pcs == world.space.pcs and result.final.step == 3
    out = tmp_path / "micro-encoder.safetensors"
    code = w2w_main(["train-encoder", "--micro", "--world", str(root / "out"), "--workdir", str(tmp_path / "cli"),
                     "--out", str(out), "--rendered", "2", "--photo-views", "1", "--diffusion-weight", "0",
                     "--train-steps", "2", "--batch", "4", "--width", "8", "--hidden", "16", "--fp16"])
    assert code == 0, capsys.readouterr().err
    encoder = load_encoder(str(out), world.space)
    assert encoder.pcs == world.space.pcs
    assert all(v.dtype == torch.float16 for k, v in _tensors(out).items() if not k.startswith("coef_"))
    assert read_encoder_metadata(str(out))["space_fingerprint"] == world.space.fingerprint
    with pytest.raises(SystemExit):
        w2w_main(["train-encoder", "--micro"])  # --out and --workdir are required


def test_retrieval_command_and_the_blend_table(toy, tmp_path, capsys):
    """--head retrieve: a gallery of the training people (the held-out tenth excluded), photo pairs naming their rows,
    the top-1 answer by default; choose_retrieval scores blends judge-free and returns the best-scoring one."""
    root, world = toy
    pairs = micro_pairs(world, dataclasses.replace(TINY, rendered=0))
    assert torch.equal(pairs.rows, pairs.groups)  # photo pairs name the training model they show
    out = tmp_path / "retrieve.safetensors"
    code = w2w_main(["train-encoder", "--micro", "--head", "retrieve", "--world", str(root / "out"), "--workdir",
                     str(tmp_path / "cli"), "--out", str(out), "--photo-views", "2", "--train-steps", "3", "--batch",
                     "8", "--width", "8", "--hidden", "16", "--embed", "8"])
    assert code == 0, capsys.readouterr().err
    encoder = load_encoder(str(out), world.space)
    models = len(world.model_seeds)
    assert encoder.config.head == "retrieve" and encoder.config.gallery == models - round(0.1 * models)
    chosen, rows = choose_retrieval(world, encoder, people=4, top_k=(1, 2, 4), temperatures=(0.05, 1.0),
                                    log=lambda s: None)
    assert [(r["top_k"], r["temperature"]) for r in rows] == [(1, 0.05), (2, 0.05), (2, 1.0), (4, 0.05), (4, 1.0)]
    best = max(rows, key=lambda r: r["gain"])
    assert (chosen.config.top_k, chosen.config.temperature) == (best["top_k"], best["temperature"])
    assert len({round(r["gain"], 9) for r in rows}) > 1  # the settings give different identities: the choice matters
    assert (encoder.config.top_k, encoder.config.temperature) == (1, 0.05)  # the command's default
    # the judge-free refinement sweep: step 0 is the encoder's own answer, the reference the engine's full inversion,
    # both scored with the encoder's face embedding
    sweep = refinement_sweep(world, encoder, lrs=(0.1, 0.3), record=(0, 2), people=2, first=5, full_steps=3,
                             log=lambda s: None)
    val = [VALIDATION_SEEDS + 5 + i for i in range(2)]
    photos = [world.photos_of(v, 1, 0) for v in val]
    scorer = Scorer(world)
    start = torch.stack([encode_person(world, encoder, ph).coefficients for ph in photos])
    at_start = encoder_identity_scores(world, encoder, start, val, scorer)
    assert sweep["curves"]["0.1"][0] == pytest.approx(float(at_start.mean()), abs=1e-6) == sweep["curves"]["0.3"][0]
    full = torch.stack([invert_from(world, ph, None, 3, 0.1, seed=i)[3] for i, ph in enumerate(photos)])
    assert sweep["full"] == pytest.approx(float(encoder_identity_scores(world, encoder, full, val, scorer).mean()),
                                          abs=1e-4)
    assert sweep["curves"]["0.1"][1] != sweep["curves"]["0.3"][1]  # the lr changes the refined identity
    text = sweep_markdown(sweep)
    assert "| 2 | " in text and "lr 0.3" in text
    assert text.count("≥ full") == sum(v >= sweep["full"] for c in sweep["curves"].values() for v in c)
    sgd = refinement_sweep(world, encoder, lrs=(0.1,), record=(0, 2), people=2, first=5, full_steps=3, momentum=0.9,
                           log=lambda s: None)  # the SGD variant: same start and reference, another refined identity
    assert sweep["optimizer"] == "Adam" and sgd["optimizer"] == "SGD, momentum 0.9" and "SGD, momentum 0.9" in \
        sweep_markdown(sgd)
    assert sgd["curves"]["0.1"][0] == sweep["curves"]["0.1"][0] and sgd["full"] == sweep["full"]
    assert sgd["curves"]["0.1"][1] != sweep["curves"]["0.1"][1]
    with pytest.raises(ValueError, match="retrieval encoder"):
        encoder_identity_scores(world, build_encoder(world.space, 5, "conv", image_size=32, width=8, hidden=8),
                                start[:, :5], val, scorer)
    again = tmp_path / "retrieve-3.safetensors"
    assert w2w_main(["train-encoder", "--micro", "--head", "retrieve", "--world", str(root / "out"), "--workdir",
                     str(tmp_path / "cli"), "--out", str(again), "--photo-views", "2", "--train-steps", "3", "--batch",
                     "8", "--width", "8", "--hidden", "16", "--embed", "8", "--top-k", "3", "--temperature", "0.2"]) == 0
    assert (load_encoder(str(again), world.space).config.top_k, load_encoder(str(again), world.space).config.temperature) \
        == (3, 0.2)


def _tensors(path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def test_encoder_info_prints_the_summary(toy, tmp_path, capsys):
    _, world = toy
    from w2w.encoder import save_encoder

    path = tmp_path / "e.safetensors"
    save_encoder(build_encoder(world.space, 5, "conv", image_size=32, width=8, hidden=8), str(path), info={"steps": 7})
    assert w2w_main(["encoder-info", str(path)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["pcs"] == 5 and summary["backbone"] == "conv" and summary["training"] == {"steps": 7}
    assert summary["space_fingerprint"] == world.space.fingerprint


def test_inversion_from_a_start_records_its_curve(toy):
    _, world = toy
    photo = world.photos_of(world.heldout_seeds[0], 1, 0)
    init = sample_identity(world.space, 3, pcs=world.space.pcs)
    out = invert_from(world, photo, init, 4, 0.1, seed=0, record=(0, 2, 4))
    assert sorted(out) == [0, 2, 4]
    assert torch.equal(out[0], init.coefficients)
    assert not torch.equal(out[2], out[4])
    again = invert_from(world, photo, init, 2, 0.1, seed=0, record=(2,))
    assert torch.equal(again[2], out[2])  # a shorter run is the prefix of a longer one (same seed, same draws)


def test_nearest_training_identity_is_the_lowest_loss_model(toy):
    """Batched over every training model with per-item factors; checked one model at a time (shared factors)."""
    _, world = toy
    photo = world.photos_of(world.heldout_seeds[0], 1, 0)
    chosen = nearest_training_identity(world, photo, draws=2, seed=4)
    space, abar = world.space, alphas_cumprod().float()
    denoiser, ctx = MicroDenoiser(world.unet, world.layout.scale), world.context(world.config.lora.prompt)
    losses = []
    for row in range(space.train_coefs.shape[0]):
        gen = torch.Generator().manual_seed(4)
        total = 0.0
        for k in range(2):
            t = torch.tensor([int((k + 0.5) * len(abar) / 2)])
            noise = torch.randn(photo.shape, generator=gen)
            x_t = abar[t].sqrt() * photo + (1 - abar[t]).sqrt() * noise
            w = space.weights(space.train_coefs[row])
            with torch.no_grad():
                total += float((denoiser(x_t, t, ctx, world.layout.factors(w)) - noise).square().mean())
        losses.append(total)
    best = min(range(len(losses)), key=losses.__getitem__)
    assert chosen.name == f"nearest-{best}"
    assert torch.equal(chosen.coefficients, space.train_coefs[best])
    assert len(set(round(x, 7) for x in losses)) > 1  # the models differ on this photo


def test_denoising_score_is_each_persons_loss_on_unseen_photos(toy):
    """Batched with one set of factors per image; checked image by image with shared factors, same draws."""
    _, world = toy
    people = list(world.heldout_seeds[:2])
    betas = torch.stack([sample_identity(world.space, s, pcs=world.space.pcs).coefficients for s in (1, 2)])
    scores = denoising_score(world, betas, people, views=2, draws=2, seed=3)
    abar, gen = alphas_cumprod().float(), torch.Generator().manual_seed(3)
    denoiser, ctx = MicroDenoiser(world.unet, world.layout.scale), world.context(world.config.lora.prompt)
    x0 = torch.cat([world.photos_of(s, 2, 100) for s in people])  # views from REFERENCE_VIEW = 100
    expected = torch.zeros(2)
    for k in range(2):
        t = torch.tensor([int((k + 0.5) * len(abar) / 2)])
        noise = torch.randn(x0.shape, generator=gen)
        for i in range(4):
            x_t = abar[t].sqrt() * x0[i:i + 1] + (1 - abar[t]).sqrt() * noise[i:i + 1]
            w = world.space.weights(betas[i // 2])
            with torch.no_grad():
                expected[i // 2] += float((denoiser(x_t, t, ctx, world.layout.factors(w)) - noise[i:i + 1]).square().mean())
    torch.testing.assert_close(scores, expected / 4, rtol=1e-5, atol=1e-7)  # mean over 2 views x 2 draws
    assert not torch.isclose(scores[0], scores[1])


@pytest.mark.slow
def test_targets_curves_and_contact_sheet_rows(toy, tmp_path, monkeypatch):
    _, world = toy
    result = train_micro_encoder(world, dataclasses.replace(TINY, diffusion_weight=0.0), str(tmp_path / "w"),
                                 log=lambda s: None)
    config = TargetConfig(full_steps=4, record=(0, 2, 4), people=1, seeds=1, ddim_steps=2, references=2,
                          nearest_draws=1, timing_repeats=1)
    logs = []
    measured = measure_targets(world, result.encoder, config, workdir=str(tmp_path / "t"), log=logs.append)
    assert measured["record"] == (0, 2, 4) and measured["people"] == 1
    assert set(measured["curves"]) == {"mean", "nearest", "encoder"}
    assert all(len(v[0]) == 3 for v in measured["curves"].values())
    # step 0 of the mean-init curve is the mean model itself: its ID score recomputed by the scorer
    scorer = Scorer(world, config.seeds, config.ddim_steps, config.references)
    person = world.heldout_seeds[0]
    mean_model = scorer.scores(torch.zeros(1, world.space.pcs), [person])
    assert measured["curves"]["mean"][0][0] == pytest.approx(float(mean_model[0]), abs=1e-6)
    assert measured["encoder_only"] == measured["curves"]["encoder"][0][0]
    assert measured["full_inversion"] == measured["curves"]["mean"][0][2]
    again = measure_targets(world, result.encoder, config, workdir=str(tmp_path / "t"), log=logs.append)
    assert again["curves"] == measured["curves"]  # read back from the work folder's cache
    assert sum("inversions of 1 held-out" in line for line in logs) == 3  # mean, nearest, encoder: once each
    # each curve is the engine's inversion from its start with the person's seed (0: first held-out person)
    photo = world.photos_of(person, 1, 0)
    alone = invert_from(world, photo, None, 4, config.lr, seed=0, record=(2, 4))
    path = next((tmp_path / "t").glob("targets-starts-*.pt"))
    cached = torch.load(path, weights_only=True)[str(person)]["mean"]
    torch.testing.assert_close(cached[1:], torch.stack([alone[2], alone[4]]), rtol=1e-4, atol=1e-5)
    # another encoder reuses the runs from the mean model and the nearest identity; without the nearest curve the
    # table shows a dash there
    other = train_micro_encoder(world, dataclasses.replace(TINY, diffusion_weight=0.0, width=4),
                                str(tmp_path / "w2"), log=lambda s: None)
    import w2w.encoder_micro as encoder_micro

    runs = []
    real = encoder_micro.invert_batch
    monkeypatch.setattr(encoder_micro, "invert_batch", lambda *a, **k: (runs.append(k["init"]) if "init" in k else None)
                        or real(*a, **k))  # (the step timing's runs pass no init)
    quick = measure_targets(world, other.encoder, dataclasses.replace(config, nearest=False),
                            workdir=str(tmp_path / "t"), log=logs.append)
    assert len(runs) == 1 and runs[0] is not None  # only the new encoder's inversion ran (not the mean model's)
    assert set(quick["curves"]) == {"mean", "encoder"} and quick["curves"]["mean"] == measured["curves"]["mean"]
    assert quick["curves"]["encoder"] != measured["curves"]["encoder"]
    assert "| 0 | " in targets_markdown(quick) and " – |" in targets_markdown(quick)
    text = targets_markdown(measured)
    assert "encoder alone vs full inversion" in text and "| 4 |" in text
    rows = pcs_curve(world, result.encoder, people=2, pcs=(2, 0), log=lambda s: None)
    assert [r["pcs"] for r in rows] == [2, world.space.pcs]
    sheet = contact_sheet_rows(world, result.encoder, world.heldout_seeds[0], seeds=[0, 11], refine_steps=2,
                               full_steps=3)
    assert [r[0].split(" (")[0] for r in sheet] == ["encoder only", "encoder + 2 steps", "full inversion, 3 steps"]
    assert all(len(cells) == 3 and cells[1][1].shape == (3, 32, 32) for _, cells in sheet)


SHIPPED = Path(DEFAULT_DIR) / "micro-encoder.safetensors"


@pytest.mark.ci_may_skip("a rebuilt miniature world ships without an encoder until benchmarks/micro_encoder.py "
                         "--write-encoder is run on it")
@pytest.mark.skipif(not SHIPPED.is_file(), reason="no micro encoder in models/micro of this checkout")
def test_shipped_micro_encoder_fits_the_budget_and_its_world():
    folder = SHIPPED.parent
    total = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
    assert total <= 25 * 2**20, f"models/micro holds {total / 2**20:.1f} MB (limit 25 MB)"
    world = load_world(str(folder))
    encoder = load_encoder(str(SHIPPED), world.space)
    assert encoder.pcs <= world.space.pcs


@pytest.fixture(scope="module")
def retrieval(toy, tmp_path_factory):
    _, world = toy
    config = dataclasses.replace(TINY, rendered=0, head="retrieve", embed=8, diffusion_weight=0.0)
    return train_micro_encoder(world, config, str(tmp_path_factory.mktemp("retrieval")), log=lambda s: None).encoder


def test_identity_loss_refinement_is_the_documented_loss(toy, retrieval):
    """invert_batch(identity=...): each person's loss is the diffusion loss plus weight · (1 − cos) between the
    encoder's face embedding of the clean image the model predicts (x̂0) and that of the person's photo; the draws are
    the ones without it; weight 0 changes nothing; people stay independent; the encoder itself is left untouched."""
    from w2w.diffusion import ddpm_noise
    from w2w.encoder_micro import balanced_id_weight, encoder_embedder
    from w2w.invert import IdentityLoss
    from w2w.micro.batch_invert import invert_batch

    _, world = toy
    people = list(world.heldout_seeds[:2])
    photos = torch.cat([world.photos_of(p, 1, 0) for p in people])
    seeds = [3, 8]
    start = torch.stack([encode_person(world, retrieval, ph[None]).coefficients for ph in photos])
    before = {k: v.clone() for k, v in retrieval.state_dict().items()}
    grads = [None if p.grad is None else p.grad.clone() for p in retrieval.parameters()]
    embed = encoder_embedder(retrieval)
    plain = invert_batch(world, photos, seeds, steps=3, init=start)
    zero = invert_batch(world, photos, seeds, steps=3, init=start, identity=IdentityLoss(embed, 0.0))
    assert torch.equal(plain[3], zero[3])
    weight = 0.5
    term = IdentityLoss(embed, weight)
    one = invert_batch(world, photos, seeds, steps=1, init=start, identity=term)[1]
    # by hand: person i's first Adam step on its own loss, drawn as the engine draws (timestep, then noise)
    space, abar = world.space, alphas_cumprod().double()
    denoiser = MicroDenoiser(world.unet, world.layout.scale)
    for i, seed in enumerate(seeds):
        gen = torch.Generator().manual_seed(seed)
        t = torch.randint(0, abar.shape[0], (1,), generator=gen)
        noise = torch.randn((1, *photos.shape[1:]), generator=gen)
        beta = start[i:i + 1].clone().requires_grad_(True)
        w = torch.addcmul(space.mean.float(), beta @ space.components[: space.pcs].float(), space.std.float())
        x_t = ddpm_noise(photos[i:i + 1], t, noise, abar)
        eps, x0_hat = denoiser.predict(x_t, t, world.context(world.config.lora.prompt), world.layout.factors(w))
        cos = (embed(x0_hat) * embed(photos[i:i + 1])).sum()
        loss = (eps - noise).square().mean() + weight * (1 - cos)
        grad, = torch.autograd.grad(loss, beta)
        grad = grad + 1e-10 * beta.detach()  # Adam's L2 weight decay
        expected = start[i] - 0.1 * grad[0] / (grad[0].abs() + 1e-8)  # Adam's first step (bias-corrected)
        torch.testing.assert_close(one[i], expected, rtol=0, atol=2e-5)
    # the pack's engine (one inversion at a time) with the same identity loss gives the batched result
    engine = invert_from(world, photos[1:], encode_person(world, retrieval, photos[1:]), 3, seed=seeds[1],
                         identity=term)[3]
    alone = invert_batch(world, photos[1:], seeds[1:], steps=3, init=start[1:], identity=term)[3]
    torch.testing.assert_close(engine, alone[0], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="fixed weight"):
        invert_batch(world, photos, seeds, steps=1, identity=IdentityLoss(embed, 1.0, balance=True))
    with_id = invert_batch(world, photos, seeds, steps=3, init=start, identity=term)[3]
    torch.testing.assert_close(with_id[1:], alone, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(with_id, plain[3])
    assert all(torch.equal(v, before[k]) for k, v in retrieval.state_dict().items())
    assert all((g is None and p.grad is None) or torch.equal(g, p.grad) for g, p in zip(grads, retrieval.parameters()))
    w1, w2 = balanced_id_weight(world, retrieval, people=3, draws=2), balanced_id_weight(world, retrieval, people=3,
                                                                                           draws=2)
    assert w1 == w2 and 0 < w1 < float("inf")
    with pytest.raises(ValueError, match="finite number >= 0"):
        IdentityLoss(embed, -1.0)
    regress = train_micro_encoder(world, TINY, None, log=lambda s: None).encoder
    with pytest.raises(ValueError, match="retrieval encoder"):
        encoder_embedder(regress)


def test_targets_with_the_identity_loss(toy, retrieval, tmp_path):
    """A retrieval encoder's targets add the curves refined with the identity loss (from its answer and from the mean
    model), at the weight of balanced_id_weight; they start where the plain curves start and are cached."""
    from w2w.encoder_micro import balanced_id_weight, encoder_embedder
    from w2w.invert import IdentityLoss
    from w2w.micro.batch_invert import invert_batch

    _, world = toy
    config = TargetConfig(full_steps=4, record=(0, 2, 4), people=1, seeds=1, ddim_steps=2, references=2,
                          nearest=False, timing_repeats=1)
    logs = []
    measured = measure_targets(world, retrieval, config, workdir=str(tmp_path), log=logs.append)
    assert set(measured["curves"]) == {"mean", "encoder", "mean+id", "encoder+id", "encoder+id/node"}
    assert measured["id_weight"] == balanced_id_weight(world, retrieval)
    assert measured["curves"]["encoder+id"][0][0] == measured["curves"]["encoder"][0][0]
    assert measured["curves"]["mean+id"][0][0] == measured["curves"]["mean"][0][0]
    assert set(measured["step_seconds"]) == {"diffusion loss", "with the identity loss"}
    person = world.heldout_seeds[0]
    # the identity loss moves the inversion (read on the coefficients: the toy judge's ID scores sit at ~1 for all)
    with_id = torch.load(next(tmp_path.glob("targets-identity-*.pt")), weights_only=True)[str(person)]["encoder+id"]
    plain = torch.load(next(tmp_path.glob("targets-encoder-*.pt")), weights_only=True)[str(person)]
    torch.testing.assert_close(with_id[0], plain[0])  # the same start
    assert not torch.allclose(with_id[-1], plain[-1], atol=1e-6)
    photo = world.photos_of(person, 1, 0)
    run = invert_batch(world, photo, [0], steps=4, identity=IdentityLoss(encoder_embedder(retrieval),
                                                                          measured["id_weight"]))[4]
    cached = torch.load(next(tmp_path.glob("targets-identity-*.pt")), weights_only=True)[str(person)]["mean+id"]
    torch.testing.assert_close(cached[-1], run[0], rtol=1e-4, atol=1e-5)
    again = measure_targets(world, retrieval, config, workdir=str(tmp_path), log=logs.append)
    assert again["curves"] == measured["curves"]
    assert sum("inversions of 1 held-out" in line for line in logs) == 5  # each curve ran once
    node = invert_from(world, photo, encode_person(world, retrieval, photo), 4, seed=0,
                       identity=IdentityLoss(encoder_embedder(retrieval), 1.0, balance=True))[4]
    cached = torch.load(next(tmp_path.glob("targets-identity-*.pt")), weights_only=True)[str(person)]
    torch.testing.assert_close(cached["encoder+id/node"][-1], node, rtol=1e-5, atol=1e-6)
    text = targets_markdown(measured)
    assert "with the identity loss (weight" in text and "encoder init, identity loss" in text
    assert "balanced on each photo" in text
    assert "Seconds per inversion step" in text
    sheet = contact_sheet_rows(world, retrieval, person, seeds=[0], refine_steps=1, full_steps=0, identity_steps=2)
    assert [r[0].split(" (")[0] for r in sheet] == ["encoder only", "encoder + 1 steps", "encoder + 2 steps, ID loss"]
    start = encode_person(world, retrieval, photo)
    balanced = invert_from(world, photo, start, 2, identity=IdentityLoss(encoder_embedder(retrieval), 1.0, balance=True))
    scorer = Scorer(world, seeds=1)
    scorer.seeds = [0]
    torch.testing.assert_close(sheet[2][1][1][1], scorer.images(balanced[2][None])[0, 0], rtol=1e-4, atol=1e-4)


def test_micro_denoiser_predicts_noise_and_clean_image_consistently(toy):
    """MicroDenoiser.predict: ε̂ is what the denoiser returns, and x̂0 the clean image that, with ε̂, makes x_t again
    (x_t = sqrt(ᾱ)·x̂0 + sqrt(1−ᾱ)·ε̂) wherever x̂0 is inside the pixels' range (it is clamped to [-1, 1])."""
    _, world = toy
    denoiser = MicroDenoiser(world.unet, world.layout.scale)
    gen = torch.Generator().manual_seed(0)
    x_t = torch.randn(4, 3, 32, 32, generator=gen)
    t = torch.tensor([0, 300, 700, 999])
    ctx = world.context(world.config.lora.prompt)
    factors = world.layout.factors(world.space.mean[None].expand(4, -1))
    eps, x0 = denoiser.predict(x_t, t, ctx, factors)
    torch.testing.assert_close(eps, denoiser(x_t, t, ctx, factors))
    assert x0.abs().max() <= 1.0
    a = alphas_cumprod().float()[t].view(-1, 1, 1, 1)
    inside = x0.abs() < 1.0
    assert inside.float().mean() > 0.2
    torch.testing.assert_close((a.sqrt() * x0 + (1 - a).sqrt() * eps)[inside], x_t[inside], rtol=1e-4, atol=1e-4)
