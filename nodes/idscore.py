"""Node: the paper's ID score (MTCNN face crops, FaceNet VGGFace2 embeddings, cosine similarity)."""
from __future__ import annotations

import math

from comfy_api.latest import io, ui

from ..w2w.metrics.faces import FACENET_FILENAME, FACENET_SIZE_TEXT, FACENET_URL, find_facenet_weights, require_facenet
from ..w2w.metrics.idscore import drop_scorers, get_scorer, id_score, preview_crops
from .folders import FACENET_FOLDER, file_fingerprint, find_file, list_files, roots
from .sockets import CATEGORY_METRICS, advanced, schema

AUTO = "auto"
_PATCHERS: dict[int, object] = {}  # id(scorer) -> the ModelPatcher ComfyUI's model management knows it by


def managed_scorer(weights_path: str):
    """The scorer, loaded through ComfyUI's model management like any model: it goes to the GPU only when there is
    room, and Unload Models (or ComfyUI freeing memory for another model) moves it off again."""
    import comfy.model_management as mm
    import comfy.model_patcher

    scorer = get_scorer(weights_path, "cpu")  # built on the CPU; the model management moves it
    patcher = _PATCHERS.get(id(scorer))
    if patcher is None:
        _PATCHERS.clear()  # get_scorer keeps one scorer at a time: so do we
        patcher = comfy.model_patcher.ModelPatcher(scorer.modules(), load_device=mm.get_torch_device(),
                                                   offload_device=mm.unet_offload_device())
        _PATCHERS[id(scorer)] = patcher
    mm.load_models_gpu([patcher])
    return scorer, patcher


def release_scorer(patcher) -> None:
    """Unload the scorer's networks now and forget them (the node's unload_after)."""
    import comfy.model_management as mm

    for i in reversed(range(len(mm.current_loaded_models))):
        if mm.current_loaded_models[i].model is patcher:
            mm.current_loaded_models.pop(i).model_unload()
    _PATCHERS.clear()
    drop_scorers()
    mm.soft_empty_cache()


def weights_choices() -> list[str]:
    return [AUTO] + list_files(FACENET_FOLDER)


def resolve_weights(choice: str) -> str:
    """Path of the chosen file; ``auto`` looks for the released file name in models/facenet, then TORCH_HOME."""
    if choice != AUTO:
        path = find_file(FACENET_FOLDER, choice)
        return find_facenet_weights(path if path is not None else choice)
    return find_facenet_weights(search_dirs=tuple(roots(FACENET_FOLDER)))


def facenet_fingerprint(choice: str):
    """What tells ComfyUI's cache that the FaceNet weights a node reads have changed: the chosen file's fingerprint
    (a missing file: the choice itself; validation reports it; a linked choice, unknown until run: NaN, which is
    never equal to itself, so the node always runs)."""
    if choice is None:
        return float("nan")
    try:
        return file_fingerprint(resolve_weights(choice))
    except OSError:  # FileNotFoundError among them
        return choice


class W2WIDScore(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            node_id="W2WIDScore",
            display_name="w2w ID Score",
            category=CATEGORY_METRICS,
            search_aliases=["face similarity", "FaceNet", "identity score", "ID similarity"],
            description="Identity preservation as in the paper (Table 3): the largest face in each image is found with "
                        "MTCNN, embedded with FaceNet (InceptionResnetV1 trained on VGGFace2), and the cosine "
                        "similarity of reference and generated embeddings is reported per pair, 1.0 = same embedding. "
                        "Pairs where either image has no detectable face are listed and left out of the mean. Needs "
                        f"facenet-pytorch (pip install --no-deps -r requirements-idscore.txt) and {FACENET_FILENAME} "
                        f"({FACENET_SIZE_TEXT}, from {FACENET_URL}) in models/facenet.",
            inputs=[
                io.Image.Input("reference", tooltip="Reference image(s), e.g. the photo you inverted. One image is "
                                                    "compared with every generated image; otherwise the batches are "
                                                    "compared pairwise and must have the same size."),
                io.Image.Input("generated", tooltip="Generated image(s) to score against the reference(s)."),
                io.Combo.Input("facenet_weights", options=weights_choices(), default=AUTO, optional=True,
                               tooltip=f"FaceNet weights file in models/facenet. 'auto' uses {FACENET_FILENAME} from "
                                       "models/facenet, else TORCH_HOME's checkpoints folder (where facenet-pytorch "
                                       "caches it). Never downloaded: get it from the facenet-pytorch v2.2.9 release."),
                advanced(io.Boolean.Input("unload_after", default=False, optional=True,
                                          tooltip="Free the MTCNN and FaceNet networks as soon as the score is "
                                                  "computed. Otherwise they stay loaded for the next run until "
                                                  "ComfyUI needs the memory or Unload Models is pressed.")),
            ],
            outputs=[
                io.Float.Output(display_name="mean_score",
                                tooltip="Mean cosine similarity over the pairs with a face on both sides "
                                        "(NaN when no pair has); the paper reports 0.64 for w2w inversion."),
                io.String.Output(display_name="report", tooltip="One line per pair: score, names, and 'ok' or which "
                                                                "image had no detectable face."),
                io.Image.Output(display_name="crops", tooltip="Reference crop | generated crop for each pair, as "
                                                              "FaceNet sees them; a crossed grey tile where no face "
                                                              "was found."),
            ],
        )

    @classmethod
    def validate_inputs(cls, facenet_weights: str = AUTO) -> bool | str:
        try:
            require_facenet()
            resolve_weights(facenet_weights)
        except (ImportError, FileNotFoundError) as exc:
            return str(exc)
        return True

    @classmethod
    def fingerprint_inputs(cls, reference, generated, facenet_weights: str = AUTO, unload_after: bool = False):
        return facenet_fingerprint(facenet_weights)

    @classmethod
    def execute(cls, reference, generated, facenet_weights: str = AUTO, unload_after: bool = False) -> io.NodeOutput:
        import comfy.model_management
        import comfy.utils

        scorer, patcher = managed_scorer(resolve_weights(facenet_weights))
        progress = comfy.utils.ProgressBar(4)

        def callback(step: int, total: int, info: str) -> None:
            comfy.model_management.throw_exception_if_processing_interrupted()
            progress.update_absolute(step, total)

        try:
            result = id_score(scorer, reference, generated, callback=callback)
        finally:
            if unload_after:
                release_scorer(patcher)
        crops = preview_crops(result)
        report = result.report()
        mean = result.mean
        summary = f"ID score {mean:.4f}" if not math.isnan(mean) else "ID score: no pair with faces on both sides"
        return io.NodeOutput(mean, report, crops, ui=ui.PreviewText(f"{summary}\n{report}"))


NODES = [W2WIDScore]
