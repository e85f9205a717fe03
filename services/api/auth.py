"""Who is calling: the API key behind a request, and what its role lets it do.

Keys come as ``Authorization: Bearer <key>`` (API clients, the CLI) or in the ``llmc_key``
cookie the sign-in page sets (the web pages, whose scripts call the same API). A missing or
wrong key is a 401; a key whose role is too low is a 403; a comparison owned by someone else
is a 404, so a key cannot even learn which ids exist.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated
from urllib.parse import urlsplit

import structlog
from fastapi import Depends, Request

from services.api.errors import ApiError
from shared.apikeys import Quotas, Role, matches, parse_key_id
from shared.store import LOCAL_OWNER, ComparisonStore

log = structlog.get_logger()

COOKIE = "llmc_key"
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class Unauthorized(ApiError):
    status_code = 401
    code = "unauthorized"

    def __init__(self, message: str):
        super().__init__(message, headers={"WWW-Authenticate": "Bearer"})


class Forbidden(ApiError):
    status_code = 403
    code = "forbidden"


@dataclass(frozen=True)
class Principal:
    """The caller: an API key's owner name, role and id (``local`` with auth off)."""

    name: str
    role: Role
    key_id: str
    quotas: Quotas = Quotas()

    def owns(self, owner: str) -> bool:
        return self.role is Role.admin or owner == self.name

    @property
    def is_admin(self) -> bool:
        return self.role is Role.admin


# With AUTH_DISABLED the one person using the service is its admin.
LOCAL = Principal(name=LOCAL_OWNER, role=Role.admin, key_id=LOCAL_OWNER)


def presented_key(request: Request) -> tuple[str | None, bool]:
    """The key a request carries and whether it came from the cookie."""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip(), False
    cookie = request.cookies.get(COOKIE)
    return (cookie, True) if cookie else (None, False)


def identify(request: Request, store: ComparisonStore, *, auth_disabled: bool) -> Principal | None:
    """The principal behind a request, or None when it carries no valid key."""
    if auth_disabled:
        return LOCAL
    key, from_cookie = presented_key(request)
    if key is None:
        return None
    key_id = parse_key_id(key)
    record = store.api_key(key_id) if key_id else None
    if record is None or not record.active or not matches(record, key):
        log.info(
            "auth.refused", key_id=key_id, path=request.url.path, revoked=bool(record and not record.active)
        )
        return None
    if from_cookie and request.method not in _SAFE_METHODS and not _same_origin(request):
        # The cookie is SameSite=Strict already; refusing cross-origin writes outright keeps a
        # browser that ignores SameSite from being used against its own user.
        raise Forbidden("cross-origin request refused: the page must be on this service's own address")
    store.touch_api_key(record.id)
    return Principal(name=record.name, role=record.role, key_id=record.id, quotas=record.quotas)


def _same_origin(request: Request) -> bool:
    origin = request.headers.get("origin") or request.headers.get("referer")
    if not origin:
        return True  # not a browser's cross-site request: browsers send Origin on POST
    return urlsplit(origin).netloc == request.headers.get("host", "")


def authenticate(request: Request) -> Principal:
    principal = identify(
        request, request.app.state.store, auth_disabled=request.app.state.settings.auth_disabled
    )
    if principal is None:
        raise Unauthorized(
            "Send an API key as 'Authorization: Bearer <key>'; an operator creates one with "
            "'llm-compare keys create --name <team> --role submitter'"
        )
    return principal


def require(role: Role):  # noqa: ANN201 - a FastAPI dependency factory
    def dependency(principal: Annotated[Principal, Depends(authenticate)]) -> Principal:
        if not principal.role.allows(role):
            raise Forbidden(f"this key's role is {principal.role.value}; this needs {role.value} or above")
        return principal

    return dependency


ReaderDep = Annotated[Principal, Depends(require(Role.reader))]
SubmitterDep = Annotated[Principal, Depends(require(Role.submitter))]
AdminDep = Annotated[Principal, Depends(require(Role.admin))]


# What every authenticated route may answer besides its own statuses, for the OpenAPI document.
AUTH_RESPONSES: dict[int | str, dict[str, object]] = {
    401: {"description": "No API key, or a wrong or revoked one"},
    403: {"description": "The key's role is too low for this request"},
}
