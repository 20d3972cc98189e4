"""A real ComfyUI, imported into the test process, that runs API-format graphs like the server does.

`ComfyHost.start(comfyui, base_dir, pack_dir)` prepares a throw-away base directory
(`custom_nodes/<pack>` -> this repository, `models/checkpoints`, `models/w2w`, ...), imports ComfyUI
from `comfyui` with `--cpu` semantics, loads the built-in and custom nodes (this pack included) and
returns a host whose `run_graph(prompt)` validates and executes a graph with `execution.PromptExecutor`,
i.e. under `torch.inference_mode()` exactly as in a real run.

Importing ComfyUI mutates the process for good: ComfyUI's root goes first on sys.path (its `nodes.py`,
`comfy/`, `utils/`, `server.py` become top-level modules), `comfy.cli_args.args` is edited, and its
node registry is global. Hence one host per process (`ComfyHost.start` refuses a second base dir),
and everything that needs it lives in `tests/comfy/` and runs in one pytest process. File names in
this directory must not clash with ComfyUI modules (`comfy` is a namespace package, so this
directory can become part of it): keep the `test_*`, `conftest`, `comfyhost` names.
"""
from __future__ import annotations

import asyncio
import copy
import ctypes
import gc
import inspect
import json
import logging
import os
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_STARTED: "ComfyHost | None" = None

# Name of the SD1.5 stand-in in the host's models/checkpoints folder, and the stock graph that uses it.
SD15_STANDIN_NAME = "w2w-standin-sd15.safetensors"
STOCK_GRAPH = Path(__file__).resolve().parents[2] / "demo" / "graphs" / "sd15_stock.json"

# Model folders created in the base directory (ComfyUI creates the rest on demand).
MODEL_KINDS = ("checkpoints", "loras", "controlnet", "vae", "embeddings", "w2w")


def load_stock_graph(ckpt_name: str = SD15_STANDIN_NAME) -> dict:
    """A fresh copy of demo/graphs/sd15_stock.json (64x64, 1 step) loading `ckpt_name`."""
    graph = json.loads(STOCK_GRAPH.read_text(encoding="utf-8"))
    for node in graph.values():
        if node["class_type"] == "CheckpointLoaderSimple":
            node["inputs"]["ckpt_name"] = ckpt_name
    return graph


def png_pixels(path: str | os.PathLike):
    """(H, W, 3) uint8 tensor of a saved PNG (Pillow ships with ComfyUI)."""
    import torch
    from PIL import Image

    with Image.open(path) as image:
        rgb = image.convert("RGB")
        return torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8).view(rgb.height, rgb.width, 3)


# ---- executor generations ------------------------------------------------------------------------------------
# ComfyUI 0.3.64: PromptExecutor(server, cache_type=...); cache.get(node_id) returns the output lists.
# Late-2026 releases (read from 0.38.1's execution.py): PromptExecutor(server, cache_type=..., cache_args=...), where
# execute reads cache_args["ram"] and ["ram_inactive"] whatever the cache type; the cache's get is a coroutine
# returning CacheEntry(ui, outputs). The harness speaks both.
def new_prompt_executor(execution, server):
    """A classic-cache PromptExecutor, with the cache arguments newer hosts require."""
    kwargs = {"cache_type": execution.CacheType.CLASSIC}
    if "cache_args" in inspect.signature(execution.PromptExecutor.__init__).parameters:
        kwargs["cache_args"] = {"lru": 0, "ram": 0, "ram_inactive": 0}  # as main.py's --cache-classic
    return execution.PromptExecutor(server, **kwargs)


def cached_outputs(cache, node_id: str):
    """The output lists of ``node_id`` in an executor's output cache, or None, whatever the host's cache API."""
    value = cache.get(node_id)
    if inspect.isawaitable(value):
        value = asyncio.run(value)
    return getattr(value, "outputs", value)  # newer hosts wrap them in CacheEntry(ui, outputs)


def _return_free_memory_to_the_os() -> None:
    """glibc keeps freed large blocks mapped; give them back so the next module starts from a low RSS."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to do


class GraphError(RuntimeError):
    """A graph that failed validation or execution; `.details` holds ComfyUI's error payload."""

    def __init__(self, message: str, details: Any):
        super().__init__(message)
        self.details = details


@dataclass
class GraphResult:
    """What one `run_graph` produced."""

    prompt_id: str
    success: bool
    ui: dict  # node id -> ui dict (e.g. {"images": [{"filename", "subfolder", "type"}]}), as in /history
    messages: list  # (event, data) pairs the executor emitted (execution_start, execution_error, ...)
    node_outputs: dict = field(repr=False)  # node id -> list of output sockets, each a list over batches
    output_dir: Path = None

    def output(self, node_id: str, index: int = 0):
        """Value of output socket `index` of node `node_id` (first batch item)."""
        if node_id not in self.node_outputs:
            raise KeyError(f"node {node_id!r} has no cached outputs (executed: {sorted(self.node_outputs)})")
        return self.node_outputs[node_id][index][0]

    def image_files(self) -> list[Path]:
        """Absolute paths of every image the output nodes saved (type 'output' or 'temp')."""
        files = []
        for ui in self.ui.values():
            for image in ui.get("images", []):
                files.append(self.output_dir.parent / image["type"] / image["subfolder"] / image["filename"])
        return files

    def error(self) -> dict | None:
        """The `execution_error` payload, if any."""
        for event, data in self.messages:
            if event == "execution_error":
                return data
        return None


class _PackLogCapture(logging.Handler):
    """Collects ComfyUI's warnings that mention the pack while custom nodes import."""

    def __init__(self, needle: str):
        super().__init__(logging.WARNING)
        self.needle = needle
        self.records: list[str] = []

    def emit(self, record):
        message = record.getMessage()
        if self.needle in message:
            self.records.append(message)


def _link(target: Path, link: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(target, target_is_directory=target.is_dir())


class ComfyHost:
    """The in-process ComfyUI; build it with `ComfyHost.start(...)` (once per process)."""

    def __init__(self, comfyui: Path, base_dir: Path, pack_dir: Path, pack_name: str):
        self.comfyui = comfyui
        self.base_dir = base_dir
        self.pack_dir = pack_dir
        self.pack_name = pack_name
        self.models_dir = base_dir / "models"
        self.output_dir = base_dir / "output"
        self.pack_import_errors: list[str] = []
        self.pack_node_ids: list[str] = []
        self.pack_module_name: str | None = None  # sys.modules name ComfyUI gave the pack
        self._shared_executor = None

    # ---------------------------------------------------------------- start-up
    @classmethod
    def start(cls, comfyui: Path, base_dir: Path, pack_dir: Path, pack_name: str) -> "ComfyHost":
        global _STARTED
        if _STARTED is not None:
            if _STARTED.base_dir != Path(base_dir):
                raise RuntimeError("ComfyUI is already imported in this process with another base directory; "
                                   "run the tests in tests/comfy/ in one pytest process with one session fixture")
            return _STARTED
        host = cls(Path(comfyui), Path(base_dir), Path(pack_dir), pack_name)
        host._prepare_base_dir()
        host._import_comfyui()
        host._init_nodes()
        _STARTED = host
        return host

    def _prepare_base_dir(self) -> None:
        for kind in MODEL_KINDS:
            (self.models_dir / kind).mkdir(parents=True, exist_ok=True)
        for name in ("input", "output", "temp", "user", "custom_nodes", "frontend"):
            (self.base_dir / name).mkdir(parents=True, exist_ok=True)
        _link(self.pack_dir, self.base_dir / "custom_nodes" / self.pack_name)

    def _import_comfyui(self) -> None:
        root = str(self.comfyui)
        shadow = sys.modules.get("nodes")
        if shadow is not None and Path(getattr(shadow, "__file__", "") or "").parent != self.comfyui:
            raise RuntimeError(f"a module named 'nodes' is already imported from {shadow.__file__}; ComfyUI's "
                               "nodes.py must be imported first: do not import the pack's nodes/ package directly")
        if root in sys.path:
            sys.path.remove(root)
        sys.path.insert(0, root)
        import comfy.cli_args

        args = comfy.cli_args.args
        args.cpu = True
        # The UNet stored in float16 and computed in float32 (ComfyUI's manual cast, as for an fp16 checkpoint on a
        # device without fast fp16): half the memory of the float32 CPU default, the path GPU users' fp16 weights
        # take, and the tests' tolerances follow the stored dtype. W2W_TEST_UNET_DTYPE=fp32 runs the CPU default.
        unet_dtype = os.environ.get("W2W_TEST_UNET_DTYPE", "fp16")
        if unet_dtype not in ("fp16", "fp32"):
            raise ValueError(f"W2W_TEST_UNET_DTYPE must be fp16 or fp32, got {unet_dtype!r}")
        args.fp16_unet = unet_dtype == "fp16"
        args.base_directory = str(self.base_dir)
        args.front_end_root = str(self.base_dir / "frontend")  # empty: no web UI is served
        args.disable_api_nodes = True
        import folder_paths  # reads args.base_directory at import
        import utils.extra_config  # noqa: F401  as main.py: the `utils` package before nodes.py puts comfy/ on sys.path

        if Path(folder_paths.base_path) != self.base_dir:
            raise RuntimeError(f"folder_paths was imported before the host set the base directory "
                               f"({folder_paths.base_path}); import ComfyUI only through ComfyHost")
        # As main.apply_custom_paths does: stock save nodes write models under output/.
        for kind in ("checkpoints", "clip", "vae", "diffusion_models", "loras"):
            folder_paths.add_model_folder_path(kind, os.path.join(folder_paths.get_output_directory(), kind))
        import comfy.utils  # noqa: F401  then the rest in main.py's order
        import execution  # noqa: F401
        import server  # noqa: F401
        import nodes  # noqa: F401
        import comfy.model_management

        if comfy.model_management.get_torch_device().type != "cpu":
            raise RuntimeError("ComfyUI did not select the CPU although args.cpu is set")

    def _init_nodes(self) -> None:
        import hook_breaker_ac10a0
        import nodes
        import server

        loop = asyncio.new_event_loop()  # never run: PromptServer.instance exists for packs that need it
        self.server = server.PromptServer(loop)
        capture = _PackLogCapture(str(self.base_dir / "custom_nodes" / self.pack_name))
        logging.getLogger().addHandler(capture)
        try:
            hook_breaker_ac10a0.save_functions()
            asyncio.run(nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=False))
            hook_breaker_ac10a0.restore_functions()
        finally:
            logging.getLogger().removeHandler(capture)
        self.pack_import_errors = capture.records
        module = f"custom_nodes.{self.pack_name}"
        import folder_paths

        # nodes.load_custom_node names a package folder after its path, dots replaced by "_x_".
        name = os.path.join(folder_paths.get_folder_paths("custom_nodes")[0], self.pack_name).replace(".", "_x_")
        self.pack_module_name = name if name in sys.modules else None
        self.pack_node_ids = sorted(name for name, cls in nodes.NODE_CLASS_MAPPINGS.items()
                                    if getattr(cls, "RELATIVE_PYTHON_MODULE", None) == module)

    # ---------------------------------------------------------------- helpers
    def stage_model(self, kind: str, source: str | os.PathLike, name: str | None = None) -> Path:
        """Symlink `source` into `models/<kind>/<name>` and return the link (ComfyUI lists it at once)."""
        source = Path(source).resolve()
        if not source.exists():
            raise FileNotFoundError(f"cannot stage {source}: it does not exist")
        link = self.models_dir / kind / (name or source.name)
        _link(source, link)
        import folder_paths

        folder_paths.filename_list_cache.clear()
        return link

    def register_node(self, class_type: str, node_class) -> None:
        """Add a V1 node class (e.g. a test probe) to the registry for the rest of the session."""
        import nodes

        nodes.NODE_CLASS_MAPPINGS[class_type] = node_class

    def pack_module(self, name: str = ""):
        """The pack's own copy of a module, e.g. `pack_module("w2w.space")`.

        ComfyUI imports a custom node folder under its path as module name (`pack_module_name`,
        dots replaced by `_x_`; relative imports inside), so its
        `w2w.space.Space` is a different class from the `w2w.space.Space` a test imports directly:
        objects handed to node classes must come from this copy.
        """
        import importlib

        if self.pack_module_name is None or self.pack_import_errors:
            raise RuntimeError(f"ComfyUI did not import the pack: {self.pack_import_errors}")
        return importlib.import_module(f"{self.pack_module_name}.{name}" if name else self.pack_module_name)

    def node_class(self, class_type: str):
        import nodes

        return nodes.NODE_CLASS_MAPPINGS[class_type]

    def validate(self, prompt: dict) -> tuple[bool, Any, list, dict]:
        """`execution.validate_prompt`: (valid, error, output node ids, per-node errors)."""
        import execution

        return asyncio.run(execution.validate_prompt(uuid.uuid4().hex, prompt, None))

    def run_graph(self, prompt: dict, check: bool = True, executor=None) -> GraphResult:
        """Validate and execute an API-format graph; raise GraphError (if `check`) on any error.

        A fresh PromptExecutor (empty caches) is used unless one is passed, so every call
        executes every node. Pass `executor=host.shared_executor` to keep ComfyUI's output cache
        between calls as a real server does (nodes whose inputs did not change, e.g. the
        checkpoint loader, are then not re-executed: faster, but a probe node may not run again).
        """
        import execution

        prompt = copy.deepcopy(prompt)  # as the server, which parses each queued prompt anew: ComfyUI writes into the
        # graph (a node's "is_changed"), and a dict reused by the caller would carry it into the next run
        prompt_id = uuid.uuid4().hex
        valid, error, outputs, node_errors = asyncio.run(execution.validate_prompt(prompt_id, prompt, None))
        if not valid:
            raise GraphError(f"graph is invalid: {error.get('message')}: {error.get('details')}; "
                             f"node errors: {node_errors}", {"error": error, "node_errors": node_errors})
        if executor is None:
            gc.collect()  # executors hold each other's caches in reference cycles: free earlier ones' models first
            executor = self.new_executor()
        executor.execute(prompt, prompt_id, {}, outputs)
        node_outputs = {}
        for node_id in prompt:
            value = cached_outputs(executor.caches.outputs, node_id)
            if value is not None:
                node_outputs[node_id] = value
        result = GraphResult(prompt_id=prompt_id, success=executor.success,
                             ui=executor.history_result["outputs"], messages=list(executor.status_messages),
                             node_outputs=node_outputs, output_dir=self.output_dir)
        if check and not result.success:
            err = result.error() or {}
            raise GraphError(f"node {err.get('node_id')} ({err.get('node_type')}) failed: "
                             f"{err.get('exception_type')}: {err.get('exception_message')}\n"
                             f"{''.join(err.get('traceback', []))}", err)
        return result

    @property
    def shared_executor(self):
        """One PromptExecutor for the session whose caches persist between runs (like the server's)."""
        if self._shared_executor is None:
            self._shared_executor = self.new_executor()
        return self._shared_executor

    def new_executor(self):
        import execution

        return new_prompt_executor(execution, self.server)

    def unload_models(self) -> None:
        """Drop cached outputs and loaded models (frees the memory the last graphs held)."""
        import comfy.model_management

        self._shared_executor = None
        gc.collect()
        comfy.model_management.unload_all_models()
        comfy.model_management.soft_empty_cache()
        gc.collect()
        _return_free_memory_to_the_os()
