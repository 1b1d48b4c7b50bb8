"""What the member machinery reads of a node: this small public interface, nothing private."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

if TYPE_CHECKING:
    from chia_prefect.members.placement import Placement

R = TypeVar("R")


class MemberHost(Protocol):
    """A node whose members this package binds, places and limits (`DatabaseNode` is one)."""

    @property
    def engine(self) -> str:
        """The engine's name; task names are `<engine>.<member>`."""

    @property
    def label(self) -> str:
        """Names the node in messages."""

    @property
    def placement(self) -> Placement:
        """Where its members run on Ray."""

    @property
    def max_concurrency(self) -> int | None:
        """At most this many of its members at once (None: no cap)."""

    @property
    def concurrency_limit_name(self) -> str:
        """The Prefect global concurrency limit keeping `max_concurrency`."""

    @property
    def placement_token(self) -> str:
        """Names the node's holds on reservations in this process."""

    @property
    def bound_members(self) -> dict[str, Any]:
        """Where the node keeps its members bound as tasks, by name."""

    def member_ray_options(self) -> dict[str, Any]:
        """Ray options for one member (reserving a placement group on first use)."""

    def run_keyed(self, member: str, key: str, call: Callable[[], R], arguments: Any, connect_opts: Any = None) -> R:
        """Run a write member's body `call` once for idempotency key `key`: the key, a digest
        of `arguments` and the result commit in one transaction with the write."""
