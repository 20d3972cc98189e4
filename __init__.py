"""weights2weights for ComfyUI: entry point of the node pack (ComfyUI V3 extension API).

Importing this file does nothing else: the nodes, ComfyUI's modules and torch are imported when ComfyUI
calls ``comfy_entrypoint()``, so tools that merely import the pack (test runners, linters) need no ComfyUI.
"""

WEB_DIRECTORY = "./web"  # the browser extension (web/js) and the node help pages (web/docs)


async def comfy_entrypoint():
    from .nodes import extension

    return extension()
