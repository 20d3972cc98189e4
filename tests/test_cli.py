"""`python -m w2w` space commands: each does its job (checked against the core's own result) and each mistake ends
with exit status 2 and one line that names the problem and the fix."""
from __future__ import annotations

import errno
import json
import os
from pathlib import Path

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
    (["sample", "{space}", "--seed", "1", "--out", "{space}"], "would replace the input"),
    (["edit", "{space}", "{identity}", "--edit", "Male=1", "--out", "{space}"], "would replace the input"),
    (["convert", "{release}", "{release}/V.pt"], "would replace a file of the input folder"),
    (["sample", "{space}", "--seed", "1", "--out", "{tmp}"], "is a folder: give a file name"),
    (["sample", "{space}", "--seed", "1", "--out", ""], "--out is empty"),
    (["export-lora", "{space}", "{identity}", "--format", "peft", "--out", "{lora}"], "this output is a folder"),
    (["edit", "{space}", "{identity}", "--edit", "Male=nan", "--out", "{tmp}/x.safetensors"], "not a finite number"),
    (["fit-directions", "{release}", "{lora}"], "is a folder (released files?)"),
])
def test_mistakes_exit_2_with_a_line_naming_the_fix(run, space_file, release, tmp_path, argv, message):
    from w2w.identity import Identity, save_identity

    identity, foreign = tmp_path / "id.safetensors", tmp_path / "foreign.safetensors"
    save_identity(sample_identity(load_space(space_file), 1, PCS), str(identity))
    save_identity(Identity(torch.ones(PCS), "0123456789abcdef"), str(foreign))
    lora = tmp_path / "lora.safetensors"
    assert run("export-lora", space_file, identity, "--out", lora)[0] == 0
    (tmp_path / "empty").mkdir()
    names = {"missing": tmp_path / "nothing.safetensors", "lora": lora, "empty": tmp_path / "empty", "tmp": tmp_path,
             "space": space_file, "identity": identity, "foreign": foreign, "release": release.folder}
    kept = {p: Path(p).read_bytes() for p in (space_file, lora, Path(release.folder) / "V.pt")}
    code, out, err = run(*[a.format(**names) for a in argv])
    assert {p: Path(p).read_bytes() for p in kept} == kept  # no input is ever replaced
    assert code == 2 and out == ""
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "x.safetensors").exists()  # nothing half-written


@pytest.mark.parametrize("argv, flag", [
    (["nearest", "S", "I", "--top", "-3"], "--top: -3 is too small: use 1 or more"),
    (["sample", "S", "--seed", "1", "--pcs", "0", "--out", "x"], "--pcs: 0 is too small"),
    (["blend", "S", "A", "B", "--t", "nan", "--out", "x"], "--t: 'nan' is not a finite number"),
    (["sample", "S", "--seed", "1", "--factor", "inf", "--out", "x"], "--factor: 'inf' is not a finite number"),
    (["build", "x", "--from", "y", "--engine", "dask", "--workers", "0"], "--workers: 0 is too small"),
    (["to-zarr", "x", "y", "--chunk-mb", "0"], "--chunk-mb: 0 is too small"),
    (["train-encoder", "--micro", "--workdir", "w", "--out", "x", "--threads", "-1"], "--threads: -1 is too small"),
    (["vae-train", "S", "--out", "x", "--latent", "two"], "--latent: 'two' is not a whole number"),
    (["download", "--pcs", "0"], "--pcs: 0 is too small"),
])
def test_impossible_numbers_are_refused_when_the_command_line_is_read(capsys, argv, flag):
    with pytest.raises(SystemExit) as caught:
        main(argv)
    assert caught.value.code == 2 and flag in capsys.readouterr().err


def test_a_full_disk_is_one_line_naming_the_fix_and_leaves_no_file(run, space_file, tmp_path, monkeypatch):
    import io

    import w2w.stfile

    class Full(io.BytesIO):  # a disk that fills up at the first byte
        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(w2w.stfile, "open", lambda *a, **k: Full(), raising=False)  # the module's writes only
    code, out, err = run("sample", space_file, "--seed", 1, "--out", tmp_path / "a.safetensors")
    assert code == 2 and err.startswith("error: No space left on device") and "free space" in err
    assert err.count("\n") == 1 and os.listdir(tmp_path) == []  # the temporary file is gone too


def test_a_permission_error_names_reading_or_writing(run, space_file, tmp_path, monkeypatch):
    """An input the user cannot read is named as such; an output where they cannot write names another folder."""
    import w2w.cli

    unreadable = os.path.realpath(space_file)
    real_access = os.access
    monkeypatch.setattr(w2w.cli.os, "access", lambda p, mode, **k: (
        False if os.path.realpath(p) == unreadable and mode == os.R_OK else real_access(p, mode, **k)))

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", space_file)

    monkeypatch.setattr("w2w.space.load_space", denied)
    code, _, err = run("sample", space_file, "--seed", 1, "--out", tmp_path / "a.safetensors")
    assert code == 2 and err.startswith("error: Permission denied") and "cannot read this file" in err
    assert "write to" not in err and os.listdir(tmp_path) == []
    monkeypatch.setattr(w2w.cli.os, "access", real_access)  # the same error on a readable file: a place to write
    code, _, err = run("sample", space_file, "--seed", 1, "--out", tmp_path / "a.safetensors")
    assert code == 2 and "choose a folder you can write to" in err and "cannot read" not in err


def test_sample_takes_every_pc_of_a_space_smaller_than_its_default(run, space_file, tmp_path):
    out = tmp_path / "a.safetensors"
    code, printed, _ = run("sample", space_file, "--seed", 3, "--out", out)
    assert code == 0 and f"({PCS} coefficients)" in printed  # the default of 1000, clamped to the space's 12
    assert torch.equal(load_identity(str(out)).coefficients, sample_identity(load_space(space_file), 3, PCS).coefficients)
