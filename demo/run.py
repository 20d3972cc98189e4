"""Run an API-format graph headlessly in a real ComfyUI server, with this pack installed.

    python demo/run.py --graph demo/graphs/sd15_stock.json --out demo-output/
    python demo/run.py --graph G.json --models ~/ComfyUI/models --stage w2w=space.safetensors --out out/

What it does: makes a throw-away base directory (custom_nodes/<pack> -> this repository; models/<kind>/
filled with links to the files in `--models` and `--stage`), starts `main.py --cpu --listen 127.0.0.1`
on a free port with that base directory, POSTs the graph to /prompt, polls /history/<id>, copies the
saved images to `--out`, and always stops the server.

Real files first: a checkpoint named by a CheckpointLoader node is taken from `--models/checkpoints/`.
When it is absent, a clearly labelled stand-in (random weights with the SD1.5 architecture, built once
and cached; see demo/standins.py) is used instead, and the run says so loudly. Other stand-ins can be
declared with `--standin KIND:NAME=PATH` (used only when NAME is absent from `--models/KIND/`).

Standard library only: importing this module imports neither ComfyUI nor torch.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `demo.*` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from demo import standins  # noqa: E402
from demo.locate import HOW_TO_PROVIDE, PACK_DIRNAME, find_comfyui, pack_root  # noqa: E402

HOST = "127.0.0.1"  # loopback only, never a public interface
CHECKPOINT_LOADERS = {"CheckpointLoaderSimple": "ckpt_name", "CheckpointLoader": "ckpt_name"}


def say(message: str) -> None:
    print(f"[w2w demo] {message}", flush=True)


class DemoError(RuntimeError):
    """A failure the user can act on; the message says what failed and what to do."""


@dataclass(frozen=True)
class Standin:
    """Use `path` for the model file `name` of folder `kind` when the real file is absent."""

    kind: str
    name: str
    path: Path
    label: str = "stand-in"


@dataclass
class DemoResult:
    prompt_id: str
    images: list  # copied image files, in output-node order
    seconds: float  # from POST /prompt to the finished history entry
    standins_used: list = field(default_factory=list)  # human-readable lines
    pack_import_errors: list = field(default_factory=list)


# ------------------------------------------------------------------------------------ graphs
def load_graph(path: str | os.PathLike) -> dict:
    """Load an API-format graph ({node id: {"class_type", "inputs"}}); reject UI-format workflows."""
    with open(path, encoding="utf-8") as handle:
        graph = json.load(handle)
    if isinstance(graph, dict) and "nodes" in graph and "links" in graph:
        raise DemoError(f"{path} is a UI workflow, not an API-format graph: in ComfyUI use "
                        "Workflow > Export (API) and pass that file")
    if not isinstance(graph, dict) or not all(isinstance(n, dict) and "class_type" in n for n in graph.values()):
        raise DemoError(f"{path} is not an API-format graph ({{id: {{'class_type': ..., 'inputs': ...}}}})")
    return graph


def replace_input_value(graph: dict, old: str, new: str) -> list[str]:
    """Replace every string input equal to `old` by `new` (in place); return 'node.input' names changed."""
    changed = []
    for node_id, node in graph.items():
        for name, value in node.get("inputs", {}).items():
            if value == old:
                node["inputs"][name] = new
                changed.append(f"{node_id}.{name}")
    return changed


def checkpoint_names(graph: dict) -> list[str]:
    names = []
    for node in graph.values():
        input_name = CHECKPOINT_LOADERS.get(node["class_type"])
        if input_name and isinstance(node["inputs"].get(input_name), str):
            names.append(node["inputs"][input_name])
    return sorted(set(names))


# ------------------------------------------------------------------------------------ base directory
def _link(source: Path, link: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(source.resolve(), target_is_directory=source.is_dir())


def prepare_base_dir(base: Path, models: Path | None, stage: list[tuple[str, Path]]) -> None:
    """custom_nodes/<pack> -> this repository; models/<kind>/<entry> -> each entry of --models and --stage."""
    for name in ("custom_nodes", "models", "input", "output", "user", "frontend"):
        (base / name).mkdir(parents=True, exist_ok=True)
    _link(pack_root(), base / "custom_nodes" / PACK_DIRNAME)
    if models is not None:
        for kind_dir in sorted(p for p in models.iterdir() if p.is_dir()):
            for entry in sorted(kind_dir.iterdir()):
                _link(entry, base / "models" / kind_dir.name / entry.name)
    for kind, source in stage:
        if not source.exists():
            raise DemoError(f"--stage {kind}={source}: the file does not exist")
        _link(source, base / "models" / kind / source.name)


def apply_standins(graph: dict, base: Path, standins_: list[Standin]) -> list[str]:
    """Stage each stand-in whose real file is absent from base/models/<kind>, and point the graph at it."""
    used = []
    for standin in standins_:
        if (base / "models" / standin.kind / standin.name).exists():
            continue
        _link(standin.path, base / "models" / standin.kind / standin.path.name)
        where = replace_input_value(graph, standin.name, standin.path.name)
        used.append(f"{standin.kind}/{standin.name} not found -> using the {standin.label} "
                    f"{standin.path.name} (inputs {', '.join(where) or 'none'})")
    return used


def loud(lines: list[str]) -> None:
    if not lines:
        return
    bar = "!" * 100
    print(bar, flush=True)
    say("STAND-INS IN USE: results come from random-weight models, NOT real ones.")
    for line in lines:
        say("  " + line)
    say("  put the real files under --models DIR/<kind>/ to use them instead.")
    print(bar, flush=True)


# ------------------------------------------------------------------------------------ server
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def _stop_with_parent() -> None:
    """In the server's process before it starts (Linux): SIGTERM it when the process that started it dies, so that a
    killed demo or test run never leaves a server holding gigabytes of models."""
    import ctypes
    import signal

    PR_SET_PDEATHSIG = 1
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass  # another C library: the server is still stopped by ComfyServer.stop() in the normal case


class ComfyServer:
    """`python main.py --cpu` on loopback with a given base directory; a context manager that always stops it."""

    def __init__(self, comfyui: Path, base: Path, python: str = sys.executable, port: int | None = None,
                 startup_timeout: float = 900.0, extra_args: tuple = (), installed_frontend: bool = False):
        self.comfyui, self.base, self.python = Path(comfyui), Path(base), python
        self.installed_frontend = installed_frontend  # True: serve the comfyui-frontend-package UI, not an empty root
        self._auto_port = port is None
        self.port = port or free_port()
        self.startup_timeout = startup_timeout
        self.extra_args = list(extra_args)
        self.log_path = self.base / "comfyui.log"
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def __enter__(self) -> "ComfyServer":
        try:
            self.start()
        except BaseException:
            self.stop()  # a server that never answered must not outlive the run
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self, attempts: int = 3) -> None:
        """Start and wait until /system_stats answers; retry on another port if ours was taken meanwhile."""
        for attempt in range(attempts):
            if self._start_once():
                return
            if not self._auto_port or attempt == attempts - 1:
                raise DemoError(f"port {self.port} on {HOST} is in use:\n{self.log_tail()}")
            say(f"port {self.port} was taken; retrying on another one")
            self.port = free_port()

    def _start_once(self) -> bool:
        """True when the server answers; False if it exited because the port was in use."""
        self.stop()
        cmd = [self.python, "main.py", "--cpu", "--listen", HOST, "--port", str(self.port),
               "--base-directory", str(self.base),
               *([] if self.installed_frontend else ["--front-end-root", str(self.base / "frontend")]),
               "--disable-api-nodes", *self.extra_args]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self._log = open(self.log_path, "w", encoding="utf-8")
        say(f"starting ComfyUI ({self.comfyui}) on {self.url}; log: {self.log_path}")
        self.process = subprocess.Popen(cmd, cwd=self.comfyui, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                        preexec_fn=_stop_with_parent if sys.platform == "linux" else None)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                if "address already in use" in self.log_tail().lower():
                    return False
                raise DemoError(f"ComfyUI exited with code {self.process.returncode} while starting:\n{self.log_tail()}")
            try:
                self.get_json("/system_stats", timeout=2)
                return True
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                time.sleep(0.5)
        raise DemoError(f"ComfyUI did not answer on {self.url} within {self.startup_timeout:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=20)
        if getattr(self, "_log", None) is not None:
            self._log.close()
            self._log = None

    def log_tail(self, lines: int = 60) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def get_json(self, path: str, timeout: float = 10.0):
        with urllib.request.urlopen(self.url + path, timeout=timeout) as response:
            return json.loads(response.read())

    def post_prompt(self, graph: dict) -> str:
        """POST the graph; return its prompt id, or raise DemoError listing every node error."""
        body = json.dumps({"prompt": graph, "client_id": uuid.uuid4().hex}).encode()
        request = urllib.request.Request(self.url + "/prompt", data=body, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=300) as response:
                return json.loads(response.read())["prompt_id"]
        except urllib.error.HTTPError as error:
            payload = error.read().decode("utf-8", errors="replace")
            raise DemoError("ComfyUI rejected the graph (HTTP {}):\n{}".format(error.code, format_rejection(payload, graph)))

    def wait_history(self, prompt_id: str, timeout: float) -> dict:
        """Poll /history/<id> until the prompt finished; raise DemoError on error or timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise DemoError(f"ComfyUI exited (code {self.process.returncode}) while running:\n{self.log_tail()}")
            try:
                entry = self.get_json(f"/history/{prompt_id}", timeout=30).get(prompt_id)
            except (urllib.error.URLError, ConnectionError, TimeoutError) as error:
                say(f"no answer from /history yet ({error}); still waiting")  # a busy CPU delays the reply
                time.sleep(2)
                continue
            if entry and entry.get("status", {}).get("completed") is not None and (
                    entry["status"]["completed"] or entry["status"].get("status_str") == "error"):
                if entry["status"].get("status_str") == "error":
                    raise DemoError("the graph failed while running:\n" + format_execution_error(entry))
                return entry
            time.sleep(1.0)
        raise DemoError(f"the graph did not finish within {timeout:.0f} s (raise --timeout); log tail:\n{self.log_tail()}")


def format_rejection(payload: str, graph: dict) -> str:
    """Readable lines from a /prompt 400 body: the error and each node's errors with its class."""
    try:
        data = json.loads(payload)
    except json.JSONDecodeError:
        return payload
    error = data.get("error", {})
    lines = [f"  {error.get('type', 'error')}: {error.get('message', '')} {error.get('details', '')}".rstrip()]
    for node_id, info in sorted(data.get("node_errors", {}).items()):
        class_type = info.get("class_type") or graph.get(node_id, {}).get("class_type", "?")
        for item in info.get("errors", []):
            lines.append(f"  node {node_id} ({class_type}): {item.get('message', '')}: {item.get('details', '')}")
    return "\n".join(lines)


def format_execution_error(entry: dict) -> str:
    for event, data in entry.get("status", {}).get("messages", []):
        if event == "execution_error":
            trace = "".join(data.get("traceback", []))
            return (f"  node {data.get('node_id')} ({data.get('node_type')}): {data.get('exception_type')}: "
                    f"{data.get('exception_message')}\n{trace}")
    return json.dumps(entry.get("status", {}), indent=1)


def pack_import_errors(log_text: str, pack_dir: str) -> list[str]:
    """Lines of the server log that report this pack failing to import."""
    return [line for line in log_text.splitlines()
            if pack_dir in line and ("Cannot import" in line or "IMPORT FAILED" in line)]


def collect_images(entry: dict, base: Path, out: Path) -> list[Path]:
    """Copy every image the output nodes saved (history 'images' of type output) into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    copied = []
    for node_output in entry.get("outputs", {}).values():
        for image in node_output.get("images", []):
            if image.get("type") != "output":
                continue
            source = base / "output" / image.get("subfolder", "") / image["filename"]
            target = out / image["filename"]
            shutil.copyfile(source, target)
            copied.append(target)
    return copied


# ------------------------------------------------------------------------------------ the run
def run_demo(graph: dict, comfyui: Path, out: Path, models: Path | None = None,
             stage: list[tuple[str, Path]] = (), extra_standins: list[Standin] = (),
             python: str = sys.executable, timeout: float = 1200.0, keep: bool = False,
             startup_timeout: float = 900.0) -> DemoResult:
    """Stage models, start the server, run `graph` (modified in place for stand-ins), copy images to `out`."""
    graph = json.loads(json.dumps(graph))  # never mutate the caller's graph
    base = Path(tempfile.mkdtemp(prefix="w2w-demo-"))
    try:
        prepare_base_dir(base, models, list(stage))
        wanted = list(extra_standins)
        missing_ckpts = [n for n in checkpoint_names(graph) if not (base / "models" / "checkpoints" / n).exists()]
        if missing_ckpts:
            ckpt = standins.ensure_sd15_standin(comfyui, log=say, python=python)
            wanted += [Standin("checkpoints", name, ckpt, "random-weight SD1.5 stand-in") for name in missing_ckpts]
        used = apply_standins(graph, base, wanted)
        loud(used)
        with ComfyServer(comfyui, base, python=python, startup_timeout=startup_timeout) as server:
            errors = pack_import_errors(server.log_tail(100000), str(base / "custom_nodes" / PACK_DIRNAME))
            for line in errors:
                say(f"WARNING: the pack failed to import: {line}")
            start = time.monotonic()
            prompt_id = server.post_prompt(graph)
            say(f"queued prompt {prompt_id}; waiting (timeout {timeout:.0f} s)")
            entry = server.wait_history(prompt_id, timeout)
            seconds = time.monotonic() - start
        images = collect_images(entry, base, Path(out))
        return DemoResult(prompt_id, images, seconds, used, errors)
    finally:
        if keep:
            say(f"kept the base directory {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)


def _parse_stage(text: str) -> tuple[str, Path]:
    kind, sep, path = text.partition("=")
    if not sep or not kind or not path:
        raise argparse.ArgumentTypeError(f"--stage expects KIND=PATH (e.g. w2w=space.safetensors), got {text!r}")
    return kind, Path(path).expanduser()


def _parse_standin(text: str) -> Standin:
    spec, sep, path = text.partition("=")
    kind, colon, name = spec.partition(":")
    if not (sep and colon and kind and name and path):
        raise argparse.ArgumentTypeError(f"--standin expects KIND:NAME=PATH, got {text!r}")
    return Standin(kind, name, Path(path).expanduser())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="demo/run.py", description="Run an API-format graph in a headless ComfyUI "
                                     "with this pack installed (stand-ins when real models are absent).")
    parser.add_argument("--graph", type=Path, default=Path(__file__).parent / "graphs" / "sd15_stock.json",
                        help="API-format graph (ComfyUI: Workflow > Export (API)); default: the stock SD1.5 graph")
    parser.add_argument("--models", type=Path, help="models folder with <kind>/ subfolders (checkpoints/, w2w/, "
                        "loras/, ...); default: the ComfyUI's own models/ folder")
    parser.add_argument("--out", type=Path, default=Path("w2w-demo-output"), help="where the images are copied")
    parser.add_argument("--stage", type=_parse_stage, action="append", default=[], metavar="KIND=PATH",
                        help="also place PATH in models/KIND/ (repeatable), e.g. w2w=space.safetensors")
    parser.add_argument("--standin", type=_parse_standin, action="append", default=[], metavar="KIND:NAME=PATH",
                        help="use PATH when models/KIND/NAME is absent, rewriting the graph (repeatable)")
    parser.add_argument("--comfyui", type=Path, help="ComfyUI checkout (default: $COMFYUI_PATH, the checkout "
                        "containing this pack, then ~/ComfyUI)")
    parser.add_argument("--python", default=sys.executable, help="Python interpreter that has ComfyUI's requirements")
    parser.add_argument("--timeout", type=float, default=1200.0, help="seconds allowed for the graph to run")
    parser.add_argument("--startup-timeout", type=float, default=900.0,
                        help="seconds allowed for ComfyUI to start (importing every node is slow on a busy CPU)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary base directory (for debugging)")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        comfyui = args.comfyui or find_comfyui()
        if comfyui is None:
            raise DemoError("ComfyUI not found: " + HOW_TO_PROVIDE)
        models = args.models
        if models is None and (Path(comfyui) / "models").is_dir():
            models = Path(comfyui) / "models"
        if models is not None and not models.is_dir():
            raise DemoError(f"--models {models}: not a directory")
        graph = load_graph(args.graph)
        result = run_demo(graph, Path(comfyui), args.out, models, args.stage, args.standin, args.python,
                          args.timeout, args.keep, args.startup_timeout)
    except (DemoError, ValueError, OSError) as error:
        say(f"FAILED: {error}")
        return 1
    say(f"done in {result.seconds:.1f} s; {len(result.images)} image(s):")
    for image in result.images:
        say(f"  {image}")
    loud(result.standins_used)
    return 0


if __name__ == "__main__":
    sys.exit(main())
