"""Space loading, conversion and reconstruction against the released file format."""

import os

import pytest
import torch
from safetensors import safe_open

from w2w.identity import Identity, IdentityMismatch, load_identity, save_identity
from w2w.sampling import sample_identity
from w2w.convert import convert_release
from w2w.space import PcsError, load_space
from w2w_fixtures import make_release, released_reference_deltas, released_reference_weights


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    return make_release(tmp_path_factory, pcs=24, models=150)


@pytest.fixture(scope="module")
def converted(release, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ours") / "space.safetensors")
    convert_release(release.folder, out)
    return out


def rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max())


def test_released_dir_loads_with_layout_and_training(release):
    space = load_space(release.folder)
    assert (space.pcs, space.dim, len(space.layout.modules)) == (24, 99_648, 64)
    assert space.train_coefs.shape == (150, 24)
    assert space.attributes[:2] == ("Male", "Young")
    assert space.train_names[0] == "model_00000"


def test_round_trip_release_convert_load_reconstruct(release, converted):
    coefs = torch.randn(3, 24, generator=torch.Generator().manual_seed(1))
    truth = released_reference_weights(release.folder, coefs)
    ours_dir = load_space(release.folder).weights(coefs)
    ours_file = load_space(converted).weights(coefs)
    assert rel_err(ours_dir, truth) <= 1e-6
    assert rel_err(ours_file, truth) <= 1e-6
    deltas_truth = released_reference_deltas(release.folder, truth[0])
    deltas = load_space(converted).deltas(coefs[0])
    assert deltas.keys() == deltas_truth.keys()
    for name, d in deltas.items():
        assert rel_err(d, deltas_truth[name]) <= 1e-6, name


def test_pcs_limits_what_is_held(release, converted):
    for path in (release.folder, converted):
        space = load_space(path, pcs=5)
        assert space.components.shape == (5, 99_648)
        assert space.total_pcs == 24
        with pytest.raises(ValueError, match="load the space with pcs >= 6"):
            space.weights(torch.zeros(6))
    for path in (release.folder, converted):  # the caller's choice, not a damaged file
        with pytest.raises(PcsError, match="has 24: lower pcs to at most 24") as caught:
            load_space(path, pcs=25)
        assert "malformed" not in str(caught.value) and "convert" not in str(caught.value)
        with pytest.raises(PcsError, match="positive integer"):
            load_space(path, pcs=0)


def test_fingerprint_is_shared_by_all_forms(release, converted, tmp_path):
    half = str(tmp_path / "half.safetensors")
    convert_release(release.folder, half, dtype=torch.float16, pcs=10)
    prints = {load_space(p, pcs=8).fingerprint for p in (release.folder, converted, half)}
    assert len(prints) == 1
    s16 = load_space(half)
    assert s16.components.dtype == torch.float16
    coefs = torch.randn(10)
    assert rel_err(s16.weights(coefs), released_reference_weights(release.folder, coefs)) <= 2e-3


def test_format_contents(converted):
    with safe_open(converted, "pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
        assert f.get_slice("components").get_shape() == [24, 99_648]
    assert meta["format"] == "w2w-space" and meta["base_model"] == "SD1.5"
    assert {"components", "mean", "std", "coef_mean", "coef_std", "train_coefs", "labels", "direction.Male"} <= keys


def test_identity_round_trip_and_mismatch(release, converted, tmp_path):
    space = load_space(converted)
    ident = sample_identity(space, seed=7, pcs=20)
    path = str(tmp_path / "id.safetensors")
    save_identity(ident, path)
    back = load_identity(path)
    assert torch.equal(back.coefficients, ident.coefficients) and back.history == ident.history
    with safe_open(path, "pt") as f:
        assert f.get_tensor("coefficients").dtype == torch.float32
    other = Identity(torch.zeros(3), "0123456789abcdef")
    with pytest.raises(IdentityMismatch, match="load the space it was made with"):
        other.check_space(space)
    with pytest.raises(IdentityMismatch, match="raise pcs"):
        ident.check_space(load_space(converted, pcs=4))


def test_sampling_is_reproducible_and_follows_stats(converted):
    space = load_space(converted)
    a = sample_identity(space, seed=5, pcs=24)
    b = sample_identity(space, seed=5, pcs=24)
    c = sample_identity(space, seed=6, pcs=24)
    assert a.coefficients.numpy().tobytes() == b.coefficients.numpy().tobytes()
    assert not torch.equal(a.coefficients, c.coefficients)
    many = torch.stack([sample_identity(space, s, 24, factor=0.5).coefficients for s in range(400)])
    torch.testing.assert_close(many.mean(0), space.coef_mean, atol=0.25 * float(space.coef_std.max()), rtol=0)
    ratio = many.std(0) / (0.5 * space.coef_std)
    assert float((ratio - 1).abs().max()) < 0.2
    with pytest.raises(ValueError, match="sampling statistics for 24 PCs"):
        sample_identity(space, 1, pcs=25)


def test_space_without_training(release, tmp_path):
    out = str(tmp_path / "bare.safetensors")
    convert_release(release.folder, out, training=False)
    space = load_space(out)
    assert space.train_coefs is None and space.attributes == ()
    with pytest.raises(ValueError, match="no sampling statistics"):
        sample_identity(space, 1, pcs=4)


def test_project_recovers_coefficients(converted):
    space = load_space(converted)
    coefs = torch.randn(24)
    torch.testing.assert_close(space.project(space.weights(coefs)), coefs, atol=1e-3, rtol=1e-3)


def test_an_interrupted_conversion_leaves_no_half_written_space(release, tmp_path):
    """The fault fires while the basis streams into the temporary file (bytes already written, before the rename): the
    previous file at the target stays as it was and no temporary file is left behind."""
    out = tmp_path / "x.safetensors"
    out.write_bytes(b"the previous, complete space")
    seen = []

    def fault(done, total, what):
        if what == "converting basis":
            partial = [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]
            seen.append([(p.name, p.stat().st_size) for p in partial])
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        convert_release(release.folder, str(out), callback=fault)
    assert len(seen) == 1 and len(seen[0]) == 1 and seen[0][0][1] > 0  # mid-write: one temporary file with bytes in it
    assert out.read_bytes() == b"the previous, complete space"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]


def test_tiny_conversion_keeps_source_fingerprint(release, tmp_path):
    out = str(tmp_path / "tiny.safetensors")
    convert_release(release.folder, out, pcs=3)
    assert load_space(out).fingerprint == load_space(release.folder).fingerprint


@pytest.mark.parametrize("kind", ["folder", "file"])
def test_loading_reports_progress_and_stops_when_the_callback_raises(release, tmp_path, monkeypatch, kind):
    import w2w.rawread as rawread

    path = release.folder
    if kind == "file":
        path = str(tmp_path / "space.safetensors")
        convert_release(release.folder, path)
    monkeypatch.setattr(rawread, "_BLOCK_BYTES", 4096)  # many small reads, so that progress has steps to report
    seen = []
    space = load_space(path, 16, progress=lambda done, total: seen.append((done, total)))
    assert len(seen) > 2 and seen == sorted(seen) and seen[-1][0] == seen[-1][1]
    torch.testing.assert_close(space.components, load_space(path, 16).components, rtol=0, atol=0)

    def cancel(done, total):
        if done > total // 2:
            raise KeyboardInterrupt("cancelled")

    with pytest.raises(KeyboardInterrupt, match="cancelled"):
        load_space(path, 16, progress=cancel)


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_written_files_get_the_mode_open_would_give(tmp_path, umask):
    """Files are written through a private temporary file; the result has the usual mode (0666 less the umask), so
    other users and services of a shared install can read a space, identity or LoRA the pack wrote."""
    import os
    import stat

    from w2w.stfile import write_safetensors

    old = os.umask(umask)
    try:
        out = tmp_path / f"mode-{umask:o}.safetensors"
        write_safetensors(str(out), {"x": torch.zeros(3)})
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~umask


def test_a_failed_final_rename_leaves_nothing_and_any_legal_name_can_be_written(tmp_path, monkeypatch):
    """The temporary file is removed when the rename onto the target fails (not only when the block fails), it never
    carries the target's extension (a folder listing would offer it), and a 240-character name can still be written."""
    from w2w.stfile import atomic_path, write_safetensors

    (tmp_path / "dir.safetensors").mkdir()
    with pytest.raises(IsADirectoryError, match="choose another name"):
        write_safetensors(str(tmp_path / "dir.safetensors"), {"x": torch.zeros(3)})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir.safetensors"]

    def no_rename(src, dst):
        raise PermissionError("read-only target")

    with monkeypatch.context() as m:
        m.setattr(os, "replace", no_rename)
        with pytest.raises(PermissionError, match="read-only"):
            write_safetensors(str(tmp_path / "a.safetensors"), {"x": torch.zeros(3)})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir.safetensors"]
    with atomic_path(str(tmp_path / "b.safetensors")) as tmp:
        assert os.path.basename(tmp).startswith(".") and not tmp.endswith(".safetensors")
    long = tmp_path / ("n" * 240 + ".safetensors")
    write_safetensors(str(long), {"x": torch.ones(2)})
    with safe_open(str(long), "pt") as f:
        assert f.get_tensor("x").tolist() == [1.0, 1.0]


def test_a_resaved_space_records_no_folder_in_its_source(release, converted, tmp_path):
    """A file's provenance names where it came from, never the folder it was read from on some machine."""
    from w2w.space import save_space

    for loaded, name in ((load_space(converted), "space.safetensors"), (load_space(release.folder), None)):
        assert os.path.dirname(os.path.abspath(converted if name else release.folder)) in loaded.source  # shown as is
        out = str(tmp_path / "again.safetensors")
        save_space(loaded, out)
        with safe_open(out, "pt") as f:
            source = f.metadata()["source"]
        expected = name or os.path.basename(os.path.normpath(release.folder))
        assert source.endswith(": " + expected) and os.sep not in source, source
        assert load_space(out).fingerprint == loaded.fingerprint
