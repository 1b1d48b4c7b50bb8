"""Joining an existing Ray cluster: check the address and the token before Ray tries.

Ray 2.60 clusters started with `ray start` use token authentication. A driver that lacks
the token retries for 20 s printing a warning a second (`host:port`), or waits 30 s and
blames the network (`ray://`). `check_ray_address` asks the cluster once, with a short
timeout, and raises one `RayClusterError` that names the fix.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from chia_prefect.errors import RayClusterError

_LOCAL = {"", "local", "auto"}
FIX = (
    "Give the driver, the Ray workers and the Prefect worker the cluster's token: "
    "RAY_AUTH_MODE=token and RAY_AUTH_TOKEN=<token> (or the token file in ~/.ray/auth_token, "
    "or RAY_AUTH_TOKEN_PATH). On the head node `ray get-auth-token` prints it."
)


def token() -> str | None:
    """The Ray auth token this process would send, from the environment or the token file."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or str(Path.home() / ".ray" / "auth_token")
    try:
        return Path(path).read_text().strip() or None
    except OSError:
        return None


def check_ray_address(address: str | None, timeout: float = 5.0) -> None:
    """Raise `RayClusterError` within about `timeout` if the cluster at `address` cannot be joined.

    `host:port` is the GCS (`ray start --head --port`, 6379 by default); `ray://host:port` the
    Ray Client server (10001 by default). An empty address, "local" or "auto" is not checked.
    """
    if address is None or address.strip() in _LOCAL:
        return
    import grpc

    client = address.startswith("ray://")
    target = address[len("ray://"):] if client else address
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise RayClusterError(
            f"Ray address {address!r} is not host:port or ray://host:port "
            "(e.g. 10.0.0.5:6379, ray://10.0.0.5:10001)."
        )
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as exc:
        raise RayClusterError(
            f"No Ray cluster answers at {address} ({exc.strerror or exc}). Start one with "
            f"`ray start --head` (it prints the address), or fix RAY_ADDRESS / the runner's address."
        ) from None
    mode = os.environ.get("RAY_AUTH_MODE", "").lower()
    sent = token() if mode == "token" else None
    metadata = (("authorization", f"Bearer {sent}"),) if sent else ()
    with grpc.insecure_channel(target) as channel:
        try:
            if client:
                from ray.core.generated import ray_client_pb2, ray_client_pb2_grpc

                stub = ray_client_pb2_grpc.RayletDriverStub(channel)
                stub.ClusterInfo(ray_client_pb2.ClusterInfoRequest(type=ray_client_pb2.ClusterInfoType.PING),
                                 timeout=timeout, metadata=metadata)
            else:
                from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

                stub = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel)
                stub.GetClusterId(gcs_service_pb2.GetClusterIdRequest(), timeout=timeout, metadata=metadata)
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            if code == grpc.StatusCode.UNAUTHENTICATED:
                if sent:
                    why = "refused the token this process sends (a token of another cluster?)"
                elif mode != "token" and token():
                    why = "requires token authentication, and RAY_AUTH_MODE=token is not set here"
                else:
                    why = "requires token authentication, and this process has no token"
                raise RayClusterError(f"The Ray cluster at {address} {why}. {FIX}") from None
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise RayClusterError(
                    f"The Ray cluster at {address} did not answer within {timeout:g} s. Is it a Ray "
                    f"{'Client server (ray start --ray-client-server-port)' if client else 'GCS (ray start --head --port)'}?"
                ) from None
            raise RayClusterError(
                f"The Ray cluster at {address} could not be asked ({code.name if code else exc}). "
                "Check the address: host:port for the GCS, ray://host:port for the Ray Client server."
            ) from None


def runner_address(runner: object) -> str | None:
    """The address a RayTaskRunner will join: its own, or RAY_ADDRESS when it has none."""
    address: str | None = getattr(runner, "address", None)
    if address:
        return address
    init_address: str | None = (getattr(runner, "init_kwargs", None) or {}).get("address")
    return init_address or os.environ.get("RAY_ADDRESS") or None


_INSTALLED = False


def install_address_check() -> None:
    """Make prefect-ray's `RayTaskRunner` (and subclasses) check the address before `ray.init`.

    Without it, a driver lacking the cluster's token retries for 20-30 s and fails with a
    message about the network. Idempotent; Ray already running in the process is not checked.
    """
    global _INSTALLED
    if _INSTALLED:
        return
    try:
        from prefect_ray.task_runners import RayTaskRunner
    except ImportError:  # pragma: no cover - prefect-ray is a dependency
        return
    original = RayTaskRunner.__enter__

    def __enter__(self):  # type: ignore[no-untyped-def]
        import ray

        if not ray.is_initialized():
            check_ray_address(runner_address(self))
        return original(self)

    __enter__.__wrapped__ = original  # type: ignore[attr-defined]
    RayTaskRunner.__enter__ = __enter__  # type: ignore[method-assign]
    _INSTALLED = True
