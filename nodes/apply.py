"""Apply w2w LoRA: an identity's rank-1 deltas as weight patches on a clone of the MODEL (paper §3, App. G).

The patches are the same LoRA adapters the stock LoraLoader builds, baked into the weights when the model loads:
no per-step cost, other LoRAs and ControlNets downstream keep working. Delayed injection switches to a second
identity part-way through sampling. Both are in :mod:`.patching`; this node only wires them.
"""
from __future__ import annotations

from comfy_api.latest import io

from .patching import delayed_injection, patched_clone
from .sockets import CATEGORY_IDENTITY, IdentitySocket, SpaceSocket, check_numbers, schema


class W2WApplyLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            node_id="W2WApplyLoRA",
            display_name="Apply w2w LoRA",
            category=CATEGORY_IDENTITY,
            search_aliases=["w2w apply", "identity LoRA", "weights2weights apply", "delayed injection"],
            description="Patches an SD1.5 MODEL with an identity's rank-1 LoRA deltas (to_q/to_v of every attention, "
                        "64 weights) on a copy; the input MODEL is unchanged. Optionally switches to a second "
                        "identity part-way through sampling (delayed injection, paper App. G).",
            inputs=[
                io.Model.Input("model", tooltip="An SD1.5 MODEL (the released space was trained on Realistic Vision v5.1)."),
                SpaceSocket.Input("space", tooltip="The w2w space the identity belongs to."),
                IdentitySocket.Input("identity", tooltip="The identity to apply (from the start of sampling)."),
                io.Float.Input("strength", default=1.0, min=-5.0, max=5.0, step=0.05,
                               tooltip="Multiplies the weight deltas, like LoraLoader's strength_model (1.0 = as trained)."),
                IdentitySocket.Input("edited_identity", optional=True,
                                     tooltip="Optional second identity (usually an edit of the first) used from "
                                             "edit_start on: delayed injection keeps the first one's layout and pose."),
                io.Float.Input("edit_start", default=0.3, min=0.0, max=1.0, step=0.01, optional=True,
                               tooltip="Fraction of the schedule after which edited_identity replaces identity "
                                       "(0 = from the start). Paper timestep T = 1000·(1 − edit_start): 0.0–0.3 for "
                                       "global edits (T 1000–700), 0.3–0.6 for fine ones. Ignored without edited_identity."),
            ],
            outputs=[io.Model.Output(display_name="model", tooltip="A patched copy of the MODEL.")],
        )

    @classmethod
    def execute(cls, model: io.Model.Type, space: SpaceSocket.Type, identity: IdentitySocket.Type, strength: float,
                edited_identity: IdentitySocket.Type | None = None, edit_start: float = 0.3) -> io.NodeOutput:
        check_numbers(cls, strength=strength, edit_start=edit_start)
        patched = patched_clone(model, space, identity, strength)
        if edited_identity is not None:
            delayed_injection(patched, space, identity, edited_identity, strength, edit_start)
        return io.NodeOutput(patched)


NODES = [W2WApplyLoRA]
