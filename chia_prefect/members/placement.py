"""Where a node's members run on Ray.

A `Placement` is configuration stored in the block. It becomes Ray `remote` options
(`scheduling_strategy`, `resources`) only when a member is submitted from a flow run on
`RayTaskRunner`. Three modes, mutually exclusive:

1. placement group: `require_colocated=True` (SQLite's default) reserves one bundle on
   first placed use, or uses a group handed in with `node.use_placement_group(pg)`;
2. node pin: `node_id=`, `pin_to_current_node=True` or `node_ip=`;
3. none: `require_colocated=False` (Postgres' default), any worker may run the member.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from chia_prefect._ui import optional_field
from chia_prefect.errors import PlacementError, SchedulingTimeoutError
from chia_prefect.members import reservations


class Placement(BaseModel):
    """Where the members of a database node run on a Ray cluster."""

    model_config = ConfigDict(extra="forbid", frozen=True, title="Placement on Ray")

    require_colocated: bool = Field(
        default=True,
        title="Keep members together",
        description=(
            "Run every member in one placement-group bundle, on one machine. Needed for "
            "SQLite, whose file lives on one disk."
        ),
    )
    reserve_bundle: dict[str, float] | None = optional_field(
        title="Bundle to reserve",
        description="Resources of the bundle reserved on first use; defaults to {'CPU': 0.5}.",
    )
    bundle_index: int = Field(
        default=0, ge=0, title="Bundle index", description="Bundle of the placement group to use."
    )
    pg_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        default="STRICT_PACK",
        title="Placement group strategy",
        description="Ray strategy of the reserved placement group.",
    )
    wait_for_pg: bool = Field(
        default=True,
        title="Wait for the placement group",
        description="Wait until the reserved placement group is ready before submitting.",
    )
    pg_ready_timeout_s: float | None = Field(
        default=60.0,
        gt=0,
        title="Placement group timeout (s)",
        description="How long to wait for the placement group; empty waits forever.",
    )
    schedule_timeout_s: float | None = Field(
        default=60.0,
        gt=0,
        title="Scheduling timeout (s)",
        description=(
            "How long a member may wait in Ray's queue, with no member of its placement "
            "starting, before it is cancelled with an error naming what holds the cluster; "
            "empty waits forever."
        ),
    )
    node_id: str | None = optional_field(
        title="Ray node id",
        description="Pin every member to this Ray node (hard affinity). Ids change when Ray restarts.",
    )
    pin_to_current_node: bool = Field(
        default=False,
        title="Pin to the flow's node",
        description="Pin every member to the Ray node of the process running the flow.",
    )
    node_ip: str | None = optional_field(
        title="Node IP address",
        description="Pin every member to the machine with this IP (survives Ray restarts).",
    )
    num_cpus: float = Field(
        default=0.1,
        gt=0,
        title="CPUs per member",
        description="Ray CPUs each member task requests; small, database work waits on I/O.",
    )

    @model_validator(mode="after")
    def _one_mode(self) -> Placement:
        pins = [
            name
            for name, value in (
                ("node_id", self.node_id),
                ("pin_to_current_node", self.pin_to_current_node),
                ("node_ip", self.node_ip),
            )
            if value
        ]
        if len(pins) > 1:
            raise PlacementError(
                f"placement: {' and '.join(pins)} are mutually exclusive; choose one node pin."
            )
        if pins and self.reserve_bundle is not None:
            raise PlacementError(
                f"placement: reserve_bundle applies to placement groups, not to {pins[0]}; "
                "remove one of them."
            )
        if self.reserve_bundle is not None and self.num_cpus > self.reserve_bundle.get("CPU", 0):
            raise PlacementError(
                f"placement: num_cpus={self.num_cpus} does not fit in reserve_bundle "
                f"{self.reserve_bundle}; members could never be scheduled."
            )
        return self

    @property
    def mode(self) -> Literal["node", "placement_group", "none"]:
        if self.node_id or self.pin_to_current_node or self.node_ip:
            return "node"
        return "placement_group" if self.require_colocated else "none"


class PlacementState:
    """Run-time placement state of one node in the driver: never pickled to workers.

    A group the node reserves lives in `reservations` (shared with other nodes of the same
    database, released when its use ends); a group handed in is only referenced here.
    """

    def __init__(self) -> None:
        self.token = reservations.new_token()
        self.handed_in: Any = None
        self.handed_in_index: int = 0

    def use(self, placement_group: Any, bundle_index: int) -> None:
        self.handed_in, self.handed_in_index = placement_group, bundle_index

    @property
    def placement_group(self) -> Any:
        if self.handed_in is not None:
            return self.handed_in
        reservation = reservations.held_by(self.token)
        return None if reservation is None else reservation.group

    def release(self) -> None:
        """Drop this node's holds (a group goes when nobody holds it); forget a handed-in
        group without removing it. Idempotent."""
        self.handed_in = None
        reservations.release_node(self.token)


def ray_options(placement: Placement, state: PlacementState, label: str, key: tuple[Any, ...] = ()) -> dict[str, Any]:
    """Ray `remote` options that put a member where `placement` says.

    `key` identifies the database: nodes with the same key and placement share a group.
    """
    from ray.util.scheduling_strategies import (
        NodeAffinitySchedulingStrategy,
        PlacementGroupSchedulingStrategy,
    )

    options: dict[str, Any] = {"num_cpus": placement.num_cpus}
    if state.handed_in is not None and placement.mode == "node":
        raise PlacementError(
            f"{label}: a placement group was handed in, but the block pins to a node; "
            "use one or the other."
        )
    if placement.mode == "node":
        if placement.node_ip:
            options["resources"] = {f"node:{placement.node_ip}": 0.001}
        else:
            options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(
                node_id=placement.node_id or _current_node_id(), soft=False
            )
    elif state.handed_in is not None or placement.mode == "placement_group":
        if state.handed_in is not None:
            group, index = state.handed_in, state.handed_in_index
        else:
            reservation = reservations.acquire(
                (key or (label,), placement.model_dump_json()), state.token,
                lambda name: _reserve(placement, label, name), label,
            )
            group, index = reservation.group, reservation.bundle_index
        options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
            placement_group=group,
            placement_group_bundle_index=index,
            placement_group_capture_child_tasks=False,
        )
    return options


def _current_node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


def _reserve(placement: Placement, label: str, name: str) -> tuple[Any, int]:
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    from chia_prefect.members.scheduling import cluster_report

    bundle = placement.reserve_bundle or {"CPU": max(0.5, placement.num_cpus)}
    bundles = [dict(bundle) for _ in range(placement.bundle_index + 1)]
    group = placement_group(bundles, strategy=placement.pg_strategy, name=name)
    if placement.wait_for_pg:
        ready, _ = ray.wait([group.ready()], timeout=placement.pg_ready_timeout_s)
        if not ready:
            remove_placement_group(group)
            raise SchedulingTimeoutError(
                f"{label}: the placement group {bundles} ({placement.pg_strategy}) was not ready "
                f"within {placement.pg_ready_timeout_s} s; the cluster lacks the resources. "
                f"{cluster_report()} Lower reserve_bundle, free resources (close() unused "
                "nodes, end the flows that hold them), or raise pg_ready_timeout_s."
            )
    return group, placement.bundle_index
