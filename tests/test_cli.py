"""`python -m w2w` space commands: each does its job (checked against the core's own result) and each mistake ends
with exit status 2 and one line that names the problem and the fix."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from w2w.cli import main
from w2w.convert import convert_release
from w2w.edit import apply_edit, blend, nearest_training
from w2w.export import lora_state_dict
from w2w.identity import load_identity
from w2w.sampling import sample_identity
from w2w.space import load_space
from w2w_fixtures import make_release

PCS = 12


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    return make_release(tmp_path_factory, "cli_release", pcs=PCS, models=150, seed=5)


@pytest.fixture(scope="module")
def space_file(release, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "space.safetensors"
    convert_release(release.folder, str(out))
    return str(out)


@pytest.fixture
def run(capsys):
    def _run(*argv):
        code = main([str(a) for a in argv])
        out = capsys.readouterr()
        return code, out.out, out.err
    return _run


def test_info_and_attributes(run, space_file, release):
    code, out, _ = run("info", space_file)
    info = json.loads(out)
    assert code == 0 and info["pcs"] == PCS and info["training_models"] == 150 and info["modules"] == 64
    assert info["fingerprint"] == load_space(release.folder).fingerprint  # the conversion is the same space
    code, out, _ = run("attributes", space_file)
    assert code == 0 and out.split() == list(load_space(space_file).attributes) and "Male" in out.split()


def test_convert_writes_a_space_with_the_requested_pcs_and_dtype(run, release, tmp_path):
    out = tmp_path / "half.safetensors"
    code, printed, _ = run("convert", release.folder, out, "--pcs", 5, "--dtype", "float16", "--no-training")
    assert code == 0 and json.loads(printed[printed.index("{"):])["pcs"] == 5
    converted = load_space(str(out))
    assert converted.components.dtype == torch.float16 and converted.pcs == 5 and converted.train_coefs is None
    torch.testing.assert_close(converted.components.float(), load_space(release.folder, 5).components,
                               rtol=0, atol=2.0 ** -11)  # float16 rounding of orthonormal rows (|v| <= 1)


def test_sample_edit_blend_export_nearest_give_the_core_results(run, space_file, tmp_path):
    space = load_space(space_file)
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    assert run("sample", space_file, "--seed", 5, "--pcs", PCS, "--out", a)[0] == 0
    assert run("sample", space_file, "--seed", 6, "--pcs", PCS, "--factor", 2, "--out", b)[0] == 0
    expected_a = sample_identity(space, 5, PCS)
    assert torch.equal(load_identity(str(a)).coefficients, expected_a.coefficients)
    assert torch.equal(load_identity(str(b)).coefficients, sample_identity(space, 6, PCS, 2.0).coefficients)

    edited = tmp_path / "edited.safetensors"
    code, out, _ = run("edit", space_file, a, "--edit", "Male=1.5", "--edit", "Young=-1", "--debias", "Eyeglasses",
                       "--out", edited)
    expected = apply_edit(space, apply_edit(space, expected_a, "Male", 1.5, ["Eyeglasses"]), "Young", -1.0,
                          ["Eyeglasses"])
    assert code == 0 and "edit Male +1.5" in out
    torch.testing.assert_close(load_identity(str(edited)).coefficients, expected.coefficients, rtol=0, atol=0)

    mix = tmp_path / "mix.safetensors"
    assert run("blend", space_file, a, b, "--t", 0.25, "--out", mix)[0] == 0
    expected_mix = blend(space, expected_a, load_identity(str(b)), 0.25)
    assert torch.equal(load_identity(str(mix)).coefficients, expected_mix.coefficients)

    lora = tmp_path / "a_lora.safetensors"
    assert run("export-lora", space_file, a, "--out", lora, "--format", "kohya")[0] == 0
    with safe_open(str(lora), "pt") as f:
        written = {k: f.get_tensor(k) for k in f.keys()}
    expected_sd = lora_state_dict(space, expected_a, "kohya")
    assert written.keys() == expected_sd.keys() and all(torch.equal(written[k], expected_sd[k]) for k in written)

    code, out, _ = run("nearest", space_file, a, "--top", 3)
    rows = json.loads(out)
    assert code == 0 and [r["row"] for r in rows] == [r for r, _, _ in nearest_training(space, expected_a, 3)]
    assert rows[0]["cosine"] >= rows[1]["cosine"] >= rows[2]["cosine"]


@pytest.mark.parametrize("argv, message", [
    (["info", "{missing}"], "space not found"),
    (["attributes", "{lora}"], "not a w2w space"),
    (["convert", "{empty}", "{tmp}/out.safetensors"], "lacks V.pt"),
    (["sample", "{space}", "--seed", "1", "--pcs", "5000", "--out", "{tmp}/x.safetensors"], "use 1..12"),
    (["edit", "{space}", "{identity}", "--edit", "Male", "--out", "{tmp}/x.safetensors"], "write ATTR=STRENGTH"),
    (["edit", "{space}", "{identity}", "--edit", "Wings=1", "--out", "{tmp}/x.safetensors"], "is not in this space"),
    (["blend", "{space}", "{identity}", "{foreign}", "--out", "{tmp}/x.safetensors"], "belongs to space"),
    (["export-lora", "{space}", "{identity}", "--out", "{tmp}/x.pt"], "is written as a .safetensors file"),
    (["nearest", "{space}", "{missing}"], "identity file not found"),
])
def test_mistakes_exit_2_with_a_line_naming_the_fix(run, space_file, tmp_path, argv, message):
    from w2w.identity import Identity, save_identity

    identity, foreign = tmp_path / "id.safetensors", tmp_path / "foreign.safetensors"
    save_identity(sample_identity(load_space(space_file), 1, PCS), str(identity))
    save_identity(Identity(torch.ones(PCS), "0123456789abcdef"), str(foreign))
    lora = tmp_path / "lora.safetensors"
    assert run("export-lora", space_file, identity, "--out", lora)[0] == 0
    (tmp_path / "empty").mkdir()
    names = {"missing": tmp_path / "nothing.safetensors", "lora": lora, "empty": tmp_path / "empty", "tmp": tmp_path,
             "space": space_file, "identity": identity, "foreign": foreign}
    code, out, err = run(*[a.format(**names) for a in argv])
    assert code == 2 and out == ""
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "x.safetensors").exists()  # nothing half-written
