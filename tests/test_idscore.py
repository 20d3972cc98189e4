"""ID score: MTCNN on a drawn face and on a public-domain photo, FaceNet loaded from a local file, per-pair report."""
from __future__ import annotations

import importlib.util
import math
import os
import sys

import numpy as np
import pytest
import torch

if importlib.util.find_spec("facenet_pytorch") is None:
    # under CI the suite's conftest turns this skip into a failure (the ID-score tier must run there)
    pytest.skip("facenet-pytorch is not installed: pip install --no-deps -r requirements-idscore.txt",
                allow_module_level=True)

from w2w.metrics import (  # noqa: E402
    FACENET_FILENAME, FACENET_URL, DetectorConfig, FaceNetWeightsMissing, find_facenet_weights, get_scorer,
    id_score, pair_indices, preview_crops,
)
from w2w.metrics.faces import FaceDetector, FaceEmbedder, require_facenet, to_uint8_images  # noqa: E402
from w2w.metrics.idscore import IDScorer  # noqa: E402
from w2w.metrics.standins import draw_face, save_random_facenet  # noqa: E402
from w2w.safeload import W2WFileError  # noqa: E402


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> str:
    return save_random_facenet(str(tmp_path_factory.mktemp("facenet") / FACENET_FILENAME), seed=0)


@pytest.fixture(scope="module")
def scorer(weights) -> IDScorer:
    return get_scorer(weights)


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    data = pytest.importorskip("skimage.data", reason="scikit-image (a test requirement) ships the public-domain astronaut photo: pip install scikit-image")
    return data.astronaut()  # (512, 512, 3) uint8, Eileen Collins, NASA, public domain


OTHER_FACE = dict(skin=(190, 140, 110), hair=(120, 60, 30))  # a second drawn person


def _as_image(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(array)).float() / 255.0  # (H, W, 3) in [0, 1], as ComfyUI's IMAGE rows


def _iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


# --- detection -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [160, 256, 512])
def test_mtcnn_finds_the_drawn_face(scorer, size):
    face = scorer.faces(_as_image(np.asarray(draw_face(size)))[None])[0]
    assert face is not None, f"no face found in the drawn {size}px face"
    drawn_oval = [v * size / 256 for v in (78, 60, 178, 210)]  # where draw_face puts the skin oval
    assert _iou(face.box, drawn_oval) > 0.6, (face.box, drawn_oval)
    assert face.probability > 0.9
    assert face.crop.shape == (3, 160, 160) and face.crop.dtype == torch.uint8


@pytest.mark.parametrize("dx", [-16, 16])
def test_detected_box_follows_the_face(scorer, dx):
    centre = scorer.faces([draw_face()])[0].box
    moved = scorer.faces([draw_face(offset=(dx, 0))])[0].box
    shift = (moved[0] + moved[2]) / 2 - (centre[0] + centre[2]) / 2
    assert abs(shift - dx) < 8, f"box centre moved {shift:.1f}px for a face moved {dx}px"


def test_mtcnn_finds_the_face_in_a_public_domain_photo(scorer, astronaut):
    face = scorer.faces(astronaut[None])[0]
    assert face is not None
    head = (170, 40, 280, 190)  # the astronaut's head in skimage.data.astronaut(), (x1, y1, x2, y2)
    assert _iou(face.box, head) > 0.4, face.box
    assert face.probability > 0.99


def test_detection_and_crop_equal_facenet_pytorch_own_mtcnn_on_a_real_photo(scorer, astronaut):
    """facenet-pytorch's own MTCNN (largest face, no post-processing, default margin 0 and 160 px crops: the paper's
    ID-score setting) on the public-domain photo: the same box and, pixel for pixel, the same crop."""
    from facenet_pytorch import MTCNN
    from PIL import Image

    theirs = MTCNN(image_size=160, margin=0, select_largest=True, post_process=False, device="cpu")
    photo = Image.fromarray(astronaut)
    boxes, probs = theirs.detect(photo)
    crop = theirs(photo)  # (3, 160, 160) float, 0..255 without post-processing
    ours = scorer.faces(astronaut[None])[0]
    np.testing.assert_allclose(np.asarray(ours.box), np.asarray(boxes[0], dtype=np.float64), rtol=0, atol=1e-3)
    assert abs(ours.probability - float(probs[0])) < 1e-5
    assert ours.crop.shape == crop.shape == (3, 160, 160)
    assert int((ours.crop.int() - crop.round().int()).abs().max()) == 0


@pytest.mark.parametrize("kind", ["blank", "noise", "featureless oval", "tiny"])
def test_images_without_a_face_give_none(scorer, kind):
    rng = np.random.default_rng(0)
    image = {
        "blank": np.full((256, 256, 3), 128, np.uint8),
        "noise": rng.integers(0, 256, (256, 256, 3), dtype=np.uint8),
        "featureless oval": np.asarray(draw_face(features=False)),
        "tiny": np.asarray(draw_face(16)),  # smaller than min_face_size: no face, no crash
    }[kind]
    assert scorer.faces([image]) == [None]


def test_batches_mixing_faces_no_faces_and_sizes(scorer):
    images = [np.asarray(draw_face(256)), np.zeros((256, 256, 3), np.uint8), np.asarray(draw_face(200)),
              np.asarray(draw_face(256))]
    found = scorer.faces(images)
    assert [f is not None for f in found] == [True, False, True, True]
    one_by_one = [scorer.faces([im])[0] for im in images]
    for batched, single in zip(found, one_by_one):
        if single is not None:
            np.testing.assert_allclose(batched.box, single.box, atol=1e-3)


# --- scores ----------------------------------------------------------------------------------------------------

def test_identical_images_score_one(scorer):
    faces = torch.stack([_as_image(np.asarray(draw_face())), _as_image(np.asarray(draw_face(**OTHER_FACE)))])
    result = id_score(scorer, faces, faces.clone())
    assert [p.status for p in result.pairs] == ["ok", "ok"]
    for pair in result.pairs:
        assert abs(pair.score - 1.0) < 1e-5, pair
    assert abs(result.mean - 1.0) < 1e-5


def test_different_faces_score_below_one(scorer):
    result = id_score(scorer, _as_image(np.asarray(draw_face()))[None],
                      _as_image(np.asarray(draw_face(**OTHER_FACE)))[None])
    assert result.pairs[0].status == "ok"
    assert result.pairs[0].score < 0.99, "embeddings of two different faces should differ"


def test_public_domain_photo_scores_one_against_itself_and_less_against_a_drawing(scorer, astronaut):
    photo = _as_image(astronaut)
    result = id_score(scorer, photo[None], torch.stack([photo.clone(), _as_image(np.array(draw_face(512)))]))
    assert [p.status for p in result.pairs] == ["ok", "ok"]
    assert abs(result.pairs[0].score - 1.0) < 1e-5
    assert result.pairs[1].score < 0.99


def test_score_is_the_cosine_of_the_embeddings(scorer):
    a, b = np.asarray(draw_face()), np.asarray(draw_face(**OTHER_FACE))
    result = id_score(scorer, [a], [b])
    ea, eb = scorer.embed(scorer.faces([a, b]))
    expected = float(torch.dot(ea, eb) / (ea.norm() * eb.norm()))
    assert result.pairs[0].score == pytest.approx(expected, abs=1e-6)
    assert abs(float(ea.norm()) - 1.0) < 1e-5


def test_pairs_without_faces_are_reported_and_left_out_of_the_mean(scorer):
    face, blank = _as_image(np.asarray(draw_face())), torch.zeros(256, 256, 3)
    other = _as_image(np.asarray(draw_face(**OTHER_FACE)))
    references = torch.stack([face, face, blank, blank])
    generated = torch.stack([other, blank, face, blank])
    result = id_score(scorer, references, generated)
    statuses = [p.status for p in result.pairs]
    assert statuses == ["ok", "no face in generated", "no face in reference", "no face in either image"]
    assert [p.score is None for p in result.pairs] == [False, True, True, True]
    assert result.n_scored == 1
    assert result.mean == pytest.approx(result.pairs[0].score, abs=1e-12)
    report = result.report()
    assert "1 of 4 pairs" in report
    for line, status in zip(report.splitlines()[2:], statuses):
        assert line.endswith(status)


def test_no_scored_pair_gives_nan_mean_and_says_so(scorer):
    result = id_score(scorer, torch.zeros(1, 128, 128, 3), torch.zeros(2, 128, 128, 3))
    assert result.n_scored == 0 and math.isnan(result.mean)
    assert "no mean" in result.report()


def test_one_reference_is_compared_with_every_generated_image(scorer):
    ref = _as_image(np.asarray(draw_face()))
    gens = torch.stack([ref, _as_image(np.asarray(draw_face(**OTHER_FACE))), ref])
    result = id_score(scorer, ref[None], gens)
    assert result.pair_index == ((0, 0), (0, 1), (0, 2))
    assert result.pairs[0].score == pytest.approx(1.0, abs=1e-5)
    assert result.pairs[2].score == pytest.approx(1.0, abs=1e-5)
    assert result.pairs[1].score < 0.999


@pytest.mark.parametrize("n_ref,n_gen,expected", [
    (1, 3, [(0, 0), (0, 1), (0, 2)]), (2, 2, [(0, 0), (1, 1)]), (1, 1, [(0, 0)]),
])
def test_pair_indices(n_ref, n_gen, expected):
    assert pair_indices(n_ref, n_gen) == expected


@pytest.mark.parametrize("n_ref,n_gen", [(2, 3), (3, 1), (0, 2), (2, 0)])
def test_pair_indices_rejects_mismatched_counts(n_ref, n_gen):
    with pytest.raises(ValueError, match="reference"):
        pair_indices(n_ref, n_gen)


def test_callback_reports_progress_and_can_stop(scorer):
    seen = []
    image = torch.zeros(1, 64, 64, 3)
    id_score(scorer, image, image, callback=lambda step, total, info: seen.append((step, total)))
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]

    def stop(step, total, info):
        raise KeyboardInterrupt("stopped")
    with pytest.raises(KeyboardInterrupt):
        id_score(scorer, image, image, callback=stop)


def test_preview_shows_both_crops_and_marks_missing_faces(scorer):
    face = _as_image(np.asarray(draw_face()))
    result = id_score(scorer, face[None], torch.stack([face, torch.zeros(256, 256, 3)]))
    preview = preview_crops(result)
    assert preview.shape == (2, 160, 320, 3)
    assert 0.0 <= float(preview.min()) and float(preview.max()) <= 1.0
    crop = result.reference_faces[0].crop.permute(1, 2, 0).float() / 255.0
    torch.testing.assert_close(preview[0, :, :160], crop)
    torch.testing.assert_close(preview[0, :, 160:], crop)  # identical generated image, identical crop
    missing = preview[1, :, 160:]
    assert float(missing[80, 80, 0]) > 0.8 and float(missing[10, 80, 0]) < 0.3  # red cross on grey


def test_input_conversions_agree():
    image = np.array(draw_face(64))
    as_float = torch.from_numpy(image).float() / 255.0
    for given in (image, image[None], as_float, as_float[None], [draw_face(64)], as_float.numpy()):
        converted = to_uint8_images(given)
        assert len(converted) == 1
        np.testing.assert_array_equal(converted[0], image)
    rgba = np.concatenate([image, np.full(image.shape[:2] + (1,), 7, np.uint8)], axis=2)
    np.testing.assert_array_equal(to_uint8_images(rgba[None])[0], image)
    with pytest.raises(ValueError, match="shape"):
        to_uint8_images(np.zeros((2, 8, 8, 5), np.uint8))


@pytest.mark.parametrize("bad", [dict(crop_size=40), dict(margin=-1), dict(min_face_size=5),
                                 dict(thresholds=(0.6, 0.7)), dict(factor=1.2)])
def test_detector_config_validation(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        DetectorConfig(**bad)


# --- weights ---------------------------------------------------------------------------------------------------

def test_weights_are_the_file_contents(weights, scorer):
    saved = torch.load(weights, weights_only=True)
    loaded = scorer.embedder.model.state_dict()
    assert "logits.weight" in saved and "logits.weight" not in loaded  # classifier head of the file is dropped
    for key in ("conv2d_1a.conv.weight", "last_linear.weight", "last_bn.running_var", "repeat_2.3.conv2d.weight"):
        torch.testing.assert_close(loaded[key], saved[key], rtol=0, atol=0)


def test_scorer_is_reused_until_the_file_changes(weights, tmp_path):
    assert get_scorer(weights) is get_scorer(weights)
    other = save_random_facenet(str(tmp_path / "other.pt"), seed=1)
    assert get_scorer(other) is not get_scorer(weights)


def test_missing_weights_error_says_what_where_and_from_where(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    with pytest.raises(FaceNetWeightsMissing) as info:
        find_facenet_weights(search_dirs=(str(tmp_path / "models" / "facenet"),))
    message = str(info.value)
    for expected in (FACENET_FILENAME, "107 MiB", FACENET_URL, "models/facenet",
                     os.path.join(str(tmp_path / "torch-home"), "checkpoints"), "--weights"):
        assert expected in message, expected
    with pytest.raises(FaceNetWeightsMissing, match="nowhere.pt"):
        get_scorer(str(tmp_path / "nowhere.pt"))


def test_weights_found_in_search_dirs_then_torch_home(weights, tmp_path, monkeypatch):
    torch_home = tmp_path / "torch-home"
    (torch_home / "checkpoints").mkdir(parents=True)
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    cached = torch_home / "checkpoints" / FACENET_FILENAME
    os.symlink(weights, cached)
    models = tmp_path / "models" / "facenet"
    models.mkdir(parents=True)
    assert find_facenet_weights(search_dirs=(str(models),)) == str(cached)
    os.symlink(weights, models / FACENET_FILENAME)
    assert find_facenet_weights(search_dirs=(str(models),)) == str(models / FACENET_FILENAME)
    assert find_facenet_weights(weights) == weights  # an explicit path wins


def test_wrong_state_dict_is_refused_with_the_file_named(tmp_path):
    path = tmp_path / "not-facenet.pt"
    torch.save({"conv.weight": torch.zeros(3, 3)}, path)
    with pytest.raises(W2WFileError, match="not-facenet.pt.*not a FaceNet"):
        FaceEmbedder(str(path))


def test_weights_with_non_finite_values_are_refused(weights, tmp_path):
    state = torch.load(weights, weights_only=True)
    state["last_linear.weight"][0, 0] = float("nan")
    path = tmp_path / "nan.pt"
    torch.save(state, path)
    with pytest.raises(W2WFileError, match="NaN"):
        FaceEmbedder(str(path))


class _NotATensor:  # a pickled class: must never be unpickled
    pass


def test_pickled_objects_are_never_run(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"conv2d_1a.conv.weight": _NotATensor()}, path)
    with pytest.raises(W2WFileError, match="refused"):
        FaceEmbedder(str(path))


def test_nothing_is_downloaded(weights, monkeypatch):
    import urllib.request

    def no_network(*args, **kwargs):
        raise AssertionError("the ID score tried to download something")
    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    IDScorer(weights)  # builds MTCNN and FaceNet from local files only


def test_missing_facenet_pytorch_names_the_install_command(monkeypatch):
    for name in [m for m in sys.modules if m == "facenet_pytorch" or m.startswith("facenet_pytorch.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "facenet_pytorch", None)  # import now raises ImportError
    with pytest.raises(ImportError, match=r"pip install --no-deps facenet-pytorch==2\.6\.0"):
        require_facenet()
    with pytest.raises(ImportError, match="no-deps"):
        FaceDetector()
