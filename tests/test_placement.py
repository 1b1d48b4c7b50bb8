"""Placement on a real 2-node Ray cluster: each mode puts every member on the intended node."""

from __future__ import annotations

import os
import time

import pytest
import ray
from helpers import wait_until
from nodes import ProbeSQLiteNode
from prefect import flow
from prefect_ray import RayTaskRunner
from pydantic import ValidationError
from ray.util.placement_group import (
    placement_group,
    placement_group_table,
    remove_placement_group,
)

from chia_prefect import Placement, PlacementError

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("ray_cluster")]


@flow(task_runner=RayTaskRunner())
def where_flow(db: ProbeSQLiteNode) -> list[dict]:
    """Where plain calls and submits of read and write members run."""
    db.init_schema("CREATE TABLE IF NOT EXISTS t (x INTEGER)")
    db.execute("INSERT INTO t VALUES (1)")
    seen = [db.where(), db.where_write(), db.where.submit().result(), db.where_write.submit().result()]
    seen += [f.result() for f in db.where.map(connect_opts=[None, {"busy_timeout_s": 5}])]
    return seen


def nodes_of(seen: list[dict]) -> set[str]:
    return {s["node"] for s in seen}


def test_node_id_pin(ray_cluster, sqlite_path):
    for target in (ray_cluster["second"], ray_cluster["head"]):
        with ProbeSQLiteNode(db_path=sqlite_path, placement=Placement(node_id=target)) as db:
            seen = where_flow(db)
        assert nodes_of(seen) == {target}
        assert os.getpid() not in {s["pid"] for s in seen}  # plain calls went to Ray too


def test_pin_to_current_node(ray_cluster, sqlite_path):
    with ProbeSQLiteNode(db_path=sqlite_path, placement=Placement(pin_to_current_node=True)) as db:
        assert nodes_of(where_flow(db)) == {ray_cluster["head"]}


def test_node_ip_pin(sqlite_path):
    ip = ray.util.get_node_ip_address()
    with ProbeSQLiteNode(db_path=sqlite_path, placement=Placement(node_ip=ip)) as db:
        seen = where_flow(db)
    alive = {n["NodeID"] for n in ray.nodes() if n["Alive"] and n["NodeManagerAddress"] == ip}
    assert nodes_of(seen) <= alive


def test_reserved_placement_group_on_first_use_released_when_the_run_ends(ray_cluster, sqlite_path):
    placement = Placement(reserve_bundle={"CPU": 0.5, "second": 0.1})
    db = ProbeSQLiteNode(db_path=sqlite_path, placement=placement)
    assert db.reserved_placement_group is None  # nothing reserved until placed use
    seen = where_flow(db)
    groups = {s["group"] for s in seen}
    assert len(groups) == 1  # one group for every member of the run
    info = placement_group_table()[groups.pop()]
    assert info["bundles_to_node_id"][0] == ray_cluster["second"] and nodes_of(seen) == {ray_cluster["second"]}
    assert info["name"].startswith("chia-prefect: ") and sqlite_path in info["name"]
    # No close(): the run that reserved the group released it when it ended.
    wait_until(lambda: placement_group_table()[info["placement_group_id"]]["state"] == "REMOVED", timeout=5)
    assert db.reserved_placement_group is None
    again = {s["group"] for s in where_flow(db)}
    assert again and again != {info["placement_group_id"]}  # the next run reserves anew
    group = again.pop()
    wait_until(lambda: placement_group_table()[group]["state"] == "REMOVED", timeout=5)


@flow(task_runner=RayTaskRunner())
def close_inside_flow(db: ProbeSQLiteNode) -> tuple[str, str]:
    group = db.where()["group"]
    db.close()
    db.close()  # idempotent
    return group, placement_group_table()[group]["state"]


def test_close_releases_at_once_inside_a_run(sqlite_path):
    group, state = close_inside_flow(ProbeSQLiteNode(db_path=sqlite_path))
    assert state == "REMOVED"


def test_reserved_outside_a_run_until_close(sqlite_path):
    db = ProbeSQLiteNode(db_path=sqlite_path)
    db.member_ray_options()  # placed use outside a flow run (as a query tool's spawn does)
    group = db.reserved_placement_group
    assert placement_group_table(group)["state"] == "CREATED"
    db.close()
    db.close()
    assert placement_group_table(group)["state"] == "REMOVED"
    assert db.reserved_placement_group is None


@flow(task_runner=RayTaskRunner())
def two_nodes_one_file(path: str) -> list[str]:
    first, second = ProbeSQLiteNode(db_path=path), ProbeSQLiteNode(db_path=path)
    groups = [first.where()["group"], second.where()["group"]]
    first.close()  # the other node still holds the shared group
    groups.append(placement_group_table()[groups[1]]["state"])
    groups.append(second.where()["group"])
    return groups


def test_nodes_of_one_database_share_one_group(sqlite_path):
    a, b, state_after_first_close, c = two_nodes_one_file(sqlite_path)
    assert a == b == c and state_after_first_close == "CREATED"
    wait_until(lambda: placement_group_table()[a]["state"] == "REMOVED", timeout=5)


def test_default_sqlite_placement_group(sqlite_path):
    with ProbeSQLiteNode(db_path=sqlite_path) as db:
        seen = where_flow(db)
        group = seen[0]["group"]
        assert group is not None
        assert nodes_of(seen) == {placement_group_table()[group]["bundles_to_node_id"][0]}
    assert placement_group_table()[group]["state"] == "REMOVED"


@ray.remote(num_cpus=0)
def _linger(seconds: float) -> None:
    import time

    time.sleep(seconds)


@flow(task_runner=RayTaskRunner())
def leave_a_member_running(db: ProbeSQLiteNode) -> str:
    """Reserve the group in this run, and leave a member running in it as the run ends."""
    from chia_prefect.members import reservations

    db.where()
    group = db.reserved_placement_group
    reservations.track_node(db.placement_token, _linger.options(**db.member_ray_options()).remote(3))
    return group.id.hex()


def test_close_waits_for_a_removal_already_under_way(sqlite_path):
    # The run's end starts removing the group (waiting for the member still in it); a
    # close() meanwhile must not return before the group is gone.
    db = ProbeSQLiteNode(db_path=sqlite_path)
    group = leave_a_member_running(db)
    time.sleep(0.5)  # the reaper has seen the run end and waits for the member
    assert placement_group_table()[group]["state"] == "CREATED"
    db.close()
    assert placement_group_table()[group]["state"] == "REMOVED"


def test_handed_in_placement_group_not_released(ray_cluster, sqlite_path):
    group = placement_group([{"CPU": 0.2}, {"CPU": 0.2, "second": 0.1}], strategy="SPREAD")
    ray.get(group.ready(), timeout=60)
    try:
        with ProbeSQLiteNode(db_path=sqlite_path) as db:
            db.use_placement_group(group, bundle_index=1)
            assert nodes_of(where_flow(db)) == {ray_cluster["second"]}
        assert placement_group_table(group)["state"] == "CREATED"
    finally:
        remove_placement_group(group)


def test_postgres_default_is_unplaced(postgres_dsn):
    from nodes import ProbePostgresNode

    db = ProbePostgresNode(dsn=postgres_dsn)
    assert db.placement.mode == "none" and "scheduling_strategy" not in db.member_ray_options()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"node_id": "a", "pin_to_current_node": True}, "mutually exclusive"),
        ({"node_id": "a", "node_ip": "1.2.3.4"}, "mutually exclusive"),
        ({"pin_to_current_node": True, "node_ip": "1.2.3.4"}, "mutually exclusive"),
        ({"node_id": "a", "reserve_bundle": {"CPU": 1}}, "reserve_bundle applies"),
        ({"reserve_bundle": {"CPU": 0.05}}, "does not fit"),
    ],
)
def test_conflicting_placement_refused(kwargs, message):
    with pytest.raises(ValidationError, match=message):
        Placement(**kwargs)


def test_handed_in_group_conflicts_with_node_pin(ray_cluster, sqlite_path):
    db = ProbeSQLiteNode(db_path=sqlite_path, placement=Placement(node_id=ray_cluster["head"]))
    db.use_placement_group(object())
    with pytest.raises(PlacementError, match="one or the other"):
        db.member_ray_options()


def test_unsatisfiable_bundle_times_out_clearly(sqlite_path):
    placement = Placement(reserve_bundle={"CPU": 64}, pg_ready_timeout_s=1)
    db = ProbeSQLiteNode(db_path=sqlite_path, placement=placement)
    with pytest.raises(PlacementError, match="not ready within 1.0 s"):
        db.member_ray_options()
    assert db.reserved_placement_group is None
