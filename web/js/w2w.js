// w2w for ComfyUI: browser side of the node pack.
// - Apply Edit Direction offers exactly the attributes of the space chosen upstream in Load w2w Space
//   (GET /w2w/spaces/{name}); the combo menu has the frontend's filter box, so the list is searchable.
// - Load w2w Space shows what the chosen space holds: PCs, attributes, layout, file size, training coefficients.
// - Invert Image to w2w shows the current step and loss (event "w2w.invert.progress"); its preview image arrives
//   through ComfyUI's own progress previews.
import { app } from "../../../scripts/app.js";
import { api } from "../../../scripts/api.js";

const LOAD_SPACE = "W2WLoadSpace";
const EDIT = "W2WApplyEditDirection";
const INVERT = "W2WInvertImage";
const PROGRESS_EVENT = "w2w.invert.progress";
const LINE_HEIGHT = 15;
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
  const slot = node.inputs?.findIndex((input) => input.name === "space") ?? -1;
  if (slot < 0) return null;
  let source = node.getInputNode(slot);
  for (let hops = 0; source && source.type === "Reroute" && hops < 32; hops += 1) {
    source = source.getInputNode(0);
  }
  return source && source.type === LOAD_SPACE ? source : null;
}

// Known names only (the widget's choices): a workflow may name a space this server does not have.
function knownSpace(loadNode) {
  const space = widget(loadNode, "space");
  return space && space.options.values?.includes(space.value) ? space.value : null;
}

async function refreshLoadSpace(node) {
  const name = knownSpace(node);
  const chosen = widget(node, "space")?.value;
  node.w2wSummary = null;
  node.w2wLines = name
    ? summaryLines(null)
    : [chosen ? `${chosen}: not in models/w2w (see the README)` : "no space in models/w2w"];
  if (name) {
    const summary = await fetchSummary(name);
    if (widget(node, "space")?.value !== name) return; // changed meanwhile
    node.w2wSummary = summary;
    node.w2wLines = summaryLines(summary);
  }
  node.setSize([node.size[0], Math.max(node.size[1], node.computeSize()[1])]);
  node.setDirtyCanvas(true, true);
}

async function refreshEdit(node) {
  const attribute = widget(node, "attribute");
  const source = spaceSource(node);
  const name = source && knownSpace(source);
  if (!attribute || !name) return;
  const summary = await fetchSummary(name);
  if (summary.error || !summary.attributes.length) return; // keep the list; execution reports the problem
  attribute.options.values = [...summary.attributes];
  if (!summary.attributes.includes(attribute.value)) attribute.value = summary.attributes[0];
  node.w2wSpace = name;
  node.setDirtyCanvas(true, true);
}

function refreshAll() {
  const nodes = app.graph?.nodes ?? app.graph?._nodes ?? [];
  return Promise.all(
    nodes.map((node) =>
      node.type === LOAD_SPACE ? refreshLoadSpace(node) : node.type === EDIT ? refreshEdit(node) : null
    )
  );
}

function drawLines(node, ctx, lines, top) {
  ctx.save();
  ctx.font = "11px sans-serif";
  ctx.fillStyle = LiteGraph.WIDGET_SECONDARY_TEXT_COLOR || "#aaa";
  ctx.textAlign = "left";
  lines.forEach((line, i) => ctx.fillText(line, 10, top + (i + 1) * LINE_HEIGHT, node.size[0] - 20));
  ctx.restore();
}

function extendLoadSpace(nodeType) {
  const computeSize = nodeType.prototype.computeSize;
  nodeType.prototype.computeSize = function (...args) {
    const size = computeSize.apply(this, args);
    size[1] += (this.w2wLines?.length ?? 0) * LINE_HEIGHT + 6;
    return size;
  };
  const onDrawForeground = nodeType.prototype.onDrawForeground;
  nodeType.prototype.onDrawForeground = function (ctx, ...rest) {
    onDrawForeground?.call(this, ctx, ...rest);
    if (this.flags?.collapsed || !this.w2wLines) return;
    const top = computeSize.call(this)[1];
    drawLines(this, ctx, this.w2wLines, top);
  };
}

function extendInvert(nodeType) {
  const onDrawForeground = nodeType.prototype.onDrawForeground;
  nodeType.prototype.onDrawForeground = function (ctx, ...rest) {
    onDrawForeground?.call(this, ctx, ...rest);
    const p = this.w2wProgress;
    if (this.flags?.collapsed || !p) return;
    ctx.save();
    ctx.font = "11px sans-serif";
    ctx.fillStyle = "#8fc";
    ctx.textAlign = "right";
    ctx.fillText(`step ${p.step}/${p.total} · loss ${p.loss.toFixed(4)}`, this.size[0] - 8, -LiteGraph.NODE_TITLE_HEIGHT / 2 + 4);
    ctx.restore();
  };
}

function findNode(id) {
  const graph = app.graph;
  return graph?.getNodeById(id) ?? graph?.getNodeById(Number(String(id).split(":").pop()));
}

app.registerExtension({
  name: "w2w.frontend",

  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name === LOAD_SPACE) {
      extendLoadSpace(nodeType);
      const onWidgetChanged = nodeType.prototype.onWidgetChanged;
      nodeType.prototype.onWidgetChanged = function (name, ...rest) {
        const result = onWidgetChanged?.call(this, name, ...rest);
        if (name === "space") refreshAll(); // the space changed: its info and every Apply Edit Direction list
        return result;
      };
    }
    if (nodeData.name === INVERT) extendInvert(nodeType);
    if (nodeData.name === EDIT || nodeData.name === LOAD_SPACE) {
      const onConnectionsChange = nodeType.prototype.onConnectionsChange;
      nodeType.prototype.onConnectionsChange = function (...args) {
        const result = onConnectionsChange?.apply(this, args);
        if (this.type === EDIT) refreshEdit(this);
        return result;
      };
    }
  },

  nodeCreated(node) {
    if (node.type === LOAD_SPACE) refreshLoadSpace(node);
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
      if (!node) return;
      node.w2wProgress = detail;
      node.setDirtyCanvas(true, false);
    });
    api.addEventListener("execution_start", () => {
      for (const node of app.graph?.nodes ?? []) if (node.type === INVERT) node.w2wProgress = null;
    });
  },
});

// For tests and other extensions: refresh every w2w node now (resolves when the route answered).
window.w2w = { refreshAll, summaryLines, fetchSummary };
