"""The member machinery: node operations declared once as `@read` or `@write` and bound as
Prefect tasks, placed on Ray, kept within a node's concurrency cap, and bounded in Ray's queue.

- `binding`: `Member[P, R]`, `MemberTask[P, R]`, `read`, `write`, batch transport.
- `remote`: a member in a flow run on Ray: its task engine on the driver, its body one Ray
  call; crash reporting, the body's log lines.
- `placement`: where a node's members run (placement groups, node pins).
- `reservations`: who holds a placement group, and its release when the use ends.
- `scheduling`: the bounded wait of a member in Ray's queue.
- `_gate`: the actor behind that wait, in a module of its own so Ray gets it by value.
- `limits`: the Prefect global concurrency limit behind `max_concurrency`.

It reads a node only through `MemberHost` (chia_prefect.members.host), never its private
attributes; the node blocks (chia_prefect.base) implement that interface.
"""

from __future__ import annotations

from chia_prefect._sql import FlatRows
from chia_prefect.members.binding import (
    Batch,
    Kind,
    Member,
    MemberTask,
    RowStream,
    abstract_member,
    member_logger,
    on_ray_runner,
    read,
    write,
)
from chia_prefect.members.host import MemberHost

__all__ = [
    "Batch", "FlatRows", "Kind", "Member", "MemberHost", "MemberTask", "RowStream", "abstract_member", "member_logger", "on_ray_runner", "read",
    "write",
]
