"""Building spaces: streaming PCA vs an exact SVD, LoRA folders reproducing their generating space, matrix files,
labels and directions, bad inputs, and an address-space-capped out-of-core build."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from w2w.build import (ArraySource, BuildConfig, BuildError, build_space, open_source, read_labels_csv)
from w2w.cli import main as cli_main
from w2w.export import export_lora
from w2w.identity import Identity
from w2w.layout import Layout, ModuleSlot
from w2w.safeload import W2WFileError
from w2w.space import Space, load_space

BLOCKS = ("down_blocks.0.attentions.0", "down_blocks.0.attentions.1", "mid_block.attentions.0", "up_blocks.1.attentions.0")


def tiny_layout(width: int = 8, alpha: float = 27.0) -> Layout:
    """SD-style module names (so every key style applies) with tiny widths, in sorted (released) order."""
    names = sorted(f"{b}.transformer_blocks.0.{t}" for b in BLOCKS for t in ("attn1.to_q", "attn1.to_v", "attn2.to_q"))
    modules, offset = [], 0
    for name in names:
        modules.append(ModuleSlot(name, width, width, offset, offset + width))
        offset += 2 * width
    return Layout(tuple(modules), rank=1, alpha=alpha)


def planted_matrix(n=300, d=1200, rank=12, seed=0, noise=0.02):
    """Rows with a clear spectral gap after ``rank`` PCs, per-column offsets and scales."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(d, rank, generator=g)).Q
    x = (torch.randn(n, rank, generator=g) * torch.logspace(1, 0, rank)) @ basis.T * d ** 0.5
    x += noise * d ** 0.5 * torch.randn(n, d, generator=g)
    return (x * (torch.rand(d, generator=g) + 0.2) * 1e-3 + torch.randn(d, generator=g) * 1e-3).float()


def flat_layout(d: int) -> Layout:
    return Layout((ModuleSlot("flat", d - 1, 1, 0, d - 1),), rank=1)


def exact_pca(x: torch.Tensor, k: int):
    x = x.double()
    z = (x - x.mean(0)) / x.std(0)
    _, s, vt = torch.linalg.svd(z, full_matrices=False)
    return z, vt[:k], s[:k] ** 2 / (x.shape[0] - 1) / x.shape[1]


def max_angle_degrees(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest principal angle between the row spaces of a and b (rows orthonormalised first)."""
    qa = torch.linalg.qr(a.double().T).Q
    qb = torch.linalg.qr(b.double().T).Q
    cos = torch.linalg.svdvals(qa.T @ qb).clamp(max=1.0)
    return float(torch.rad2deg(torch.arccos(cos)).max())


# ---- correctness against an exact SVD --------------------------------------------------------------------
@pytest.mark.parametrize("memory_mb,block_rows", [(64, None), (1, 37)], ids=["cached", "streamed-blocks-of-37"])
def test_matches_exact_svd(memory_mb, block_rows):
    x = planted_matrix()
    k = 10
    z, vt, ev = exact_pca(x, k)
    cfg = BuildConfig(pcs=k, power_iters=2, memory_mb=memory_mb, block_rows=block_rows)
    res = build_space(ArraySource(x, layout=flat_layout(x.shape[1])), cfg)
    assert max_angle_degrees(res.space.components, vt) < 0.05
    for i in range(k):  # each component, not only the subspace (the spectrum has distinct values)
        assert abs(float(res.space.components[i].double() @ vt[i])) > 1 - 1e-6
    rel = (res.explained_variance_ratio - ev).abs() / ev
    assert float(rel.max()) <= 1e-3
    torch.testing.assert_close(res.space.train_coefs.double(), z @ res.space.components.double().T, rtol=0, atol=1e-3)
    torch.testing.assert_close(res.space.mean.double(), x.double().mean(0), rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(res.space.std.double(), x.double().std(0), rtol=1e-5, atol=1e-9)
    streamed = memory_mb == 1
    assert res.rows_read == x.shape[0] * (cfg.passes if streamed else 1)  # cached: read once
    biggest = res.space.components.gather(1, res.space.components.abs().argmax(1, keepdim=True))
    assert bool((biggest > 0).all())  # deterministic signs


def test_same_seed_same_result_and_more_iterations_help():
    x = planted_matrix(seed=1, noise=0.2)
    src = ArraySource(x, layout=flat_layout(x.shape[1]))
    a = build_space(src, BuildConfig(pcs=12, power_iters=1, seed=3))
    b = build_space(src, BuildConfig(pcs=12, power_iters=1, seed=3))
    assert torch.equal(a.space.components, b.space.components)
    _, vt, ev = exact_pca(x, 12)
    errors = [abs(float(build_space(src, BuildConfig(pcs=12, power_iters=q, oversample=2)).explained_variance_ratio.sum()
                        - ev.sum())) for q in (0, 2)]
    assert errors[1] < errors[0]


def test_progress_callback_counts_blocks_and_can_stop():
    x = planted_matrix(n=100, d=300)
    seen = []
    cfg = BuildConfig(pcs=4, power_iters=1, memory_mb=1, block_rows=30)
    build_space(ArraySource(x, layout=flat_layout(300)), cfg, callback=lambda i, n, what: seen.append((i, n, what)))
    assert seen[-1][2] == "done" and seen[-1][0] == seen[-1][1] == 4 * cfg.passes
    assert [s[0] for s in seen[:-1]] == list(range(4 * cfg.passes))

    def stop(i, n, what):
        if i == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_space(ArraySource(x, layout=flat_layout(300)), cfg, callback=stop)


# ---- matrix files ----------------------------------------------------------------------------------------
def test_matrix_file_formats_agree(tmp_path):
    x = planted_matrix(n=120, d=tiny_layout().dim, seed=2)
    big = torch.cat([torch.zeros(3, x.shape[1]), x])
    torch.save(big[3:], tmp_path / "w.pt")  # a view: the tensor starts inside its storage
    np.save(tmp_path / "w.npy", x.numpy())
    save_file({"weights": x, "other": torch.zeros(3)}, str(tmp_path / "w.safetensors"))
    save_file({"weights": x.half()}, str(tmp_path / "half.safetensors"))
    cfg = BuildConfig(pcs=6, memory_mb=1, block_rows=50)
    layout = tiny_layout()
    ref = build_space(ArraySource(x, layout=layout), cfg).space
    for name in ("w.pt", "w.npy", "w.safetensors"):
        got = build_space(open_source(str(tmp_path / name), layout=layout), cfg).space
        assert torch.equal(got.components, ref.components), name
        assert got.train_names == tuple(str(i) for i in range(120))
    half = build_space(open_source(str(tmp_path / "half.safetensors"), layout=layout), cfg).space
    assert max_angle_degrees(half.components[:3], ref.components[:3]) < 1.0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_matrix_file_rows_in_every_float_dtype(tmp_path, dtype):
    """One reader (w2w.rawread) for .pt, .safetensors and .npy: rows come back as float32, exactly converted."""
    x = planted_matrix(n=40, d=tiny_layout().dim, seed=3).to(dtype)
    torch.save(x, tmp_path / "w.pt")
    save_file({"w": x}, str(tmp_path / "w.safetensors"))
    files = ["w.pt", "w.safetensors"]
    if dtype != torch.bfloat16:  # numpy has no bfloat16
        np.save(tmp_path / "w.npy", x.numpy())
        files.append("w.npy")
    for name in files:
        source = open_source(str(tmp_path / name), layout=tiny_layout())
        out = np.empty((7, x.shape[1]), np.float32)
        source.read(30, out)
        assert torch.equal(torch.from_numpy(out), x[30:37].float()), name


def test_reader_reports_a_short_read(tmp_path):
    from w2w.rawread import pread_into

    (tmp_path / "f.bin").write_bytes(b"\0" * 10)
    with pytest.raises(W2WFileError, match="truncated"):
        pread_into(str(tmp_path / "f.bin"), 4, torch.empty(4, dtype=torch.float32))
    assert torch.equal(pread_into(str(tmp_path / "f.bin"), 2, torch.ones(2, dtype=torch.float32)), torch.zeros(2))


def test_matrix_needs_layout_of_its_width(tmp_path):
    np.save(tmp_path / "w.npy", np.zeros((5, 100), np.float32))
    with pytest.raises(BuildError, match="100 weights per row.*--layout"):
        open_source(str(tmp_path / "w.npy"))
    with pytest.raises(ValueError, match="layout given has"):
        open_source(str(tmp_path / "w.npy"), layout=tiny_layout())


def test_truncated_matrix_file_is_reported(tmp_path):
    np.save(tmp_path / "w.npy", np.zeros((50, tiny_layout().dim), np.float32))
    with open(tmp_path / "w.npy", "r+b") as f:
        f.truncate(os.path.getsize(tmp_path / "w.npy") - 100)
    with pytest.raises(W2WFileError, match="truncated"):
        open_source(str(tmp_path / "w.npy"), layout=tiny_layout())


@pytest.mark.parametrize("entry", [
    {"dtype": "F32", "shape": [2, 4], "data_offsets": [-32, 0]},  # would read the header as weights
    {"dtype": "F32", "shape": [2, 4]},  # no offsets
    {"dtype": "F32", "shape": [2, 4], "data_offsets": [32, 0]},  # backwards
    {"dtype": "F32", "shape": [2, 4], "data_offsets": [0.0, 32.0]},  # not integers
    {"dtype": "F32", "shape": [-2, -4], "data_offsets": [0, 32]},  # negative sizes, same byte count
    {"dtype": "F32", "shape": [True, 8], "data_offsets": [0, 32]},
    {"dtype": "F32", "shape": 8, "data_offsets": [0, 32]},
])
def test_a_hostile_safetensors_header_is_refused_before_any_read(tmp_path, entry):
    """The raw reader parses the header itself (to find the data without a memory map), so it checks what the
    safetensors library would: integer offsets in order, non-negative integer shapes."""
    import json
    import struct

    from w2w.build import open_source

    header = json.dumps({"weights": entry}).encode()
    header += b" " * (-len(header) % 8)
    path = tmp_path / "w.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(32))
    with pytest.raises(W2WFileError, match="malformed header entry|lacks a 2-D tensor|holds 0 2-D tensors"):
        open_source(str(path), layout=tiny_layout())


# ---- LoRA folders ----------------------------------------------------------------------------------------
def generating_space(layout: Layout, k: int = 5, seed: int = 0) -> Space:
    g = torch.Generator().manual_seed(seed)
    comps = torch.linalg.qr(torch.randn(layout.dim, k, generator=g)).Q.T.contiguous()
    mean = torch.randn(layout.dim, generator=g) * 1e-2
    std = torch.rand(layout.dim, generator=g) * 1e-2 + 1e-3
    return Space(comps, mean, std, layout)


def write_lora_folder(folder, space: Space, n: int, formats=("kohya",), seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    coefs = torch.randn(n, space.pcs, generator=g) * torch.linspace(3, 1, space.pcs)
    names = [f"model_{i:03d}" for i in range(n)]
    os.makedirs(folder, exist_ok=True)
    for i, name in enumerate(names):
        fmt = formats[i % len(formats)]
        out = os.path.join(folder, name if fmt == "peft" else f"{name}.safetensors")
        export_lora(space, Identity(coefs[i], space.fingerprint, name), out, fmt)
    return names, coefs


@pytest.mark.parametrize("formats", [("kohya",), ("peft",), ("diffusers",), ("kohya", "peft", "diffusers")],
                         ids=["kohya", "peft", "diffusers", "mixed"])
def test_lora_folder_reproduces_generating_space(tmp_path, formats):
    layout = tiny_layout()
    gen = generating_space(layout)
    names, coefs = write_lora_folder(tmp_path / "loras", gen, 40, formats)
    source = open_source(str(tmp_path / "loras"))
    assert source.layout.modules == layout.modules
    res = build_space(source, BuildConfig(pcs=5, power_iters=1))
    built = res.space
    assert built.train_names == tuple(names)
    assert float(res.explained_variance_ratio.sum()) > 0.999  # the models span 5 directions exactly
    truth = gen.deltas(coefs)
    rebuilt = built.deltas(built.train_coefs)
    for name in truth:  # every training model is reconstructed: ΔW = alpha/rank · B @ A per module
        torch.testing.assert_close(rebuilt[name], truth[name], rtol=1e-3, atol=1e-6 * float(truth[name].abs().max()))
    if formats in (("kohya",), ("peft",)):  # same weight coordinates: the affine spaces coincide
        assert built.layout.alpha == layout.alpha
        assert max_angle_degrees(built.components * built.std, gen.components * gen.std) < 0.01


def test_folder_layout_of_sd15_names_is_released_order(tmp_path):
    from w2w.build import layout_of_lora
    from w2w.layout import sd15_layout

    ref = sd15_layout()
    shapes = {m.name: ((1, m.in_features), (m.out_features, 1)) for m in reversed(ref.modules)}
    assert layout_of_lora(shapes, 27.0) == ref


def test_mixed_layouts_name_the_offending_files(tmp_path):
    layout = tiny_layout()
    write_lora_folder(tmp_path / "loras", generating_space(layout), 4)
    other = tiny_layout(width=4)
    odd = generating_space(other, k=2)
    export_lora(odd, Identity(torch.ones(2), odd.fingerprint), str(tmp_path / "loras" / "zz_odd.safetensors"))
    with pytest.raises(BuildError, match=r"1 of 5 LoRAs.*zz_odd\.safetensors"):
        open_source(str(tmp_path / "loras"))


def test_empty_folder_and_missing_source(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no LoRAs here")
    with pytest.raises(BuildError, match="holds no LoRA"):
        open_source(str(tmp_path / "empty"))
    with pytest.raises(W2WFileError, match="source not found"):
        open_source(str(tmp_path / "nothing"))


def test_nan_rows_are_named(tmp_path):
    x = planted_matrix(n=50, d=tiny_layout().dim)
    x[7, 3] = float("nan")
    x[31, 0] = float("inf")
    np.save(tmp_path / "w.npy", x.numpy())
    with pytest.raises(BuildError, match=r"2 of 50 models.*row 7 \(7\), row 31 \(31\)"):
        build_space(open_source(str(tmp_path / "w.npy"), layout=tiny_layout()), BuildConfig(pcs=3, block_rows=20))


@pytest.mark.parametrize("memory_mb,block_rows", [(64, None), (1, 20)], ids=["cached", "streamed"])
def test_weights_whose_squares_overflow_float32_build_the_same_space(memory_mb, block_rows):
    """PCA of standardised weights does not depend on their units: rows scaled by 1e24 (finite in float32, squares
    not) give the same components, and every block is counted, none dropped."""
    x = planted_matrix(n=60, d=300)
    config = BuildConfig(pcs=4, power_iters=2, memory_mb=memory_mb, block_rows=block_rows)
    plain = build_space(ArraySource(x, layout=flat_layout(300)), config).space
    huge = build_space(ArraySource(x * 1e24, layout=flat_layout(300)), config).space
    assert bool(torch.isfinite(huge.std).all()) and bool(torch.isfinite(huge.components).all())
    torch.testing.assert_close(huge.std.double(), plain.std.double() * 1e24, rtol=1e-5, atol=0)
    torch.testing.assert_close(huge.mean.double(), plain.mean.double() * 1e24, rtol=1e-5, atol=1e15)
    torch.testing.assert_close(huge.components, plain.components, rtol=0, atol=1e-4)  # unit rows
    torch.testing.assert_close(huge.train_coefs, plain.train_coefs, rtol=0, atol=1e-3 * float(plain.train_coefs.abs().max()))


def test_too_many_pcs(tmp_path):
    x = planted_matrix(n=10, d=tiny_layout().dim)
    with pytest.raises(BuildError, match="at most 9"):
        build_space(ArraySource(x, layout=tiny_layout()), BuildConfig(pcs=10))


# ---- labels and directions ------------------------------------------------------------------------------
def labels_frame(names, coefs, seed=0):
    import pandas as pd

    g = torch.Generator().manual_seed(seed)
    male = (coefs[:, 0] + 0.3 * torch.randn(len(names), generator=g) > 0).int()
    young = (coefs[:, 1] > 0).int()
    return pd.DataFrame({"file": [f"{n}.safetensors" for n in names], "Male": male.numpy(), "Young": young.numpy()})


def test_labels_csv_in_order_or_keyed(tmp_path):
    names = ("b", "a", "c")
    (tmp_path / "ordered.csv").write_text("Male,Young\n1,0\n0,1\n1,1\n")
    labels, attrs = read_labels_csv(str(tmp_path / "ordered.csv"), names)
    assert attrs == ("Male", "Young") and labels[:, 0].tolist() == [1, 0, 1]
    (tmp_path / "keyed.csv").write_text("file,Male\nc.safetensors,5\nb,3\na,4\n")
    labels, _ = read_labels_csv(str(tmp_path / "keyed.csv"), names)
    assert labels[:, 0].tolist() == [3, 4, 5]


@pytest.mark.parametrize("text,message", [
    ("Male\n1\n0\n", "2 label rows but the space has 3"),
    ("file,Male\na,1\nb,0\n", r"1 training models have no label row \(e.g. c\)"),
    ("file,Male\na,1\nb,0\nc,1\nd,0\n", r"1 label rows name no training model \(e.g. d\)"),
    ("file,Male\na,1\nb,0\nb,1\n", "listed twice"),
    ("file,Male,Note\na,1,x\nb,0,y\nc,1,z\n", "Note are not numeric"),
    ("file,Male\na,1\nb,\nc,1\n", "NaN"),
], ids=["count", "missing", "extra", "duplicate", "text-column", "empty-cell"])
def test_bad_labels_csv(tmp_path, text, message):
    (tmp_path / "labels.csv").write_text(text)
    with pytest.raises(ValueError, match=message):
        read_labels_csv(str(tmp_path / "labels.csv"), ("a", "b", "c"))


def test_cli_build_with_labels_then_fit_directions(tmp_path, capsys):
    layout = tiny_layout()
    gen = generating_space(layout)
    names, coefs = write_lora_folder(tmp_path / "loras", gen, 60, ("kohya", "peft"))
    df = labels_frame(names, coefs).sample(frac=1.0, random_state=0)  # keyed by file name, shuffled
    df.to_csv(tmp_path / "labels.csv", index=False)
    out = tmp_path / "space.safetensors"
    assert cli_main(["build", str(out), "--from", str(tmp_path / "loras"), "--pcs", "5", "--labels",
                     str(tmp_path / "labels.csv"), "--quiet"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["training_models"] == 60 and summary["pcs"] == 5 and summary["explained_variance"] > 0.999
    space = load_space(str(out))
    assert space.train_names == tuple(names)
    male = labels_frame(names, coefs)["Male"].to_numpy()
    assert space.labels[:, space.attribute_names.index("Male")].numpy().tolist() == male.tolist()
    assert set(space.directions) == {"Male", "Young"}
    assert len(json.loads(_meta(out)["explained_variance_ratio"])) == 5

    # Male was drawn from generating PC 0: its direction, mapped back to weights, lies along that PC
    male_dir = space.directions["Male"].unit @ (space.components * space.std)
    cos = torch.nn.functional.cosine_similarity(male_dir, gen.components[0] * gen.std, dim=0)
    assert abs(float(cos)) > 0.9

    assert cli_main(["fit-directions", str(out), str(tmp_path / "labels.csv"), "--debias", "Young",
                     "--only", "Male"]) == 0
    again = load_space(str(out))
    assert again.fingerprint == space.fingerprint
    assert again.directions["Male"].debias == ("Young",)
    assert abs(float(again.directions["Male"].vector @ space.directions["Young"].vector)) < 1e-4 * \
        float(again.directions["Male"].vector.norm() * space.directions["Young"].vector.norm())
    torch.testing.assert_close(again.components, space.components)


def test_cli_errors_are_clear(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert cli_main(["build", str(tmp_path / "s.safetensors"), "--from", str(tmp_path / "empty"), "--quiet"]) == 2
    assert "holds no LoRA" in capsys.readouterr().err
    assert not (tmp_path / "s.safetensors").exists()


def _meta(path):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


# ---- out of core -----------------------------------------------------------------------------------------
_CAPPED = r"""
import os, resource, sys
import torch
from w2w.build import BuildConfig, build_space, open_source
torch.randn(64, 64) @ torch.randn(64, 64)  # start the BLAS threads before the cap
status = lambda key: int([l for l in open("/proc/self/status") if l.startswith(key)][0].split()[1]) * 1024
extra = int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_AS, (status("VmSize") + extra, status("VmSize") + extra))
rss0 = status("VmRSS")
res = build_space(open_source(sys.argv[1]), BuildConfig(pcs=4, power_iters=1, memory_mb=16))
print(res.space.pcs, res.rows_read, status("VmHWM") - rss0, float(res.explained_variance_ratio.sum()))
"""


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS and /proc are Linux facts")
def test_out_of_core_build_under_an_address_space_cap(tmp_path):
    """A 319 MB matrix built by a process allowed 200 MB of address space beyond what it had mapped (the absolute
    1.5x-the-cap run with the whole interpreter counted is in benchmarks/build_space.py --out-of-core)."""
    from w2w.layout import sd15_layout

    d = sd15_layout().dim
    n = 800  # 800 x 99,648 float32 = 319 MB
    g = torch.Generator().manual_seed(0)
    basis = torch.randn(8, d, generator=g)
    with open(tmp_path / "w.npy", "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": (n, d)})
        for s in range(0, n, 100):
            b = min(100, n - s)
            f.write((torch.randn(b, 8, generator=g) @ basis + 0.1 * torch.randn(b, d, generator=g)).numpy().tobytes())
    size = os.path.getsize(tmp_path / "w.npy")
    extra = 200 << 20
    assert size >= 1.5 * extra
    env = dict(os.environ, MALLOC_ARENA_MAX="2", PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.run([sys.executable, "-c", _CAPPED, str(tmp_path / "w.npy"), str(extra)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    pcs, rows_read, peak_extra, explained = proc.stdout.split()
    assert int(pcs) == 4 and int(rows_read) == 3 * n  # streamed: three passes, nothing cached
    assert int(peak_extra) < extra
    assert float(explained) > 0.5
    print(f"matrix {size / 2**20:.0f} MiB, address-space allowance {extra / 2**20:.0f} MiB, "
          f"peak RSS increase {int(peak_extra) / 2**20:.0f} MiB")


def test_cli_matrix_with_layout_names_and_labels(tmp_path, capsys):
    layout = tiny_layout()
    write_lora_folder(tmp_path / "loras", generating_space(layout), 2)
    x = planted_matrix(n=40, d=layout.dim, seed=4)
    torch.save(x, tmp_path / "all_weights.pt")
    (tmp_path / "names.txt").write_text("\n".join(f"m{i}" for i in range(40)))
    (tmp_path / "labels.csv").write_text("file,Male\n" + "\n".join(f"m{i},{int(x[i, 0] > 0)}" for i in reversed(range(40))))
    out = tmp_path / "space.safetensors"
    assert cli_main(["build", str(out), "--from", str(tmp_path / "all_weights.pt"), "--layout", str(tmp_path / "loras"),
                     "--names", str(tmp_path / "names.txt"), "--labels", str(tmp_path / "labels.csv"),
                     "--pcs", "6", "--power-iters", "2", "--quiet"]) == 0
    capsys.readouterr()
    space = load_space(str(out))
    assert space.layout.modules == layout.modules and space.train_names[:2] == ("m0", "m1")
    assert space.labels[:, 0].tolist() == [float(x[i, 0] > 0) for i in range(40)]
    ref = build_space(ArraySource(x, layout=layout), BuildConfig(pcs=6, power_iters=2)).space
    assert torch.equal(space.components, ref.components)


@pytest.mark.parametrize("kw", [{"pcs": 0}, {"power_iters": -1}, {"oversample": -2}, {"memory_mb": 0},
                                {"block_rows": 0}])
def test_config_is_validated(kw):
    with pytest.raises(ValueError, match=next(iter(kw))):
        BuildConfig(**kw)


def test_a_krylov_basis_wider_than_the_weights_is_refused_not_built_wrong():
    """(power_iters + 1) · (pcs + oversample) directions cannot be orthonormal in fewer weights: such a build used to
    write components that are not orthonormal (explained variance above 1) and exit 0; it is refused naming the fix,
    and the suggested setting builds an orthonormal basis."""
    x = torch.randn(300, 40, generator=torch.Generator().manual_seed(0))
    source = ArraySource(x, layout=flat_layout(40))
    cfg = BuildConfig(pcs=20, power_iters=1)
    with pytest.raises(BuildError, match=r"need 60 directions but a model has 40 weights: use power_iters 0"):
        build_space(source, cfg)
    res = build_space(source, BuildConfig(pcs=20, power_iters=0))
    c = res.space.components
    torch.testing.assert_close(c @ c.T, torch.eye(20), atol=1e-4, rtol=0)


# ---- the command line refuses what would go wrong, before any work -----------------------------------------
def test_cli_never_writes_over_its_inputs(tmp_path, capsys):
    layout = tiny_layout()
    names, coefs = write_lora_folder(tmp_path / "loras", generating_space(layout), 12)
    matrix = tmp_path / "m.npy"
    np.save(matrix, planted_matrix(n=30, d=layout.dim).numpy())
    labels_frame(names, coefs).to_csv(tmp_path / "labels.csv", index=False)
    before = {p: p.read_bytes() for p in (matrix, tmp_path / "labels.csv")}
    listing = sorted(os.listdir(tmp_path / "loras"))
    for argv, message in [
        (["build", matrix, "--from", matrix, "--layout", tmp_path / "loras"], "would replace the input"),
        (["build", tmp_path / "loras" / "space.safetensors", "--from", tmp_path / "loras"], "whose every file is read"),
        (["build", tmp_path / "loras" / "model_000.safetensors", "--from", tmp_path / "loras"], "would replace"),
        (["build", tmp_path / "labels.csv", "--from", tmp_path / "loras", "--labels", tmp_path / "labels.csv"],
         "would replace the input"),
        (["build", tmp_path, "--from", tmp_path / "loras"], "is a folder"),
    ]:
        assert cli_main([str(a) for a in argv] + ["--pcs", "3", "--quiet"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, (argv, err)
    assert {p: p.read_bytes() for p in before} == before and sorted(os.listdir(tmp_path / "loras")) == listing

    space = tmp_path / "space.safetensors"
    assert cli_main(["build", str(space), "--from", str(tmp_path / "loras"), "--pcs", "3", "--quiet"]) == 0
    capsys.readouterr()
    assert cli_main(["fit-directions", str(space), str(tmp_path / "labels.csv"), "--out",
                     str(tmp_path / "labels.csv")]) == 2
    assert "would replace the input" in capsys.readouterr().err and (tmp_path / "labels.csv").read_bytes() == \
        before[tmp_path / "labels.csv"]


def test_cli_build_checks_labels_before_reading_the_models(tmp_path, capsys, monkeypatch):
    import w2w.build

    def never(*args, **kwargs):
        raise AssertionError("the build ran before its labels were checked")

    monkeypatch.setattr(w2w.build, "build_space", never)
    layout = tiny_layout()
    names, coefs = write_lora_folder(tmp_path / "loras", generating_space(layout), 12)
    labels_frame(names, coefs).to_csv(tmp_path / "labels.csv", index=False)
    labels_frame(names[:-1], coefs[:-1]).to_csv(tmp_path / "short.csv", index=False)
    for extra, message in [(["--labels", str(tmp_path / "missing.csv")], "could not be read as CSV"),
                           (["--labels", str(tmp_path / "short.csv")], "have no label row"),
                           (["--labels", str(tmp_path / "labels.csv"), "--debias", "Bald"], "Bald not among")]:
        code = cli_main(["build", str(tmp_path / "s.safetensors"), "--from", str(tmp_path / "loras"), "--pcs", "3",
                         "--quiet"] + extra)
        err = capsys.readouterr().err
        assert code == 2 and message in err, err
    assert not (tmp_path / "s.safetensors").exists()


def test_two_models_of_one_name_are_refused(tmp_path):
    layout = tiny_layout()
    gen = generating_space(layout)
    write_lora_folder(tmp_path / "loras", gen, 4, ("kohya",))
    export_lora(gen, Identity(torch.ones(gen.pcs), gen.fingerprint, "x"), str(tmp_path / "loras" / "model_001"), "peft")
    with pytest.raises(BuildError, match="share the model name 'model_001'"):
        open_source(str(tmp_path / "loras"))
    (tmp_path / "loras" / "model_001").rename(tmp_path / "loras" / ".model_001.unfinished")  # hidden: never a model
    assert open_source(str(tmp_path / "loras")).names == tuple(f"model_{i:03d}" for i in range(4))

    np.save(tmp_path / "m.npy", planted_matrix(n=3, d=layout.dim).numpy())
    with pytest.raises(BuildError, match="appear more than once .'a'"):
        open_source(str(tmp_path / "m.npy"), layout=layout, names=["a", "b", "a"])


def test_a_label_column_with_one_value_fits_no_direction(tmp_path, capsys):
    layout = tiny_layout()
    names, coefs = write_lora_folder(tmp_path / "loras", generating_space(layout), 12)
    frame = labels_frame(names, coefs)
    frame["Bald"] = 0
    frame.to_csv(tmp_path / "labels.csv", index=False)
    space = tmp_path / "space.safetensors"
    assert cli_main(["build", str(space), "--from", str(tmp_path / "loras"), "--pcs", "3", "--quiet"]) == 0
    assert cli_main(["sample", str(space), "--seed", "1", "--out", str(tmp_path / "id.safetensors")]) == 0
    capsys.readouterr()
    assert cli_main(["edit", str(space), str(tmp_path / "id.safetensors"), "--edit", "Male=1", "--out",
                     str(tmp_path / "edited.safetensors")]) == 2  # built without labels: the fix is fit-directions
    assert "python -m w2w fit-directions SPACE labels.csv" in capsys.readouterr().err
    for method in ("lstsq", "logistic"):
        assert cli_main(["fit-directions", str(space), str(tmp_path / "labels.csv"), "--method", method]) == 2
        assert "'Bald' has the same label (0) for every training model" in capsys.readouterr().err
    assert cli_main(["fit-directions", str(space), str(tmp_path / "labels.csv"), "--only", "Male,Young"]) == 0
    assert set(load_space(str(space)).directions) == {"Male", "Young"}
