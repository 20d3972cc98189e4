"""Hostile and broken files: nothing from a pickle runs, every failure is a clear W2WFileError/LayoutError."""
import os
import shutil

import pytest
import torch

from w2w.layout import LayoutError
from w2w.safeload import W2WFileError, load_dataframe
from w2w.convert import convert_release
from w2w.space import load_space
from w2w_fixtures import make_release

SLOTS = ("V.pt", "mean.pt", "std.pt", "weight_dimensions.pt", "proj_1000pc.pt", "pinverse_1000pc.pt", "identity_df.pt")


class _Payload:
    """Unpickling this would create a marker file through os.system."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    return make_release(tmp_path_factory, pcs=6, models=40)


@pytest.fixture
def copy(release, tmp_path):
    dst = tmp_path / "rel"
    shutil.copytree(release.folder, dst)
    return dst


@pytest.mark.parametrize("slot", SLOTS)
@pytest.mark.parametrize("how", ["torch_save", "plain_pickle"])
def test_malicious_pickle_runs_nothing(copy, tmp_path, slot, how):
    marker = tmp_path / "pwned"
    payload = _Payload(str(marker))
    if how == "torch_save":
        torch.save({"x": payload} if slot == "weight_dimensions.pt" else payload, copy / slot)
    else:
        import pickle

        with open(copy / slot, "wb") as f:
            pickle.dump(payload, f)
    with pytest.raises(W2WFileError) as info:
        load_space(str(copy))
    assert slot in str(info.value)
    assert not marker.exists(), "a pickled payload was executed"


def test_dataframe_loader_refuses_foreign_globals(tmp_path):
    import pandas as pd

    marker = tmp_path / "pwned"
    df = pd.DataFrame({"Male": [1, -1]})
    df.attrs["x"] = _Payload(str(marker))  # a DataFrame carrying a payload in its attrs
    torch.save(df, tmp_path / "df.pt")
    with pytest.raises(W2WFileError, match="refused to load global"):
        load_dataframe(str(tmp_path / "df.pt"))
    assert not marker.exists()


@pytest.mark.parametrize("slot", ["V.pt", "mean.pt", "weight_dimensions.pt", "identity_df.pt"])
def test_truncated_files(copy, slot):
    data = (copy / slot).read_bytes()
    (copy / slot).write_bytes(data[: len(data) // 2])
    with pytest.raises(W2WFileError, match="truncated|corrupt"):
        load_space(str(copy))


def test_missing_required_file_names_it_and_the_fix(copy):
    (copy / "std.pt").unlink()
    with pytest.raises(W2WFileError, match=r"lacks std\.pt.*python -m w2w download"):
        load_space(str(copy))


@pytest.mark.parametrize("slot,value,match", [
    ("mean.pt", torch.zeros(99_647), "shape"),
    ("std.pt", torch.zeros(2, 3), "dimensions"),
    ("V.pt", torch.zeros(1000, 4), "rows"),
    ("mean.pt", torch.full((99_648,), float("nan")), "NaN"),
    ("V.pt", torch.full((99_648, 2), float("inf")), "NaN or Inf"),
    ("proj_1000pc.pt", torch.full((40, 6), float("nan")), "NaN"),
    ("mean.pt", [1, 2, 3], "holds a list"),
])
def test_wrong_shapes_and_values(copy, slot, value, match):
    torch.save(value, copy / slot)
    with pytest.raises((W2WFileError, LayoutError), match=match):
        load_space(str(copy))


def test_layout_that_does_not_add_up(copy):
    dims = torch.load(copy / "weight_dimensions.pt", weights_only=True)
    key = next(iter(dims))
    dims.pop(key)
    torch.save(dims, copy / "weight_dimensions.pt")
    with pytest.raises(LayoutError):
        load_space(str(copy))


def test_label_rows_must_match_training_rows(copy):
    proj = torch.load(copy / "proj_1000pc.pt", weights_only=True)
    torch.save(proj[:-1].clone(), copy / "proj_1000pc.pt")
    torch.save(torch.linalg.pinv(proj[:-1]), copy / "pinverse_1000pc.pt")
    with pytest.raises(W2WFileError, match="rows"):
        load_space(str(copy))


def test_our_format_damage_is_detected(release, tmp_path):
    out = tmp_path / "s.safetensors"
    convert_release(release.folder, str(out))
    data = bytearray(out.read_bytes())
    (tmp_path / "cut.safetensors").write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(W2WFileError, match="truncated or corrupt"):
        load_space(str(tmp_path / "cut.safetensors"))
    data[-4:] = b"\x00\x00\xc0\x7f"  # last float of the file -> NaN
    (tmp_path / "nan.safetensors").write_bytes(bytes(data))
    with pytest.raises(W2WFileError):
        load_space(str(tmp_path / "nan.safetensors"))
    from safetensors.torch import save_file

    save_file({"lora_unet_x.lora_down.weight": torch.zeros(1, 2)}, str(tmp_path / "lora.safetensors"))
    with pytest.raises(W2WFileError, match="not a w2w space"):
        load_space(str(tmp_path / "lora.safetensors"))
    with pytest.raises(W2WFileError, match="space not found"):
        load_space(str(tmp_path / "nope.safetensors"))


@pytest.mark.parametrize("content, says", [
    (b"", "is empty"),
    (b"version https://git-lfs.github.com/spec/v1\noid sha256:ab12\nsize 3990000000\n", "Git LFS pointer.*git lfs pull"),
    (b"<!DOCTYPE html><html><body>Rate limited</body></html>", "HTML or XML page"),
    (b"hello world", "not a torch file"),
])
@pytest.mark.parametrize("name", ["V.pt", "identity_df.pt"])
def test_a_failed_download_is_named_for_what_it_is(copy, content, says, name):
    """What a failed or incomplete download leaves (an empty file, an LFS pointer of a clone without LFS, an error
    page) is named as such and the fix given, instead of being called an unsafe pickle or a torch error."""
    (copy / name).write_bytes(content)
    with pytest.raises(W2WFileError, match=says) as caught:
        load_space(str(copy))
    assert name in str(caught.value) and "refused" not in str(caught.value)


def test_garbage_after_a_pickle_opcode_is_a_clear_file_error(tmp_path):
    """A damaged torch file whose first byte looks like a pickle: torch raises whatever the damage gives (KeyError,
    EOFError, ...); the loader reports a file error naming the file and the fix."""
    from w2w.safeload import load_object

    path = tmp_path / "x.pt"
    path.write_bytes(b"\x80\x02hello world")
    with pytest.raises(W2WFileError, match="x.pt.*Download it again"):
        load_object(str(path))


def _resaved(release, tmp_path, tensors=None, metadata=None):
    """A converted space re-written with some tensors or metadata entries replaced."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    good = tmp_path / "good.safetensors"
    if not good.exists():
        convert_release(release.folder, str(good))
    with safe_open(str(good), "pt") as f:
        data, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    out = tmp_path / "edited.safetensors"
    save_file({**data, **(tensors or {})}, str(out), metadata={**meta, **(metadata or {})})
    return str(out), data


@pytest.mark.parametrize("what", ["labels 1-D", "labels NaN", "train_coefs Inf", "directions a list",
                                  "format_version text", "layout empty"])
def test_a_damaged_space_file_is_a_file_error_naming_the_file_and_the_fix(release, tmp_path, what):
    """Metadata or tensors of the wrong kind in our own format: never a bare IndexError/AttributeError from deep
    inside, and never loaded with NaN labels (which would fail later in least squares)."""
    _, data = _resaved(release, tmp_path)
    labels, train = data["labels"].clone(), data["train_coefs"].clone()
    labels[0, 0], train[1, 1] = float("nan"), float("inf")
    edits = {"labels 1-D": ({"labels": data["labels"][:, 0].contiguous()}, None),
             "labels NaN": ({"labels": labels}, None), "train_coefs Inf": ({"train_coefs": train}, None),
             "directions a list": (None, {"directions": "[]"}), "format_version text": (None, {"format_version": "abc"}),
             "layout empty": (None, {"layout": "{}"})}[what]
    path, _ = _resaved(release, tmp_path, *edits)
    with pytest.raises(W2WFileError, match="python -m w2w convert") as caught:
        load_space(path)
    assert path in str(caught.value)


@pytest.mark.parametrize("config", ["[]", '"x"', '{"r": 1e400}', '{"lora_alpha": -1}', '{"lora_alpha": NaN}'])
def test_a_bad_adapter_config_is_a_file_error(copy, config):
    (copy / "adapter_config.json").write_text(config)
    with pytest.raises(W2WFileError, match="not a valid PEFT adapter config.*as downloaded"):
        load_space(str(copy))


def test_a_non_finite_released_pseudo_inverse_is_refused_at_load(copy):
    pinv = torch.load(copy / "pinverse_1000pc.pt", weights_only=True)
    pinv[0, 0] = float("nan")
    torch.save(pinv, copy / "pinverse_1000pc.pt")
    with pytest.raises(W2WFileError, match="pseudo-inverse contains NaN"):
        load_space(str(copy))


@pytest.mark.parametrize("history", ["5", "null", '{"a": 1}', "not json"])
def test_an_identity_file_with_a_malformed_history_is_a_file_error(tmp_path, history):
    from safetensors.torch import save_file

    from w2w.identity import load_identity

    path = str(tmp_path / "i.safetensors")
    save_file({"coefficients": torch.ones(3)}, path,
              metadata={"format": "w2w-identity", "space_fingerprint": "0123456789abcdef", "history": history})
    with pytest.raises(W2WFileError, match="malformed identity metadata"):
        load_identity(path)


@pytest.mark.parametrize("pcs", [0, -3, 2.5, True])
def test_conversion_refuses_a_bad_number_of_pcs_before_writing(release, tmp_path, pcs):
    out = tmp_path / "s.safetensors"
    with pytest.raises(ValueError, match="pcs must be a positive whole number"):
        convert_release(release.folder, str(out), pcs=pcs)
    assert list(tmp_path.iterdir()) == []
