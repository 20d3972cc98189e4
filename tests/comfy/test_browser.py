"""End to end in a real browser: the real ComfyUI server, a real frontend (comfyui-frontend-package) and this pack's
web extension, driven in headless Chromium through Playwright.

Every test runs on two frontends, one server at a time (see browserhost.py):
- bundled: the frontend installed with ComfyUI's requirements, with its canvas (LiteGraph) node renderer;
- newest: the comfyui-frontend-package named in newest-frontend.txt, served with --front-end-root, with the Vue node
  renderer on (setting Comfy.VueNodes.Enabled), as a new install has it.

Each ComfyUI (`demo.run.ComfyServer`) gets the SD1.5 stand-in checkpoint and two small synthetic spaces whose
attributes differ. In the browser: the frontend registers every W2W node and the w2w.frontend extension; the edit
workflow (example_workflows/w2w_edit_identity.json, shrunk to 64x64 and 1 step) loads, the space is switched with real
clicks, Load w2w Space shows the space's summary in its DOM, both Apply Edit Direction menus list exactly the new
space's attributes, the attribute menu filters as one types, the graph runs and its images appear; in
example_workflows/invert_image.json, Invert Image to w2w shows its step and loss on the node (the server's progress
text). Screenshots are saved (paths printed; copied to $W2W_TEST_ARTIFACTS when set), also at a failure. Without
Playwright, Chromium or a frontend the tests skip loudly, and fail under CI.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from browserhost import HOW_TO_PROVIDE, bundled_frontend, find_browser, launch, newest_frontend, unavailable
from demo.locate import PACK_DIRNAME
from demo.run import ComfyServer, format_execution_error, prepare_base_dir

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
WORKFLOW = REPO / "example_workflows" / "w2w_edit_identity.json"
PCS = 8
SPACES = {  # file name in models/w2w -> attributes of its training labels (B has names outside CelebA's 33)
    "w2w-browser-a.safetensors": ("Male", "Young", "Eyeglasses", "Bald", "Blond_Hair"),
    "w2w-browser-b.safetensors": ("Smiling", "Wavy_Hair", "Goatee", "Pale_Skin", "Narrow_Eyes", "Rosy_Cheeks"),
}
SPACE_A, SPACE_B = SPACES
LOAD_SPACE_ID, SAMPLE_ID, EDIT_IDS, SAVE_IDS = 2, 3, (12, 13), (11, 17)
RUN_TIMEOUT_S = 600


@pytest.fixture(scope="module")
def browser_api():
    sync_api, found = find_browser()
    if sync_api is None:
        unavailable(f"{found}; to run it, {HOW_TO_PROVIDE}")
    return sync_api, found


@pytest.fixture(scope="module", params=["bundled", "newest"])
def frontend(request):
    found, reason = bundled_frontend() if request.param == "bundled" else newest_frontend()
    if found is None:
        unavailable(reason)
    return found


@pytest.fixture(scope="module")
def staged_models(comfyui_path, sd15_standin, tmp_path_factory) -> list:
    """(kind, file) for models/: the stand-in checkpoint and the two small spaces."""
    from w2w.convert import convert_release
    from w2w.synthetic import write_release

    root = tmp_path_factory.mktemp("browser-models")
    stage = [("checkpoints", Path(sd15_standin))]
    for i, (name, attributes) in enumerate(SPACES.items()):
        release = root / f"release-{i}"
        write_release(str(release), pcs=PCS, models=64, attributes=attributes, seed=10 + i)
        convert_release(str(release), str(root / name))
        stage.append(("w2w", root / name))
    return stage


@pytest.fixture(scope="module")
def ui_server(frontend, staged_models, comfyui_path, tmp_path_factory):
    base = tmp_path_factory.mktemp(f"browser-{frontend.name}")
    prepare_base_dir(base, None, staged_models)
    from PIL import Image  # a 64x64 photo stand-in for Load Image in invert_image.json

    Image.radial_gradient("L").resize((64, 64)).convert("RGB").save(base / "input" / "example.png")
    # a returning user (no first-run template browser over the canvas), with the renderer under test
    settings = {"Comfy.TutorialCompleted": True}
    if frontend.vue_nodes:
        settings["Comfy.VueNodes.Enabled"] = True
    settings_file = base / "user" / "default" / "comfy.settings.json"
    settings_file.parent.mkdir(parents=True, exist_ok=True)
    settings_file.write_text(json.dumps(settings), encoding="utf-8")
    print(f"\nfrontend {frontend.name}: comfyui-frontend-package {frontend.version}, "
          f"{'Vue' if frontend.vue_nodes else 'canvas'} node renderer", flush=True)
    # UNet stored in float16 (computed in float32), as in the in-process host: half the memory of the CPU default
    with ComfyServer(comfyui_path, base, installed_frontend=True, front_end_root=frontend.static,
                     extra_args=("--fp16-unet",)) as server:
        yield server


def get(server, path: str):
    """(status, parsed JSON or text) of GET path."""
    try:
        with urllib.request.urlopen(server.url + path, timeout=60) as response:
            body, status = response.read(), response.status
    except urllib.error.HTTPError as error:
        body, status = error.read(), error.code
    try:
        return status, json.loads(body)
    except ValueError:
        return status, body.decode("utf-8", errors="replace")


def w2w_node_ids(server) -> list[str]:
    status, listing = get(server, "/object_info")
    assert status == 200, listing
    return sorted(k for k in listing if k.startswith("W2W"))


def wait_for_run(server, known: set, timeout: float) -> dict:
    """The history entry of the first prompt not in `known`, once it finished; fail on its error or on a timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for prompt_id, entry in get(server, "/history")[1].items():
            status = entry.get("status", {})
            if prompt_id in known or not status:
                continue
            if status.get("status_str") == "error":
                pytest.fail("the graph failed while running:\n" + format_execution_error(entry))
            if status.get("completed"):
                return entry
        time.sleep(1)
    pytest.fail(f"the graph did not finish within {timeout:.0f} s; server log:\n{server.log_tail()}")


def test_space_routes(ui_server):
    status, listing = get(ui_server, "/w2w/spaces")
    assert status == 200 and set(SPACES) <= set(listing["spaces"])
    for name, attributes in SPACES.items():
        status, summary = get(ui_server, "/w2w/spaces/" + name)
        assert status == 200, summary
        assert set(summary["attributes"]) == set(attributes)
        assert summary["pcs"] == PCS and summary["training_coefficients"] is True
        assert summary["training_models"] == 64
        assert summary["file_size"] == (ui_server.base / "models" / "w2w" / name).stat().st_size
        assert summary["layout"]["modules"] == 64 and summary["layout"]["rank"] == 1
        assert "1.0 = one standard deviation" in summary["strength_units"]
    status, missing = get(ui_server, "/w2w/spaces/no-such-space.safetensors")
    assert status == 404 and "not found" in missing["error"]


def test_help_pages_served(ui_server):
    ids = w2w_node_ids(ui_server)
    assert "W2WLoadSpace" in ids and "W2WApplyEditDirection" in ids
    for node_id in ids:
        status, text = get(ui_server, f"/extensions/{PACK_DIRNAME}/docs/{node_id}.md")
        assert status == 200 and "# " in text, f"no help page for {node_id}"


# ---- in the page ----------------------------------------------------------------------------------------------
JS_APP_READY = "() => window.w2w && window.comfyAPI?.app?.app?.graph"
JS_FRONTEND = """() => {
  const app = window.comfyAPI.app.app;
  return {
    version: window.__COMFYUI_FRONTEND_VERSION__,
    nodeTypes: Object.keys(LiteGraph.registered_node_types).filter((t) => t.startsWith("W2W")).sort(),
    extensions: app.extensions.map((e) => e.name),
    vueSetting: app.extensionManager?.setting?.get("Comfy.VueNodes.Enabled") ?? null,
  };
}"""
JS_VUE_NODES = "() => document.querySelectorAll('[data-node-id]').length"
JS_WIDGET_POINT = """([nodeId, name]) => {
  const app = window.comfyAPI.app.app;
  const node = app.graph.getNodeById(nodeId);
  const w = node.widgets.find((x) => x.name === name);
  const h = w.computedHeight || LiteGraph.NODE_WIDGET_HEIGHT;
  const [x, y] = app.canvas.ds.convertOffsetToCanvas([node.pos[0] + node.size[0] / 2, node.pos[1] + w.y + h / 2]);
  const rect = app.canvas.canvas.getBoundingClientRect();
  return [rect.left + x, rect.top + y];
}"""
JS_WIDGET = """([nodeId, name]) => {
  const node = window.comfyAPI.app.app.graph.getNodeById(nodeId);
  const w = node.widgets.find((x) => x.name === name);
  return {value: w.value, values: [...(w.options.values || [])]};
}"""
JS_SET = """([nodeId, name, value]) => {
  const node = window.comfyAPI.app.app.graph.getNodeById(nodeId);
  const w = node.widgets.find((x) => x.name === name);
  w.value = value;
  w.callback?.(value);
}"""
JS_ATTRIBUTES_ARE = """([ids, expected]) => ids.every((id) => {
  const node = window.comfyAPI.app.app.graph.getNodeById(id);
  const values = node.widgets.find((x) => x.name === "attribute").options.values;
  return JSON.stringify([...values].sort()) === JSON.stringify([...expected].sort()) && expected.includes(
    node.widgets.find((x) => x.name === "attribute").value);
})"""
# Load w2w Space's summary widget as the user sees it: its element on screen, whole (not cut), inside the node's own
# element when the Vue renderer draws nodes as DOM.
JS_SUMMARY = """(nodeId) => {
  const node = window.comfyAPI.app.app.graph.getNodeById(nodeId);
  const el = node.widgets?.find((x) => x.name === "summary")?.element;
  if (!el) return null;
  const r = el.getBoundingClientRect();
  const onScreen = r.width > 0 && r.height > 0 && r.bottom > 0 && r.right > 0 && r.top < innerHeight && r.left < innerWidth;
  return {
    text: el.innerText, lines: node.w2wLines, shown: el.isConnected && el.checkVisibility() && onScreen,
    whole: el.scrollHeight <= el.clientHeight + 1, inNode: !!el.closest(`[data-node-id="${nodeId}"]`),
  };
}"""
JS_OUTPUT_SHOWN = """([ids, vue]) => ids.every((id) => {
  const imgs = vue ? [...document.querySelectorAll(`[data-node-id="${id}"] img`)]
                   : window.comfyAPI.app.app.graph.getNodeById(id).imgs ?? [];
  return imgs.length > 0 && imgs.every((img) => img.complete && img.naturalWidth > 0);
})"""
JS_VIEW = """([nodeId, x, y, scale]) => {  // node nodeId's corner at (x, y) on screen, at this zoom
  const app = window.comfyAPI.app.app;
  const pos = app.graph.getNodeById(nodeId).pos;
  app.canvas.ds.scale = scale;
  app.canvas.ds.offset = [x / scale - pos[0], y / scale - pos[1]];
  app.canvas.setDirty(true, true);
}"""
JS_FIT_VIEW = """() => {  // every node on screen
  const app = window.comfyAPI.app.app;
  const nodes = app.graph.nodes;
  const left = Math.min(...nodes.map((n) => n.pos[0]));
  const top = Math.min(...nodes.map((n) => n.pos[1] - LiteGraph.NODE_TITLE_HEIGHT));
  const right = Math.max(...nodes.map((n) => n.pos[0] + n.size[0]));
  const bottom = Math.max(...nodes.map((n) => n.pos[1] + n.size[1]));
  const margin = 80;
  const { clientWidth, clientHeight } = app.canvas.canvas;
  const scale = Math.min((clientWidth - 2 * margin) / (right - left), (clientHeight - 2 * margin) / (bottom - top));
  app.canvas.ds.scale = scale;
  app.canvas.ds.offset = [margin / scale - left, margin / scale - top];
  app.canvas.setDirty(true, true);
}"""
JS_NEW_NODE_CHOICES = "([type, name]) => [...LiteGraph.createNode(type).widgets.find((w) => w.name === name).options.values]"
JS_PROMPT_INPUTS = "async (id) => (await window.comfyAPI.app.app.graphToPrompt()).output[String(id)].inputs"


def check_errors(errors: list[str], when: str) -> None:
    """Fail on any browser error from this pack (its extension files or its /w2w routes) and on any uncaught
    exception outside the frontend's own bundle; print the host's own errors (its probes for optional per-user
    files such as user.css answer 404 on a new profile; a newer frontend asks for routes this ComfyUI lacks;
    external hosts are unreachable offline)."""
    ours = [e for e in errors if f"/extensions/{PACK_DIRNAME}/" in e or "/w2w/" in e or "w2w.js" in e]
    foreign = [e for e in errors if e.startswith("page error") and "/assets/" not in e.split("\n", 1)[-1]]
    host = [e for e in errors if e not in ours]
    if host:
        print(f"\nbrowser errors {when} from ComfyUI's own frontend (not this pack):\n  " + "\n  ".join(
            e.splitlines()[0][:200] for e in host), flush=True)
    assert not ours, f"errors from the w2w extension {when}:\n" + "\n".join(ours)
    assert not foreign, f"uncaught exceptions outside the frontend bundle {when}:\n" + "\n".join(foreign)
    errors.clear()


def save_screenshot(page, tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    page.screenshot(path=str(path))
    print(f"\nbrowser screenshot: {path}", flush=True)
    artifacts = os.environ.get("W2W_TEST_ARTIFACTS")
    if artifacts:
        Path(artifacts).mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, Path(artifacts) / path.name)
        print(f"copied to {Path(artifacts) / path.name}", flush=True)
    return path


@contextlib.contextmanager
def ui_page(browser_api, server, frontend, tmp_path: Path, name: str):
    """(page, errors): the UI of `server` loaded in a new headless Chromium profile, its start-up workflow settled;
    a screenshot is saved if the block fails."""
    sync_api, executable = browser_api
    errors: list[str] = []
    with sync_api.sync_playwright() as playwright:
        context = launch(playwright, executable, tmp_path / "profile")
        page = context.pages[0] if context.pages else context.new_page()
        page.on("console", lambda m: errors.append(f"console.{m.type}: {m.text} at {m.location}") if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(f"page error: {e} {e.stack}"))
        page.on("response", lambda r: errors.append(f"HTTP {r.status} {r.url}") if r.status >= 400 else None)
        page.on("requestfailed", lambda r: errors.append(f"failed {r.url} {r.failure}"))
        try:
            page.goto(server.url, wait_until="load", timeout=180_000)
            try:
                page.wait_for_function(JS_APP_READY, timeout=180_000)
            except sync_api.TimeoutError:
                pytest.fail("the UI or the w2w extension did not load within 180 s; browser errors:\n" + "\n".join(errors))
            # the frontend opens its own start-up workflow after the first requests: ours is loaded once it is there
            page.wait_for_load_state("networkidle", timeout=180_000)
            page.wait_for_function("() => window.comfyAPI.app.app.vueAppReady !== false", timeout=60_000)
            page.wait_for_function("() => window.comfyAPI.app.app.graph.nodes.length > 0", timeout=60_000)
            version = page.evaluate("() => window.__COMFYUI_FRONTEND_VERSION__")
            assert version == frontend.version, f"the page runs frontend {version}, expected {frontend.version}"
            yield page, errors
        except BaseException:
            save_screenshot(page, tmp_path, f"w2w-browser-{frontend.name}-{name}-failure.png")
            raise
        finally:
            context.close()


def load_workflow(page, frontend, workflow: dict) -> None:
    page.evaluate("async (wf) => { await window.comfyAPI.app.app.loadGraphData(wf); }", workflow)
    count = len(workflow["nodes"])
    page.wait_for_function("(n) => window.comfyAPI.app.app.graph.nodes.length === n", arg=count, timeout=60_000)
    if frontend.vue_nodes:  # every node drawn as DOM
        page.wait_for_function(f"(n) => ({JS_VUE_NODES})() === n", arg=count, timeout=60_000)


# Combo widgets as a user works them: the canvas renderer opens a LiteGraph context menu (with the frontend's filter
# box), the Vue renderer a listbox (with a search box when the list is long).
def open_combo(page, frontend, node_id: int, widget: str):
    """Click the combo widget (as a user); the menu locator."""
    if frontend.vue_nodes:
        page.locator(f'[data-node-id="{node_id}"] [data-widget-name="{widget}"] [role="combobox"]').first.click()
        menu = page.get_by_role("listbox")
    else:
        x, y = page.evaluate(JS_WIDGET_POINT, [node_id, widget])
        page.mouse.click(x, y)
        menu = page.locator(".litecontextmenu")
    menu.wait_for(state="visible", timeout=10_000)
    return menu


def menu_entries(frontend, menu, visible_only: bool = False):
    selector = '[role="option"]' if frontend.vue_nodes else ".litemenu-entry"
    return menu.locator(selector + (":visible" if visible_only else ""))


def click_in_combo(page, frontend, node_id: int, widget: str, entry: str) -> None:
    menu = open_combo(page, frontend, node_id, widget)
    menu_entries(frontend, menu).filter(has_text=re.compile(f"^{re.escape(entry)}$")).first.click()
    menu.wait_for(state="hidden", timeout=10_000)


def combo_choices(page, frontend, node_id: int, widget: str) -> list[str]:
    """The entries the combo's menu shows; the menu is closed again (Escape)."""
    menu = open_combo(page, frontend, node_id, widget)
    entries = [text.strip() for text in menu_entries(frontend, menu).all_inner_texts()]
    close_menu(page, frontend, menu)
    return entries


def close_menu(page, frontend, menu) -> None:
    """Escape closes the menu as a user closes it. The canvas renderer's filter box handles Escape once it has the
    focus, which it takes a moment after the menu shows: press it there, and again if the first press came early."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    for _ in range(3):
        box = None if frontend.vue_nodes else menu.locator(".comfy-context-menu-filter")
        if box is not None and box.count():
            box.first.press("Escape")
        else:
            page.keyboard.press("Escape")
        try:
            menu.wait_for(state="hidden", timeout=3_000)
            return
        except PlaywrightTimeout:
            continue
    menu.wait_for(state="hidden", timeout=1_000)  # fails naming the menu that stayed open


def search_in_combo(page, sync_api, frontend, node_id: int, widget: str, text: str) -> None:
    """Type ``text`` in the menu's filter box; exactly one entry must stay; Enter picks it."""
    menu = open_combo(page, frontend, node_id, widget)
    if frontend.vue_nodes:
        box = page.get_by_role("combobox", name="Search")
        box.fill(text)
    else:  # the canvas menu filters on key events: type as a user does (fill alone was missed once on a busy CPU)
        box = menu.locator(".comfy-context-menu-filter")
        box.press_sequentially(text, delay=50)
    shown = menu_entries(frontend, menu, visible_only=True)
    sync_api.expect(shown, f"filter {text!r} in the {widget} menu must leave one entry").to_have_count(1, timeout=10_000)
    box.press("Enter")
    menu.wait_for(state="hidden", timeout=10_000)


def wait_summary(page, sync_api, node_id: int, expected: str) -> dict:
    """Load w2w Space's summary once it shows `expected` on screen; fail with what it shows otherwise. A longer text
    makes the node grow on the next frames: the summary is returned once it is whole, or after 10 s as it is then
    (check_summary names what is cut off)."""
    try:
        page.wait_for_function(f"(id) => {{ const s = ({JS_SUMMARY})(id); return s && s.shown && "
                               f"s.text.includes({json.dumps(expected)}); }}", arg=node_id, timeout=60_000)
    except sync_api.TimeoutError:
        pytest.fail(f"Load w2w Space does not show {expected!r} on screen: {page.evaluate(JS_SUMMARY, node_id)}")
    with contextlib.suppress(sync_api.TimeoutError):
        page.wait_for_function(f"(id) => ({JS_SUMMARY})(id).whole", arg=node_id, timeout=10_000)
    return page.evaluate(JS_SUMMARY, node_id)


def check_summary(summary: dict, frontend, attributes: tuple) -> None:
    text = summary["text"]
    assert text.splitlines() == summary["lines"], summary
    assert f"{PCS} PCs" in text and "training coefficients: yes (64 identities)" in text, text
    assert f"attributes ({len(attributes)}): " + ", ".join(attributes) in text, text
    assert summary["whole"], f"the summary is cut off on the node: {summary}"
    if frontend.vue_nodes:
        assert summary["inNode"], "the summary is not inside the node's element"


def test_frontend_registers_pack(browser_api, ui_server, frontend, tmp_path):
    """The frontend registers every W2W node of the server and the w2w.frontend extension, with the renderer under test."""
    ids = w2w_node_ids(ui_server)
    with ui_page(browser_api, ui_server, frontend, tmp_path, "register") as (page, errors):
        state = page.evaluate(JS_FRONTEND)
        assert state["nodeTypes"] == ids, f"the frontend registered {state['nodeTypes']}, the server has {ids}"
        assert "w2w.frontend" in state["extensions"], state["extensions"]
        workflow = json.loads(WORKFLOW.read_text(encoding="utf-8"))
        load_workflow(page, frontend, workflow)
        drawn_as_dom = page.evaluate(JS_VUE_NODES)
        if frontend.vue_nodes:
            assert state["vueSetting"] is True and drawn_as_dom == len(workflow["nodes"]), (state, drawn_as_dom)
        else:
            assert drawn_as_dom == 0, f"{drawn_as_dom} nodes drawn as DOM: not the canvas renderer"
        save_screenshot(page, tmp_path, f"w2w-browser-{frontend.name}-loaded.png")
        check_errors(errors, "on load")


def test_edit_workflow_in_browser(browser_api, ui_server, frontend, tmp_path):
    sync_api, _ = browser_api
    workflow = json.loads(WORKFLOW.read_text(encoding="utf-8"))
    with ui_page(browser_api, ui_server, frontend, tmp_path, "edit") as (page, errors):
        load_workflow(page, frontend, workflow)
        check_errors(errors, "on load")

        # tiny graph on the stand-in checkpoint and the small spaces
        standin = next(p.name for p in (ui_server.base / "models" / "checkpoints").iterdir())
        page.evaluate(JS_SET, [1, "ckpt_name", standin])
        page.evaluate(JS_SET, [8, "width", 64])
        page.evaluate(JS_SET, [8, "height", 64])
        for sampler in (9, 15):
            page.evaluate(JS_SET, [sampler, "steps", 1])
        page.evaluate(JS_SET, [LOAD_SPACE_ID, "pcs", PCS])
        page.evaluate(JS_SET, [SAMPLE_ID, "pcs", PCS])
        page.evaluate(JS_SET, [EDIT_IDS[0], "debias", ""])
        # Load w2w Space and both Apply Edit Direction nodes in view at 100 %, below the frontend's notices
        page.evaluate(JS_VIEW, [LOAD_SPACE_ID, 120, 420, 1.0])

        # the space, chosen with clicks, drives the summary and the attribute lists of both Apply Edit Direction nodes
        click_in_combo(page, frontend, LOAD_SPACE_ID, "space", SPACE_A)
        page.wait_for_function(JS_ATTRIBUTES_ARE, arg=[list(EDIT_IDS), list(SPACES[SPACE_A])], timeout=60_000)
        check_summary(wait_summary(page, sync_api, LOAD_SPACE_ID, "attributes (5)"), frontend, SPACES[SPACE_A])
        assert sorted(combo_choices(page, frontend, EDIT_IDS[1], "attribute")) == sorted(SPACES[SPACE_A])
        click_in_combo(page, frontend, LOAD_SPACE_ID, "space", SPACE_B)
        page.wait_for_function(JS_ATTRIBUTES_ARE, arg=[list(EDIT_IDS), list(SPACES[SPACE_B])], timeout=60_000)
        check_summary(wait_summary(page, sync_api, LOAD_SPACE_ID, "attributes (6)"), frontend, SPACES[SPACE_B])
        for edit_id in EDIT_IDS:  # what the user sees in each menu, not only the widget's state
            assert sorted(combo_choices(page, frontend, edit_id, "attribute")) == sorted(SPACES[SPACE_B]), edit_id
        # searchable: the attribute menu filters as one types
        search_in_combo(page, sync_api, frontend, EDIT_IDS[1], "attribute", "wav")
        assert page.evaluate(JS_WIDGET, [EDIT_IDS[1], "attribute"])["value"] == "Wavy_Hair"
        # each node has its own list: a new Apply Edit Direction still offers the server's own choices
        status, info = get(ui_server, "/object_info/W2WApplyEditDirection")
        spec = info["W2WApplyEditDirection"]["input"]["required"]["attribute"]
        server_choices = spec[1]["options"] if spec[0] == "COMBO" else spec[0]
        assert page.evaluate(JS_NEW_NODE_CHOICES, ["W2WApplyEditDirection", "attribute"]) == server_choices
        # the summary is display only: never sent with the prompt
        assert page.evaluate(JS_PROMPT_INPUTS, LOAD_SPACE_ID) == {"space": SPACE_B, "pcs": PCS}
        save_screenshot(page, tmp_path, f"w2w-browser-{frontend.name}-space.png")  # Load w2w Space, Apply Edit

        # the whole graph in view (the canvas only draws, and so only loads the images of, visible nodes)
        page.evaluate(JS_FIT_VIEW)
        started = time.monotonic()
        known = set(get(ui_server, "/history")[1])
        page.evaluate("async () => { await window.comfyAPI.app.app.queuePrompt(0, 1); }")
        wait_for_run(ui_server, known, RUN_TIMEOUT_S)
        try:
            page.wait_for_function(JS_OUTPUT_SHOWN, arg=[list(SAVE_IDS), frontend.vue_nodes], timeout=60_000)
        except sync_api.TimeoutError:
            pytest.fail(f"the graph ran but Save Image nodes {SAVE_IDS} show no image 60 s later")
        print(f"graph ran and its images appeared in {time.monotonic() - started:.1f} s", flush=True)
        save_screenshot(page, tmp_path, f"w2w-browser-{frontend.name}-overview.png")  # output images on Save Image
        check_errors(errors, "while editing and running")
    queue = get(ui_server, "/history?max_items=5")[1]
    outputs = [o for entry in queue.values() for o in entry.get("outputs", {}).values() if "images" in o]
    assert len(outputs) >= 2, f"history lists {len(outputs)} image outputs"


JS_INTO_SUBGRAPH = """async ([loadId, editIds, space]) => {
  const app = window.comfyAPI.app.app;
  const items = new Set([loadId, ...editIds].map((id) => app.graph.getNodeById(id)));
  const { node } = app.graph.convertToSubgraph(items);
  const inner = node.subgraph.nodes;
  const load = inner.find((n) => n.type === "W2WLoadSpace");
  const edits = inner.filter((n) => n.type === "W2WApplyEditDirection");
  const choose = async (name) => {
    const widget = load.widgets.find((x) => x.name === "space");
    widget.value = name;
    await window.w2w.refreshAll();
    return edits.map((e) => [...e.widgets.find((x) => x.name === "attribute").options.values].sort());
  };
  const first = await choose(space[0]);
  const second = await choose(space[1]);
  return {
    rootIds: app.graph.nodes.map((n) => n.id), outer: node.id, edits: edits.length, first, second,
    inAll: edits.every((e) => window.w2w.allNodes().includes(e)),
    found: edits.every((e) => window.w2w.findNode(`${node.id}:${e.id}`) === e),
  };
}"""


def test_nodes_inside_a_subgraph_follow_their_space(browser_api, ui_server, frontend, tmp_path):
    """A user who groups Load w2w Space and Apply Edit Direction into a subgraph keeps the attribute lists that follow
    the chosen space (the nodes live in the subgraph's own graph, not the root graph), and progress events addressed
    'outer:inner' reach the inner node."""
    workflow = json.loads(WORKFLOW.read_text(encoding="utf-8"))
    with ui_page(browser_api, ui_server, frontend, tmp_path, "subgraph") as (page, errors):
        load_workflow(page, frontend, workflow)
        check_errors(errors, "on load")
        got = page.evaluate(JS_INTO_SUBGRAPH, [LOAD_SPACE_ID, list(EDIT_IDS), [SPACE_A, SPACE_B]])
        assert got["edits"] == len(EDIT_IDS) and LOAD_SPACE_ID not in got["rootIds"], got
        assert got["first"] == [sorted(SPACES[SPACE_A])] * len(EDIT_IDS), got
        assert got["second"] == [sorted(SPACES[SPACE_B])] * len(EDIT_IDS), got
        assert got["inAll"] and got["found"], got
        check_errors(errors, "with the nodes in a subgraph")


INVERT_WORKFLOW = REPO / "example_workflows" / "invert_image.json"
INVERT_ID, INVERT_STEPS = 4, 20
JS_WATCH_PREVIEWS = """() => {
  window.__w2wPreviews = [];
  const api = window.comfyAPI.api.api;
  for (const event of ["b_preview_with_metadata", "b_preview"]) {
    api.addEventListener(event, ({ detail }) => window.__w2wPreviews.push(String(detail?.nodeId ?? detail?.displayNodeId ?? "")));
  }
}"""
# The last step's text once the event reported it: on screen (inside the node's element with the Vue renderer) and,
# with the canvas renderer, the value of one of the node's own (DOM) widgets.
JS_STEP_TEXT = """([nodeId, steps, vue]) => {
  const node = window.comfyAPI.app.app.graph.getNodeById(nodeId);
  if (node.w2wProgress?.step !== steps) return null;
  const pattern = new RegExp(`step ${steps}/${steps} · loss \\\\d+\\\\.\\\\d{4}`);
  const root = vue ? document.querySelector(`[data-node-id="${nodeId}"]`) : document.body;
  const shown = [...(root?.querySelectorAll("*") ?? [])].find((el) => !el.children.length &&
    pattern.test(el.textContent) && el.checkVisibility() && el.getBoundingClientRect().width > 0);
  const onNode = vue || (node.widgets ?? []).some((w) => pattern.test(String(w.value ?? "")));
  return shown && onNode ? {text: shown.textContent.trim(), progress: node.w2wProgress} : null;
}"""


def test_live_inversion_in_browser(browser_api, ui_server, frontend, tmp_path):
    """Invert Image to w2w shows step and loss on the node while it runs, and sends progress previews."""
    sync_api, _ = browser_api
    workflow = json.loads(INVERT_WORKFLOW.read_text(encoding="utf-8"))
    with ui_page(browser_api, ui_server, frontend, tmp_path, "invert") as (page, errors):
        load_workflow(page, frontend, workflow)
        standin = next(p.name for p in (ui_server.base / "models" / "checkpoints").iterdir())
        for node_id, name, value in ((1, "ckpt_name", standin), (2, "space", SPACE_B), (2, "pcs", PCS),
                                     (INVERT_ID, "preset", "custom"), (INVERT_ID, "pcs", PCS),
                                     (INVERT_ID, "steps", INVERT_STEPS), (INVERT_ID, "lr", 0.1),
                                     (INVERT_ID, "resolution", 64), (INVERT_ID, "face", "off"),  # no face here
                                     (8, "width", 64), (8, "height", 64), (9, "steps", 1)):
            page.evaluate(JS_SET, [node_id, name, value])
        page.evaluate("() => window.w2w.refreshAll()")
        page.evaluate(JS_WATCH_PREVIEWS)
        started = time.monotonic()
        page.evaluate("async () => { await window.comfyAPI.app.app.queuePrompt(0, 1); }")
        try:
            shown = page.wait_for_function(JS_STEP_TEXT, arg=[INVERT_ID, INVERT_STEPS, frontend.vue_nodes],
                                           timeout=RUN_TIMEOUT_S * 1000, polling=500).json_value()
        except sync_api.TimeoutError:
            state = page.evaluate(f"() => window.comfyAPI.app.app.graph.getNodeById({INVERT_ID}).w2wProgress")
            pytest.fail(f"Invert Image to w2w never showed step {INVERT_STEPS}/{INVERT_STEPS} on screen; last event {state}")
        print(f"inversion reached step {INVERT_STEPS} on screen in {time.monotonic() - started:.1f} s", flush=True)
        previews = page.evaluate("() => window.__w2wPreviews")
        save_screenshot(page, tmp_path, f"w2w-browser-{frontend.name}-invert.png")
        check_errors(errors, "while inverting")
    progress = shown["progress"]
    assert progress["total"] == INVERT_STEPS and progress["loss"] == progress["loss"] and progress["loss"] > 0
    # the text on the node is the server's, for the same step as the event
    assert shown["text"] == f"step {INVERT_STEPS}/{INVERT_STEPS} · loss {progress['loss']:.4f}", shown
    # one preview every PREVIEW_EVERY (10) steps: at least 2 for 20 steps, all from the Invert node
    assert previews.count(str(INVERT_ID)) >= INVERT_STEPS // 10, previews
