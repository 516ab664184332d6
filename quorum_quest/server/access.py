"""Who may do what: authorization rules, lease ownership, and the caller of each call.

What this module guarantees, when auth is on (`Settings.auth_on`):

- every call of the lock service is made by one identity (`quorum_quest.server.identity`)
  and is let through only if the first rule of `auth.rules` that matches the identity
  and the lock allows the operation's permission: `lock` (TryAcquireLock, KeepAlive,
  KeepAliveMany, ReleaseLock), `read` (GetLeader, WatchLeaders: a watch of a whole
  service is let in when some lock of the service may be read, and reports only the
  locks the rules let it read) or `admin` (GetStatus, which names no
  lock: only a rule whose `locks` is `*` matches it). No matching rule, or a rule without
  the permission, refuses the call: PERMISSION_DENIED for an identity, UNAUTHENTICATED for
  `anonymous` (it may only be missing credentials). A `*` identity glob never matches
  `anonymous`: only a rule naming `anonymous` lets callers without credentials in;
- a lease belongs to the identity that acquired it: the store's holder is
  `<identity>` + `HOLDER_SEPARATOR` + `<client_id>`, a separator no client_id can hold
  (names with control characters are refused), so another identity can neither renew nor
  release it, whatever client_id it sends, and two identities with the same client_id
  never share a lease. `anonymous` keeps the bare client_id, the holder the original
  clients always had. Answers show the client_id only (`client_id_of`);
- quotas (`quorum_quest.server.quotas`) are charged to the identity.

With auth off every call is `OPEN`: no identity, the bare client_id, nothing checked.
"""

from __future__ import annotations

from collections.abc import Iterable
from fnmatch import fnmatchcase

import grpc

from quorum_quest.config.settings import ANONYMOUS, AuthRule, AuthSettings
from quorum_quest.errors import PermissionDenied, Unauthenticated
from quorum_quest.server.identity import Tokens, bearer_token, certificate_identity
from quorum_quest.server.quotas import Quotas
from quorum_quest.stores import LockKey

LOCK, READ, ADMIN = "lock", "read", "admin"
# Between identity and client_id in a store's holder: a C0 control (unit separator),
# which the servicer refuses in every client_id.
HOLDER_SEPARATOR = "\x1f"
# Decisions remembered per configuration before the memo is cleared.
MAX_DECISIONS = 65_536


def client_id_of(holder: str) -> str:
    """The client_id part of a store's holder (the holder itself for a bare client_id)."""
    if HOLDER_SEPARATOR in holder:
        return holder.rpartition(HOLDER_SEPARATOR)[2]
    return holder


def lock_name(key: LockKey | None) -> str:
    return "the service (no lock)" if key is None else f"{key.service}/{key.domain}"


class _Rule:
    __slots__ = ("allow", "domain", "every_lock", "identity", "service")

    def __init__(self, rule: AuthRule) -> None:
        self.identity = rule.identity
        self.every_lock = rule.locks == "*"
        self.service, _, self.domain = rule.locks.partition("/")
        self.allow = frozenset(rule.allow)

    def matches_identity(self, identity: str) -> bool:
        if self.identity == ANONYMOUS or identity == ANONYMOUS:
            return self.identity == identity
        return fnmatchcase(identity, self.identity)

    def matches(self, identity: str, key: LockKey | None) -> bool:
        if not self.matches_identity(identity):
            return False
        if self.every_lock:
            return True
        return (
            key is not None
            and fnmatchcase(key.service, self.service)
            and fnmatchcase(key.domain, self.domain)
        )


class Rules:
    """`auth.rules`: the first rule matching the identity and the lock decides."""

    def __init__(self, rules: Iterable[AuthRule]) -> None:
        self._rules = [_Rule(rule) for rule in rules]
        self._decided: dict[tuple[str, LockKey | None, str], bool] = {}

    def allows_some(self, identity: str, service: str, permission: str) -> bool:
        """Whether `identity` may have `permission` on some lock of `service`: the first
        rule covering every domain of it decides; a rule before it that covers some of
        its domains and allows `permission` lets some lock through."""
        for rule in self._rules:
            if not rule.matches_identity(identity):
                continue
            if rule.every_lock:
                return permission in rule.allow
            if not fnmatchcase(service, rule.service):
                continue
            if rule.domain == "*":
                return permission in rule.allow
            if permission in rule.allow:
                return True
        return False

    def allows(self, identity: str, key: LockKey | None, permission: str) -> bool:
        memo = (identity, key, permission)
        decided = self._decided.get(memo)
        if decided is None:
            decided = False
            for rule in self._rules:
                if rule.matches(identity, key):
                    decided = permission in rule.allow
                    break
            if len(self._decided) >= MAX_DECISIONS:
                self._decided.clear()
            self._decided[memo] = decided
        return decided


class Caller:
    """The one who makes a call: its identity, and what that lets it do."""

    __slots__ = ("_access", "identity")

    def __init__(self, identity: str, access: Access | None) -> None:
        self.identity = identity
        self._access = access

    @property
    def audited(self) -> bool:
        """Auth is on: this call's grants, releases and losses are audit lines."""
        return self._access is not None

    def holder(self, client_id: str) -> str:
        """The holder the store knows this caller's lease of `client_id` by."""
        if self._access is None or self.identity == ANONYMOUS:
            return client_id
        return f"{self.identity}{HOLDER_SEPARATOR}{client_id}"

    def allow(self, key: LockKey | None, permission: str, operation: str) -> None:
        """Raise unless this caller may do `operation` (needing `permission`) to `key`."""
        access = self._access
        if access is None or access.rules.allows(self.identity, key, permission):
            return
        if self.identity == ANONYMOUS:
            raise Unauthenticated(
                f"no credentials: anonymous callers may not {operation} {lock_name(key)};"
                " send a bearer token or a client certificate",
                ANONYMOUS,
            )
        raise PermissionDenied(
            f"{self.identity} may not {operation} {lock_name(key)}: no rule of auth.rules"
            f" allows it {permission!r} there",
            self.identity,
        )

    def may(self, key: LockKey, permission: str) -> bool:
        """Whether this caller has `permission` on `key`."""
        access = self._access
        return access is None or access.rules.allows(self.identity, key, permission)

    def allow_service(self, service: str, permission: str, operation: str) -> None:
        """Raise unless this caller may have `permission` on some lock of `service`."""
        access = self._access
        if access is None or access.rules.allows_some(self.identity, service, permission):
            return
        if self.identity == ANONYMOUS:
            raise Unauthenticated(
                f"no credentials: anonymous callers may not {operation} {service}/*;"
                " send a bearer token or a client certificate",
                ANONYMOUS,
            )
        raise PermissionDenied(
            f"{self.identity} may not {operation} {service}/*: no rule of auth.rules"
            f" allows it {permission!r} on a lock of that service",
            self.identity,
        )

    def allow_all(self, keys: Iterable[LockKey], permission: str, operation: str) -> None:
        if self._access is not None:
            for key in keys:
                self.allow(key, permission, operation)

    def denied_lease(self, key: LockKey, operation: str) -> PermissionDenied:
        """The refusal of `operation` on a lease that another identity holds."""
        return PermissionDenied(
            f"{self.identity} may not {operation} {lock_name(key)}: the lease with this"
            " client_id belongs to another identity",
            self.identity,
        )

    # -- the lease quota --------------------------------------------------------------

    def reserve(self, key: LockKey) -> bool:
        """Take a place under the lease quota for an acquire of `key` (see
        `LeaseLedger.reserve`); False when no quota applies or `key` is held already."""
        access = self._access
        if access is None or not access.max_leases:
            return False
        return access.quotas.leases.reserve(self.identity, key, access.max_leases)

    def leased(self, key: LockKey, ttl_ms: int) -> None:
        access = self._access
        if access is not None and access.max_leases:
            access.quotas.leases.granted(self.identity, key, ttl_ms)

    def unleased(self, key: LockKey) -> None:
        access = self._access
        if access is not None and access.max_leases:
            access.quotas.leases.ended(self.identity, key)


# Every caller while auth is off.
OPEN = Caller("", None)


class Access:
    """Auth for one configuration: how callers are identified, the rules, the quotas."""

    def __init__(
        self, auth: AuthSettings, tokens: Tokens | None, *, mutual_tls: bool, quotas: Quotas
    ) -> None:
        self.rules = Rules(auth.rules)
        self.tokens = tokens
        self.mutual_tls = mutual_tls
        self.quotas = quotas
        self.max_leases = auth.quotas.maxLeasesPerIdentity
        self.calls_per_second = auth.quotas.callsPerSecondPerIdentity

    def caller(self, context: grpc.aio.ServicerContext) -> Caller:
        """Who makes the call in `context`; raises `Unauthenticated` for credentials that
        are not good and `QuotaExceeded` for an identity over its call rate."""
        token = bearer_token(context)
        if token is not None:
            if self.tokens is None:
                raise Unauthenticated(
                    "this service takes no bearer tokens (auth.tokensFile is not set)"
                )
            identity = self.tokens.book.identity(token)
            if identity is None:
                raise Unauthenticated("the bearer token is not known (or no longer)")
        elif self.mutual_tls:
            identity = certificate_identity(context) or ANONYMOUS
        else:
            identity = ANONYMOUS
        if self.calls_per_second:
            self.quotas.calls.take(identity, self.calls_per_second)
        return Caller(identity, self)
