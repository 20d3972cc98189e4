"""Everything the pack does to a ComfyUI MODEL, in one place; the node files only wire inputs to these functions.

- :func:`patched_clone`: an identity's rank-1 deltas as the stock LoRA patches on a clone (Apply w2w LoRA).
- :func:`delayed_injection`: a switch to a second identity part-way through sampling (paper App. G).
- :func:`identity_hooks`: the same patches as ComfyUI weight hooks (``HOOKS``), which stock nodes attach to a
  conditioning with a mask and a schedule; a delayed injection there is two hooks with keyframes.
- :func:`trainable_clone` and :class:`ComfyDenoiser`: a loaded clone whose 64 target weights read the factors of
  the current optimisation step, and the denoiser the core's inversion loop calls (Invert nodes).

Only public ``ModelPatcher`` surfaces are used (``clone``, ``add_patches``, ``add_weight_wrapper``,
``add_wrapper_with_key``, ``comfy.model_management.load_models_gpu``); whatever touches the shared modules
(weight wrappers, ``requires_grad``) is undone in ``finally``. The maths is the core's (``w2w.export``,
``w2w.invert``).
"""
from __future__ import annotations

import contextlib
import inspect

import torch

from ..w2w.export import identity_factors
from ..w2w.identity import Identity
from ..w2w.invert import FactorBoard, FactorWrapper
from ..w2w.space import Space

DELAYED_INJECTION_KEY = "w2w_delayed_injection"


# ---- checks ----------------------------------------------------------------------------------------------
def model_type_name(model) -> str:
    config = getattr(getattr(model, "model", None), "model_config", None)
    return type(config).__name__ if config is not None else type(getattr(model, "model", model)).__name__


def target_keys(space: Space) -> dict[str, tuple[int, int]]:
    """ComfyUI state-dict key -> (out, in) of every module of the space's layout."""
    keys = {}
    for slot in space.layout.modules:
        if slot.comfy_key is None:
            raise ValueError(f"space module {slot.name!r} has no SD-style UNet name; this space cannot patch a "
                             "ComfyUI MODEL")
        keys[slot.comfy_key] = (slot.out_features, slot.in_features)
    return keys


def _parameter_shape(module, key: str) -> tuple[int, ...] | None:
    """Shape of the parameter at a dotted state-dict key, or None if the module has no such parameter."""
    for part in key.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return tuple(module.shape) if isinstance(module, torch.Tensor) else None


def check_targets(model, space: Space) -> dict[str, tuple[int, int]]:
    """The space's target keys, after checking that ``model`` has each of them with the right shape."""
    keys = target_keys(space)
    shapes = {key: _parameter_shape(model.model, key) for key in keys}
    missing = [k for k in keys if shapes[k] is None]
    wrong = [k for k in keys if shapes[k] is not None and shapes[k] != keys[k]]
    if missing or wrong:
        example = missing[0] if missing else f"{wrong[0]} has shape {shapes[wrong[0]]}, not {keys[wrong[0]]}"
        raise ValueError(f"w2w spaces are for {space.base_model} UNets; this MODEL is {model_type_name(model)}: "
                         f"{len(missing)} of the {len(keys)} target weights are missing and {len(wrong)} have another "
                         f"shape (e.g. {example}). Load an SD1.5 checkpoint (e.g. Realistic Vision v5.1).")
    return keys


# ---- Apply: baked LoRA patches ------------------------------------------------------------------------------
def comfy_factors(space: Space, identity: Identity) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """ComfyUI key -> (B (out, rank), A (rank, in)) of ``identity``: ΔW = alpha/rank · B @ A."""
    return {slot.comfy_key: (b, a) for slot, a, b in identity_factors(space, identity)}


def lora_patches(space: Space, identity: Identity) -> dict:
    """``add_patches`` values: one LoRA adapter per target weight, the same patch the stock LoraLoader builds."""
    from comfy.weight_adapter import LoRAAdapter

    alpha = float(space.layout.alpha)
    return {key: LoRAAdapter(set(), (up, down, alpha, None, None, None))
            for key, (up, down) in comfy_factors(space, identity).items()}


def patched_clone(model, space: Space, identity: Identity, strength: float):
    """A clone of ``model`` with the identity's weight deltas as patches; ``model`` itself is never touched."""
    keys = check_targets(model, space)
    patches = lora_patches(space, identity)
    clone = model.clone()
    accepted = clone.add_patches(patches, float(strength))
    if set(accepted) != set(keys):
        missing = sorted(set(keys) - set(accepted))
        raise ValueError(f"ComfyUI accepted {len(accepted)} of {len(keys)} w2w patches on this "
                         f"{model_type_name(model)} MODEL (e.g. not {missing[:1]}); w2w spaces are for SD1.5 UNets")
    return clone


# ---- Apply: delayed injection --------------------------------------------------------------------------------
# ComfyUI 0.3.64 offers three ways to change weights during sampling: hook keyframes (attached to CONDITIONING, not
# to a MODEL), an in-place weight swap from a sampler callback (would leave the shared weights modified if sampling
# stops), and per-weight wrappers. We use wrappers on the 64 target weights, where ``fn`` adds
# ``alpha/rank · (B₂A₂ − B₁A₁)`` once switched, and an APPLY_MODEL wrapper that sees each step's sigma and flips the
# switch when sigma ≤ ``percent_to_sigma(edit_start)``. Both live on the clone only. The wrapped weights are
# recomputed at every UNet call (a rank-2 update of 64 matrices), so only graphs that use ``edit_start`` pay for it.
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
    before, after = comfy_factors(space, first), comfy_factors(space, second)
    for key, (b1, a1) in before.items():
        b2, a2 = after[key]
        up = torch.cat([scale * b2, -scale * b1], dim=1)
        down = torch.cat([a2, a1], dim=0)
        model.add_weight_wrapper(key, DelayedDelta(switch, up, down))
    model.add_wrapper_with_key("apply_model", DELAYED_INJECTION_KEY, switch)
    return model


# ---- Hooks: the same patches, per conditioning ------------------------------------------------------------
# A ComfyUI weight hook carries patches that the sampler applies only while it evaluates the conditionings the hook is
# attached to (Cond Set Props / Cond Pair Set Props / Set CLIP Hooks), optionally under a mask and a timestep range,
# with its strength scheduled by keyframes. Different hook groups on the conds of one step cost one UNet pass each.
def identity_weight_hook(space: Space, identity: Identity, strength: float):
    """A model-only ``comfy.hooks.WeightHook`` whose patches are exactly those :func:`patched_clone` bakes."""
    import comfy.hooks

    hook = comfy.hooks.WeightHook(strength_model=float(strength), strength_clip=0.0)
    hook.weights = lora_patches(space, identity)  # ComfyUI keys -> LoRA adapters, as add_patches takes them
    hook.weights_clip = {}  # model-only: nothing to patch on a text encoder
    hook.need_weight_init = False  # already keyed for the UNet (no LoRA key mapping to do)
    previous = hook.custom_should_register  # the host's extension point, kept by the hook's clones

    def should_register(self, model, model_options, target_dict, registered):
        # add_hook_patches drops keys the MODEL lacks without a word: an SDXL or other UNet would sample unchanged
        if target_dict.get("target") != getattr(getattr(comfy.hooks, "EnumWeightTarget", None), "Clip", "clip"):
            check_targets(model, space)
        return previous(self, model, model_options, target_dict, registered)

    hook.custom_should_register = should_register
    return hook


def _keyframes(*points: tuple[float, float]):
    """A HookKeyframeGroup with (strength, start_percent) keyframes."""
    import comfy.hooks

    group = comfy.hooks.HookKeyframeGroup()
    for strength, start in points:
        group.add(comfy.hooks.HookKeyframe(strength=strength, start_percent=start))
    return group


def identity_hooks(space: Space, identity: Identity, strength: float, prev_hooks=None, edited: Identity | None = None,
                   edit_start: float = 0.3):
    """``HOOKS`` applying ``identity``; with ``edited``, ``identity`` until ``edit_start`` of the schedule and ``edited``
    after it (delayed injection with keyframes: the switch happens at the same sigma as :class:`InjectionSwitch`'s).
    Combined after ``prev_hooks`` like Create Hook LoRA. Nothing is patched until a sampler uses the hooks."""
    import comfy.hooks

    if edited is not None and edit_start <= 0.0:  # switched from the first step on: only the edited identity
        identity, edited = edited, None
    group = comfy.hooks.HookGroup()
    first = identity_weight_hook(space, identity, strength)
    group.add(first)
    if edited is not None:
        second = identity_weight_hook(space, edited, strength)
        first.hook_keyframe = _keyframes((1.0, 0.0), (0.0, edit_start))
        second.hook_keyframe = _keyframes((0.0, 0.0), (1.0, edit_start))
        group.add(second)
    return group if prev_hooks is None else prev_hooks.clone_and_combine(group)


# ---- Invert: a trainable clone ----------------------------------------------------------------------------
# The executor runs every node under ``torch.inference_mode()``, where checkpoint weights are inference tensors that
# autograd may not save. Every weight and bias therefore gets a weight wrapper (the ``comfy_extras/nodes_train.py``
# pattern): ComfyUI then hands each layer a fresh copy of its weight, and the 64 target weights get
# ``W + 27 · B @ A`` from the current step's factors.
class _Copy:
    """Weight wrapper that changes nothing: its presence makes ComfyUI pass the layer a copy of its weight."""

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        return weight


_COPY = _Copy()


def _ours(f) -> bool:
    return f is _COPY or isinstance(f, FactorWrapper)


def static_clone(model):
    """A clone of ``model`` whose weights all stay resident and get their wrappers.

    On hosts with dynamic VRAM (late-2026 ComfyUI on NVIDIA GPUs) ``clone()`` gives a ``ModelPatcherDynamic``: weights
    are streamed, small layers skip ``setup_param`` and so never get weight wrappers, and ``force_full_load`` is
    ignored. An inversion needs every weight wrapped, so it takes the plain patcher those hosts keep for this: the
    cached non-dynamic delegate (``get_non_dynamic_delegate``), else ``clone(disable_dynamic=True)``. ComfyUI 0.3.64
    has neither and only the plain patcher.
    """
    try:
        if getattr(model, "is_dynamic", lambda: False)():
            delegate = getattr(model, "get_non_dynamic_delegate", None)
            if delegate is not None:
                return delegate()
        if "disable_dynamic" in inspect.signature(model.clone).parameters:
            return model.clone(disable_dynamic=True)
    except RuntimeError as exc:
        # a dynamic patcher rebuilds its plain twin from how its loader made it (cached_patcher_init), which core
        # ComfyUI's loaders record and some custom loaders do not
        if "cached_patcher_init" not in str(exc) and "non-dynamic" not in str(exc):
            raise
        raise ValueError(
            "this MODEL cannot be inverted on a host with dynamic VRAM: ComfyUI could not make the plain (non-dynamic) "
            f"copy of it that an inversion needs, because its loader did not record how to rebuild it ({exc}). Load "
            "the checkpoint with Load Checkpoint or Load Diffusion Model, or start ComfyUI with "
            "--disable-dynamic-vram") from exc
    return model.clone()


def _blocks(module: torch.nn.Module):
    """The outermost modules below ``module`` that are not mere containers (the UNet's resnet and transformer blocks)."""
    for child in module.children():
        if isinstance(child, (torch.nn.ModuleList, torch.nn.Sequential, torch.nn.ModuleDict)):
            yield from _blocks(child)
        else:
            yield child


@contextlib.contextmanager
def checkpointed_blocks(diffusion_model: torch.nn.Module):
    """Gradient checkpointing over the UNet's blocks while the context is open (Chen et al. 2016): a block keeps
    only its input for backward and runs its forward again then. With weight wrappers every layer sees a float32
    copy of its weight, and autograd would keep all of them — a second UNet in memory — until backward; here only
    one block's copies are alive at a time, for one more forward pass per step. The shared modules get their own
    forward back on exit."""
    import torch.utils.checkpoint

    blocks = list(_blocks(diffusion_model))
    before = [block.__dict__.get("forward") for block in blocks]
    for block in blocks:
        def run(*args, _forward=block.forward, **kwargs):
            return torch.utils.checkpoint.checkpoint(_forward, *args, use_reentrant=False, **kwargs)
        block.forward = run
    try:
        yield len(blocks)
    finally:
        for block, previous in zip(blocks, before):
            if previous is None:
                block.__dict__.pop("forward", None)
            else:
                block.forward = previous


@contextlib.contextmanager
def trainable_clone(model, space: Space, keys: dict[str, tuple[int, int]] | None = None, checkpointing: bool = False):
    """A loaded clone of ``model`` whose target weights read the factors on the yielded board; undone on exit.

    Yields (patcher, board). ``keys`` are the checked target keys (:func:`check_targets`; checked here when None).
    Every other weight and bias gets a no-op wrapper so that no inference tensor is saved for backward;
    ``checkpointing`` recomputes each block in backward instead of keeping its weight copies. On exit,
    whatever happened: the factors are dropped, our wrappers leave the shared modules, the clone is unloaded
    (weights restored from ComfyUI's backup) and ``requires_grad`` is restored.
    """
    import comfy.model_management as mm

    keys = check_targets(model, space) if keys is None else keys
    board = FactorBoard(space.layout)
    index = {slot.comfy_key: i for i, slot in enumerate(space.layout.modules)}
    patcher = static_clone(model)
    modules = list(patcher.model.named_modules())
    for name, module in modules:
        if not hasattr(module, "weight_function"):
            continue
        if getattr(module, "weight", None) is not None:
            key = f"{name}.weight"
            patcher.add_weight_wrapper(key, board.wrappers[index[key]] if key in keys else _COPY)
        if getattr(module, "bias", None) is not None:
            patcher.add_weight_wrapper(f"{name}.bias", _COPY)
    grad_flags = [(p, p.requires_grad) for p in patcher.model.parameters()]
    try:
        patcher.model.requires_grad_(False)
        mm.load_models_gpu([patcher], force_full_load=True)
        with checkpointed_blocks(patcher.model.diffusion_model) if checkpointing else contextlib.nullcontext():
            yield patcher, board
    finally:
        board.factors = None
        for _, module in modules:
            for attr in ("weight_function", "bias_function"):
                functions = module.__dict__.get(attr)
                if functions is not None and any(_ours(f) for f in functions):
                    setattr(module, attr, [f for f in functions if not _ours(f)])
        for i in reversed(range(len(mm.current_loaded_models))):
            if mm.current_loaded_models[i].model is patcher:
                mm.current_loaded_models.pop(i).model_unload(unpatch_weights=True)
        for p, flag in grad_flags:
            if p.requires_grad != flag:
                with torch.inference_mode(p.is_inference()):  # inference tensors only take the flag back inside it
                    p.requires_grad_(flag)


class ComfyDenoiser:
    """The core's denoiser on a ComfyUI MODEL: DDPM x_t, t -> ε̂ through ``apply_model`` (k-diffusion form)."""

    def __init__(self, patcher, board: FactorBoard, sigmas: torch.Tensor):
        self.patcher = patcher
        self.board = board
        self.sigmas = sigmas  # (1000,) the model's own σ_t
        self.last_x0 = None

    def __call__(self, x_t, t, cond, factors):
        return self.predict(x_t, t, cond, factors)[0]

    def predict(self, x_t, t, cond, factors):
        """(ε̂, x̂0): the noise and the clean latents (ComfyUI's ``denoised``) the patched model predicts."""
        import comfy.model_management

        comfy.model_management.throw_exception_if_processing_interrupted()  # Cancel: no UNet pass after it
        self.board.factors = factors
        sigma = self.sigmas[t].to(x_t.device)
        s = sigma.view(-1, 1, 1, 1)
        x = x_t * (1.0 + s ** 2).sqrt()  # = x0 + σ·ε, what ComfyUI's samplers feed the model
        context = cond.expand(x.shape[0], *cond.shape[1:])
        denoised = self.patcher.model.apply_model(x, sigma, c_crossattn=context)
        self.last_x0 = denoised.detach()  # the current identity's reconstruction, for the progress preview
        return (x - denoised) / s, denoised
