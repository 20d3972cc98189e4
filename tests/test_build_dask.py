"""Building on Dask: the to-zarr conversion, the Dask engine against the single-machine build on a 2-worker
LocalCluster (with a matrix larger than each worker's memory limit), the CLI, and a worker killed mid-build.

Without dask/distributed/zarr these tests skip with a loud reason, except in CI (CI set), where they fail: CI
installs requirements-dask.txt (scripts/test.sh), so a missing Dask there is a broken setup, not a choice.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from test_build import flat_layout, generating_space, labels_frame, max_angle_degrees, tiny_layout, write_lora_folder
from w2w.build import ArraySource, BuildConfig, BuildError, RowSource, build_space, open_source
from w2w.build_dask import (INSTALL_HINT, ClusterError, ZarrSource, build_space_dask, open_rows, require_dask,
                            write_zarr)
from w2w.cli import main as cli_main
from w2w.safeload import W2WFileError
from w2w.space import load_space

ROOT = Path(__file__).resolve().parents[1]
WORKER_MEMORY = 300 << 20  # memory limit of each worker of the test cluster


def _dask_missing() -> str | None:
    try:
        require_dask()
    except ImportError as exc:
        return str(exc)
    return None


@pytest.fixture(scope="module")
def dask_ready():
    """Skip loudly without dask/distributed/zarr; in CI, fail instead."""
    missing = _dask_missing()
    if missing and os.environ.get("CI"):
        pytest.fail(f"CI must run the Dask tests, but {missing}")
    if missing:
        pytest.skip(f"DASK ENGINE NOT TESTED: {missing}")


def local_cluster(**config):
    """A LocalCluster of 2 single-thread worker processes with WORKER_MEMORY each (``config``: Dask settings for the
    scheduler, such as allowed-failures), and a client of the test's own."""
    import dask
    from distributed import Client, LocalCluster

    with dask.config.set(config):
        cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, memory_limit=WORKER_MEMORY,
                               dashboard_address=":0")  # any free port: never another cluster's
    client = Client(cluster, set_as_default=False)
    # functions of this module sent to workers travel by value: workers must not import it (nor torch through it)
    import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    client.run(_warm_up)
    return cluster, client


def _warm_up() -> None:
    """Import what the passes use, so that the bytes a worker reads during a build are the matrix's."""
    import dask.array as da
    import numpy as np
    import zarr  # noqa: F401

    x = da.random.default_rng(0).standard_normal((8, 4), chunks=(4, 4), dtype=np.float32)
    (x.T @ x).compute(scheduler="sync"), x.var(0, dtype="f8").compute(scheduler="sync")
    da.compute(*da.linalg.svd_compressed(x, 2, seed=0), scheduler="sync")


def _torch_imported() -> bool:
    return "torch" in sys.modules


@pytest.fixture(scope="module")
def cluster(dask_ready):
    cluster, client = local_cluster()
    yield cluster, client
    client.close()
    cluster.close()


class PlantedRows(RowSource):
    """Rows with a planted spectrum: ``rank`` directions of variance 100..1 (× d) over isotropic noise of variance
    ``noise``², then per-weight scales and offsets. Generated block by block from a seed per block start, so the
    matrix is never held whole."""

    def __init__(self, n: int, d: int, rank: int = 16, seed: int = 0, noise: float = 0.5):
        g = torch.Generator().manual_seed(seed)
        self.basis = torch.linalg.qr(torch.randn(d, rank, generator=g)).Q.T.contiguous() * d ** 0.5  # (rank, d)
        self.spectrum = torch.logspace(1, 0, rank)
        self.scale, self.offset = (torch.rand(d, generator=g) + 0.2) * 1e-3, torch.randn(d, generator=g) * 1e-3
        self.seed, self.noise = seed, noise
        self.shape, self.layout = (n, d), flat_layout(d)
        self.names = tuple(f"m{i}" for i in range(n))
        self.description = f"planted rows {n:,} x {d:,}"

    def read(self, start: int, out: np.ndarray) -> np.ndarray:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + start)
        b, d = out.shape
        x = (torch.randn(b, len(self.spectrum), generator=g) * self.spectrum) @ self.basis
        x += self.noise * torch.randn(b, d, generator=g)
        out[:] = (x * self.scale + self.offset).numpy()
        return out


def projections(source: ZarrSource, space) -> torch.Tensor:
    """Z componentsᵀ in float64, block by block, from the stored rows and the space's mean and std."""
    std = torch.where(space.std == 0, torch.ones_like(space.std), space.std).double()
    out, buf = [], np.empty((256, source.shape[1]), np.float32)
    for start in range(0, source.shape[0], 256):
        x = torch.from_numpy(source.read(start, buf[: min(256, source.shape[0] - start)])).double()
        out.append((x - space.mean.double()) / std @ space.components.double().T)
    return torch.cat(out)


def assert_same_space(dask_result, local_result, compare: int) -> None:
    """Largest principal angle over the first ``compare`` PCs ≤ 0.05 rad; explained variance within 0.1 %."""
    a, b = dask_result.space.components[:compare], local_result.space.components[:compare]
    assert max_angle_degrees(a, b) <= float(np.rad2deg(0.05))
    ev_dask, ev_local = dask_result.explained_variance_ratio, local_result.explained_variance_ratio
    assert float(((ev_dask[:compare] - ev_local[:compare]).abs() / ev_local[:compare]).max()) <= 1e-3
    assert abs(float(ev_dask.sum()) / float(ev_local.sum()) - 1) <= 1e-3
    # the same standardisation: the single-machine build sums float32 blocks, so its mean carries float32 rounding
    # of the data's magnitude (~1e-6 of it); 1e-4 of each weight's spread is far above that and far below any error
    mean_shift = (dask_result.space.mean.double() - local_result.space.mean.double()).abs() / local_result.space.std
    assert float(mean_shift.max()) <= 1e-4
    torch.testing.assert_close(dask_result.space.std, local_result.space.std, rtol=1e-5, atol=0)


# ---- without Dask ---------------------------------------------------------------------------------------
def test_missing_dask_says_what_to_install(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "distributed", None)  # makes `import distributed` fail
    with pytest.raises(ImportError, match="distributed") as info:
        require_dask()
    assert "pip install -r requirements-dask.txt" in str(info.value) and 'pip install ".[dask]"' in str(info.value)
    np.save(tmp_path / "w.npy", np.zeros((4, tiny_layout().dim), np.float32))
    monkeypatch.setitem(sys.modules, "zarr", None)
    assert cli_main(["to-zarr", str(tmp_path / "w.npy"), str(tmp_path / "w.zarr"), "--layout",
                     str(_layout_lora(tmp_path)), "--quiet"]) == 2
    assert INSTALL_HINT in capsys.readouterr().err
    assert not (tmp_path / "w.zarr").exists()


def _layout_lora(tmp_path) -> Path:
    write_lora_folder(tmp_path / "layout", generating_space(tiny_layout()), 1)
    return tmp_path / "layout"


def test_core_imports_no_dask_until_asked():
    code = ("import sys, w2w.build, w2w.build_dask, w2w.cli_build; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'dask', 'distributed', 'zarr'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    assert out.strip() == "[]"


def test_requirements_dask_matches_the_pyproject_extra():
    lines = [line.split("#", 1)[0].strip() for line in (ROOT / "requirements-dask.txt").read_text().splitlines()]
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["dask"]
    assert sorted(line for line in lines if line) == sorted(extra)
    assert "requirements-dask.txt" in (ROOT / "scripts" / "test.sh").read_text()  # CI runs these tests


def test_dask_engine_needs_a_zarr_source_and_local_engine_no_cluster_options(tmp_path, capsys):
    np.save(tmp_path / "w.npy", np.random.default_rng(0).standard_normal((20, 99_648)).astype(np.float32))
    out = tmp_path / "s.safetensors"
    assert cli_main(["build", str(out), "--from", str(tmp_path / "w.npy"), "--engine", "dask", "--quiet"]) == 2
    assert "python -m w2w to-zarr" in capsys.readouterr().err
    assert cli_main(["build", str(out), "--from", str(tmp_path / "w.npy"), "--workers", "2", "--quiet"]) == 2
    assert "--engine dask" in capsys.readouterr().err
    assert not out.exists()


# ---- to-zarr --------------------------------------------------------------------------------------------
def test_to_zarr_keeps_rows_names_and_layout_of_every_source(tmp_path, dask_ready):
    layout = tiny_layout()
    names, _ = write_lora_folder(tmp_path / "loras", generating_space(layout), 30, ("kohya", "peft"))
    x = torch.from_numpy(PlantedRows(50, layout.dim).read(0, np.empty((50, layout.dim), np.float32)))
    np.save(tmp_path / "w.npy", x.numpy())
    torch.save(x.double(), tmp_path / "w.pt")
    save_file({"weights": x.half()}, str(tmp_path / "w.safetensors"))
    (tmp_path / "names.txt").write_text("\n".join(f"n{i}" for i in range(50)))
    for name, extra in [("loras", []), ("w.npy", ["--names", str(tmp_path / "names.txt")]), ("w.pt", []),
                        ("w.safetensors", [])]:
        layout_args = [] if name == "loras" else ["--layout", str(tmp_path / "loras")]
        out = tmp_path / f"{name}.zarr"
        assert cli_main(["to-zarr", str(tmp_path / name), str(out), "--chunk-rows", "7", "--quiet",
                         *layout_args, *extra]) == 0
        original = open_source(str(tmp_path / name), layout=layout, names=None if name == "loras" else
                               ([f"n{i}" for i in range(50)] if extra else None))
        stored = open_rows(str(out))
        assert isinstance(stored, ZarrSource) and stored.shape == original.shape
        assert stored.names == original.names and stored.layout.modules == layout.modules
        assert stored.array.chunks == (7, layout.dim)  # rows in chunks, all weights of a row in one chunk
        n, d = original.shape
        want, got = np.empty((n, d), np.float32), np.empty((n, d), np.float32)
        assert np.array_equal(original.read(0, want), stored.read(0, got)), name  # float32 rows, exactly
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".partial-")]


def test_to_zarr_is_atomic_and_never_overwrites(tmp_path, dask_ready):
    class Failing(PlantedRows):
        def read(self, start, out):
            if start >= 20:
                raise OSError("disk gone")
            return super().read(start, out)

    with pytest.raises(OSError, match="disk gone"):
        write_zarr(Failing(40, 64), str(tmp_path / "w.zarr"), chunk_rows=10)
    assert os.listdir(tmp_path) == []  # neither the array nor its temporary folder
    write_zarr(PlantedRows(40, 64), str(tmp_path / "w.zarr"), chunk_rows=10)
    with pytest.raises(W2WFileError, match="already exists"):
        write_zarr(PlantedRows(40, 64), str(tmp_path / "w.zarr"), chunk_rows=10)


def test_local_engine_reads_zarr_exactly_like_the_matrix_file(tmp_path, dask_ready):
    source = PlantedRows(300, 500)
    x = source.read(0, np.empty((300, 500), np.float32))
    np.save(tmp_path / "w.npy", x)
    write_zarr(ArraySource(x, layout=source.layout), str(tmp_path / "w.zarr"), chunk_rows=64)
    cfg = BuildConfig(pcs=8, memory_mb=1, block_rows=50)
    ref = build_space(open_source(str(tmp_path / "w.npy"), layout=source.layout), cfg)
    got = build_space(ZarrSource(str(tmp_path / "w.zarr")), cfg)
    assert torch.equal(got.space.components, ref.space.components)
    assert torch.equal(got.space.train_coefs, ref.space.train_coefs)


def test_local_engine_reads_each_zarr_chunk_once_per_pass(tmp_path, dask_ready):
    from w2w import procstat

    zs = write_zarr(PlantedRows(1200, 4000), str(tmp_path / "w.zarr"), chunk_rows=100)
    cfg = BuildConfig(pcs=8, memory_mb=4)  # blocks of 104 rows by the memory budget, 100 once whole chunks
    before = procstat.read_bytes()
    res = build_space(zs, cfg)
    assert res.rows_read == 1200 * cfg.passes  # streamed, not cached
    assert abs((procstat.read_bytes() - before) / (1200 * 4000 * 4) - cfg.passes) < 0.05


# ---- the Dask engine ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_dask_build_agrees_with_single_machine_on_a_matrix_larger_than_each_worker(tmp_path, cluster):
    _, client = cluster
    source = PlantedRows(4800, 20_000)  # 366 MiB of float32: more than each worker's 300 MiB limit
    zs = write_zarr(source, str(tmp_path / "w.zarr"), chunk_rows=100)
    matrix_bytes = zs.shape[0] * zs.shape[1] * 4
    assert matrix_bytes > WORKER_MEMORY
    cfg = BuildConfig(pcs=16, power_iters=1, memory_mb=32)
    local = build_space(zs, cfg)
    workers_before = set(client.scheduler_info()["workers"])
    result = build_space_dask(zs, cfg, client=client)

    assert set(client.scheduler_info()["workers"]) == workers_before  # no worker died or was restarted
    assert_same_space(result, local, compare=12)  # the first 3/4 of the PCs
    coefs, proj = result.space.train_coefs.double(), projections(zs, result.space)
    assert float(((coefs - proj).norm(dim=0) / proj.norm(dim=0)).max()) <= 1e-4  # float32 products of 20,000 terms
    assert result.space.train_names == source.names and result.passes == cfg.passes == 3
    peaks = [w["peak_rss"] for w in result.workers.values()]
    read = sum(w["read_bytes"] for w in result.workers.values())
    assert len(peaks) == 2 and max(peaks) < WORKER_MEMORY < matrix_bytes  # the matrix was never held by a worker
    assert abs(read / matrix_bytes - cfg.passes) < 0.05  # each pass reads every chunk once
    assert not any(client.run(_torch_imported).values())
    print(f"matrix {matrix_bytes / 2**20:.0f} MiB; worker limit {WORKER_MEMORY / 2**20:.0f} MiB; peak RSS "
          f"{', '.join(f'{p / 2**20:.0f}' for p in peaks)} MiB; read {read / matrix_bytes:.3f} passes; "
          f"dask {result.seconds:.1f} s, local {local.seconds:.1f} s")


def test_svd_compressed_gives_the_same_space_in_more_passes(tmp_path, cluster):
    _, client = cluster
    zs = write_zarr(PlantedRows(2000, 8000), str(tmp_path / "w.zarr"), chunk_rows=100)
    cfg = BuildConfig(pcs=12, power_iters=1)
    local = build_space(zs, cfg)
    seen = []
    result = build_space_dask(zs, cfg, client=client, algorithm="svd_compressed",
                              callback=lambda i, n, what: seen.append((i, n, what)))
    assert_same_space(result, local, compare=9)
    proj = projections(zs, result.space)
    assert float(((result.space.train_coefs.double() - proj).norm(dim=0) / proj.norm(dim=0)).max()) <= 1e-4
    assert result.passes == 2 * cfg.power_iters + 4 == 6 and seen[-1] == (6, 6, "done")
    read = sum(w["read_bytes"] for w in result.workers.values())  # also counts the workers' own /proc polling
    assert abs(read / (2000 * 8000 * 4) - result.passes) < 0.05


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # NaN rows in the statistics
def test_nan_rows_are_named_on_the_cluster(tmp_path, cluster):
    _, client = cluster
    x = PlantedRows(60, 200).read(0, np.empty((60, 200), np.float32))
    x[7, 3], x[41, 0] = np.nan, np.inf
    zs = write_zarr(ArraySource(x, names=[f"m{i}" for i in range(60)], layout=flat_layout(200)),
                    str(tmp_path / "w.zarr"), chunk_rows=16)
    with pytest.raises(BuildError, match=r"2 of 60 models.*row 7 \(m7\), row 41 \(m41\)"):
        build_space_dask(zs, BuildConfig(pcs=3), client=client)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the lost chunk's NaN rows
def test_workers_that_cannot_see_the_array_stop_the_build(tmp_path, cluster):
    _, client = cluster
    zs = write_zarr(PlantedRows(40, 64), str(tmp_path / "w.zarr"), chunk_rows=10)
    os.rename(tmp_path / "w.zarr", tmp_path / "elsewhere.zarr")  # what a worker without the shared mount sees
    with pytest.raises(ClusterError, match=r"2 Dask worker\(s\) cannot see .*w\.zarr"):
        build_space_dask(zs, BuildConfig(pcs=3), client=client)
    missing = ZarrSource(str(tmp_path / "elsewhere.zarr"))
    os.remove(tmp_path / "elsewhere.zarr" / "weights" / "c" / "1" / "0")  # a chunk lost after the conversion
    with pytest.raises(BuildError, match=r"10 of 40 models contain NaN.*row 10 \(m10\)"):
        build_space_dask(missing, BuildConfig(pcs=3), client=client)


def test_cli_to_zarr_then_build_on_the_cluster_writes_the_same_format(tmp_path, cluster, capsys):
    scheduler = cluster[0].scheduler_address
    layout = tiny_layout()
    gen = generating_space(layout)
    names, coefs = write_lora_folder(tmp_path / "loras", gen, 60, ("kohya", "peft"))
    labels_frame(names, coefs).sample(frac=1.0, random_state=0).to_csv(tmp_path / "labels.csv", index=False)
    common = ["--pcs", "5", "--labels", str(tmp_path / "labels.csv"), "--quiet"]
    assert cli_main(["build", str(tmp_path / "local.safetensors"), "--from", str(tmp_path / "loras"), *common]) == 0
    assert cli_main(["to-zarr", str(tmp_path / "loras"), str(tmp_path / "w.zarr"), "--chunk-rows", "16",
                     "--quiet"]) == 0
    capsys.readouterr()
    assert cli_main(["build", str(tmp_path / "dask.safetensors"), "--from", str(tmp_path / "w.zarr"),
                     "--engine", "dask", "--scheduler", scheduler, *common]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["passes"] == 3 and len(summary["workers"]) == 2 and summary["training_models"] == 60

    local, dask_space = load_space(str(tmp_path / "local.safetensors")), load_space(str(tmp_path / "dask.safetensors"))
    assert _keys(tmp_path / "dask.safetensors") == _keys(tmp_path / "local.safetensors")
    assert dask_space.train_names == local.train_names == tuple(names)
    assert torch.equal(dask_space.labels, local.labels) and set(dask_space.directions) == {"Male", "Young"}
    assert max_angle_degrees(dask_space.components, local.components) < 0.05
    cos = torch.nn.functional.cosine_similarity(dask_space.directions["Male"].unit @ dask_space.components,
                                                local.directions["Male"].unit @ local.components, dim=0)
    assert float(cos) > 1 - 1e-6  # the same direction in weight space


def test_cli_without_scheduler_starts_a_local_cluster_with_the_memory_limit_asked(tmp_path, dask_ready, capsys):
    write_zarr(PlantedRows(400, 2000), str(tmp_path / "w.zarr"), chunk_rows=50)
    assert cli_main(["build", str(tmp_path / "s.safetensors"), "--from", str(tmp_path / "w.zarr"), "--engine", "dask",
                     "--workers", "2", "--threads-per-worker", "1", "--worker-memory", "300MiB", "--pcs", "6",
                     "--quiet"]) == 0
    workers = json.loads(capsys.readouterr().out)["workers"]
    assert len(workers) == 2
    for w in workers.values():
        assert w["memory_limit_gib"] == round(300 / 1024, 3) and 0 < w["peak_rss_gib"] < w["memory_limit_gib"]
    assert load_space(str(tmp_path / "s.safetensors")).pcs == 6


def _keys(path) -> tuple[list[str], list[str]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return sorted(f.keys()), sorted(f.metadata())


# ---- a worker killed mid-build --------------------------------------------------------------------------
class WorkerKiller(threading.Thread):
    """Kills (SIGKILL) the first worker seen running a task of the build; the Nanny then starts a new one."""

    def __init__(self, client):
        super().__init__(daemon=True)
        self.client, self.pids, self.killed, self.stop = client, client.run(os.getpid), None, threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            busy = [address for address, keys in self.client.processing().items() if keys]
            if busy and busy[0] in self.pids:
                self.killed = self.pids[busy[0]]
                os.kill(self.killed, signal.SIGKILL)
                return
            time.sleep(0.01)


def _build_while_killing(tmp_path, scheduler, client, out) -> tuple[int, WorkerKiller]:
    killer = WorkerKiller(client)
    killer.start()
    try:
        code = cli_main(["build", str(out), "--from", str(tmp_path / "w.zarr"), "--engine", "dask", "--scheduler",
                         scheduler, "--pcs", "8", "--quiet"])
    finally:
        killer.stop.set()
        killer.join()
    assert killer.killed is not None  # a worker really was killed while it computed part of the build
    return code, killer


@pytest.fixture
def matrix_zarr(tmp_path, dask_ready):
    return write_zarr(PlantedRows(1200, 8000), str(tmp_path / "w.zarr"), chunk_rows=40)  # 30 tasks per pass


def test_killed_worker_is_retried_and_the_space_is_unchanged(tmp_path, matrix_zarr, capsys):
    cluster, client = local_cluster()
    try:
        scheduler = cluster.scheduler_address
        assert cli_main(["build", str(tmp_path / "calm.safetensors"), "--from", str(tmp_path / "w.zarr"),
                         "--engine", "dask", "--scheduler", scheduler, "--pcs", "8", "--quiet"]) == 0
        code, killer = _build_while_killing(tmp_path, scheduler, client, tmp_path / "killed.safetensors")
        assert code == 0, capsys.readouterr().err[-2000:]
        assert killer.killed not in client.run(os.getpid).values()  # the Nanny replaced the killed worker
    finally:
        client.close()
        cluster.close()
    calm, killed = load_space(str(tmp_path / "calm.safetensors")), load_space(str(tmp_path / "killed.safetensors"))
    torch.testing.assert_close(killed.components, calm.components, rtol=0, atol=1e-6)
    torch.testing.assert_close(killed.train_coefs, calm.train_coefs, rtol=1e-5, atol=1e-5)
    assert torch.equal(killed.mean, calm.mean) and torch.equal(killed.std, calm.std)


def test_killed_worker_without_retries_fails_clearly_and_writes_nothing(tmp_path, matrix_zarr, capsys):
    out = tmp_path / "space.safetensors"
    out.write_bytes(b"an older space, to be kept if the build fails")
    cluster, client = local_cluster(**{"distributed.scheduler.allowed-failures": 0})
    try:
        code, _ = _build_while_killing(tmp_path, cluster.scheduler_address, client, out)
    finally:
        client.close()
        cluster.close()
    err = capsys.readouterr().err
    assert code == 2 and "Dask gave up on the build" in err and "Nothing was written" in err
    assert "allowed-failures" in err  # the message names the setting that allows retries
    assert out.read_bytes() == b"an older space, to be kept if the build fails"
    assert sorted(os.listdir(tmp_path)) == ["space.safetensors", "w.zarr"]  # no temporary file left behind


def test_a_cluster_that_could_never_run_is_refused_at_once(tmp_path, dask_ready):
    """A scheduler file that is not there (the client would wait for it to appear) and a local cluster of no workers
    (tasks would wait forever) fail before anything starts."""
    from w2w.build_dask import dask_client

    with pytest.raises(ClusterError, match="scheduler file not found: .*nothing.json"):
        with dask_client(str(tmp_path / "nothing.json")):
            pass
    for kw in ({"workers": 0}, {"threads_per_worker": 0}, {"workers": 1.5}):
        with pytest.raises(ValueError, match="at least 1"):
            with dask_client(**kw):
                pass
