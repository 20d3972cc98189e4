"""Finding ComfyUI: $COMFYUI_PATH, then a checkout containing the pack, then ~/ComfyUI (no ComfyUI needed)."""
from __future__ import annotations

from pathlib import Path

import pytest

from demo import locate


def make_comfyui(root: Path) -> Path:
    for name in ("main.py", "nodes.py", "execution.py", "folder_paths.py"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text("")
    (root / "comfy").mkdir()
    (root / "comfyui_version.py").write_text('__version__ = "0.3.64"\n')
    return root


def test_explicit_path_wins_over_home(tmp_path):
    explicit, home = make_comfyui(tmp_path / "a"), make_comfyui(tmp_path / "home" / "ComfyUI")
    env = {"COMFYUI_PATH": str(explicit), "HOME": str(home.parent)}
    assert locate.find_comfyui(env) == explicit.resolve()


def test_home_is_the_fallback_and_absence_gives_none(tmp_path):
    home = make_comfyui(tmp_path / "home" / "ComfyUI")
    # Only valid while the repository itself is not inside a ComfyUI's custom_nodes.
    if locate._enclosing_comfyui(locate.pack_root()) is None:
        assert locate.find_comfyui({"HOME": str(home.parent)}) == home.resolve()
        assert locate.find_comfyui({"HOME": str(tmp_path / "nobody")}) is None


def test_a_wrong_explicit_path_is_an_error_not_a_fallback(tmp_path):
    with pytest.raises(ValueError, match="COMFYUI_PATH"):
        locate.find_comfyui({"COMFYUI_PATH": str(tmp_path), "HOME": str(tmp_path)})


def test_checkout_containing_the_pack_is_found_through_a_symlink(tmp_path):
    root = make_comfyui(tmp_path / "ComfyUI")
    (root / "custom_nodes").mkdir()
    link = root / "custom_nodes" / locate.PACK_DIRNAME
    link.symlink_to(locate.pack_root(), target_is_directory=True)
    assert locate._enclosing_comfyui(link) == root


def test_version_and_cache_dir(tmp_path):
    root = make_comfyui(tmp_path / "ComfyUI")
    assert locate.comfyui_version(root) == "0.3.64"
    assert locate.comfyui_version(tmp_path) is None
    cache = locate.cache_dir({"XDG_CACHE_HOME": str(tmp_path / "xdg"), "HOME": str(tmp_path)})
    assert cache == tmp_path / "xdg" / "comfyui-w2w" / "standins"
    assert locate.cache_dir({"HOME": str(tmp_path)}) == tmp_path / ".cache" / "comfyui-w2w" / "standins"
