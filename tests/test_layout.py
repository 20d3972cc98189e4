import pytest
import torch

from w2w.layout import Layout, LayoutError, ModuleSlot, diffusers_to_ldm, module_path_from_key, sd15_layout


def test_sd15_layout_matches_released_offsets():
    layout = sd15_layout()
    assert layout.dim == 99_648
    assert len(layout.modules) == 64
    assert layout.modules[0].name == "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    assert layout.modules[0].a_offset == 0
    assert layout.module("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v").a_offset == 1920
    assert layout.module("mid_block.attentions.0.transformer_blocks.0.attn1.to_q").a_offset == 35_968
    assert layout.module("up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_v").a_offset == 98_560
    assert layout.scale == 27.0


@pytest.mark.parametrize("diffusers,ldm", [
    ("down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_q", "input_blocks.2.1.transformer_blocks.0.attn1.to_q"),
    ("down_blocks.2.attentions.0.transformer_blocks.0.attn2.to_v", "input_blocks.7.1.transformer_blocks.0.attn2.to_v"),
    ("mid_block.attentions.0.transformer_blocks.0.attn1.to_v", "middle_block.1.transformer_blocks.0.attn1.to_v"),
    ("up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_q", "output_blocks.3.1.transformer_blocks.0.attn2.to_q"),
    ("up_blocks.3.attentions.2.transformer_blocks.0.attn1.to_q", "output_blocks.11.1.transformer_blocks.0.attn1.to_q"),
])
def test_diffusers_to_ldm(diffusers, ldm):
    assert diffusers_to_ldm(diffusers) == ldm


def test_all_sd15_comfy_keys_are_distinct_attention_weights():
    keys = [m.comfy_key for m in sd15_layout().modules]
    assert len(set(keys)) == 64
    assert all(k.startswith("diffusion_model.") and k.endswith(".weight") for k in keys)


@pytest.mark.parametrize("key,path,which", [
    ("base_model.model.mid_block.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight",
     "mid_block.attentions.0.transformer_blocks.0.attn1.to_q", "A"),
    ("base_model.model.up_blocks.1.attentions.2.transformer_blocks.0.attn2.to_v.lora_B.identity1.weight",
     "up_blocks.1.attentions.2.transformer_blocks.0.attn2.to_v", "B"),
    ("unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_q.lora_A.weight",
     "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_q", "A"),
    ("lora_unet_down_blocks_2_attentions_1_transformer_blocks_0_attn1_to_v.lora_up.weight",
     "down_blocks.2.attentions.1.transformer_blocks.0.attn1.to_v", "B"),
    ("lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_out_0.lora_down.weight",
     "mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0", "A"),
])
def test_key_styles(key, path, which):
    assert module_path_from_key(key) == (path, which)


def test_weight_dimensions_round_trip_with_identity1_keys():
    layout = sd15_layout()
    dims = layout.to_weight_dimensions()
    renamed = {k.replace(".weight", ".identity1.weight"): v for k, v in dims.items()}
    assert Layout.from_weight_dimensions(renamed) == layout
    assert Layout.from_json(layout.to_json()) == layout


def test_factors_and_flatten_are_inverse():
    layout = sd15_layout()
    w = torch.randn(layout.dim)
    parts = {m.name: (a, b) for m, (a, b) in zip(layout.modules, layout.factors(w))}
    assert torch.equal(layout.flatten(parts), w)
    batch = torch.randn(3, layout.dim)
    deltas = layout.deltas(batch)
    m = layout.modules[7]
    a = batch[1, m.a_offset:m.a_offset + m.in_features]
    b = batch[1, m.b_offset:m.b_offset + m.out_features]
    torch.testing.assert_close(deltas[m.name][1], 27.0 * torch.outer(b, a), rtol=1e-6, atol=0)


def test_bad_layouts_are_refused():
    with pytest.raises(LayoutError, match="does not add up"):
        Layout((ModuleSlot("a", 4, 4, 0, 5),))  # gap
    with pytest.raises(LayoutError, match="does not add up"):
        Layout((ModuleSlot("a", 4, 4, 0, 2),))  # overlap
    dims = sd15_layout().to_weight_dimensions()
    first = next(iter(dims))
    broken = dict(dims)
    broken[first] = ((999,), torch.Size([1, 320]))
    with pytest.raises(LayoutError, match="numel"):
        Layout.from_weight_dimensions(broken)
    only_a = {k: v for k, v in dims.items() if ".lora_B." not in k or "up_blocks.3.attentions.2" not in k or "attn2.to_v" not in k}
    with pytest.raises(LayoutError, match="only its A factor"):
        Layout.from_weight_dimensions(only_a)
    with pytest.raises(LayoutError, match="not a LoRA factor key"):
        Layout.from_weight_dimensions({"some.other.weight": ((4,), torch.Size([2, 2]))})
    with pytest.raises(LayoutError, match="this layout needs"):
        sd15_layout().factors(torch.zeros(10))
