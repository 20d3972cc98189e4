// w2w for ComfyUI: browser side of the node pack. Works with both node renderers of the ComfyUI frontend (the
// LiteGraph canvas and the Vue "Nodes 2.0" renderer): nothing is drawn on the canvas; text is shown in DOM widgets
// or sent by the server as progress text, and widget edits are followed through the widgets' callbacks.
// - Apply Edit Direction offers exactly the attributes of the space chosen upstream in Load w2w Space
//   (GET /w2w/spaces/{name}); the combo menu has the frontend's filter box, so the list is searchable.
// - Load w2w Space shows what the chosen space holds (PCs, attributes, layout, file size, training coefficients)
//   in a read-only text widget ("summary") that is never saved in the workflow nor sent with the prompt.
// - The inversion nodes show the current step and loss as the node's progress text, sent by the server
//   (nodes/inversion.py); the event "w2w.invert.progress" keeps the latest values on the node (node.w2wProgress).
//   Their preview images arrive through ComfyUI's own progress previews.
import { app } from "../../../scripts/app.js";
import { api } from "../../../scripts/api.js";

const LOAD_SPACE = "W2WLoadSpace";
const EDIT = "W2WApplyEditDirection";
const INVERT_NODES = new Set(["W2WInvertImage", "W2WVAEInvert"]);
const PROGRESS_EVENT = "w2w.invert.progress";
const SUMMARY = "summary"; // the read-only text widget of Load w2w Space
const LINE_HEIGHT = 16;
const MAX_ATTRIBUTES_SHOWN = 6;

const summaries = new Map(); // space name -> Promise of the route's summary (or {error})

function fetchSummary(name) {
  if (!summaries.has(name)) {
    const path = "/w2w/spaces/" + name.split("/").map(encodeURIComponent).join("/");
    const request = api
      .fetchApi(path)
      .then(async (response) => {
        const body = await response.json();
        if (!response.ok) return { error: body.error || `HTTP ${response.status}` };
        return body;
      })
      .catch((error) => ({ error: String(error) }));
    summaries.set(name, request);
  }
  return summaries.get(name);
}

function widget(node, name) {
  return node.widgets?.find((w) => w.name === name);
}

function formatBytes(bytes) {
  const units = ["B", "kB", "MB", "GB"];
  let value = bytes;
  let unit = 0;
  while (value >= 1000 && unit < units.length - 1) {
    value /= 1000;
    unit += 1;
  }
  return `${value.toFixed(unit === 0 ? 0 : 1)} ${units[unit]}`;
}

export function summaryLines(summary) {
  if (!summary) return ["space: loading..."];
  if (summary.error) return ["space: " + summary.error.slice(0, 120)];
  const attrs = summary.attributes;
  const shown = attrs.slice(0, MAX_ATTRIBUTES_SHOWN).join(", ") + (attrs.length > MAX_ATTRIBUTES_SHOWN ? ", ..." : "");
  const layout = summary.layout;
  return [
    `${summary.pcs.toLocaleString("en")} PCs · ${summary.base_model} · ${formatBytes(summary.file_size)}`,
    `layout: ${layout.modules} modules, rank ${layout.rank}, alpha ${layout.alpha}, ${layout.dim.toLocaleString("en")} weights`,
    summary.training_coefficients
      ? `training coefficients: yes (${summary.training_models} identities)`
      : "training coefficients: no (nearest-neighbour, fitting directions unavailable)",
    `attributes (${attrs.length}): ${attrs.length ? shown : "none"}`,
  ];
}

// The Load w2w Space node feeding `node`'s space input (through legacy Reroute nodes), or null.
function spaceSource(node) {
  // a node being configured outside any graph (e.g. while the frontend copies it into a new subgraph) has no links
  if (!node.graph) return null;
  const slot = node.inputs?.findIndex((input) => input.name === "space") ?? -1;
  if (slot < 0) return null;
  let source = node.getInputNode(slot);
  for (let hops = 0; source && source.type === "Reroute" && hops < 32; hops += 1) {
    source = source.graph ? source.getInputNode(0) : null;
  }
  return source && source.type === LOAD_SPACE ? source : null;
}

// Known names only (the widget's choices): a workflow may name a space this server does not have.
function knownSpace(loadNode) {
  const space = widget(loadNode, "space");
  const values = space?.options?.values;
  return Array.isArray(values) && values.includes(space.value) ? space.value : null;
}

// A read-only DOM widget showing `node.w2wLines`: both renderers show the element itself (the canvas renderer
// positions it over the node, the Vue renderer places it among the node's widgets). Not serialised.
function addSummaryWidget(node) {
  const element = document.createElement("div");
  element.className = "w2w-summary";
  Object.assign(element.style, {
    overflow: "auto",
    font: "11px sans-serif",
    lineHeight: `${LINE_HEIGHT}px`,
    color: "var(--descrip-text, #aaa)",
    padding: "4px",
    boxSizing: "border-box",
  });
  const text = document.createElement("div"); // its height is the lines' as wrapped at the node's width
  Object.assign(text.style, { whiteSpace: "pre-wrap", overflowWrap: "anywhere" });
  element.append(text);
  const summary = node.addDOMWidget(SUMMARY, "w2w_summary", element, {
    getValue: () => text.textContent,
    setValue: () => {}, // derived from the space: nothing to restore
    getMinHeight: () => summaryHeight(node, text),
    serialize: false, // never in the prompt sent to the server
  });
  summary.serialize = false; // never in the workflow's widgets_values
  summary.w2wText = text;
  // the text wraps again when the node gets its width or is resized: keep the node tall enough
  const observer = new ResizeObserver(() => fitNode(node));
  observer.observe(text);
  const onRemove = summary.onRemove;
  summary.onRemove = function (...args) {
    observer.disconnect();
    return onRemove?.apply(this, args);
  };
  return summary;
}

// Below this width the element is not laid out on the node yet, and how its text wraps means nothing.
const MIN_LAID_OUT_WIDTH = 120;

function summaryHeight(node, text) {
  const lines = (node.w2wLines?.length ?? 1) * LINE_HEIGHT;
  const wrapped = text.offsetWidth >= MIN_LAID_OUT_WIDTH ? text.offsetHeight : 0;
  return Math.max(lines, wrapped) + 16; // + the padding and the widget's margins
}

// Grow the node to its computed size (never shrink what the user made larger).
function fitNode(node) {
  const height = node.computeSize()[1];
  if (node.size[1] < height) node.setSize([node.size[0], height]);
  if (node.graph) node.setDirtyCanvas(true, true);
}

function showLines(node, lines) {
  node.w2wLines = lines;
  const summary = widget(node, SUMMARY);
  if (summary?.w2wText) summary.w2wText.textContent = lines.join("\n");
  fitNode(node);
}

async function refreshLoadSpace(node) {
  const name = knownSpace(node);
  const chosen = widget(node, "space")?.value;
  node.w2wSummary = null;
  showLines(node, name
    ? summaryLines(null)
    : [chosen ? `${chosen}: not in models/w2w (see the README)` : "no space in models/w2w"]);
  if (!name) return;
  const summary = await fetchSummary(name);
  if (widget(node, "space")?.value !== name) return; // changed meanwhile
  node.w2wSummary = summary;
  showLines(node, summaryLines(summary));
}

// A combo's choices, changed in place: the Vue renderer keeps the array it first saw (and reads it again when the menu
// opens), so a new array would not be shown there. The array given at creation is the node definition's, shared by
// every node of the type: each widget gets its own copy first, at creation, before a renderer reads it.
const OWN_CHOICES = Symbol("w2w own choices");

function setChoices(combo, choices) {
  const values = combo.options.values;
  if (Array.isArray(values) && values[OWN_CHOICES]) {
    values.splice(0, values.length, ...choices);
  } else {
    const own = [...choices];
    own[OWN_CHOICES] = true;
    combo.options.values = own; // a property of the same options object; the object itself is never replaced
  }
}

async function refreshEdit(node) {
  const attribute = widget(node, "attribute");
  const source = spaceSource(node);
  const name = source && knownSpace(source);
  if (!attribute || !name) return;
  const summary = await fetchSummary(name);
  if (summary.error || !summary.attributes.length) return; // keep the list; execution reports the problem
  setChoices(attribute, summary.attributes);
  if (!summary.attributes.includes(attribute.value)) attribute.value = summary.attributes[0];
  node.w2wSpace = name;
  node.setDirtyCanvas(true, true);
}

// Every node of the workflow: the root graph's and those inside subgraphs (frontends with subgraphs keep each
// subgraph's nodes in its own graph, reached through the subgraph node's `subgraph`).
function allNodes() {
  const found = [];
  const seen = new Set();
  const visit = (graph) => {
    if (!graph || seen.has(graph)) return;
    seen.add(graph);
    for (const node of graph.nodes ?? graph._nodes ?? []) {
      found.push(node);
      if (node.subgraph) visit(node.subgraph);
    }
  };
  visit(app.graph);
  for (const graph of app.graph?.subgraphs?.values?.() ?? []) visit(graph); // definitions not placed anywhere
  return found;
}

function refreshAll() {
  return Promise.all(
    allNodes().map((node) =>
      node.type === LOAD_SPACE ? refreshLoadSpace(node) : node.type === EDIT ? refreshEdit(node) : null
    )
  );
}

// Both renderers call a widget's callback when the user changes its value (the Vue renderer may not call the
// node's onWidgetChanged).
function followWidget(node, name, onChange) {
  const target = widget(node, name);
  if (!target) return;
  const callback = target.callback;
  target.callback = function (...args) {
    const result = callback?.apply(this, args);
    onChange();
    return result;
  };
}

// A node by the id the server reports: "12" on the root graph, "7:12" for node 12 inside subgraph node 7.
function findNode(id) {
  const direct = app.graph?.getNodeById(id);
  if (direct) return direct;
  const path = String(id).split(":");
  let graph = app.graph;
  for (const part of path.slice(0, -1)) {
    graph = (graph?.getNodeById(part) ?? graph?.getNodeById(Number(part)))?.subgraph;
  }
  const last = path[path.length - 1];
  return graph?.getNodeById(last) ?? graph?.getNodeById(Number(last)) ?? null;
}

app.registerExtension({
  name: "w2w.frontend",

  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name === LOAD_SPACE) {
      // onNodeCreated runs once the node has its widgets (node.type may not be set yet in newer frontends)
      const onNodeCreated = nodeType.prototype.onNodeCreated;
      nodeType.prototype.onNodeCreated = function (...args) {
        const result = onNodeCreated?.apply(this, args);
        addSummaryWidget(this);
        followWidget(this, "space", () => refreshAll()); // its summary and every Apply Edit Direction list
        refreshLoadSpace(this);
        return result;
      };
    }
    if (nodeData.name === EDIT) {
      const onNodeCreated = nodeType.prototype.onNodeCreated;
      nodeType.prototype.onNodeCreated = function (...args) {
        const result = onNodeCreated?.apply(this, args);
        const attribute = widget(this, "attribute");
        if (Array.isArray(attribute?.options?.values)) setChoices(attribute, attribute.options.values);
        return result;
      };
      const onConnectionsChange = nodeType.prototype.onConnectionsChange;
      nodeType.prototype.onConnectionsChange = function (...args) {
        const result = onConnectionsChange?.apply(this, args);
        refreshEdit(this);
        return result;
      };
    }
  },

  async afterConfigureGraph() {
    await refreshAll();
  },

  async refreshComboInNodes() {
    summaries.clear(); // "Refresh" (R) re-reads models/w2w
    await refreshAll();
  },

  setup() {
    api.addEventListener(PROGRESS_EVENT, ({ detail }) => {
      const node = findNode(detail.node);
      if (node && INVERT_NODES.has(node.type)) node.w2wProgress = detail;
    });
    api.addEventListener("execution_start", () => {
      for (const node of allNodes()) if (INVERT_NODES.has(node.type)) node.w2wProgress = null;
    });
  },
});

// For tests and other extensions: refresh every w2w node now (resolves when the route answered).
window.w2w = { refreshAll, summaryLines, fetchSummary, allNodes, findNode };
