"""Encode Face to w2w: photo(s) -> an identity of the space in one forward pass of a trained face encoder.

The photos are framed exactly as the inversion nodes frame them (:func:`.inversion.frame_photos`: the square of twice
the largest face's box, or the centre crop); the encoder (:mod:`w2w.encoder`, files in ``models/w2w_encoders``) maps
each to the first P coefficients and the identity is their mean. Invert Image to w2w takes it as ``init_identity``
(the ``fast`` preset refines it in a few steps).
"""
from __future__ import annotations

import threading

from comfy_api.latest import io

from ..w2w.encoder import EncoderConfig, check_space, encode_photos, load_encoder, read_encoder_metadata
from ..w2w.safeload import W2WFileError
from .folders import ENCODER_FOLDER, file_fingerprint, list_files, resolve_encoder
from .idscore import AUTO, facenet_fingerprint, resolve_weights, weights_choices
from .inversion import FACE_AUTO, FACE_CHOICES, frame_photos, framing_preview
from .sockets import CATEGORY_INVERSION, IdentitySocket, SpaceSocket, advanced, schema

FACENET_FRAME = 256  # side a FaceNet encoder's photos are framed at (its backbone takes the central face region)
_CACHE: dict[str, tuple[tuple, object]] = {}  # encoder path -> (file and space fingerprints, loaded encoder)
_LOCK = threading.Lock()


def cached_encoder(path: str, facenet: str | None, space):
    """The encoder of ``path`` (with its FaceNet weights) for ``space`` (a retrieval encoder's gallery is the space's
    training models), loaded once per version of the files and space."""
    stamp = file_fingerprint(path) + (file_fingerprint(facenet) if facenet else ()) + (space.fingerprint, space.pcs)
    with _LOCK:
        hit = _CACHE.get(path)
        if hit is not None and hit[0] == stamp:
            return hit[1]
    encoder = load_encoder(path, space, facenet_weights=facenet)
    with _LOCK:
        _CACHE.clear()  # one encoder at a time
        _CACHE[path] = (stamp, encoder)
    return encoder


class W2WEncodeFace(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            node_id="W2WEncodeFace",
            display_name="Encode Face to w2w",
            category=CATEGORY_INVERSION,
            search_aliases=["w2w encoder", "one-shot inversion", "fast inversion", "face to identity"],
            description="Maps a photo of a face (or a batch of photos of one person) to an identity of the w2w space "
                        "in one forward pass of a trained face encoder (python -m w2w train-encoder; files in "
                        "models/w2w_encoders), framing the photos as Invert Image to w2w does. Use the identity "
                        "as it is, or as init_identity of Invert Image to w2w with the fast preset (a few refinement "
                        "steps instead of 400).",
            inputs=[
                io.Image.Input("image", tooltip="One photo, or a batch of photos of the same person (the identity is "
                                                "the mean of the per-photo predictions)."),
                SpaceSocket.Input("space", tooltip="The w2w space the encoder was trained for (Load w2w Space, with "
                                                   "at least as many PCs as the encoder predicts)."),
                io.Combo.Input("encoder", options=list_files(ENCODER_FOLDER),
                               tooltip="A face encoder in models/w2w_encoders, trained for this space with "
                                       "`python -m w2w train-encoder`. A retrieval encoder (--head retrieve) "
                                       "answers with the space's most similar training models, so the space must "
                                       "hold its training coefficients."),
                io.Combo.Input("face", options=list(FACE_CHOICES), default=FACE_AUTO, optional=True,
                               tooltip="auto: frame every photo around its largest face (MTCNN, as the inversion "
                                       "nodes; photos without a face are left out, centre crop without "
                                       "facenet-pytorch). off: centre crop."),
                advanced(io.Combo.Input("facenet_weights", options=weights_choices(), default=AUTO, optional=True,
                                        tooltip="Only for encoders with the FaceNet backbone: the FaceNet weights they "
                                                "were trained with (models/facenet; auto: the released file name).")),
            ],
            outputs=[IdentitySocket.Output(display_name="identity", tooltip="The encoded identity.")],
        )

    @classmethod
    def validate_inputs(cls, encoder: str) -> bool | str:
        try:
            resolve_encoder(encoder)
        except W2WFileError as exc:
            return str(exc)
        return True

    @classmethod
    def fingerprint_inputs(cls, image, space, encoder: str, face: str = FACE_AUTO, facenet_weights: str = AUTO):
        # a facenet-backbone encoder also reads the FaceNet weights file
        return file_fingerprint(resolve_encoder(encoder)), facenet_fingerprint(facenet_weights)

    @classmethod
    def execute(cls, image: io.Image.Type, space: SpaceSocket.Type, encoder: str, face: str = FACE_AUTO,
                facenet_weights: str = AUTO) -> io.NodeOutput:
        path = resolve_encoder(encoder)
        meta = read_encoder_metadata(path)
        config = EncoderConfig.from_json(meta["config"])
        check_space(encoder, meta["space_fingerprint"], config.pcs, space)  # before any heavy loading
        facenet = resolve_weights(facenet_weights) if config.backbone == "facenet" else None
        net = cached_encoder(path, facenet, space)
        size = config.image_size if config.backbone == "conv" else FACENET_FRAME
        framed = frame_photos(image, None, size, face)
        identity = encode_photos(net, framed.pixels.permute(0, 3, 1, 2), space, name="encoded")
        identity = identity.derive(identity.coefficients, f"encoder={encoder} ({framed.note})")
        return io.NodeOutput(identity, ui=framing_preview(framed, cls))


NODES = [W2WEncodeFace]
