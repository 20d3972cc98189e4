"""`python -m w2w idscore REF_DIR GEN_DIR`: pairing, per-image report, JSON, crops, errors."""
from __future__ import annotations

import importlib.util
import json
import os

import numpy as np
import pytest

if importlib.util.find_spec("facenet_pytorch") is None:
    # under CI the suite's conftest turns this skip into a failure (the ID-score tier must run there)
    pytest.skip("facenet-pytorch is not installed: pip install --no-deps -r requirements-idscore.txt",
                allow_module_level=True)

from PIL import Image  # noqa: E402

from w2w import cli  # noqa: E402
from w2w.metrics.faces import FACENET_FILENAME  # noqa: E402
from w2w.metrics.standins import draw_face, save_random_facenet  # noqa: E402

OTHER_FACE = dict(skin=(190, 140, 110), hair=(120, 60, 30))


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> str:
    return save_random_facenet(str(tmp_path_factory.mktemp("facenet") / FACENET_FILENAME), seed=3)


@pytest.fixture
def run(capsys):
    def _run(*argv):
        code = cli.main([str(a) for a in argv])
        out = capsys.readouterr()
        return code, out.out, out.err
    return _run


def _save(folder, name, image):
    folder.mkdir(parents=True, exist_ok=True)
    (image if isinstance(image, Image.Image) else Image.fromarray(image)).save(folder / name)


def test_one_reference_against_a_folder(tmp_path, weights, run):
    _save(tmp_path / "ref", "me.png", draw_face())
    gen = tmp_path / "gen"
    _save(gen, "a.png", draw_face())
    _save(gen, "b.png", np.zeros((256, 256, 3), np.uint8))
    _save(gen, "c.jpg", draw_face(**OTHER_FACE))
    code, out, _ = run("idscore", tmp_path / "ref" / "me.png", gen, "--weights", weights, "--json")
    assert code == 0
    data = json.loads(out)
    by_name = {r["generated"]: r for r in data["results"]}
    assert set(by_name) == {"a.png", "b.png", "c.jpg"}
    assert by_name["a.png"]["status"] == "ok" and abs(by_name["a.png"]["score"] - 1.0) < 1e-5
    assert by_name["b.png"] == {"reference": "me.png", "generated": "b.png", "score": None,
                                "status": "no face in generated"}
    assert by_name["c.jpg"]["status"] == "ok" and by_name["c.jpg"]["score"] < 0.999
    assert data["scored"] == 2 and data["pairs"] == 3
    assert data["mean"] == pytest.approx((by_name["a.png"]["score"] + by_name["c.jpg"]["score"]) / 2, abs=1e-9)


def test_folders_are_paired_by_name_and_reported_as_a_table(tmp_path, weights, run):
    _save(tmp_path / "ref", "x.png", draw_face())
    _save(tmp_path / "ref", "y.png", draw_face(**OTHER_FACE))
    _save(tmp_path / "gen", "y.jpg", draw_face(**OTHER_FACE))
    _save(tmp_path / "gen", "x.png", draw_face(**OTHER_FACE))
    code, out, _ = run("idscore", tmp_path / "ref", tmp_path / "gen", "--weights", weights,
                       "--crops", tmp_path / "crops")
    assert code == 0
    lines = out.splitlines()
    assert "2 of 2 pairs" in lines[0]
    x_line = next(line for line in lines if "x.png -> x.png" in line)
    y_line = next(line for line in lines if "y.png -> y.jpg" in line)
    x_score, y_score = float(x_line.split()[0]), float(y_line.split()[0])
    assert x_score < 0.999  # two different drawn people
    assert y_score > x_score, (x_score, y_score)  # same drawing, png vs jpg, is closer
    crops = sorted(os.listdir(tmp_path / "crops"))
    assert crops == ["x__x.png", "y__y.png"]
    assert Image.open(tmp_path / "crops" / "x__x.png").size == (320, 160)


def test_no_face_anywhere_exits_1_and_says_so(tmp_path, weights, run):
    _save(tmp_path / "ref", "r.png", np.zeros((128, 128, 3), np.uint8))
    _save(tmp_path / "gen", "g.png", np.zeros((128, 128, 3), np.uint8))
    code, out, _ = run("idscore", tmp_path / "ref", tmp_path / "gen", "--weights", weights)
    assert code == 1
    assert "no mean" in out and "no face in either image" in out


def test_unpaired_names_are_an_error(tmp_path, weights, run):
    for name in ("a.png", "b.png"):
        _save(tmp_path / "ref", name, draw_face())
    for name in ("a.png", "c.png"):
        _save(tmp_path / "gen", name, draw_face())
    code, _, err = run("idscore", tmp_path / "ref", tmp_path / "gen", "--weights", weights)
    assert code == 2
    assert "only in REF ['b']" in err and "only in GEN ['c']" in err


def test_missing_weights_is_a_clear_error(tmp_path, run, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))
    _save(tmp_path / "ref", "a.png", draw_face())
    code, _, err = run("idscore", tmp_path / "ref", tmp_path / "ref")
    assert code == 2
    assert FACENET_FILENAME in err and "107 MiB" in err and "--weights" in err


def test_empty_or_missing_folders_are_errors(tmp_path, weights, run):
    (tmp_path / "empty").mkdir()
    code, _, err = run("idscore", tmp_path / "empty", tmp_path / "empty", "--weights", weights)
    assert code == 2 and "holds no images" in err
    code, _, err = run("idscore", tmp_path / "nope", tmp_path / "empty", "--weights", weights)
    assert code == 2 and "no such folder" in err


def test_crops_are_never_written_among_the_images_scored(tmp_path, weights, run):
    """Crops saved in REF_DIR or GEN_DIR would be read as images by the next score: refused before scoring."""
    _save(tmp_path / "ref", "x.png", draw_face())
    _save(tmp_path / "gen", "x.png", draw_face())
    for crops in (tmp_path / "gen", tmp_path / "ref" / "crops", tmp_path / "gen" / "x.png"):
        code, out, err = run("idscore", tmp_path / "ref", tmp_path / "gen", "--weights", weights, "--crops", crops)
        assert code == 2 and out == "" and err.startswith("error: --crops"), err
    assert sorted(os.listdir(tmp_path / "ref")) == ["x.png"] and sorted(os.listdir(tmp_path / "gen")) == ["x.png"]
