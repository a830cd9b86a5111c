"""One registry directory shared by several processes and replicas (NOTE(shared registry) in
ntk_server/registry.py): concurrent writers, lost races, the staging sweep, cross-replica use."""

from __future__ import annotations

import errno
import hashlib
import multiprocessing
import os
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import registry_writers
from conftest import MLP_SPEC
from ntk_client import Client, NTKError
from ntk_server.config import ServerConfig
from ntk_server.registry import STALE_STAGING_S, Registry, content_id
from ntk_server.server import BackgroundServer

WRITERS = 4
ROUNDS = 3
CHURN_ROUNDS = 15
CHILD_TIMEOUT_S = 120


def _assert_registry_intact(root: Path) -> None:
    """Every published entry is complete and matches its content id; nothing is half-written."""
    registry = Registry(root)
    for entry in (root / "models").iterdir():
        record = registry.get_model(entry.name)
        assert sorted(p.name for p in entry.iterdir()) == ["model.json", "weights.safetensors"]
        weights = registry.load_weights(entry.name)
        assert content_id(record.spec, weights) == entry.name
    for entry in (root / "datasets").iterdir():
        record = registry.get_dataset(entry.name)
        x, _ = registry.load_dataset(entry.name)
        assert x.shape == record.x_shape
        h = hashlib.sha256(f"{record.dtype}\0{list(record.x_shape)}\0[]\0".encode())
        h.update((entry / "x.npy").read_bytes())
        assert h.hexdigest().startswith(entry.name)
    leftovers = sorted(p.name for p in (root / "tmp").iterdir())
    assert leftovers == [], f"staging or trash left behind: {leftovers}"


def test_concurrent_writers_in_several_processes_never_corrupt_the_registry(tmp_path):
    root = tmp_path / "shared"
    ctx = multiprocessing.get_context("spawn")  # the parent has torch threads; never fork it
    barrier = ctx.Barrier(WRITERS + 1)
    results = ctx.Queue()
    procs = [
        ctx.Process(target=registry_writers.writer, args=(str(root), barrier, results, i, ROUNDS))
        for i in range(WRITERS)
    ]
    procs.append(
        ctx.Process(
            target=registry_writers.churner,
            args=(str(root), barrier, results, WRITERS, CHURN_ROUNDS),
        )
    )
    for p in procs:
        p.start()
    try:
        reports = [results.get(timeout=CHILD_TIMEOUT_S) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=CHILD_TIMEOUT_S)
            if p.is_alive():
                p.kill()
                p.join()
    errors = [err for _, _, err in reports if err]
    assert not errors, "\n".join(errors)

    created_by_id = defaultdict(int)
    seeds_by_id = defaultdict(set)
    churn_id = None
    for _, done, _ in reports:
        for kind, *rest in done:
            if kind == "churn":
                assert rest[0] == CHURN_ROUNDS
                continue
            seed, entry_id, created = rest
            if kind == "model" and seed == registry_writers.CHURN_SEED:
                churn_id = entry_id  # deleted and stored again: it may be created many times
                continue
            created_by_id[entry_id] += created
            seeds_by_id[entry_id].add(seed)
    # Same content, same id, and exactly one writer won each race to publish it.
    assert all(count == 1 for count in created_by_id.values()), dict(created_by_id)
    assert all(len(seeds) == 1 for seeds in seeds_by_id.values())
    models = {p.name for p in (root / "models").iterdir()}
    shared = {i for i, s in seeds_by_id.items() if s & set(registry_writers.SHARED_SEEDS)}
    assert len(shared) == len(registry_writers.SHARED_SEEDS)
    assert len(models) == len(registry_writers.SHARED_SEEDS) + WRITERS * ROUNDS + 1
    assert churn_id in models
    assert len(list((root / "datasets").iterdir())) == 1
    _assert_registry_intact(root)


def test_a_lost_race_is_recognised_by_its_error_number_not_by_exists(tmp_path, monkeypatch):
    registry = Registry(tmp_path / "reg")
    record, created = registry.register_model(MLP_SPEC)
    assert created
    # Another host's stale attribute cache: the published entry looks absent to this one.
    monkeypatch.setattr(Path, "exists", lambda self: False)
    again, created = registry.register_model(MLP_SPEC)
    assert not created and again == record
    assert list((tmp_path / "reg" / "tmp").iterdir()) == []


def test_publish_raises_other_rename_errors(tmp_path, monkeypatch):
    registry = Registry(tmp_path / "reg")

    def no_space(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "rename", no_space)
    with pytest.raises(OSError, match="No space"):
        registry.register_model(MLP_SPEC)
    monkeypatch.undo()
    assert list((tmp_path / "reg" / "models").iterdir()) == []
    assert list((tmp_path / "reg" / "tmp").iterdir()) == []


def test_start_up_sweep_spares_a_slow_writer_and_removes_crashed_ones(tmp_path):
    root = tmp_path / "reg"
    Registry(root)
    old = time.time() - 2 * STALE_STAGING_S

    slow = root / "tmp" / "stage-slow-upload"  # directory untouched for long, file still growing
    slow.mkdir()
    (slow / "x.npy").write_bytes(b"partial")
    os.utime(slow, (old, old))

    crashed = root / "tmp" / "stage-crashed"
    crashed.mkdir()
    (crashed / "x.npy").write_bytes(b"partial")
    for path in (crashed / "x.npy", crashed):
        os.utime(path, (old, old))

    trash = root / "tmp" / "deleted-fresh"  # a delete that died before removing its trash
    trash.mkdir()
    (trash / "model.json").write_text("{}")

    Registry(root)  # a replica (re)starting
    assert sorted(p.name for p in (root / "tmp").iterdir()) == ["stage-slow-upload"]


def test_a_model_registered_through_one_replica_is_served_and_deleted_by_another(tmp_path, rng):
    config = ServerConfig(address="127.0.0.1:0", registry=tmp_path / "shared")
    x = rng.standard_normal((7, 6))
    with (
        BackgroundServer(config) as a,
        BackgroundServer(config) as b,
        Client(a.address, timeout=60) as ca,
        Client(b.address, timeout=60) as cb,
    ):
        model = ca.register_model(MLP_SPEC)
        assert cb.get_model(model.id) == model
        assert [m.id for m in cb.models()] == [model.id]
        k_a = ca.kernel(model, x, dtype="float64")
        k_b = cb.kernel(model, x, dtype="float64")  # now loaded in b's memory too
        np.testing.assert_array_equal(k_a, k_b)

        ca.delete_model(model)
        with pytest.raises(NTKError) as info:
            cb.kernel(model, x, dtype="float64")
        assert info.value.code.name == "NOT_FOUND" and model.id in info.value.details
