"""Models and datasets on disk, content-addressed and written atomically.

Layout under the registry root:
  models/<id>/model.json             spec, shapes, parameter names, creation time
  models/<id>/weights.safetensors    initial weights (float64 for seeded models)
  models/<id>/owners/<name>          one empty file per token name that registered the model
  datasets/<id>/dataset.json, x.npy, y.npy
  tmp/                               staging; an entry appears under models/ or datasets/ only by
                                     one rename of a complete, fsynced directory

A process killed mid-write leaves at most a staging directory in tmp/, never a half entry.
Staging directories are named after their host and process; the next start on the same host
removes those whose process is gone, and any replica removes ones older than an hour.
Several servers may share one root: the id is the hash of the content, so two writers of the
same model race to rename identical directories and the loser discards its copy. Ownership claims
are files of their own rather than a list in model.json, so two replicas adding owners to one
model at once never lose either claim.

NOTE(shared registry): replicas on several hosts share the root over a network filesystem
(Kubernetes ReadWriteMany: NFS, CephFS, a cloud file store). What this module relies on:
  - rename(2) of a directory is atomic and fails with EEXIST or ENOTEMPTY when the target is a
    non-empty directory. The loser of a race learns it from that error number, not from an
    exists() check, which another host's stale attribute cache may answer wrongly.
  - Entries are immutable once published, so positive caching on other hosts is harmless.
    Negative caching is not: a host that once looked up an id before it existed may go on
    believing it absent. A miss is therefore retried once after listing the parent directory,
    which makes NFS revalidate it; mounting with lookupcache=positive removes the doubt.
  - Staging directories of crashed writers are swept at start-up by age. The age is that of
    the newest file inside (a slow upload keeps writing its .npy, while its directory's mtime
    stands still) and is measured against a probe file's mtime, i.e. the file server's clock,
    so skew between hosts does not make a live writer look stale.
  - A deleted model may still sit in another replica's memory; the runtime checks the entry
    is still on disk before each use (Registry.has_model).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import socket
import tempfile
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import load_file, save_file

from ntk_server.engine.network import Network, canonical_spec
from ntk_server.errors import InvalidArgument, NotFound, Unavailable, short

log = logging.getLogger(__name__)

ID_HEX_CHARS = 32
OWNERS_DIR = "owners"
# A staging directory with no file written for this long belongs to a crashed writer.
STALE_STAGING_S = 3600.0
STAGING_PREFIX = "stage-"
TRASH_PREFIX = "deleted-"
CLOCK_PROBE_PREFIX = "clock-"
REGISTER_ATTEMPTS = 3
_ID_CHARS = set("0123456789abcdef")
# Staging directories made by this process (several registries may share a root in-process).
_OWN_STAGING: set[str] = set()


@dataclass(frozen=True)
class ModelRecord:
    id: str
    spec: dict
    parameter_count: int
    input_shape: tuple[int, ...]
    output_size: int
    parameters: tuple[tuple[str, tuple[int, ...]], ...]
    created_at: str


@dataclass(frozen=True)
class DatasetRecord:
    id: str
    dtype: str
    x_shape: tuple[int, ...]
    y_shape: tuple[int, ...]
    size_bytes: int


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _newest_mtime(path: Path) -> float:
    """The latest mtime of a directory and the files directly inside it."""
    newest = path.stat().st_mtime
    if path.is_dir():
        for child in path.iterdir():
            try:
                newest = max(newest, child.stat().st_mtime)
            except FileNotFoundError:
                continue
    return newest


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def content_id(spec: Mapping, params: Mapping[str, torch.Tensor]) -> str:
    """Hash of the canonical spec and every parameter's name, dtype, shape and bytes."""
    h = hashlib.sha256()
    h.update(json.dumps(spec, sort_keys=True, separators=(",", ":")).encode())
    for name in sorted(params):
        t = params[name].detach().cpu().contiguous()
        h.update(f"\0{name}\0{t.dtype}\0{list(t.shape)}\0".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:ID_HEX_CHARS]


def _check_owner(name: str) -> None:
    # Owner names are file names; auth.py allows only safe ones, this guards other callers.
    if not name or name.startswith(".") or "/" in name or "\0" in name:
        raise ValueError(f"owner name {name!r} is not a safe file name")


def check_id(value: str, field: str) -> str:
    if len(value) != ID_HEX_CHARS or not set(value) <= _ID_CHARS:
        raise NotFound(f"no such id {short(value)}", field=field, value=value)
    return value


def parse_safetensors(data: bytes, field: str = "safetensors") -> dict[str, torch.Tensor]:
    """Decode uploaded weights; only float32 and float64 tensors are accepted."""
    try:
        tensors = st_load(data)
    except Exception as exc:  # safetensors raises several types for malformed input
        raise InvalidArgument(f"not a valid safetensors file ({exc})", field=field) from None
    for name, t in tensors.items():
        if t.dtype not in (torch.float32, torch.float64):
            raise InvalidArgument(
                f"dtype {t.dtype} is not float32 or float64", field=f"{field}[{name!r}]"
            )
    return tensors


class Registry:
    """The on-disk store. Methods are safe to call from several threads and processes."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.models_dir = self.root / "models"
        self.datasets_dir = self.root / "datasets"
        self.tmp_dir = self.root / "tmp"
        try:
            for d in (self.models_dir, self.datasets_dir, self.tmp_dir):
                d.mkdir(parents=True, exist_ok=True)
            self._clean_staging()
        except OSError as exc:
            raise RuntimeError(
                f"registry directory {str(self.root)!r} is not usable: {exc.strerror} "
                f"({exc.filename}); it must be a writable directory"
            ) from None

    def _filesystem_now(self) -> float:
        """The current time on the clock that stamps files in tmp/ (see NOTE(shared registry))."""
        probe = self.tmp_dir / f"{CLOCK_PROBE_PREFIX}{uuid.uuid4().hex}"
        try:
            with open(probe, "wb") as f:
                f.write(b"\0")
                f.flush()
                os.fsync(f.fileno())
                return os.fstat(f.fileno()).st_mtime
        finally:
            probe.unlink(missing_ok=True)

    def _clean_staging(self) -> None:
        # Other replicas may be writing into tmp/ right now: only leftovers of dead processes
        # on this host, deleted entries and old directories are removed.
        now = self._filesystem_now()
        for entry in self.tmp_dir.iterdir():
            if entry.name.startswith(TRASH_PREFIX):
                # Already unpublished; whoever deleted it died before finishing.
                shutil.rmtree(entry, ignore_errors=True)
                continue
            try:
                age_s = now - _newest_mtime(entry)
            except FileNotFoundError:
                continue  # published or removed meanwhile
            if age_s > STALE_STAGING_S or self._orphaned(entry.name):
                log.info("removing leftover staging entry name=%s age_s=%.0f", entry.name, age_s)
                if entry.is_dir():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)

    @staticmethod
    def _orphaned(name: str) -> bool:
        """A staging directory of a process on this host that no longer runs."""
        parts = name.split("-")
        if len(parts) < 4 or parts[0] != "stage" or parts[1] != _host_tag():
            return False
        try:
            pid = int(parts[2])
        except ValueError:
            return False
        if pid == os.getpid():
            # Not ours: an earlier process with our pid (containers restart as pid 1).
            return name not in _OWN_STAGING
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False

    def staging(self) -> Path:
        """A fresh private directory under tmp/ for building an entry."""
        prefix = f"{STAGING_PREFIX}{_host_tag()}-{os.getpid()}-"
        path = Path(tempfile.mkdtemp(prefix=prefix, dir=self.tmp_dir))
        _OWN_STAGING.intersection_update(os.listdir(self.tmp_dir))  # forget finished ones
        _OWN_STAGING.add(path.name)
        return path

    def _publish(self, staged: Path, final: Path) -> bool:
        """Atomically move a complete staged directory into place; False if it already exists."""
        _fsync_dir(staged)
        try:
            os.rename(staged, final)
        except OSError as exc:
            # Lost the race to another writer of the same content (NOTE(shared registry)).
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            shutil.rmtree(staged, ignore_errors=True)
            return False
        _fsync_dir(final.parent)
        return True

    @staticmethod
    def _read_json(path: Path) -> dict:
        """Read an entry's json; a miss is retried once after refreshing the parent listing."""
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            os.listdir(path.parent.parent)  # revalidates a network filesystem's lookup cache
            return json.loads(path.read_text())

    # Models -------------------------------------------------------------------------------

    def register_model(
        self,
        spec: dict,
        weights: Mapping[str, torch.Tensor] | None = None,
        owner: str | None = None,
    ) -> tuple[ModelRecord, bool]:
        """Validate, hash and store a model; returns (record, created).

        owner: a token name to record as one of the model's owners (also when it existed).
        """
        spec = canonical_spec(spec)
        net = Network(spec)
        if weights is None:
            params = net.init_params()
        else:
            net.check_params(weights, field="safetensors")
            params = {k: v.detach().cpu().contiguous() for k, v in weights.items()}
        model_id = content_id(spec, params)
        final = self.models_dir / model_id
        record = ModelRecord(
            id=model_id,
            spec=spec,
            parameter_count=net.parameter_count,
            input_shape=net.input_shape,
            output_size=net.output_size,
            parameters=tuple((n, s) for n, s in net.param_shapes.items()),
            created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        )
        # Another replica may delete the entry between any two of these steps; each attempt
        # either publishes our copy or reads the one that is there.
        for _ in range(REGISTER_ATTEMPTS):
            if final.exists():
                try:
                    existing = self.get_model(model_id)
                except NotFound:
                    pass  # deleted meanwhile: store it again
                else:
                    if owner:
                        self.claim_model(model_id, owner)
                    return existing, False
            staged = self.staging()
            try:
                save_file(params, str(staged / "weights.safetensors"))
                with open(staged / "weights.safetensors", "rb+") as f:
                    os.fsync(f.fileno())
                _write_file(
                    staged / "model.json", json.dumps(_record_json(record), indent=1).encode()
                )
                if owner:
                    _check_owner(owner)
                    (staged / OWNERS_DIR).mkdir()
                    _write_file(staged / OWNERS_DIR / owner, b"")
                created = self._publish(staged, final)
            except BaseException:
                shutil.rmtree(staged, ignore_errors=True)
                raise
            if created:
                log.info("model registered id=%s parameters=%d", model_id, net.parameter_count)
                return record, True
            try:
                existing = self.get_model(model_id)
            except NotFound:
                continue  # the winner's copy was deleted before we could read it
            if owner:
                self.claim_model(model_id, owner)
            return existing, False
        raise Unavailable(
            f"model {model_id} was deleted {REGISTER_ATTEMPTS} times while being registered; "
            "retry the registration",
            field="spec",
        )

    def model_owners(self, model_id: str) -> frozenset[str]:
        """Token names that registered a model; empty when unowned or unknown."""
        folder = self.models_dir / check_id(model_id, "model_id") / OWNERS_DIR
        try:
            return frozenset(os.listdir(folder))
        except FileNotFoundError:
            return frozenset()

    def claim_model(self, model_id: str, owner: str) -> None:
        """Add an owner to an existing model."""
        _check_owner(owner)
        folder = self.models_dir / check_id(model_id, "model_id") / OWNERS_DIR
        try:
            # No parents=True: a model deleted meanwhile must not reappear as a bare directory.
            folder.mkdir(exist_ok=True)
            _write_file(folder / owner, b"")
        except FileNotFoundError:
            raise NotFound(f"no model with id {model_id!r}", field="model_id") from None
        _fsync_dir(folder)

    def release_model(self, model_id: str, owner: str) -> frozenset[str]:
        """Remove one owner's claim; returns the owners left."""
        _check_owner(owner)
        folder = self.models_dir / check_id(model_id, "model_id") / OWNERS_DIR
        try:
            (folder / owner).unlink()
        except FileNotFoundError:
            pass
        else:
            _fsync_dir(folder)
            log.info("model claim released id=%s owner=%s", model_id, owner)
        return self.model_owners(model_id)

    def get_model(self, model_id: str, field: str = "model_id") -> ModelRecord:
        path = self.models_dir / check_id(model_id, field) / "model.json"
        try:
            data = self._read_json(path)
        except FileNotFoundError:
            raise NotFound(f"no model with id {model_id!r}", field=field, value=model_id) from None
        return ModelRecord(
            id=data["id"],
            spec=data["spec"],
            parameter_count=data["parameter_count"],
            input_shape=tuple(data["input_shape"]),
            output_size=data["output_size"],
            parameters=tuple((n, tuple(s)) for n, s in data["parameters"]),
            created_at=data["created_at"],
        )

    def has_model(self, model_id: str) -> bool:
        """Whether the entry is on disk now (it may have been deleted through another replica)."""
        return (self.models_dir / check_id(model_id, "model_id") / "model.json").exists()

    def load_weights(self, model_id: str) -> dict[str, torch.Tensor]:
        path = self.models_dir / check_id(model_id, "model_id") / "weights.safetensors"
        try:
            return load_file(str(path))
        except FileNotFoundError:
            raise NotFound(f"no model with id {model_id!r}", field="model_id") from None

    def list_models(self) -> list[ModelRecord]:
        out = []
        for entry in sorted(self.models_dir.iterdir()):
            try:
                out.append(self.get_model(entry.name))
            except NotFound:
                continue  # deleted meanwhile
        return sorted(out, key=lambda r: (r.created_at, r.id))

    def count_models(self) -> int:
        return sum(1 for _ in os.scandir(self.models_dir))

    def delete_model(self, model_id: str) -> None:
        self._delete(self.models_dir, model_id, "model")

    def _delete(self, parent: Path, entry_id: str, kind: str) -> None:
        final = parent / check_id(entry_id, f"{kind}_id")
        trash = self.tmp_dir / f"{TRASH_PREFIX}{uuid.uuid4().hex}"
        try:
            os.rename(final, trash)  # the entry disappears in one step
        except FileNotFoundError:
            raise NotFound(f"no {kind} with id {entry_id!r}", field=f"{kind}_id") from None
        shutil.rmtree(trash, ignore_errors=True)
        log.info("%s deleted id=%s", kind, entry_id)

    # Datasets -----------------------------------------------------------------------------

    def publish_dataset(
        self, staged: Path, x_shape, y_shape, dtype: str
    ) -> tuple[DatasetRecord, bool]:
        """Hash a staged dataset (x.npy, optional y.npy) and move it into place."""
        h = hashlib.sha256(f"{dtype}\0{list(x_shape)}\0{list(y_shape)}\0".encode())
        size = 0
        for name in ("x.npy", "y.npy"):
            path = staged / name
            if path.exists():
                with open(path, "rb") as f:
                    while chunk := f.read(1 << 20):
                        h.update(chunk)
                        size += len(chunk)
        dataset_id = h.hexdigest()[:ID_HEX_CHARS]
        record = DatasetRecord(dataset_id, dtype, tuple(x_shape), tuple(y_shape), size)
        _write_file(staged / "dataset.json", json.dumps(record.__dict__).encode())
        created = self._publish(staged, self.datasets_dir / dataset_id)
        if created:
            log.info("dataset stored id=%s x_shape=%s bytes=%d", dataset_id, list(x_shape), size)
        return record, created

    def get_dataset(self, dataset_id: str, field: str = "dataset_id") -> DatasetRecord:
        path = self.datasets_dir / check_id(dataset_id, field) / "dataset.json"
        try:
            data = self._read_json(path)
        except FileNotFoundError:
            raise NotFound(f"no dataset with id {dataset_id!r}", field=field) from None
        return DatasetRecord(
            data["id"],
            data["dtype"],
            tuple(data["x_shape"]),
            tuple(data["y_shape"]),
            data["size_bytes"],
        )

    def load_dataset(
        self, dataset_id: str, field: str = "dataset_id"
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """(x, y or None), memory-mapped read-only."""
        record = self.get_dataset(dataset_id, field)
        folder = self.datasets_dir / record.id
        x = np.load(folder / "x.npy", mmap_mode="r")
        y = np.load(folder / "y.npy", mmap_mode="r") if record.y_shape else None
        return x, y


def _host_tag() -> str:
    """The host name, with dashes dropped so staging names split cleanly on '-'."""
    return "".join(c for c in socket.gethostname() if c.isalnum())[:40] or "host"


def _record_json(record: ModelRecord) -> dict:
    return {
        "id": record.id,
        "spec": record.spec,
        "parameter_count": record.parameter_count,
        "input_shape": list(record.input_shape),
        "output_size": record.output_size,
        "parameters": [[n, list(s)] for n, s in record.parameters],
        "created_at": record.created_at,
    }
