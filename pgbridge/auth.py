"""Tokens: verify a client's JWT and turn its claims into what the connection may see. No I/O.

Claims pgbridge reads:

- ``exp`` (required): the connection is closed with 1008 ``Token expired`` when it passes.
- ``sub`` (required, a non-empty string): per-subject limits count by it, and a refreshed token must
  carry the same. With ``--subjectless-tokens per-token``, a token without one is accepted and counts
  as a subject of its own.
- ``collections``: ``"*"``, a list of collection names (``"*"`` allowed as an element), or an object
  mapping a collection (or ``"*"``) to the operations allowed on it. A token without the claim may
  subscribe to every published collection only if the server runs with ``--unscoped-tokens all``.
- the tenant claim named by ``--tenant-claim``, when tenant isolation is on (required then).
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import jwt

from pgbridge.config import check_secret
from pgbridge.errors import AuthError, ConfigError
from pgbridge.events import OPS, Op

ALL_OPS: frozenset[Op] = frozenset(OPS)
_INVALID_SUBJECT = "Token has an invalid subject: sub must be a non-empty string"
_FAR_FUTURE = 2.0**40  # seconds since 1970, about the year 36812: an exp beyond it is treated as it


def bearer_matches(header: str, secret: str) -> bool:
    """Whether an ``Authorization`` header is ``Bearer <secret>``, compared in constant time. A header's
    bytes that are not UTF-8 (kept as surrogates) match nothing, and raise nothing."""
    return hmac.compare_digest(header.encode("utf-8", "surrogateescape"), f"Bearer {secret}".encode())


@dataclass(frozen=True, slots=True)
class Grant:
    """What one verified token allows."""

    subject: str
    """What per-subject limits count by: the ``sub`` claim (or, for a token accepted without one, the
    token itself)."""
    sub: str | None
    """The ``sub`` claim as the token carries it."""
    expires_at: float
    """When the connection must end: the token's ``exp`` plus the leeway."""
    exp: float
    """The token's ``exp`` claim, as the client knows it."""
    collections: Mapping[str, frozenset[Op]] = field(default_factory=dict)
    """Allowed operations per collection; the key ``"*"`` stands for every collection."""
    tenant: Any = None

    def allowed(self, collection: str) -> frozenset[Op]:
        """The operations allowed on ``collection``; a grant naming it (even an empty one) beats ``"*"``."""
        found = self.collections.get(collection)
        if found is None:
            found = self.collections.get("*")
        return found or frozenset()


@dataclass(frozen=True, slots=True)
class TokenPolicy:
    """How tokens are verified. Build it with :meth:`from_settings`."""

    key: Any
    algorithms: tuple[str, ...]
    audience: str | None = None
    issuer: str | None = None
    leeway: float = 0.0
    unscoped: Literal["all", "none"] = "none"
    tenant_claim: str | None = None
    subjectless: Literal["refuse", "per-token"] = "refuse"

    @classmethod
    def from_settings(
        cls,
        *,
        secret: str | None,
        public_key_pem: bytes | None = None,
        audience: str | None = None,
        issuer: str | None = None,
        leeway: float = 0.0,
        unscoped: Literal["all", "none"] = "none",
        tenant_claim: str | None = None,
        subjectless: Literal["refuse", "per-token"] = "refuse",
    ) -> TokenPolicy:
        if public_key_pem is not None:
            from cryptography.hazmat.primitives.asymmetric import ec, rsa
            from cryptography.hazmat.primitives.serialization import load_pem_public_key

            try:
                key = load_pem_public_key(public_key_pem)
            except ValueError as exc:
                raise ConfigError(f"the JWT public key is not a PEM public key: {exc}") from None
            if isinstance(key, rsa.RSAPublicKey):
                algorithms: tuple[str, ...] = ("RS256",)
            elif isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp256r1":
                algorithms = ("ES256",)
            else:
                raise ConfigError("the JWT public key must be an RSA key (RS256) or a P-256 EC key (ES256)")
            return cls(key, algorithms, audience, issuer, leeway, unscoped, tenant_claim, subjectless)
        if not secret:
            raise ConfigError("no JWT secret: set PGBRIDGE_JWT_SECRET or pass --jwt-secret")
        check_secret(secret)
        return cls(secret, ("HS256",), audience, issuer, leeway, unscoped, tenant_claim, subjectless)

    def verify(self, token: str | None) -> Grant:
        """Check a token; raise :class:`AuthError` whose ``reason`` is the close reason to send."""
        if not token:
            raise AuthError("Missing token")
        try:
            claims = jwt.decode(
                token,
                self.key,
                algorithms=list(self.algorithms),
                audience=self.audience,
                issuer=self.issuer,
                leeway=self.leeway,
                options={"require": ["exp"], "verify_aud": self.audience is not None},
            )
        except jwt.ExpiredSignatureError:
            raise AuthError("Token expired") from None
        except jwt.exceptions.InvalidSubjectError:  # PyJWT's own check of sub: not a string
            raise AuthError(_INVALID_SUBJECT) from None
        except (jwt.InvalidTokenError, ValueError, OverflowError, TypeError):  # exp: 1e400 overflows inside PyJWT
            raise AuthError("Authentication failed") from None
        tenant = None
        if self.tenant_claim is not None:
            tenant = claims.get(self.tenant_claim)
            if tenant is None:
                raise AuthError(f"Token lacks the {self.tenant_claim} claim")
            if not isinstance(tenant, (str, int, float, bool)):
                raise AuthError(f"Invalid {self.tenant_claim} claim: must be a string, number or boolean")
        sub = claims.get("sub")
        if sub is None:
            if self.subjectless == "refuse":
                raise AuthError("Token has no subject: it needs a sub claim")
        elif not isinstance(sub, str) or not sub.strip():
            raise AuthError(_INVALID_SUBJECT)
        exp = claims["exp"]
        if not isinstance(exp, (int, float)) or isinstance(exp, bool):
            raise AuthError("Authentication failed")
        return Grant(
            subject=sub if sub is not None else "token:" + hashlib.sha256(token.encode()).hexdigest(),
            sub=sub,
            expires_at=min(float(min(exp, _FAR_FUTURE)) + self.leeway, _FAR_FUTURE),
            exp=float(min(exp, _FAR_FUTURE)),
            collections=self._collections(claims),
            tenant=tenant,
        )

    def _collections(self, claims: Mapping[str, Any]) -> Mapping[str, frozenset[Op]]:
        if "collections" not in claims:
            return {"*": ALL_OPS} if self.unscoped == "all" else {}
        value = claims["collections"]
        if value == "*":
            return {"*": ALL_OPS}
        if isinstance(value, list) and all(isinstance(c, str) for c in value):
            return dict.fromkeys(value, ALL_OPS)
        if isinstance(value, dict):
            grants: dict[str, frozenset[Op]] = {}
            for name, ops in value.items():
                if ops == "*":
                    grants[name] = ALL_OPS
                elif isinstance(ops, list) and all(op in OPS for op in ops):
                    grants[name] = frozenset(ops)
                else:
                    raise AuthError("Invalid collections claim")
            return grants
        raise AuthError("Invalid collections claim")


def mint(secret: str, subject: str, ttl: float, **claims: Any) -> str:
    """Sign an HS256 token for ``subject`` that expires ``ttl`` seconds from now."""
    now = int(time.time())
    return jwt.encode({"sub": subject, "iat": now, "exp": now + int(ttl), **claims}, secret, algorithm="HS256")
