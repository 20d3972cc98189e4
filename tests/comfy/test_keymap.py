"""Our module names map onto the 64 SD1.5 target weights exactly as ComfyUI's own LoRA key mapping does."""
import json
import subprocess
import sys

from w2w.layout import sd15_layout

# Runs in a child process so ComfyUI's modules are imported by ComfyUI's own rules, not into this one.
PROBE = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import comfy.cli_args
comfy.cli_args.args.cpu = True  # no GPU here: as `main.py --cpu`
import comfy.utils, comfy.lora
# the SD1.5 UNet config as comfy.model_detection reports it
cfg = {"num_res_blocks": [2, 2, 2, 2], "channel_mult": [1, 2, 4, 4], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
       "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], "transformer_depth_middle": 1}
names = json.loads(sys.stdin.read())
class Model:  # what model_lora_keys_unet reads: the state-dict keys and the UNet config
    class model_config:
        unet_config = cfg
    def state_dict(self):
        return {k: None for k in names["comfy_keys"]}
key_map = comfy.lora.model_lora_keys_unet(Model(), {})
diffusers = comfy.utils.unet_to_diffusers(cfg)
print(json.dumps({"kohya": {k: key_map.get(k) for k in names["kohya"]},
                  "diffusers": {k: diffusers.get(k + ".weight") for k in names["diffusers"]}}))
"""


def test_names_match_comfyui_key_mapping(comfyui_path):
    layout = sd15_layout()
    names = {"comfy_keys": [m.comfy_key for m in layout.modules], "kohya": [m.kohya_name for m in layout.modules],
             "diffusers": [m.name for m in layout.modules]}
    out = subprocess.run([sys.executable, "-c", PROBE, str(comfyui_path)], input=json.dumps(names),
                         capture_output=True, text=True, cwd=str(comfyui_path), timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    for m in layout.modules:
        assert got["kohya"][m.kohya_name] == m.comfy_key, m.name
        assert "diffusion_model." + got["diffusers"][m.name] == m.comfy_key, m.name
