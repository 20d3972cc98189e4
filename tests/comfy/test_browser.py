"""End to end in a real browser: the real ComfyUI server, its real frontend (comfyui-frontend-package) and this
pack's web extension, driven in headless Chromium through Playwright.

One ComfyUI is started headless (`demo.run.ComfyServer`, installed frontend) with the SD1.5 stand-in checkpoint and
two small synthetic spaces whose attributes differ. The browser loads example_workflows/w2w_edit_identity.json,
shrinks it (64x64, 1 step), switches the space with real clicks, sees the attribute list follow, searches the
attribute menu, queues the graph and waits for the output image. A screenshot is saved (path printed; copied to
$W2W_TEST_ARTIFACTS when set). Skipped loudly when Playwright or Chromium is missing (see browserhost.py).
"""
from __future__ import annotations

import json
import os
import shutil
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from browserhost import HOW_TO_PROVIDE, find_browser, launch
from demo.locate import PACK_DIRNAME
from demo.run import ComfyServer, prepare_base_dir

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
        message = f"BROWSER TEST SKIPPED: {found}; to run it, {HOW_TO_PROVIDE}"
        print("\n" + "!" * 100 + "\n" + message + "\n" + "!" * 100, flush=True)
        pytest.skip(message)
    return sync_api, found


@pytest.fixture(scope="module")
def ui_server(comfyui_path, sd15_standin, tmp_path_factory):
    from w2w.convert import convert_release
    from w2w.synthetic import write_release

    root = tmp_path_factory.mktemp("browser")
    stage = [("checkpoints", Path(sd15_standin))]
    for i, (name, attributes) in enumerate(SPACES.items()):
        release = root / f"release-{i}"
        write_release(str(release), pcs=PCS, models=64, attributes=attributes, seed=10 + i)
        convert_release(str(release), str(root / name))
        stage.append(("w2w", root / name))
    base = root / "base"
    prepare_base_dir(base, None, stage)
    from PIL import Image  # a 64x64 photo stand-in for Load Image in invert_image.json

    Image.radial_gradient("L").resize((64, 64)).convert("RGB").save(base / "input" / "example.png")
    # a returning user: no first-run template browser over the canvas
    settings = base / "user" / "default" / "comfy.settings.json"
    settings.parent.mkdir(parents=True, exist_ok=True)
    settings.write_text(json.dumps({"Comfy.TutorialCompleted": True}), encoding="utf-8")
    # UNet stored in float16 (computed in float32), as in the in-process host: half the memory of the CPU default
    with ComfyServer(comfyui_path, base, installed_frontend=True, extra_args=("--fp16-unet",)) as server:
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
    status, listing = get(ui_server, "/object_info")
    ids = sorted(k for k in listing if k.startswith("W2W"))
    assert "W2WLoadSpace" in ids and "W2WApplyEditDirection" in ids
    for node_id in ids:
        status, text = get(ui_server, f"/extensions/{PACK_DIRNAME}/docs/{node_id}.md")
        assert status == 200 and f"# " in text, f"no help page for {node_id}"


# ---- in the page ----------------------------------------------------------------------------------------------
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
JS_OUTPUT_SHOWN = """(ids) => ids.every((id) => {
  const imgs = window.comfyAPI.app.app.graph.getNodeById(id).imgs;
  return imgs && imgs.length > 0 && imgs[0].complete && imgs[0].naturalWidth > 0;
})"""


def open_combo(page, node_id: int, widget: str):
    """Click the combo widget on the canvas (as a user); the menu locator."""
    x, y = page.evaluate(JS_WIDGET_POINT, [node_id, widget])
    page.mouse.click(x, y)
    menu = page.locator(".litecontextmenu")
    menu.wait_for(state="visible", timeout=10_000)
    return menu


def click_in_combo(page, node_id: int, widget: str, entry: str) -> None:
    menu = open_combo(page, node_id, widget)
    menu.locator(".litemenu-entry", has_text=entry).first.click()
    menu.wait_for(state="detached", timeout=10_000)


def search_in_combo(page, node_id: int, widget: str, text: str) -> None:
    """Type ``text`` in the menu's filter box; exactly one entry must stay; Enter picks it."""
    menu = open_combo(page, node_id, widget)
    menu_filter = menu.locator(".comfy-context-menu-filter")
    menu_filter.fill(text)
    shown = menu.locator(".litemenu-entry:visible")
    assert shown.count() == 1, f"filter {text!r} left {shown.all_inner_texts()} in the {widget} menu"
    menu_filter.press("Enter")
    menu.wait_for(state="detached", timeout=10_000)


def check_errors(errors: list[str], when: str) -> None:
    """Fail on any browser error from this pack (its extension files or its /w2w routes) and on any uncaught
    exception outside the frontend's own bundle; print the host's own errors (its probes for optional per-user
    files such as user.css answer 404 on a new profile; external hosts are unreachable offline)."""
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


def test_edit_workflow_in_browser(browser_api, ui_server, tmp_path):
    sync_api, executable = browser_api
    workflow = json.loads(WORKFLOW.read_text(encoding="utf-8"))
    errors: list[str] = []
    with sync_api.sync_playwright() as playwright:
        context = launch(playwright, executable, tmp_path / "profile")
        try:
            page = context.pages[0] if context.pages else context.new_page()
            page.on("console", lambda m: errors.append(f"console.{m.type}: {m.text} at {m.location}") if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(f"page error: {e} {e.stack}"))
            page.on("response", lambda r: errors.append(f"HTTP {r.status} {r.url}") if r.status >= 400 else None)
            page.on("requestfailed", lambda r: errors.append(f"failed {r.url} {r.failure}"))
            page.goto(ui_server.url, wait_until="load", timeout=180_000)
            try:
                page.wait_for_function("() => window.w2w && window.comfyAPI?.app?.app?.graph", timeout=180_000)
            except sync_api.TimeoutError:
                pytest.fail("the UI or the w2w extension did not load within 180 s; browser errors:\n" + "\n".join(errors))
            # the frontend opens its own start-up workflow after the first requests: load ours once it settled
            page.wait_for_load_state("networkidle", timeout=180_000)
            page.wait_for_function("() => window.comfyAPI.app.app.vueAppReady !== false", timeout=60_000)
            page.wait_for_timeout(1000)
            page.evaluate("async (wf) => { await window.comfyAPI.app.app.loadGraphData(wf); }", workflow)
            page.wait_for_timeout(2000)
            assert page.evaluate("() => window.comfyAPI.app.app.graph.nodes.length") == len(workflow["nodes"])
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

            # the space, chosen with clicks, drives the attribute lists of both Apply Edit Direction nodes
            click_in_combo(page, LOAD_SPACE_ID, "space", SPACE_A)
            page.wait_for_function(JS_ATTRIBUTES_ARE, arg=[list(EDIT_IDS), list(SPACES[SPACE_A])], timeout=60_000)
            lines_a = page.evaluate(f"() => window.comfyAPI.app.app.graph.getNodeById({LOAD_SPACE_ID}).w2wLines")
            assert any(f"{PCS} PCs" in line for line in lines_a), lines_a
            assert any("training coefficients: yes (64 identities)" in line for line in lines_a), lines_a
            click_in_combo(page, LOAD_SPACE_ID, "space", SPACE_B)
            page.wait_for_function(JS_ATTRIBUTES_ARE, arg=[list(EDIT_IDS), list(SPACES[SPACE_B])], timeout=60_000)
            assert page.evaluate(JS_WIDGET, [EDIT_IDS[0], "attribute"])["values"] != list(SPACES[SPACE_A])
            # searchable: the attribute menu filters as one types
            search_in_combo(page, EDIT_IDS[1], "attribute", "wav")
            assert page.evaluate(JS_WIDGET, [EDIT_IDS[1], "attribute"])["value"] == "Wavy_Hair"

            # the whole graph in view (the canvas only draws, and so only loads the images of, visible nodes)
            page.evaluate("() => { const app = window.comfyAPI.app.app; app.canvas.ds.scale = 0.55; "
                          "app.canvas.ds.offset = [20, 40]; app.graph.setDirtyCanvas(true, true); }")
            started = time.monotonic()
            page.evaluate("async () => { await window.comfyAPI.app.app.queuePrompt(0, 1); }")
            page.wait_for_function(JS_OUTPUT_SHOWN, arg=list(SAVE_IDS), timeout=RUN_TIMEOUT_S * 1000, polling=1000)
            print(f"graph ran and its images appeared in {time.monotonic() - started:.1f} s", flush=True)
            page.wait_for_timeout(500)
            save_screenshot(page, tmp_path, "w2w-browser-overview.png")  # whole graph, output images on Save Image
            # readable close-up: Load w2w Space with its info, the two Apply Edit Direction nodes
            page.evaluate("() => { const app = window.comfyAPI.app.app; const n = app.graph.getNodeById(2); "
                          "app.canvas.ds.scale = 1.1; app.canvas.ds.offset = [40 - n.pos[0], 120 - n.pos[1]]; "
                          "app.graph.setDirtyCanvas(true, true); }")
            page.wait_for_timeout(500)
            save_screenshot(page, tmp_path, "w2w-browser-space.png")
            check_errors(errors, "while editing and running")
        except BaseException:
            failed = tmp_path / "w2w-browser-failure.png"
            page.screenshot(path=str(failed))
            print(f"\nscreenshot at the failure: {failed}", flush=True)
            raise
        finally:
            context.close()
    queue = get(ui_server, "/history?max_items=5")[1]
    outputs = [o for entry in queue.values() for o in entry.get("outputs", {}).values() if "images" in o]
    assert len(outputs) >= 2, f"history lists {len(outputs)} image outputs"


INVERT_WORKFLOW = REPO / "example_workflows" / "invert_image.json"
INVERT_ID, INVERT_STEPS = 4, 20
JS_WATCH_PREVIEWS = """() => {
  window.__w2wPreviews = [];
  const api = window.comfyAPI.api.api;
  for (const event of ["b_preview_with_metadata", "b_preview"]) {
    api.addEventListener(event, ({ detail }) => window.__w2wPreviews.push(String(detail?.nodeId ?? detail?.displayNodeId ?? "")));
  }
}"""


def test_live_inversion_in_browser(browser_api, ui_server, tmp_path):
    """Invert Image to w2w shows step and loss on the node while it runs, and sends progress previews."""
    sync_api, executable = browser_api
    workflow = json.loads(INVERT_WORKFLOW.read_text(encoding="utf-8"))
    errors: list[str] = []
    with sync_api.sync_playwright() as playwright:
        context = launch(playwright, executable, tmp_path / "profile")
        try:
            page = context.pages[0] if context.pages else context.new_page()
            page.on("pageerror", lambda e: errors.append(f"page error: {e} {e.stack}"))
            page.goto(ui_server.url, wait_until="load", timeout=180_000)
            page.wait_for_function("() => window.w2w && window.comfyAPI?.app?.app?.graph", timeout=180_000)
            page.wait_for_load_state("networkidle", timeout=180_000)
            page.wait_for_timeout(1000)
            page.evaluate("async (wf) => { await window.comfyAPI.app.app.loadGraphData(wf); }", workflow)
            page.wait_for_timeout(2000)
            standin = next(p.name for p in (ui_server.base / "models" / "checkpoints").iterdir())
            for node_id, name, value in ((1, "ckpt_name", standin), (2, "space", SPACE_B), (2, "pcs", PCS),
                                         (INVERT_ID, "preset", "custom"), (INVERT_ID, "pcs", PCS),
                                         (INVERT_ID, "steps", INVERT_STEPS), (INVERT_ID, "lr", 0.1),
                                         (INVERT_ID, "resolution", 64), (8, "width", 64), (8, "height", 64),
                                         (9, "steps", 1)):
                page.evaluate(JS_SET, [node_id, name, value])
            page.evaluate("() => window.w2w.refreshAll()")
            page.evaluate(JS_WATCH_PREVIEWS)
            page.evaluate("async () => { await window.comfyAPI.app.app.queuePrompt(0, 1); }")
            page.wait_for_function(f"() => window.comfyAPI.app.app.graph.getNodeById({INVERT_ID}).w2wProgress?.step "
                                   f"=== {INVERT_STEPS}", timeout=RUN_TIMEOUT_S * 1000, polling=500)
            progress = page.evaluate(f"() => window.comfyAPI.app.app.graph.getNodeById({INVERT_ID}).w2wProgress")
            previews = page.evaluate("() => window.__w2wPreviews")
            save_screenshot(page, tmp_path, "w2w-browser-invert.png")
        finally:
            context.close()
    assert progress["total"] == INVERT_STEPS and progress["loss"] == progress["loss"] and progress["loss"] > 0
    # one preview every PREVIEW_EVERY (10) steps: at least 2 for 20 steps, all from the Invert node
    assert previews.count(str(INVERT_ID)) >= INVERT_STEPS // 10, previews
    assert not [e for e in errors if "/assets/" not in e.split("\n", 1)[-1]], errors
