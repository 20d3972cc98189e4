"""w2w Identity Hook: an identity as a ComfyUI weight hook (``HOOKS``), for identities per region, per stretch of the
schedule, and several people in one image.

The hook carries the patches Apply w2w LoRA bakes (:func:`.patching.identity_hooks`); ComfyUI's stock hook nodes do
the rest: Cond Set Props / Cond Pair Set Props attach it to a conditioning with a mask and a timestep range, Set CLIP
Hooks to a text encoder, Combine Hooks joins groups, Create Hook Keyframe / Set Hook Keyframes schedule its strength.
"""
from __future__ import annotations

from comfy_api.latest import io

from .patching import identity_hooks
from .sockets import CATEGORY_IDENTITY, IdentitySocket, SpaceSocket, advanced, check_numbers, schema


class W2WIdentityHook(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            node_id="W2WIdentityHook",
            display_name="w2w Identity Hook",
            category=CATEGORY_IDENTITY,
            search_aliases=["w2w hook", "identity per region", "two people", "regional identity", "hook LoRA"],
            description="An identity as HOOKS: the same 64 rank-1 patches as Apply w2w LoRA, applied by the sampler only "
                        "to the conditionings the hooks are attached to (Cond Set Props / Cond Pair Set Props, with a "
                        "mask and a start/end percent), so several people can share one image and an identity can "
                        "cover part of the schedule. Model-only, like Create Hook LoRA (MO). Each differently hooked "
                        "conditioning costs one more UNet pass per step.",
            inputs=[
                SpaceSocket.Input("space", tooltip="The w2w space the identity belongs to."),
                IdentitySocket.Input("identity", tooltip="The identity the hook applies."),
                io.Float.Input("strength", default=1.0, min=-5.0, max=5.0, step=0.05,
                               tooltip="Multiplies the weight deltas, like Create Hook LoRA's strength_model "
                                       "(1.0 = as trained). Keyframes (Set Hook Keyframes) scale it further."),
                io.Hooks.Input("prev_hooks", optional=True,
                               tooltip="Hooks to combine with (e.g. another identity or a LoRA hook), as in Create "
                                       "Hook LoRA."),
                advanced(IdentitySocket.Input(
                    "edited_identity", optional=True,
                    tooltip="Optional second identity used from edit_start on (delayed injection with hook keyframes; "
                            "do not put Set Hook Keyframes on these hooks, it would replace the switch).")),
                advanced(io.Float.Input(
                    "edit_start", default=0.3, min=0.0, max=1.0, step=0.01, optional=True,
                    tooltip="Fraction of the schedule after which edited_identity replaces identity (as in Apply w2w "
                            "LoRA). Ignored without edited_identity.")),
            ],
            outputs=[io.Hooks.Output(display_name="hooks", tooltip="Weight hooks: attach them to conditioning with "
                                                                     "Cond Set Props or Cond Pair Set Props.")],
        )

    @classmethod
    def execute(cls, space: SpaceSocket.Type, identity: IdentitySocket.Type, strength: float,
                prev_hooks: io.Hooks.Type | None = None, edited_identity: IdentitySocket.Type | None = None,
                edit_start: float = 0.3) -> io.NodeOutput:
        check_numbers(cls, strength=strength, edit_start=edit_start)
        identity.check_space(space)
        if edited_identity is not None:
            edited_identity.check_space(space)
        return io.NodeOutput(identity_hooks(space, identity, strength, prev_hooks, edited_identity, edit_start))


NODES = [W2WIdentityHook]
