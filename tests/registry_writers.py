"""Child-process bodies for the shared-registry tests (spawned, so importable by name).

Each writer opens its own Registry on the shared root, waits at a barrier so that all of them
start together, and reports what it did (or the error it met) on a queue.
"""

from __future__ import annotations

import copy
import traceback

import numpy as np

SMALL_MLP = {
    "input_shape": [5],
    "layers": [{"type": "dense", "width": 16}, {"type": "tanh"}, {"type": "dense", "width": 2}],
    "parameterization": "ntk",
    "init": {"seed": 0, "sigma_w": 1.3, "sigma_b": 0.1},
}
SHARED_SEEDS = (1, 2, 3)  # every writer registers these
CHURN_SEED = 99  # one process deletes and re-registers this while the writers register it
DATASET_ROWS = 257


def spec_with_seed(seed: int) -> dict:
    spec = copy.deepcopy(SMALL_MLP)
    spec["init"]["seed"] = seed
    return spec


def shared_dataset() -> np.ndarray:
    return np.random.default_rng(7).standard_normal((DATASET_ROWS, 5)).astype(np.float32)


def writer(root: str, barrier, results, worker: int, rounds: int) -> None:
    """Registers the shared models, its own models and one shared dataset, `rounds` times."""
    try:
        from ntk_server.registry import Registry

        registry = Registry(root)
        barrier.wait()
        done = []
        for r in range(rounds):
            seeds = [*SHARED_SEEDS, CHURN_SEED, 1000 + 100 * worker + r]
            for seed in seeds:
                record, created = registry.register_model(spec_with_seed(seed))
                done.append(("model", seed, record.id, created))
            staged = registry.staging()
            np.save(staged / "x.npy", shared_dataset())
            record, created = registry.publish_dataset(staged, (DATASET_ROWS, 5), (), "float32")
            done.append(("dataset", 0, record.id, created))
        results.put((worker, done, None))
    except BaseException:
        results.put((worker, [], traceback.format_exc()))


def churner(root: str, barrier, results, worker: int, rounds: int) -> None:
    """Deletes and re-registers the churn model while the writers register it."""
    try:
        from ntk_server.registry import Registry

        registry = Registry(root)
        barrier.wait()
        deleted = 0
        for _ in range(rounds):
            record, _ = registry.register_model(spec_with_seed(CHURN_SEED))
            registry.delete_model(record.id)  # only this process deletes, so it is there
            deleted += 1
        registry.register_model(spec_with_seed(CHURN_SEED))  # leave it registered
        results.put((worker, [("churn", deleted)], None))
    except BaseException:
        results.put((worker, [], traceback.format_exc()))
