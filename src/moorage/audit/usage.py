"""Usage per customer per day, computed from the audit trail."""

from __future__ import annotations

from dataclasses import astuple, dataclass
from datetime import datetime

from moorage.audit.events import BLOB_PULL, BLOB_PUSH, MANIFEST_PULL, MANIFEST_PUSH
from moorage.db.audit_store import AuditStore

VENDOR = "vendor"


@dataclass
class UsageLine:
    day: str
    customer: str
    pulls: int = 0
    blob_downloads: int = 0
    pushes: int = 0
    bytes_out: int = 0
    bytes_in: int = 0

    def values(self) -> tuple[object, ...]:
        return astuple(self)


async def usage_report(
    store: AuditStore, since: datetime | None, until: datetime | None
) -> list[UsageLine]:
    """Return one line per day and customer, in that order.

    A pull is a successful manifest GET; a push is a successful manifest PUT.
    Bytes out count manifest and blob downloads, bytes in count blob uploads.
    Vendor accounts are reported as the customer "vendor".
    """
    actions = (MANIFEST_PULL, BLOB_PULL, MANIFEST_PUSH, BLOB_PUSH)
    lines: dict[tuple[str, str], UsageLine] = {}
    for row in await store.usage(actions, since, until):
        customer = row.customer or VENDOR
        line = lines.setdefault((row.day, customer), UsageLine(row.day, customer))
        if row.action == MANIFEST_PULL:
            line.pulls += row.events
            line.bytes_out += row.bytes
        elif row.action == BLOB_PULL:
            line.blob_downloads += row.events
            line.bytes_out += row.bytes
        elif row.action == MANIFEST_PUSH:
            line.pushes += row.events
        else:
            line.bytes_in += row.bytes
    return [lines[key] for key in sorted(lines)]
