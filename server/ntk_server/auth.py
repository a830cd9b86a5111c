"""Bearer tokens, roles and per-token quotas; the caller of the current request.

Tokens come from a file (NTK_TOKENS_FILE) and/or the environment (NTK_TOKENS, entries separated
by commas). Each entry is one line of the form

    name:token[:role][:quota=value...]

  name    shows in logs and model ownership; up to 64 letters, digits and `_.@-`, starting
          with a letter or digit. Never the secret.
  token   the bearer secret; any printable characters except `:`, `,` and whitespace.
  role    read, write (the default) or admin; see METHOD_ROLES.
  quotas  concurrent_requests=N, kernel_entries=N; override the server-wide defaults for this
          token (0 = unlimited).

Blank lines and lines starting with `#` are ignored. Example:

    alice:9dX...:write:concurrent_requests=4
    dashboards:Qe1...:read:kernel_entries=1000000
    ops:pA7...:admin

The interceptor (interceptors.py) authenticates each call and puts its Principal in a context
variable for the rest of the request; `current()` reads it anywhere below the servicer.
"""

from __future__ import annotations

import contextvars
import enum
import hashlib
import ipaddress
import re
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

from ntk_server.errors import PermissionDenied, ResourceExhausted, Unauthenticated

AUTH_METADATA_KEY = "authorization"
BEARER_PREFIX = "bearer "
# Names become file names in the registry (models/<id>/owners/<name>): no leading dot, no slash.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
_TOKEN = re.compile(r"^[\x21-\x7e]+$")  # printable ASCII without space: a valid metadata value


class Role(enum.IntEnum):
    """Ordered: each role may do everything the roles below it may."""

    READ = 1  # compute kernels, predict, evaluate, read models and datasets
    WRITE = 2  # also register and delete models, upload datasets
    ADMIN = 3  # also sees and deletes every model in owner-only mode


# Methods of ntk.v1.NTKService and the least role that may call them. A method missing here (a
# newer RPC) needs WRITE, so a read-only token never gains a new way to change the server.
METHOD_ROLES = {
    "GetModel": Role.READ,
    "ListModels": Role.READ,
    "GetDataset": Role.READ,
    "ComputeKernel": Role.READ,
    "Predict": Role.READ,
    "Evaluate": Role.READ,
    "RegisterModel": Role.WRITE,
    "DeleteModel": Role.WRITE,
    "UploadDataset": Role.WRITE,
}
DEFAULT_METHOD_ROLE = Role.WRITE


@dataclass(frozen=True)
class Quotas:
    """Per-token limits; 0 means unlimited."""

    concurrent_requests: int = 0
    kernel_entries: int = 0


QUOTA_NAMES = tuple(Quotas.__dataclass_fields__)


@dataclass(frozen=True)
class Principal:
    """Who makes a request. `anonymous` when authentication is off (then role is ADMIN)."""

    name: str
    role: Role
    quotas: Quotas = field(default_factory=Quotas)
    anonymous: bool = False

    @property
    def owner(self) -> str | None:
        """The name recorded as a model's owner; None for anonymous callers."""
        return None if self.anonymous else self.name


def anonymous(quotas: Quotas) -> Principal:
    return Principal("anonymous", Role.ADMIN, quotas, anonymous=True)


_current: contextvars.ContextVar[Principal | None] = contextvars.ContextVar(
    "ntk_principal", default=None
)


def current() -> Principal | None:
    """The caller of the request this code runs for; None outside a request (in-process use)."""
    return _current.get()


def current_owner() -> str | None:
    """The token name to record as owner of what the current request creates, if any."""
    principal = current()
    return None if principal is None else principal.owner


def set_current(principal: Principal) -> contextvars.Token:
    return _current.set(principal)


def reset_current(token: contextvars.Token) -> None:
    _current.reset(token)


def _digest(token: str) -> bytes:
    # Tokens are looked up by their hash, so the secrets are not kept in server memory as such,
    # and the lookup's timing does not depend on how much of a guessed token is right.
    return hashlib.sha256(token.encode()).digest()


class TokenTable:
    """Known tokens, by the hash of the secret. Build with `parse()` or `load()`."""

    def __init__(self, principals: dict[bytes, Principal]):
        self._by_digest = principals

    def __len__(self) -> int:
        return len(self._by_digest)

    @property
    def names(self) -> list[str]:
        return sorted(p.name for p in self._by_digest.values())

    @classmethod
    def parse(cls, entries: Iterable[tuple[str, str]], defaults: Quotas) -> TokenTable:
        """entries: (where, text) pairs, `where` naming the source for error messages."""
        principals: dict[bytes, Principal] = {}
        names: dict[str, str] = {}
        for where, text in entries:
            text = text.strip()
            if not text or text.startswith("#"):
                continue
            token, principal = _parse_entry(text, where, defaults)
            if principal.name in names:
                first = names[principal.name]
                raise ValueError(f"{where}: token name {principal.name!r} already used at {first}")
            digest = _digest(token)
            if digest in principals:
                raise ValueError(
                    f"{where}: token {principal.name!r} has the same secret as "
                    f"{principals[digest].name!r}"
                )
            names[principal.name] = where
            principals[digest] = principal
        return cls(principals)

    @classmethod
    def load(cls, path: Path | None, env_value: str | None, defaults: Quotas) -> TokenTable:
        """Tokens from a file (one entry per line) and from NTK_TOKENS (comma-separated)."""
        entries: list[tuple[str, str]] = []
        if path is not None:
            try:
                lines = Path(path).read_text().splitlines()
            except OSError as exc:
                raise ValueError(f"tokens_file {str(path)!r}: {exc.strerror}") from None
            entries += [(f"tokens_file {str(path)!r} line {i}", t) for i, t in enumerate(lines, 1)]
        if env_value:
            parts = env_value.split(",")
            entries += [(f"NTK_TOKENS entry {i}", t) for i, t in enumerate(parts, 1)]
        return cls.parse(entries, defaults)

    def authenticate(self, metadata: Iterable[tuple[str, str | bytes]]) -> Principal:
        """The Principal of a call's `authorization: Bearer <token>` metadata."""
        values = [v for k, v in metadata if k == AUTH_METADATA_KEY]
        if not values:
            raise Unauthenticated(
                f"missing bearer token: send metadata '{AUTH_METADATA_KEY}: Bearer <token>'"
            )
        value = values[0] if isinstance(values[0], str) else values[0].decode("latin-1")
        if len(values) > 1 or not value.lower().startswith(BEARER_PREFIX):
            raise Unauthenticated(
                f"malformed '{AUTH_METADATA_KEY}' metadata: expected one 'Bearer <token>'"
            )
        principal = self._by_digest.get(_digest(value[len(BEARER_PREFIX) :].strip()))
        if principal is None:
            raise Unauthenticated("unknown bearer token")  # never echo what was sent
        return principal


def _parse_entry(text: str, where: str, defaults: Quotas) -> tuple[str, Principal]:
    parts = text.split(":")
    if len(parts) < 2:
        raise ValueError(f"{where}: expected name:token[:role][:quota=value...]")
    name, token, options = parts[0].strip(), parts[1].strip(), parts[2:]
    if not _NAME.match(name):
        raise ValueError(
            f"{where}: token name {name[:64]!r} must be 1-64 letters, digits or _.@- characters, "
            f"starting with a letter or digit"
        )
    if not _TOKEN.match(token):
        raise ValueError(f"{where}: the token of {name!r} is empty or has whitespace")
    role, quotas = Role.WRITE, {}
    for option in (o.strip() for o in options):
        key, eq, value = option.partition("=")
        if not eq:
            try:
                role = Role[option.upper()]
            except KeyError:
                raise ValueError(
                    f"{where}: unknown role {option!r} for {name!r}; roles are "
                    f"{[r.name.lower() for r in Role]}"
                ) from None
            continue
        if key not in QUOTA_NAMES:
            raise ValueError(
                f"{where}: unknown quota {key!r} for {name!r}; quotas are {list(QUOTA_NAMES)}"
            )
        try:
            quotas[key] = int(value)
        except ValueError:
            quotas[key] = -1
        if quotas[key] < 0:
            raise ValueError(f"{where}: quota {key} of {name!r} must be an integer >= 0")
    return token, Principal(name, role, replace(defaults, **quotas))


def authorize(principal: Principal, method: str) -> None:
    """Raise PermissionDenied unless the principal's role allows an NTKService method."""
    needed = METHOD_ROLES.get(method, DEFAULT_METHOD_ROLE)
    if principal.role < needed:
        raise PermissionDenied(
            f"token {principal.name!r} has role {principal.role.name.lower()}; {method} needs "
            f"role {needed.name.lower()} or above"
        )


def check_kernel_entries(entries: int) -> None:
    """Raise ResourceExhausted when a kernel is larger than the caller's kernel_entries quota."""
    principal = current()
    if principal is None:
        return
    limit = principal.quotas.kernel_entries
    if limit and entries > limit:
        raise ResourceExhausted(
            f"quota kernel_entries exceeded: the kernel has {entries} entries, token "
            f"{principal.name!r} may compute at most {limit} per request; ask for fewer rows "
            f"or columns (x1, x2) or a smaller layout"
        )


class ConcurrencyLimiter:
    """Requests in flight per token name, against each token's concurrent_requests quota."""

    def __init__(self):
        self._lock = threading.Lock()
        self._inflight: dict[str, int] = {}

    def acquire(self, principal: Principal) -> None:
        limit = principal.quotas.concurrent_requests
        with self._lock:
            count = self._inflight.get(principal.name, 0)
            if limit and count >= limit:
                raise ResourceExhausted(
                    f"quota concurrent_requests exceeded: token {principal.name!r} has {count} "
                    f"requests in flight, limit {limit}; retry when one finishes"
                )
            self._inflight[principal.name] = count + 1

    def release(self, principal: Principal) -> None:
        with self._lock:
            count = self._inflight.get(principal.name, 0) - 1
            if count > 0:
                self._inflight[principal.name] = count
            else:
                self._inflight.pop(principal.name, None)


def is_loopback(host: str) -> bool:
    """True for localhost, 127.0.0.0/8 and ::1; False for wildcards and every other address."""
    host = host.strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything
