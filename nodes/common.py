"""What the w2w nodes share: socket types, the model folders, file look-ups, and weight patches on a MODEL.

Only translation between ComfyUI and the core lives here; the maths is in ``w2w/``. ComfyUI modules
(``folder_paths``, ``comfy.*``) are imported inside functions so that this file can be imported by tools
that merely inspect the pack.
"""
from __future__ import annotations

import os

import torch
from comfy_api.latest import io

from ..w2w.identity import Identity
from ..w2w.safeload import W2WFileError
from ..w2w.space import RELEASE_FILES, Space

CATEGORY = "w2w"
SPACE_FOLDER = "w2w"  # folder_paths name: models/w2w (our .safetensors spaces and folders of released files)
IDENTITY_FOLDER = "w2w_identities"  # models/w2w/identities (identity coefficient files)
IDENTITY_SUBDIR = "identities"
DOWNLOAD_HINT = "`python -m w2w download` fetches the released files and converts them (see models/README.md)"

# One declared type per socket; values are the core's frozen dataclasses (w2w.space.Space, w2w.identity.Identity).
SpaceSocket = io.Custom("W2W_SPACE")
IdentitySocket = io.Custom("W2W_IDENTITY")


# ---- model folders ----------------------------------------------------------------------------------------
def register_model_folders() -> None:
    """Register ``models/w2w`` and ``models/w2w/identities`` (extra_model_paths.yaml entries are kept first)."""
    import folder_paths

    space_dir = os.path.join(folder_paths.models_dir, "w2w")
    for name, path in ((SPACE_FOLDER, space_dir), (IDENTITY_FOLDER, os.path.join(space_dir, IDENTITY_SUBDIR))):
        folder_paths.add_model_folder_path(name, path)
        folder_paths.folder_names_and_paths[name][1].add(".safetensors")


def _roots(folder: str) -> list[str]:
    import folder_paths

    return folder_paths.get_folder_paths(folder)


def _release_dirs(root: str, depth: int = 3) -> list[str]:
    """Sub-folders of ``root`` (up to ``depth`` levels) that hold the released files, as 'a/b/' names."""
    found = []
    for here, dirs, files in os.walk(root, followlinks=True):
        rel = os.path.relpath(here, root)
        level = 0 if rel == "." else rel.count(os.sep) + 1
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and level < depth)
        if rel != "." and all(f in files for f in RELEASE_FILES):
            found.append(rel.replace(os.sep, "/") + "/")
    return found


def list_spaces() -> list[str]:
    """Space choices: our .safetensors files (identities excluded) and folders of released files ('name/')."""
    import folder_paths

    files = [f for f in folder_paths.get_filename_list(SPACE_FOLDER)
             if not f.replace(os.sep, "/").startswith(IDENTITY_SUBDIR + "/")]
    folders = [d for root in _roots(SPACE_FOLDER) if os.path.isdir(root) for d in _release_dirs(root)]
    return sorted(set(files)) + sorted(set(folders))


def resolve_space(name: str) -> str:
    """Full path of the space ``name`` (file or 'folder/'), or W2WFileError naming the file, folders and fix."""
    import folder_paths

    if name.endswith("/"):
        for root in _roots(SPACE_FOLDER):
            path = os.path.join(root, *name.rstrip("/").split("/"))
            if os.path.isdir(path):
                return path
    else:
        path = folder_paths.get_full_path(SPACE_FOLDER, name)
        if path is not None:
            return path
    roots = ", ".join(_roots(SPACE_FOLDER))
    raise W2WFileError(f"w2w space {name!r} not found in the w2w model folder ({roots}). Put a converted .safetensors "
                       f"space or a folder of the released files ({', '.join(RELEASE_FILES)}, proj_1000pc.pt, "
                       f"identity_df.pt, ...) there; {DOWNLOAD_HINT}.")


def list_identities() -> list[str]:
    import folder_paths

    return sorted(folder_paths.get_filename_list(IDENTITY_FOLDER))


def resolve_identity(name: str) -> str:
    import folder_paths

    path = folder_paths.get_full_path(IDENTITY_FOLDER, name)
    if path is None:
        raise W2WFileError(f"identity {name!r} not found in {', '.join(_roots(IDENTITY_FOLDER))}: save one with "
                           "Save w2w Identity or `python -m w2w sample ... --out` into that folder")
    return path


def file_fingerprint(path: str) -> tuple:
    """(path, size, mtime) of a file, or of every file directly inside a folder: changes when the content is replaced."""
    paths = [path] if os.path.isfile(path) else sorted(os.path.join(path, f) for f in os.listdir(path))
    return tuple((p, os.path.getsize(p), os.path.getmtime(p)) for p in paths if os.path.isfile(p))


def save_target(folder_name: str, filename_prefix: str) -> tuple[str, str]:
    """(absolute path, name relative to the folder) for a new numbered file ``prefix_00001_.safetensors``."""
    import folder_paths

    root = os.path.abspath(_roots(folder_name)[0])
    out_dir, filename, counter, subfolder, _ = folder_paths.get_save_image_path(filename_prefix, root)
    os.makedirs(out_dir, exist_ok=True)
    name = f"{filename}_{counter:05}_.safetensors"
    return os.path.join(out_dir, name), os.path.join(subfolder, name).replace(os.sep, "/")


# ---- patches on a MODEL -----------------------------------------------------------------------------------
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


def identity_factors(space: Space, identity: Identity) -> dict[str, tuple]:
    """ComfyUI key -> (B (out, rank), A (rank, in)) float32 factors of ``identity``: ΔW = alpha/rank · B @ A."""
    identity.check_space(space)
    layout = space.layout
    weights = space.weights(identity.coefficients)  # (d,)
    return {slot.comfy_key: (b.contiguous(), a.contiguous()) for slot, (a, b) in zip(layout.modules, layout.factors(weights))}


def lora_patches(space: Space, identity: Identity) -> dict:
    """``add_patches`` values: one LoRA adapter per target weight, the same patch the stock LoraLoader builds."""
    from comfy.weight_adapter import LoRAAdapter

    alpha = float(space.layout.alpha)
    return {key: LoRAAdapter(set(), (up, down, alpha, None, None, None))
            for key, (up, down) in identity_factors(space, identity).items()}


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
