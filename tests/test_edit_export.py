"""Edit directions, strength units, blends, nearest neighbours, and LoRA export exactness."""
import json

import pytest
import torch
from safetensors import safe_open

from w2w.edit import apply_edit, blend, fit_directions, get_direction, nearest_training
from w2w.export import export_lora, lora_state_dict
from w2w.identity import Identity
from w2w.sampling import sample_identity
from w2w.convert import convert_release
from w2w.space import load_space
from w2w_fixtures import make_release, released_reference_deltas, released_reference_weights


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    return make_release(tmp_path_factory, pcs=16, models=400, label_values=(0, 1))


@pytest.fixture(scope="module")
def space(release):
    return load_space(release.folder)


def test_lstsq_direction_is_pinverse_times_labels(space, release):
    pinv = torch.load(f"{release.folder}/pinverse_1000pc.pt", weights_only=True)
    labels = space.labels[:, space.attribute_names.index("Young")]
    torch.testing.assert_close(get_direction(space, "Young").vector, pinv @ labels, rtol=1e-4, atol=1e-6)


def test_direction_recovers_planted_attribute(space, release):
    planted = release.planted[:, release.attributes.index("Male")]
    got = get_direction(space, "Male").unit
    cos = float(torch.dot(got, planted / planted.norm()))
    assert cos > 0.8, cos  # labels were drawn from this direction plus noise


def test_strength_is_in_training_spread_units(space):
    ident = sample_identity(space, seed=1, pcs=16)
    direction = get_direction(space, "Male")
    edited = apply_edit(space, ident, "Male", 2.0)
    moved = float((edited.coefficients - ident.coefficients) @ direction.unit)
    proj_std = float((space.train_coefs @ direction.unit).std())
    assert moved == pytest.approx(2.0 * proj_std, rel=1e-5)
    raw = direction.raw_multiplier(2.0)
    torch.testing.assert_close(ident.coefficients + raw * direction.vector, edited.coefficients, rtol=1e-5, atol=1e-5)


def test_debias_makes_direction_orthogonal_and_edits_compose(space):
    plain = get_direction(space, "Male")
    debiased = get_direction(space, "Male", debias=["Young"])
    young = get_direction(space, "Young").vector
    assert abs(float(debiased.vector @ young)) < 1e-4 * float(plain.vector.norm() * young.norm())
    ident = sample_identity(space, seed=2, pcs=8)  # shorter than the directions: padded with zeros
    one = apply_edit(space, apply_edit(space, ident, "Male", 1.0), "Young", -0.5)
    other = apply_edit(space, apply_edit(space, ident, "Young", -0.5), "Male", 1.0)
    assert one.pcs == 16
    torch.testing.assert_close(one.coefficients, other.coefficients, rtol=0, atol=1e-6)
    assert one.history[-1] == "edit Young -0.5"


def test_logistic_directions(space):
    lstsq = get_direction(space, "Male").unit
    logistic = get_direction(space, "Male", method="logistic")
    assert logistic.method == "logistic"
    assert float(lstsq @ logistic.unit) > 0.7


def test_fitted_directions_are_cached_in_our_format(release, tmp_path):
    out = str(tmp_path / "s.safetensors")
    convert_release(release.folder, out)
    ours = load_space(out, training=False)  # no training data: directions come from the file
    assert set(ours.attributes) == set(release.attributes)
    torch.testing.assert_close(get_direction(ours, "Male").vector, get_direction(load_space(release.folder), "Male").vector)
    debiased = get_direction(ours, "Male", debias=["Young"])  # from cached directions + stored covariance
    full = get_direction(load_space(release.folder), "Male", debias=["Young"])
    torch.testing.assert_close(debiased.vector, full.vector)
    assert debiased.spread == pytest.approx(full.spread, rel=1e-4)
    with pytest.raises(ValueError, match="needs the training models"):
        fit_directions(ours, ["Male"])
    refit = fit_directions(load_space(out), ["Male"], debias={"Male": ["Young"]})
    assert refit.directions["Male"].debias == ("Young",)


def test_blend_and_nearest(space):
    a = sample_identity(space, 3, 16)
    b = sample_identity(space, 4, 10)
    assert torch.equal(blend(space, a, b, 0.0).coefficients, a.coefficients)
    mid = blend(space, a, b, 0.5).coefficients
    torch.testing.assert_close(mid[10:], 0.5 * a.coefficients[10:])
    row = 123
    train = Identity(space.train_coefs[row].clone(), space.fingerprint)
    (best_row, name, cos), = nearest_training(space, train)
    assert best_row == row and name == "model_00123" and cos == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("fmt", ["kohya", "peft", "diffusers"])
def test_export_reproduces_deltas(space, release, tmp_path, fmt):
    ident = sample_identity(space, seed=9, pcs=16)
    truth = released_reference_deltas(release.folder, released_reference_weights(release.folder, ident.coefficients))
    out = export_lora(space, ident, str(tmp_path / ("lora" if fmt == "peft" else "lora.safetensors")), fmt)
    path = f"{out}/adapter_model.safetensors" if fmt == "peft" else out
    with safe_open(path, "pt") as f:
        sd = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    assert meta["w2w_space"] == space.fingerprint
    if fmt == "peft":
        config = json.load(open(f"{out}/adapter_config.json"))
        scale = config["lora_alpha"] / config["r"]
    for module in space.layout.modules:
        if fmt == "kohya":
            down, up = sd[f"{module.kohya_name}.lora_down.weight"], sd[f"{module.kohya_name}.lora_up.weight"]
            scale = float(sd[f"{module.kohya_name}.alpha"]) / down.shape[0]
        elif fmt == "peft":
            down, up = sd[f"{module.peft_prefix}.lora_A.weight"], sd[f"{module.peft_prefix}.lora_B.weight"]
        else:
            down, up, scale = sd[f"unet.{module.name}.lora_A.weight"], sd[f"unet.{module.name}.lora_B.weight"], 1.0
        delta = up @ down * scale
        ref = truth[module.name]
        assert float((delta - ref).abs().max() / ref.abs().max()) <= 1e-6, module.name
    assert len(sd) == (192 if fmt == "kohya" else 128)


def test_export_refuses_foreign_identity(space):
    with pytest.raises(ValueError, match="belongs to space"):
        lora_state_dict(space, Identity(torch.zeros(4), "ffffffffffffffff"))


# ---- the exports read by the libraries that consume them -----------------------------------------------------
def test_a_failed_peft_export_leaves_no_folder_and_a_new_one_has_both_files(space, tmp_path, monkeypatch):
    """A peft adapter is a folder of two files: a new one appears whole (written in a hidden folder, then renamed)
    or not at all; writing over an earlier adapter folder replaces each file whole."""
    import json
    import os
    import stat

    import w2w.export as export

    ident = sample_identity(space, seed=3, pcs=16)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(export.json, "dump", disk_full)
        with pytest.raises(OSError, match="No space left"):
            export_lora(space, ident, str(tmp_path / "adapter"), "peft")
    assert os.listdir(tmp_path) == []
    out = export_lora(space, ident, str(tmp_path / "adapter"), "peft")
    assert sorted(os.listdir(out)) == ["adapter_config.json", "adapter_model.safetensors"]
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o777 & ~export._umask()
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["r"] == space.layout.rank
    again = export_lora(space, sample_identity(space, seed=4, pcs=16), out, "peft")  # over the earlier one
    assert again == out and sorted(os.listdir(out)) == ["adapter_config.json", "adapter_model.safetensors"]
    assert os.listdir(tmp_path) == ["adapter"]


def test_peft_export_matches_peft_own_naming_on_diffusers_unet(space, tmp_path):
    """PEFT itself reads our adapter_config.json and, injected into diffusers' own SD1.5 UNet (on the meta device:
    names and shapes only), names every LoRA tensor exactly as our file does, with the same shapes."""
    peft = pytest.importorskip("peft", reason="the test requirements install peft: pip install -r requirements-test.txt")
    diffusers = pytest.importorskip("diffusers", reason="pip install -r requirements-test.txt")
    out = export_lora(space, sample_identity(space, seed=3, pcs=16), str(tmp_path / "peft"), "peft")
    config = peft.LoraConfig.from_pretrained(out)
    assert (config.r, config.lora_alpha) == (1, 27)
    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel(cross_attention_dim=768)  # diffusers' SD1.5 UNet configuration
    peft.inject_adapter_in_model(config, unet)
    theirs = {k: tuple(v.shape) for k, v in peft.get_peft_model_state_dict(unet).items()}
    with safe_open(f"{out}/adapter_model.safetensors", "pt") as f:
        ours = {k.removeprefix("base_model.model."): tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert len(theirs) == 128 and ours == theirs


def test_kohya_export_read_by_diffusers_equals_the_diffusers_export(space, tmp_path):
    """diffusers' own kohya reader (its conversion to PEFT keys, alpha as a scale) turns our kohya file into our
    diffusers file: same keys, A equal, B·alpha/rank equal to the B with the scale folded in."""
    pytest.importorskip("diffusers", reason="the test requirements install diffusers: pip install -r requirements-test.txt")
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_lora_to_diffusers
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

    identity = sample_identity(space, seed=4, pcs=16)
    kohya = lora_state_dict(space, identity, "kohya")
    converted, alphas = _convert_non_diffusers_lora_to_diffusers(dict(kohya))
    # alphas come keyed 'unet.<path>.processor.to_q_lora.down.weight.alpha': by module path '<path>.to_q'
    alpha_of = {k.removeprefix("unet.").removesuffix("_lora.down.weight.alpha").replace(".processor.", "."): v
                for k, v in alphas.items()}
    theirs = convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in converted.items()})
    ours = {k.removeprefix("unet."): v for k, v in lora_state_dict(space, identity, "diffusers").items()}
    assert theirs.keys() == ours.keys() and len(ours) == 128 and len(alpha_of) == 64
    for key, value in ours.items():
        if ".lora_A." in key:
            assert torch.equal(theirs[key], value), key
        else:
            alpha = alpha_of[key.removesuffix(".lora_B.weight")]
            torch.testing.assert_close(theirs[key] * alpha / theirs[key].shape[1], value, rtol=1e-6, atol=0)
