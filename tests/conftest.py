"""Markers shared by the whole suite (options only; fixtures live next to the tests that use them)."""


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: heavy test (seconds to minutes on a CPU); still runs in CI, "
                                       "deselect locally with -m 'not slow'")
    config.addinivalue_line("markers", "comfy: needs a real ComfyUI (found via $COMFYUI_PATH, a ComfyUI checkout "
                                       "containing this pack, then ~/ComfyUI); skipped with a reason otherwise")
