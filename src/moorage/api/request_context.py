"""The HTTP request being served, for code that runs outside its handler.

`RequestMiddleware` sets `current_scope` to the request's ASGI scope while the
application handles the request. Code that the storage layer calls back, such
as the integrity hook, reads it to name the request's caller in the events it
records. The scope is set as it is, with no object built per request, because
every request pays for the set. `request_actor` reads the fields only when an
event needs them.

Tasks and `asyncio.to_thread` copy the variable, but a plain
`loop.run_in_executor` thread does not see it: code that reports from such a
thread passes the request's context on, as the encryption driver's
`SegmentReader` does.
"""

from __future__ import annotations

from contextvars import ContextVar

from starlette.types import Scope

from moorage.api.http import ProxyTrust, source_address, user_agent
from moorage.audit.recorder import Actor

current_scope: ContextVar[Scope | None] = ContextVar(
    "moorage_request_scope", default=None
)


def request_actor(trust: ProxyTrust) -> Actor | None:
    """Return the actor of the request being served, or None outside a request.

    The account and customer are those of the authenticated caller. Both are
    None for an anonymous request, or before the request guard has run.
    """
    scope = current_scope.get()
    if scope is None:
        return None
    state = scope.get("state") or {}
    caller = state.get("caller")
    principal = caller.principal if caller is not None else None
    return Actor(
        account=principal.login if principal else None,
        customer=principal.customer_slug if principal else None,
        source_address=source_address(scope, trust),
        user_agent=user_agent(scope),
        request_id=state.get("request_id"),
    )


def request_repository() -> str | None:
    """Return the repository of the request being served once its handler has
    set it, or None."""
    scope = current_scope.get()
    if scope is None:
        return None
    repository = (scope.get("state") or {}).get("repository")
    return str(repository) if repository is not None else None
