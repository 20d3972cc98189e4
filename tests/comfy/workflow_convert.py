"""UI-format workflows (what the ComfyUI frontend saves and `example_workflows/` holds) <-> API-format graphs.

Both directions need the node definitions (`object_info`), so they run inside an imported ComfyUI. The rules
are the frontend's: `widgets_values` lists the values of every widget input in definition order (required then
optional), with one extra entry ("fixed", "randomize", ...) after each input that has `control_after_generate`;
linked inputs are in `inputs` with the link id. Frontend-only nodes (notes, reroutes) are not part of a graph.
"""
from __future__ import annotations

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
FRONTEND_ONLY = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}


def node_info(class_type: str) -> dict:
    """What /object_info reports for one node type (input specs, input order, outputs)."""
    import nodes

    cls = nodes.NODE_CLASS_MAPPINGS[class_type]
    if hasattr(cls, "GET_NODE_INFO_V1"):
        return cls.GET_NODE_INFO_V1()
    inputs = cls.INPUT_TYPES()
    return {"input": inputs, "input_order": {k: list(v) for k, v in inputs.items()},
            "output": list(cls.RETURN_TYPES), "output_name": list(getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES))}


def _spec(info: dict, name: str):
    for category in ("required", "optional"):
        if name in info["input"].get(category, {}):
            return info["input"][category][name]
    raise KeyError(name)


def is_widget(spec) -> bool:
    kind = spec[0]
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    return (isinstance(kind, (list, tuple)) or kind in WIDGET_TYPES) and not options.get("forceInput")


def widget_slots(info: dict) -> list[tuple[str, bool]]:
    """(input name, followed by a control_after_generate value) for every widget, in widgets_values order."""
    slots = []
    for category in ("required", "optional"):
        for name in info["input_order"].get(category, []):
            spec = _spec(info, name)
            if is_widget(spec):
                options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
                slots.append((name, bool(options.get("control_after_generate"))))
    return slots


def socket_type(spec) -> str:
    return "COMBO" if isinstance(spec[0], (list, tuple)) else str(spec[0])


def ui_to_api(workflow: dict) -> dict:
    """API-format graph of a UI-format workflow (muted/bypassed and frontend-only nodes left out)."""
    links = {link[0]: link for link in workflow["links"]}
    api = {}
    for node in workflow["nodes"]:
        if node["type"] in FRONTEND_ONLY or node.get("mode", 0) in (2, 4):
            continue
        info = node_info(node["type"])
        inputs = {}
        values = list(node.get("widgets_values", []))
        for name, control in widget_slots(info):
            if not values:
                raise ValueError(f"node {node['id']} ({node['type']}): widgets_values ends before {name!r}")
            inputs[name] = values.pop(0)
            if control:
                values.pop(0)
        if values:
            raise ValueError(f"node {node['id']} ({node['type']}): {len(values)} widgets_values left over: {values}")
        for socket in node.get("inputs", []):
            if socket.get("link") is not None:
                _, source, slot, *_ = links[socket["link"]]
                inputs[socket["name"]] = [str(source), slot]
        api[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return api


def api_to_ui(api: dict, positions: dict[str, tuple[int, int]], notes: list[tuple[str, tuple[int, int]]] = ()) -> dict:
    """UI-format workflow of an API graph (node ids must be integers as strings), laid out at ``positions``."""
    nodes_out, links, link_id = [], [], 0
    outgoing: dict[tuple[str, int], list[int]] = {}
    infos = {nid: node_info(node["class_type"]) for nid, node in api.items()}
    for order, (nid, node) in enumerate(sorted(api.items(), key=lambda kv: int(kv[0]))):
        info = infos[nid]
        sockets, values = [], []
        for name, control in widget_slots(info):
            value = node["inputs"].get(name, _default(_spec(info, name)))
            values.append(value)
            if control:
                values.append("fixed")
        for category in ("required", "optional"):
            for name in info["input_order"].get(category, []):
                spec = _spec(info, name)
                value = node["inputs"].get(name)
                if is_widget(spec):
                    continue
                entry = {"name": name, "type": socket_type(spec), "link": None}
                if isinstance(value, list):
                    link_id += 1
                    source, slot = value
                    links.append([link_id, int(source), slot, int(nid), len(sockets),
                                  infos[source]["output"][slot] if isinstance(infos[source]["output"][slot], str) else "COMBO"])
                    outgoing.setdefault((source, slot), []).append(link_id)
                    entry["link"] = link_id
                sockets.append(entry)
        nodes_out.append({"id": int(nid), "type": node["class_type"], "pos": list(positions[nid]), "size": [320, 120],
                          "flags": {}, "order": order, "mode": 0, "inputs": sockets, "outputs": [],
                          "properties": {"Node name for S&R": node["class_type"]}, "widgets_values": values})
    for entry in nodes_out:
        info = infos[str(entry["id"])]
        entry["outputs"] = [{"name": name, "type": kind if isinstance(kind, str) else "COMBO",
                             "links": outgoing.get((str(entry["id"]), slot), []), "slot_index": slot}
                            for slot, (name, kind) in enumerate(zip(info["output_name"], info["output"]))]
    next_id = max(int(n) for n in api) + 1
    for offset, (text, pos) in enumerate(notes):
        nodes_out.append({"id": next_id + offset, "type": "Note", "pos": list(pos), "size": [420, 180], "flags": {},
                          "order": len(nodes_out), "mode": 0, "inputs": [], "outputs": [], "properties": {},
                          "widgets_values": [text]})
    return {"last_node_id": next_id + len(notes) - 1, "last_link_id": link_id, "nodes": nodes_out, "links": links,
            "groups": [], "config": {}, "extra": {"ds": {"scale": 0.8, "offset": [0, 0]}}, "version": 0.4}


def _default(spec):
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if "default" in options:
        return options["default"]
    choices = spec[0] if isinstance(spec[0], (list, tuple)) else options.get("options", [])
    return choices[0] if choices else ""
