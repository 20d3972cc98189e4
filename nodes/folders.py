"""The pack's model folders: registered once when ComfyUI loads the pack, then listed and resolved by name.

| folder_paths name | default folder | holds |
|---|---|---|
| ``w2w`` | ``models/w2w`` | our ``.safetensors`` spaces and sub-folders of the released files |
| ``w2w_identities`` | ``models/w2w/identities`` | identity coefficient files |
| ``w2w_vae`` | ``models/w2w_vae`` | VAE-w2w files |
| ``w2w_encoders`` | ``models/w2w_encoders`` | face encoders (``python -m w2w train-encoder``) |
| ``facenet`` | ``models/facenet`` | FaceNet weights for the ID score |

Entries of ``extra_model_paths.yaml`` are kept (ours are added after them). ComfyUI modules are imported inside the
functions, so the file can be imported by tools that only inspect the pack.
"""
from __future__ import annotations

import os
import stat

from ..w2w.safeload import W2WFileError
from ..w2w.space import RELEASE_FILES

SPACE_FOLDER = "w2w"
IDENTITY_FOLDER = "w2w_identities"
IDENTITY_SUBDIR = "identities"
VAE_FOLDER = "w2w_vae"
ENCODER_FOLDER = "w2w_encoders"
FACENET_FOLDER = "facenet"
DOWNLOAD_HINT = "`python -m w2w download` fetches the released files and converts them (see models/README.md)"

# folder_paths name -> (path below models/, file extensions)
FOLDERS = {
    SPACE_FOLDER: (("w2w",), {".safetensors"}),
    IDENTITY_FOLDER: (("w2w", IDENTITY_SUBDIR), {".safetensors"}),
    VAE_FOLDER: ((VAE_FOLDER,), {".safetensors"}),
    ENCODER_FOLDER: ((ENCODER_FOLDER,), {".safetensors"}),
    FACENET_FOLDER: ((FACENET_FOLDER,), {".pt", ".pth"}),
}


def register_model_folders() -> None:
    """Add the pack's folders to ``folder_paths`` (idempotent)."""
    import folder_paths

    for name, (parts, extensions) in FOLDERS.items():
        folder_paths.add_model_folder_path(name, os.path.join(folder_paths.models_dir, *parts))
        folder_paths.folder_names_and_paths[name][1].update(extensions)


def roots(folder: str) -> list[str]:
    import folder_paths

    return folder_paths.get_folder_paths(folder)


def _hidden(name: str) -> bool:
    """A name with a part starting with '.': a hidden file or folder, such as a file still being written."""
    return any(part.startswith(".") for part in name.replace(os.sep, "/").split("/"))


def list_files(folder: str) -> list[str]:
    import folder_paths

    return sorted(f for f in folder_paths.get_filename_list(folder) if not _hidden(f))


def find_file(folder: str, name: str) -> str | None:
    import folder_paths

    return folder_paths.get_full_path(folder, name)


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
    files = [f for f in list_files(SPACE_FOLDER) if not f.replace(os.sep, "/").startswith(IDENTITY_SUBDIR + "/")]
    folders = [d for root in roots(SPACE_FOLDER) if os.path.isdir(root) for d in _release_dirs(root)]
    return sorted(set(files)) + sorted(set(folders))


def resolve_space(name: str) -> str:
    """Full path of the space ``name`` (file or 'folder/'), or W2WFileError naming the file, folders and fix."""
    if name.endswith("/"):
        parts = name.rstrip("/").split("/")
        if name.startswith(("/", "\\")) or os.path.isabs(name) or any(p in ("", ".", "..") for p in parts):
            raise W2WFileError(f"w2w space {name!r} is not the name of a folder inside the w2w model folder (no "
                               "absolute paths, '.' or '..'): choose one of the spaces the Load w2w Space node lists")
        for root in roots(SPACE_FOLDER):
            path = os.path.join(root, *parts)
            if os.path.isdir(path):
                return path
    else:
        path = find_file(SPACE_FOLDER, name)
        if path is not None:
            return path
    raise W2WFileError(f"w2w space {name!r} not found in the w2w model folder ({', '.join(roots(SPACE_FOLDER))}). Put a "
                       f"converted .safetensors space or a folder of the released files ({', '.join(RELEASE_FILES)}, "
                       f"proj_1000pc.pt, identity_df.pt, ...) there; {DOWNLOAD_HINT}.")


def resolve_identity(name: str) -> str:
    path = find_file(IDENTITY_FOLDER, name)
    if path is None:
        raise W2WFileError(f"identity {name!r} not found in {', '.join(roots(IDENTITY_FOLDER))}: save one with "
                           "Save w2w Identity or `python -m w2w sample ... --out` into that folder")
    return path


def resolve_vae(name: str) -> str:
    path = find_file(VAE_FOLDER, name)
    if path is None:
        raise W2WFileError(f"VAE-w2w file {name!r} not found in {', '.join(roots(VAE_FOLDER))}: train one with "
                           "`python -m w2w vae-train SPACE --out models/w2w_vae/NAME.safetensors`")
    return path


def resolve_encoder(name: str) -> str:
    path = find_file(ENCODER_FOLDER, name)
    if path is None:
        raise W2WFileError(f"encoder file {name!r} not found in {', '.join(roots(ENCODER_FOLDER))}: train one for your "
                           "space with `python -m w2w train-encoder SPACE --out models/w2w_encoders/NAME.safetensors` "
                           "(docs/encoder.md)")
    return path


def file_fingerprint(path: str) -> tuple:
    """(path, size, mtime, inode, ctime) of a file, or of every file directly inside a folder: changes when the content
    is replaced, also by a copy that keeps the old modification time (``cp -p``, ``rsync -t``: a new inode, or a new
    change time where the inode is reused)."""
    paths = [path] if os.path.isfile(path) else sorted(os.path.join(path, f) for f in os.listdir(path))
    stats = [(p, os.stat(p)) for p in paths]
    return tuple((p, st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns) for p, st in stats
                 if stat.S_ISREG(st.st_mode))


def save_target(folder_name: str, filename_prefix: str) -> tuple[str, str]:
    """(absolute path, name relative to the folder) for a new numbered file ``prefix_00001_.safetensors``."""
    import folder_paths

    root = os.path.abspath(roots(folder_name)[0])
    out_dir, filename, counter, subfolder, _ = folder_paths.get_save_image_path(filename_prefix, root)
    os.makedirs(out_dir, exist_ok=True)
    name = f"{filename}_{counter:05}_.safetensors"
    return os.path.join(out_dir, name), os.path.join(subfolder, name).replace(os.sep, "/")
