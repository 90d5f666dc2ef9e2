"""The webhook's own credential: what Label Studio's webhooks carry to open ``/webhook`` and
nothing else. Layer L0.

Label Studio 1.23.2 shows a webhook's headers to every project member with webhook view rights
(every member in the Community edition), so the backend's Basic credentials must never be
stored there: with them anyone could call ``/predict``. Webhooks carry
``Authorization: Bearer <token>`` instead, where the token is WAFER_WEBHOOK_SECRET when set, or
else derived from the Basic credentials with scrypt (slow and one-way: reading the token teaches
nothing about the password, and the same settings give the backend and ``setup-project`` the
same token without a new variable to set).
"""

from __future__ import annotations

import base64
import hashlib
import hmac

WEBHOOK_SCHEME = "Bearer"
_SALT = b"wafermap-labeling webhook token\x00"


def webhook_token(basic_auth: tuple[str, str] | None, secret: str = "") -> str | None:
    """The token webhooks carry; None when the backend has no credentials (then every route,
    ``/webhook`` too, is open, loopback only).

    `secret` (WAFER_WEBHOOK_SECRET) wins when set; otherwise the token is scrypt of the
    password salted with the user name (about 50 ms, 16 MiB, computed once per process).
    """
    if basic_auth is None:
        return None
    if secret:
        return secret
    user, password = basic_auth
    key = hashlib.scrypt(password.encode(), salt=_SALT + user.encode(), n=2**14, r=8, p=1, dklen=24)
    return base64.urlsafe_b64encode(key).decode().rstrip("=")


def webhook_headers(token: str | None) -> dict[str, str]:
    """The headers to register on Label Studio's webhook (none without a token)."""
    return {} if token is None else {"Authorization": f"{WEBHOOK_SCHEME} {token}"}


def carries_webhook_token(authorization: str | None, token: str | None) -> bool:
    """Whether an Authorization header holds `token` (compared in constant time)."""
    if token is None or not authorization:
        return False
    scheme, _, value = authorization.strip().partition(" ")
    if scheme.lower() != WEBHOOK_SCHEME.lower():
        return False
    return hmac.compare_digest(value.strip().encode(), token.encode())
