"""Headless demo of the pack in a real ComfyUI, with clearly labelled stand-in models when real files are absent."""
