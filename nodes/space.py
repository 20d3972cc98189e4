"""Nodes over spaces and identities: load a space, sample, edit, blend, save/load identities, save as a LoRA."""
from __future__ import annotations

import logging

from comfy_api.latest import io, ui

from ..w2w.edit import apply_edit, blend
from ..w2w.export import export_lora
from ..w2w.identity import load_identity, save_identity
from ..w2w.safeload import W2WFileError
from ..w2w.sampling import sample_identity
from ..w2w.space import RELEASED_ATTRIBUTES, load_space
from .folders import (IDENTITY_FOLDER, file_fingerprint, list_files, list_spaces, resolve_identity, resolve_space,
                      save_target)
from .sockets import (CATEGORY_IDENTITY, CATEGORY_SPACE, SEED_MAX, IdentitySocket, SpaceSocket, advanced, check_numbers,
                      schema)

log = logging.getLogger(__name__)

SPACE_TIP = "The w2w space (Load w2w Space)."
IDENTITY_TIP = "An identity: coefficients in the space (Sample Identity, Apply Edit Direction, Load w2w Identity, ...)."


class W2WLoadSpace(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            node_id="W2WLoadSpace",
            display_name="Load w2w Space",
            category=CATEGORY_SPACE,
            search_aliases=["weights2weights", "w2w space", "identity space"],
            description="Loads a weights2weights space (PCA basis over identity LoRA weights, paper §3) from models/w2w: "
                        "a converted .safetensors space or a folder of the released files.",
            inputs=[
                io.Combo.Input("space", options=list_spaces(),
                               tooltip="A .safetensors space or a folder of released files (V.pt, mean.pt, std.pt, "
                                       "weight_dimensions.pt, ...) in models/w2w. `python -m w2w download` fetches them."),
                io.Int.Input("pcs", default=1000, min=1, max=100_000,
                             tooltip="Principal components to load. 1000 for sampling and editing (paper default); "
                                     "10,000 for inversion. More PCs take more memory."),
            ],
            outputs=[SpaceSocket.Output(display_name="space", tooltip="The loaded space.")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(cls, space: str) -> bool | str:
        try:
            resolve_space(space)
        except W2WFileError as exc:
            return str(exc)
        return True

    @classmethod
    def fingerprint_inputs(cls, space: str, pcs: int):
        return file_fingerprint(resolve_space(space)), pcs

    @classmethod
    def execute(cls, space: str, pcs: int) -> io.NodeOutput:
        import comfy.model_management as mm
        import comfy.utils

        bar = comfy.utils.ProgressBar(100, node_id=getattr(cls.hidden, "unique_id", None))

        def progress(done: int, total: int) -> None:  # the basis read, seconds for the released files: Cancel works
            mm.throw_exception_if_processing_interrupted()
            bar.update_absolute(round(100 * done / max(1, total)), 100)

        loaded = load_space(resolve_space(space), pcs, progress=progress)
        log.info("w2w: loaded space %s (%d of %d PCs, fingerprint %s)", space, loaded.pcs, loaded.total_pcs, loaded.fingerprint)
        return io.NodeOutput(loaded)


class W2WSampleIdentity(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            node_id="W2WSampleIdentity",
            display_name="Sample Identity",
            category=CATEGORY_IDENTITY,
            search_aliases=["w2w sample", "random person", "new identity"],
            description="Samples a new identity (paper §3.2): each PC coefficient ~ Normal(mean, factor·std) of the "
                        "training identities. The same seed gives the same identity.",
            inputs=[
                SpaceSocket.Input("space", tooltip=SPACE_TIP),
                io.Int.Input("seed", default=0, min=0, max=SEED_MAX, control_after_generate=True,
                             tooltip="Random seed; the same seed, pcs and factor give the same identity."),
                io.Int.Input("pcs", default=1000, min=1, max=100_000,
                             tooltip="Number of PCs to sample (the release has statistics for 1000; paper default 1000)."),
                io.Float.Input("factor", default=1.0, min=0.0, max=5.0, step=0.05,
                               tooltip="Multiplies each PC's standard deviation: <1 stays near the average face, "
                                       ">1 gives more unusual identities (paper default 1.0)."),
            ],
            outputs=[IdentitySocket.Output(display_name="identity", tooltip="The sampled identity.")],
        )

    @classmethod
    def execute(cls, space: SpaceSocket.Type, seed: int, pcs: int, factor: float) -> io.NodeOutput:
        check_numbers(cls, factor=factor)
        return io.NodeOutput(sample_identity(space, seed, pcs, factor))


class W2WApplyEditDirection(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            node_id="W2WApplyEditDirection",
            display_name="Apply Edit Direction",
            category=CATEGORY_IDENTITY,
            search_aliases=["w2w edit", "attribute edit", "age beard gender edit"],
            description="Moves an identity along an attribute direction fitted to the training identities' labels "
                        "(paper §3.3). Chain several to compose edits.",
            inputs=[
                SpaceSocket.Input("space", tooltip=SPACE_TIP),
                IdentitySocket.Input("identity", tooltip="The identity to edit."),
                io.Combo.Input("attribute", options=list(RELEASED_ATTRIBUTES), default="Male",
                               tooltip="The CelebA attribute to move along (the released space labels these 33)."),
                io.Float.Input("strength", default=1.0, min=-10.0, max=10.0, step=0.05,
                               tooltip="How far to move, in training-spread units: 1.0 = one standard deviation of "
                                       "training identities along the direction (negative removes the attribute)."),
                io.String.Input("debias", default="", optional=True,
                                tooltip="Comma-separated attributes to keep unchanged, e.g. 'Male, Young' (their "
                                        "directions are projected out one after another, paper §3.3)."),
                advanced(io.String.Input("attribute_override", default="", optional=True,
                                         tooltip="For spaces with other labels: an attribute name used instead of "
                                                 "'attribute'. Leave empty to use 'attribute'.")),
            ],
            outputs=[IdentitySocket.Output(display_name="identity", tooltip="The edited identity.")],
        )

    @classmethod
    def validate_inputs(cls, attribute: str) -> bool | str:
        # The UI lists the attributes of the space chosen upstream (web/js); execute checks the name against it.
        return bool(attribute.strip()) or "attribute is empty: pick one of the space's attributes"

    @classmethod
    def execute(cls, space: SpaceSocket.Type, identity: IdentitySocket.Type, attribute: str, strength: float,
                debias: str = "", attribute_override: str = "") -> io.NodeOutput:
        check_numbers(cls, strength=strength)
        name = attribute_override.strip() or attribute
        if name not in space.attributes:
            known = ", ".join(space.attributes) or "none"
            raise ValueError(f"attribute {name!r} is not available in this space (it has: {known}); pick one of "
                             "these or load a space with training labels")
        others = [d.strip() for d in debias.split(",") if d.strip()]
        unknown = [d for d in others if d not in space.attributes]
        if unknown:
            raise ValueError(f"debias names {', '.join(map(repr, unknown))}, not attribute(s) of this space (it has: "
                             f"{', '.join(space.attributes) or 'none'}): correct the spelling or remove it from debias")
        return io.NodeOutput(apply_edit(space, identity, name, strength, others))


class W2WBlendIdentities(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            node_id="W2WBlendIdentities",
            display_name="Blend Identities",
            category=CATEGORY_IDENTITY,
            search_aliases=["w2w blend", "mix identities", "interpolate identities"],
            description="Interpolates two identities of the same space: (1 - t)·A + t·B (t outside 0..1 extrapolates).",
            inputs=[
                SpaceSocket.Input("space", tooltip=SPACE_TIP),
                IdentitySocket.Input("identity_a", tooltip="Identity A (t = 0)."),
                IdentitySocket.Input("identity_b", tooltip="Identity B (t = 1)."),
                io.Float.Input("t", default=0.5, min=-1.0, max=2.0, step=0.05,
                               tooltip="Blend factor: 0 gives A, 1 gives B, 0.5 the midpoint."),
            ],
            outputs=[IdentitySocket.Output(display_name="identity", tooltip="The blended identity.")],
        )

    @classmethod
    def execute(cls, space: SpaceSocket.Type, identity_a: IdentitySocket.Type, identity_b: IdentitySocket.Type,
                t: float) -> io.NodeOutput:
        check_numbers(cls, t=t)
        return io.NodeOutput(blend(space, identity_a, identity_b, t))


class W2WSaveIdentity(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            node_id="W2WSaveIdentity",
            display_name="Save w2w Identity",
            category=CATEGORY_IDENTITY,
            search_aliases=["w2w save identity"],
            description="Saves an identity's coefficients (a few kB, .safetensors) into models/w2w/identities, "
                        "tied to its space by fingerprint.",
            inputs=[
                IdentitySocket.Input("identity", tooltip="The identity to save."),
                io.String.Input("filename_prefix", default="w2w_identity",
                                tooltip="File name prefix inside models/w2w/identities (sub-folders allowed); a counter "
                                        "is appended: prefix_00001_.safetensors."),
            ],
            outputs=[],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, identity: IdentitySocket.Type, filename_prefix: str) -> io.NodeOutput:
        path, name = save_target(IDENTITY_FOLDER, filename_prefix)
        save_identity(identity, path)
        return io.NodeOutput(ui=ui.PreviewText(f"saved identity {name}"))


class W2WLoadIdentity(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            node_id="W2WLoadIdentity",
            display_name="Load w2w Identity",
            category=CATEGORY_IDENTITY,
            search_aliases=["w2w load identity"],
            description="Loads identity coefficients saved by Save w2w Identity or `python -m w2w sample/edit`.",
            inputs=[
                io.Combo.Input("identity", options=list_files(IDENTITY_FOLDER),
                               tooltip="An identity file in models/w2w/identities."),
            ],
            outputs=[IdentitySocket.Output(display_name="identity", tooltip="The loaded identity.")],
        )

    @classmethod
    def validate_inputs(cls, identity: str) -> bool | str:
        try:
            resolve_identity(identity)
        except W2WFileError as exc:
            return str(exc)
        return True

    @classmethod
    def fingerprint_inputs(cls, identity: str):
        return file_fingerprint(resolve_identity(identity))

    @classmethod
    def execute(cls, identity: str) -> io.NodeOutput:
        return io.NodeOutput(load_identity(resolve_identity(identity)))


class W2WSaveLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            node_id="W2WSaveLoRA",
            display_name="Save w2w LoRA",
            category=CATEGORY_IDENTITY,
            search_aliases=["w2w export LoRA", "identity to LoRA", "kohya LoRA"],
            description="Writes an identity as a standard kohya LoRA (rank 1, alpha 27) into the loras folder, so the "
                        "stock LoraLoader, A1111/Forge and kohya tools can use it.",
            inputs=[
                SpaceSocket.Input("space", tooltip=SPACE_TIP),
                IdentitySocket.Input("identity", tooltip=IDENTITY_TIP),
                io.String.Input("filename_prefix", default="w2w/identity",
                                tooltip="File name prefix inside models/loras (sub-folders allowed); a counter is "
                                        "appended: prefix_00001_.safetensors."),
                io.Combo.Input("dtype", options=["float32", "float16"], default="float32",
                               tooltip="Storage precision: float32 reproduces Apply w2w LoRA exactly; float16 halves "
                                       "the file (about 200 kB)."),
            ],
            outputs=[],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, space: SpaceSocket.Type, identity: IdentitySocket.Type, filename_prefix: str,
                dtype: str) -> io.NodeOutput:
        import torch

        path, name = save_target("loras", filename_prefix)
        export_lora(space, identity, path, "kohya", getattr(torch, dtype))
        return io.NodeOutput(ui=ui.PreviewText(f"saved LoRA {name} (load it with LoraLoader)"))


NODES = [W2WLoadSpace, W2WSampleIdentity, W2WApplyEditDirection, W2WBlendIdentities, W2WSaveIdentity,
         W2WLoadIdentity, W2WSaveLoRA]
