"""Apply w2w LoRA: an identity's rank-1 deltas as weight patches on a clone of the MODEL (paper §3, App. G).

The patches are the same LoRA adapters the stock LoraLoader builds (``ModelPatcher.add_patches``), baked into
the weights when the model loads: no per-step cost, other LoRAs and ControlNets downstream keep working.

Delayed injection (paper App. G: original weights while t > T, edited weights after) switches to a second
identity part-way through sampling. ComfyUI 0.3.64 offers three ways to change weights during sampling:
hook keyframes (attached to CONDITIONING, not to a MODEL), an in-place weight swap from a sampler callback
(would leave the shared weights modified if sampling stops), and per-weight wrappers. We use the public
``ModelPatcher`` surface: ``add_weight_wrapper(key, fn)`` on the 64 target weights, where ``fn`` adds
``alpha/rank · (B₂A₂ − B₁A₁)`` once switched, and ``add_wrapper_with_key(WrappersMP.APPLY_MODEL, ...)``,
which sees each step's sigma and flips the switch when sigma ≤ ``percent_to_sigma(edit_start)``. Both live on
the clone only. The wrapped weights are recomputed at every UNet call (a rank-2 update of 64 matrices), so
only graphs that use ``edit_start`` pay for it.
"""
from __future__ import annotations

import torch
from comfy_api.latest import io

from ..w2w.identity import Identity
from ..w2w.space import Space
from .common import CATEGORY, IdentitySocket, SpaceSocket, identity_factors, patched_clone

WRAPPER_KEY = "w2w_delayed_injection"


class InjectionSwitch:
    """Shared state of one delayed injection: on once the sampler's sigma reaches the switch point."""

    def __init__(self, edit_start: float):
        self.edit_start = float(edit_start)
        self.active = False

    def __call__(self, executor, x, t, *args, **kwargs):
        """APPLY_MODEL wrapper: ``t`` is the batch's sigma."""
        threshold = executor.class_obj.model_sampling.percent_to_sigma(self.edit_start)
        self.active = bool(t.max().item() <= threshold)
        try:
            return executor(x, t, *args, **kwargs)
        finally:
            self.active = False  # outside sampling the first identity is in force


class DelayedDelta:
    """Weight wrapper: ``w + scale · (B₂A₂ − B₁A₁)`` while the switch is on, ``w`` otherwise."""

    def __init__(self, switch: InjectionSwitch, up: torch.Tensor, down: torch.Tensor):
        self.switch = switch
        self.up = up  # (out, 2r): [scale·B₂, −scale·B₁]
        self.down = down  # (2r, in): [A₂; A₁]

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.switch.active:
            return weight
        delta = self.up.to(weight.device, torch.float32) @ self.down.to(weight.device, torch.float32)
        return (weight.float() + delta).to(weight.dtype)

    def move_to(self, device=None) -> int:
        if device is not None:
            self.up, self.down = self.up.to(device), self.down.to(device)
        return self.up.nbytes + self.down.nbytes


def delayed_injection(model, space: Space, first: Identity, second: Identity, strength: float, edit_start: float):
    """Add the switch from ``first`` to ``second`` at ``edit_start`` to an already patched clone ``model``."""
    switch = InjectionSwitch(edit_start)
    scale = float(strength) * space.layout.scale
    before, after = identity_factors(space, first), identity_factors(space, second)
    for key, (b1, a1) in before.items():
        b2, a2 = after[key]
        up = torch.cat([scale * b2, -scale * b1], dim=1)
        down = torch.cat([a2, a1], dim=0)
        model.add_weight_wrapper(key, DelayedDelta(switch, up, down))
    model.add_wrapper_with_key("apply_model", WRAPPER_KEY, switch)
    return model


class W2WApplyLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="W2WApplyLoRA",
            display_name="Apply w2w LoRA",
            category=CATEGORY,
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
    def execute(cls, model, space, identity, strength: float, edited_identity=None, edit_start: float = 0.3) -> io.NodeOutput:
        patched = patched_clone(model, space, identity, strength)
        if edited_identity is not None:
            delayed_injection(patched, space, identity, edited_identity, strength, edit_start)
        return io.NodeOutput(patched)


NODES = [W2WApplyLoRA]
