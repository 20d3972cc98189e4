"""Regenerate `example_workflows/*.json` (UI format) from the API graphs below, with the node definitions of a
real ComfyUI (imported in-process with this pack):

    python tests/comfy/make_example_workflows.py [--comfyui PATH]

`test_example_workflows.py` converts them back and validates them in ComfyUI.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]

CKPT = "realisticVisionV51_v51VAE.safetensors"
SPACE = "weights2weights.safetensors"
CONTROLNET = "control_v11p_sd15_openpose.pth"
POSE_IMAGE = "w2w_pose.png"
PHOTO = "example.png"  # ComfyUI ships input/example.png; replace it with your photo(s)
FILES_NOTE = ("w2w needs two downloads (see the pack's README):\n"
              f"- models/checkpoints/{CKPT} (Realistic Vision v5.1, the base the space was trained on)\n"
              f"- models/w2w/{SPACE}: run `python -m w2w download` (or put the released files/ folder there)\n"
              "Prompt with \"sks person\"; cfg 3.0 as in the paper.")


def _base(size=512, steps=25, seed=5) -> dict:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}},
        "2": {"class_type": "W2WLoadSpace", "inputs": {"space": SPACE, "pcs": 1000}},
        "3": {"class_type": "W2WSampleIdentity", "inputs": {"space": ["2", 0], "seed": seed, "pcs": 1000, "factor": 1.0}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "sks person", "clip": ["1", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "low quality, blurry, unfinished", "clip": ["1", 1]}},
        "8": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
    }


def _sampler(model, positive=("6", 0), negative=("7", 0), seed=5, steps=25) -> dict:
    return {"class_type": "KSampler", "inputs": {"seed": seed, "steps": steps, "cfg": 3.0, "sampler_name": "euler",
                                                 "scheduler": "normal", "denoise": 1.0, "model": list(model),
                                                 "positive": list(positive), "negative": list(negative),
                                                 "latent_image": ["8", 0]}}


def _apply(identity, edited=None, edit_start=0.3) -> dict:
    inputs = {"model": ["1", 0], "space": ["2", 0], "identity": list(identity), "strength": 1.0, "edit_start": edit_start}
    if edited is not None:
        inputs["edited_identity"] = list(edited)
    return {"class_type": "W2WApplyLoRA", "inputs": inputs}


def _decode_save(nid: int, samples: str, prefix: str) -> dict:
    return {str(nid): {"class_type": "VAEDecode", "inputs": {"samples": [samples, 0], "vae": ["1", 2]}},
            str(nid + 1): {"class_type": "SaveImage", "inputs": {"filename_prefix": prefix, "images": [str(nid), 0]}}}


def _edit(identity, attribute, strength, debias="") -> dict:
    return {"class_type": "W2WApplyEditDirection", "inputs": {"space": ["2", 0], "identity": list(identity),
                                                             "attribute": attribute, "strength": strength,
                                                             "debias": debias, "attribute_override": ""}}


def sample_graph() -> dict:
    g = _base()
    g["4"] = _apply(("3", 0))
    g["9"] = _sampler(("4", 0))
    g.update(_decode_save(10, "9", "w2w/sample"))
    return g


def edit_graph() -> dict:
    g = _base()
    g["4"] = _apply(("3", 0))
    g["9"] = _sampler(("4", 0))
    g.update(_decode_save(10, "9", "w2w/original"))
    g["12"] = _edit(("3", 0), "Male", 1.5, "Young")
    g["13"] = _edit(("12", 0), "Eyeglasses", 1.0, "")
    g["14"] = _apply(("3", 0), edited=("13", 0), edit_start=0.3)
    g["15"] = _sampler(("14", 0))
    g.update(_decode_save(16, "15", "w2w/edited"))
    return g


def controlnet_graph() -> dict:
    g = _base()
    g["4"] = _apply(("3", 0))
    g["12"] = {"class_type": "LoadImage", "inputs": {"image": POSE_IMAGE}}
    g["13"] = {"class_type": "ControlNetLoader", "inputs": {"control_net_name": CONTROLNET}}
    g["14"] = {"class_type": "ControlNetApplyAdvanced", "inputs": {"positive": ["6", 0], "negative": ["7", 0],
                                                                   "control_net": ["13", 0], "image": ["12", 0],
                                                                   "strength": 0.8, "start_percent": 0.0,
                                                                   "end_percent": 1.0, "vae": ["1", 2]}}
    g["9"] = _sampler(("4", 0), positive=("14", 0), negative=("14", 1))
    g.update(_decode_save(10, "9", "w2w/controlnet"))
    return g


def save_lora_graph() -> dict:
    g = {"2": {"class_type": "W2WLoadSpace", "inputs": {"space": SPACE, "pcs": 1000}},
         "3": {"class_type": "W2WSampleIdentity", "inputs": {"space": ["2", 0], "seed": 5, "pcs": 1000, "factor": 1.0}},
         "4": _edit(("3", 0), "Young", -1.0, "Male")}
    g["5"] = {"class_type": "W2WSaveLoRA", "inputs": {"space": ["2", 0], "identity": ["4", 0],
                                                      "filename_prefix": "w2w/identity", "dtype": "float32"}}
    g["6"] = {"class_type": "W2WSaveIdentity", "inputs": {"identity": ["4", 0], "filename_prefix": "w2w_identity"}}
    return g


def invert_graph() -> dict:
    g = _base()
    del g["3"]
    g["2"]["inputs"]["pcs"] = 10_000
    g["3"] = {"class_type": "LoadImage", "inputs": {"image": PHOTO}}
    g["4"] = {"class_type": "W2WInvertImage", "inputs": {
        "model": ["1", 0], "vae": ["1", 2], "image": ["3", 0], "space": ["2", 0], "preset": "reference", "pcs": 10_000,
        "steps": 400, "lr": 0.1, "seed": 0, "clip": ["1", 1], "prompt": "sks person", "resolution": 512,
        "precision": "auto", "face": "auto", "face_mask": False, "random_crop": False, "vae_sample": False, "gradient_checkpointing": True,
        "identity_loss": 0.0, "facenet_weights": "auto"}}
    g["5"] = {"class_type": "PreviewImage", "inputs": {"images": ["4", 1]}}
    g["12"] = _edit(("4", 0), "Male", 1.0)
    g["13"] = {"class_type": "W2WSaveIdentity", "inputs": {"identity": ["4", 0], "filename_prefix": "w2w_inverted"}}
    g["14"] = _apply(("4", 0), edited=("12", 0), edit_start=0.3)
    g["9"] = _sampler(("14", 0))
    g.update(_decode_save(10, "9", "w2w/inverted"))
    return g


def _hook(identity, nid_space="2", edited=None, edit_start=0.3) -> dict:
    inputs = {"space": [nid_space, 0], "identity": list(identity), "strength": 1.0, "edit_start": edit_start}
    if edited is not None:
        inputs["edited_identity"] = list(edited)
    return {"class_type": "W2WIdentityHook", "inputs": inputs}


def _halves(g: dict, width: int, height: int) -> None:
    """Masks 20 (left half) and 23 (right half) of a width × height image, from stock mask nodes."""
    g["20"] = {"class_type": "SolidMask", "inputs": {"value": 0.0, "width": width, "height": height}}
    g["21"] = {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": width // 2, "height": height}}
    g["22"] = {"class_type": "MaskComposite", "inputs": {"destination": ["20", 0], "source": ["21", 0], "x": 0, "y": 0,
                                                         "operation": "add"}}
    g["23"] = {"class_type": "InvertMask", "inputs": {"mask": ["22", 0]}}


def _two_regions(g: dict, left_identity, right_identity) -> None:
    """Hooks of two identities on the left and right halves of one prompt (Cond Pair Set Props (+ Combine))."""
    g["24"] = _hook(left_identity)
    g["25"] = _hook(right_identity)
    g["26"] = {"class_type": "PairConditioningSetProperties", "inputs": {
        "positive_NEW": ["6", 0], "negative_NEW": ["7", 0], "strength": 1.0, "set_cond_area": "default",
        "mask": ["22", 0], "hooks": ["24", 0]}}
    g["27"] = {"class_type": "PairConditioningSetPropertiesAndCombine", "inputs": {
        "positive": ["26", 0], "negative": ["26", 1], "positive_NEW": ["6", 0], "negative_NEW": ["7", 0],
        "strength": 1.0, "set_cond_area": "default", "mask": ["23", 0], "hooks": ["25", 0]}}


def two_people_graph() -> dict:
    g = _base()
    g["6"]["inputs"]["text"] = "photo of two people side by side, sks person"
    g["8"]["inputs"].update(width=768, height=512)
    g["4"] = {"class_type": "W2WSampleIdentity", "inputs": {"space": ["2", 0], "seed": 6, "pcs": 1000, "factor": 1.0}}
    _halves(g, 768, 512)
    _two_regions(g, ("3", 0), ("4", 0))
    g["9"] = _sampler(("1", 0), positive=("27", 0), negative=("27", 1))
    g.update(_decode_save(10, "9", "w2w/two_people"))
    return g


def late_identity_graph() -> dict:
    g = _base()
    g["4"] = _hook(("3", 0))
    g["12"] = {"class_type": "CreateHookKeyframe", "inputs": {"strength_mult": 0.0, "start_percent": 0.0}}
    g["13"] = {"class_type": "CreateHookKeyframe", "inputs": {"strength_mult": 1.0, "start_percent": 0.4,
                                                              "prev_hook_kf": ["12", 0]}}
    g["14"] = {"class_type": "SetHookKeyframes", "inputs": {"hooks": ["4", 0], "hook_kf": ["13", 0]}}
    g["15"] = {"class_type": "PairConditioningSetProperties", "inputs": {
        "positive_NEW": ["6", 0], "negative_NEW": ["7", 0], "strength": 1.0, "set_cond_area": "default",
        "hooks": ["14", 0]}}
    g["9"] = _sampler(("1", 0), positive=("15", 0), negative=("15", 1))
    g.update(_decode_save(10, "9", "w2w/late_identity"))
    return g


def inverted_and_sampled_graph() -> dict:
    g = _base()
    g["2"]["inputs"]["pcs"] = 10_000
    g["6"]["inputs"]["text"] = "photo of two people side by side, sks person"
    g["8"]["inputs"].update(width=768, height=512)
    g["12"] = {"class_type": "LoadImage", "inputs": {"image": PHOTO}}
    g["4"] = {"class_type": "W2WInvertImage", "inputs": {
        "model": ["1", 0], "vae": ["1", 2], "image": ["12", 0], "space": ["2", 0], "preset": "reference",
        "pcs": 10_000, "steps": 400, "lr": 0.1, "seed": 0, "clip": ["1", 1], "prompt": "sks person",
        "resolution": 512, "precision": "auto", "face": "auto", "face_mask": False, "random_crop": False, "vae_sample": False, "gradient_checkpointing": True,
        "identity_loss": 0.0, "facenet_weights": "auto"}}
    _halves(g, 768, 512)
    _two_regions(g, ("4", 0), ("3", 0))
    g["9"] = _sampler(("1", 0), positive=("27", 0), negative=("27", 1))
    g.update(_decode_save(10, "9", "w2w/inverted_and_sampled"))
    return g


def _grid(graph: dict, columns: dict[str, int], rows: dict[str, int]) -> dict[str, tuple[int, int]]:
    return {nid: (40 + 380 * columns[nid], 40 + 260 * rows[nid]) for nid in graph}


WORKFLOWS = {
    # name: (graph builder, columns, rows, extra note)
    "w2w_sample_identity": (sample_graph, {"1": 0, "2": 0, "3": 1, "4": 2, "6": 1, "7": 1, "8": 2, "9": 3, "10": 4, "11": 4},
                            {"1": 0, "2": 2, "3": 2, "4": 0, "6": 3, "7": 4, "8": 2, "9": 0, "10": 0, "11": 1},
                            "Sample Identity draws a new person from the space; change the seed for another one."),
    "w2w_edit_identity": (edit_graph, {"1": 0, "2": 0, "3": 1, "4": 2, "6": 1, "7": 1, "8": 2, "9": 3, "10": 4,
                                       "11": 5, "12": 2, "13": 3, "14": 4, "15": 5, "16": 6, "17": 7},
                          {"1": 0, "2": 2, "3": 2, "4": 0, "6": 3, "7": 4, "8": 5, "9": 0, "10": 0, "11": 0,
                           "12": 2, "13": 2, "14": 2, "15": 2, "16": 2, "17": 2},
                          "Edits chain: Male +1.5 (keeping age), then Eyeglasses +1. Apply w2w LoRA uses the original "
                          "identity for the first 30% of the schedule (edit_start 0.3) and the edited one after, so the "
                          "layout stays (delayed injection, paper App. G)."),
    "w2w_apply_controlnet": (controlnet_graph, {"1": 0, "2": 0, "3": 1, "4": 2, "6": 1, "7": 1, "8": 2, "9": 4,
                                                "10": 5, "11": 5, "12": 2, "13": 2, "14": 3},
                             {"1": 0, "2": 2, "3": 2, "4": 0, "6": 4, "7": 5, "8": 6, "9": 0, "10": 0, "11": 1,
                              "12": 3, "13": 5, "14": 4},
                             f"The w2w MODEL works with ControlNet as any SD1.5 MODEL. Put {CONTROLNET} into "
                             f"models/controlnet and an OpenPose skeleton image ({POSE_IMAGE}) into input/."),
    "w2w_save_lora": (save_lora_graph, {"2": 0, "3": 1, "4": 2, "5": 3, "6": 3}, {"2": 0, "3": 0, "4": 0, "5": 0, "6": 1},
                      "Save w2w LoRA writes a standard kohya LoRA into models/loras (load it with LoraLoader, "
                      "A1111/Forge, ...); Save w2w Identity writes the coefficients into models/w2w/identities."),
    "invert_image": (invert_graph, {"1": 0, "2": 0, "3": 0, "4": 1, "5": 2, "6": 2, "7": 2, "8": 3, "9": 4, "10": 5,
                                    "11": 5, "12": 2, "13": 3, "14": 3},
                     {"1": 1, "2": 3, "3": 0, "4": 1, "5": 0, "6": 3, "7": 4, "8": 5, "9": 1, "10": 1, "11": 2,
                      "12": 2, "13": 0, "14": 2},
                     "Invert Image to w2w finds the identity whose model best reconstructs the photo (paper §3.4): "
                     "load the space with pcs >= 10,000 for the reference preset (1,000 for out-of-distribution: "
                     "paintings, cartoons). Batch several photos of one person (Batch Images) for a multi-image "
                     "inversion; paint the face in Load Image's mask editor and connect its MASK to restrict the "
                     "loss. The identity is then saved, edited (Male +1) and sampled with delayed injection."),
    "w2w_two_people": (two_people_graph, {"1": 0, "2": 0, "3": 1, "4": 1, "6": 1, "7": 1, "8": 4, "9": 4, "10": 5,
                                          "11": 5, "20": 1, "21": 1, "22": 2, "23": 2, "24": 2, "25": 2, "26": 3,
                                          "27": 3},
                       {"1": 0, "2": 2, "3": 2, "4": 3, "6": 0, "7": 1, "8": 2, "9": 0, "10": 0, "11": 1, "20": 4,
                        "21": 5, "22": 4, "23": 5, "24": 2, "25": 3, "26": 0, "27": 1},
                       "Two people in one image: each w2w Identity Hook is attached to the same prompt under a mask "
                       "(left and right halves) with Cond Pair Set Props; the sampler runs each masked conditioning "
                       "with its own identity's weights and blends them by mask. The MODEL is the plain checkpoint. "
                       "Each hooked conditioning is one more UNet pass per step."),
    "w2w_identity_late_steps": (late_identity_graph, {"1": 0, "2": 0, "3": 1, "4": 2, "6": 1, "7": 1, "8": 3, "9": 4,
                                                      "10": 5, "11": 5, "12": 2, "13": 2, "14": 3, "15": 3},
                                {"1": 0, "2": 2, "3": 2, "4": 2, "6": 0, "7": 1, "8": 3, "9": 0, "10": 0, "11": 1,
                                 "12": 3, "13": 4, "14": 2, "15": 0},
                                "The identity only for the late steps: keyframes give the hook strength 0 until 40 % "
                                "of the schedule and 1 after, so the prompt sets pose and layout and the identity the "
                                "face. The same keyframes can fade an identity out, or in gradually (Create Hook "
                                "Keyframes Interp.)."),
    "w2w_inverted_and_sampled": (inverted_and_sampled_graph, {"1": 0, "2": 0, "3": 1, "4": 1, "6": 1, "7": 1, "8": 4,
                                                              "9": 4, "10": 5, "11": 5, "12": 0, "20": 1, "21": 1,
                                                              "22": 2, "23": 2, "24": 2, "25": 2, "26": 3, "27": 3},
                                 {"1": 0, "2": 2, "3": 3, "4": 2, "6": 0, "7": 1, "8": 2, "9": 0, "10": 0, "11": 1,
                                  "12": 3, "20": 4, "21": 5, "22": 4, "23": 5, "24": 2, "25": 3, "26": 0, "27": 1},
                                 "An inverted person (left) next to a sampled one (right): Invert Image to w2w turns "
                                 "the photo into an identity of the space (load it with pcs 10,000), and both are "
                                 "hooks on the two halves of one prompt."),
}


def build_all() -> dict[str, dict]:
    from workflow_convert import api_to_ui

    out = {}
    for name, (builder, columns, rows, note) in WORKFLOWS.items():
        graph = builder()
        positions = _grid(graph, columns, rows)
        bottom = 40 + 260 * (max(rows.values()) + 1)
        out[name] = api_to_ui(graph, positions, [(FILES_NOTE, (40, bottom)), (note, (500, bottom))])
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--comfyui", type=Path, help="ComfyUI checkout (default: found as the tests find it)")
    args = parser.parse_args(argv)
    from comfyhost import ComfyHost
    from demo.locate import PACK_DIRNAME, find_comfyui, pack_root

    comfyui = args.comfyui or find_comfyui()
    if comfyui is None:
        parser.error("ComfyUI not found")
    ComfyHost.start(comfyui, Path(tempfile.mkdtemp(prefix="w2w-workflows-")), pack_root(), PACK_DIRNAME)
    target = ROOT / "example_workflows"
    target.mkdir(exist_ok=True)
    for name, workflow in build_all().items():
        (target / f"{name}.json").write_text(json.dumps(workflow, indent=1) + "\n", encoding="utf-8")
        print(f"wrote {target / name}.json")
    return 0


if __name__ == "__main__":
    sys.path[:0] = [str(HERE), str(ROOT)]  # comfyhost, workflow_convert, demo
    sys.exit(main())
