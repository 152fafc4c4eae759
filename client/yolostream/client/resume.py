"""Many replicas behind one client: the channel target, gRPC's balancing config, and the stream resume policy.

Balancing is gRPC's own: the channel resolves the target to every replica (a static ``ipv4:``/``ipv6:`` list, or
``dns:///name:port``, which a Kubernetes headless Service answers with every ready pod), ``round_robin`` opens a
sub-channel to each, and client-side health checking (gRFC A17, the service config's ``healthCheckConfig``) keeps
a Health Watch open on each one: a replica that reports NOT_SERVING (draining, warming up) stops getting new calls
and gets them again once it reports SERVING. ``tests/test_scaleout.py`` shows that grpcio honours this.

A stream cannot move by itself once it has started (gRPC's retries never cover a stream that has had an answer,
gRFC A6). :class:`ResumePolicy` says how ``FeatureStream`` reopens it: on another call over the same channel, which
round_robin places on a healthy replica, re-sending the frames that were sent but not answered.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Sequence
from dataclasses import dataclass

import grpc

#: gRPC resolver schemes passed through untouched as a channel target (``dns:///svc:50051``, ``ipv4:a:p,b:p``).
TARGET_SCHEMES = ("dns", "ipv4", "ipv6", "unix", "unix-abstract", "vsock", "xds", "google-c2p")
#: The service the Health Watch of each replica asks about; the server reports it like the whole server ("").
HEALTH_SERVICE = "yolostream.v1.FeatureService"
#: Status codes after which a stream is reopened elsewhere: the replica died, drained or became unreachable.
RESUMABLE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE})
#: How a draining server answers a frame that it read but did not accept (a per-frame ERROR whose message starts
#: with this): the frame was not processed, so a resuming stream sends it again instead of passing the error on.
DRAIN_REFUSAL = "server is shutting down"
#: Reconnect backoff to a replica that went away (gRPC's default grows to 120 s): a replica that comes back is
#: used by new streams within about this long.
RECONNECT_BACKOFF_MS = (100, 1000)


@dataclass(frozen=True)
class ResumePolicy:
    """When and for how long a stream whose replica failed is reopened on another.

    Arguments:
        enabled: resume at all (False: the first UNAVAILABLE ends the stream, as with one server).
        max_attempts: reopenings in a row that end without a single answer before giving up.
        timeout_s: seconds from the failure that cut the stream until an answer arrives again; past it the
            stream ends with FeatureServerError UNAVAILABLE. This is the bound on how long a stream waits when
            every replica is down (a frozen replica is first noticed by keepalive, ``keepalive_s`` +
            ``keepalive_timeout_s`` of the client).
        backoff_s: pause before the second reopening in a row, doubling for each further one.
        max_backoff_s: the longest such pause.
    """

    enabled: bool = True
    max_attempts: int = 8
    timeout_s: float = 10.0
    backoff_s: float = 0.05
    max_backoff_s: float = 1.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {self.max_attempts}")
        if self.timeout_s <= 0:
            raise ValueError(f"resume timeout must be positive, got {self.timeout_s}")
        if self.backoff_s < 0 or self.max_backoff_s < 0:
            raise ValueError("resume backoff must be non-negative")

    def backoff(self, failures: int) -> float:
        """Pause before reopening after ``failures`` failed attempts in a row (none before the first retry)."""
        if failures <= 1:
            return 0.0
        return min(self.max_backoff_s, self.backoff_s * 2 ** (failures - 2))


def resume_policy(resume: "ResumePolicy | bool | None", default: ResumePolicy) -> ResumePolicy:
    """A policy from what a caller passed: a policy, True/False (the default's bounds, on or off), or None."""
    if resume is None:
        return default
    if isinstance(resume, ResumePolicy):
        return resume
    return ResumePolicy(enabled=bool(resume), max_attempts=default.max_attempts, timeout_s=default.timeout_s,
                        backoff_s=default.backoff_s, max_backoff_s=default.max_backoff_s)


def _split_host_port(address: str) -> tuple[str, str]:
    host, sep, port = address.strip().rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"server address {address!r} is not HOST:PORT")
    return host, port


def channel_target(address: str | Sequence[str]) -> str:
    """The gRPC target for ``address``: one ``host:port``, a gRPC target (``dns:///name:port``, ``ipv4:a:p,b:p``),
    a comma-separated list or a sequence of ``ip:port`` replicas.

    A list of several replicas becomes a static ``ipv4:``/``ipv6:`` target, which needs IP literals: gRPC has no
    target for several host names, and one name that resolves to every replica (``dns:///name:port``, a headless
    Service) is the way to name them, so a list with a name in it is refused with that advice.
    """
    if isinstance(address, str):
        scheme = address.split(":", 1)[0]
        if scheme in TARGET_SCHEMES:
            return address
        items = [a.strip() for a in address.split(",") if a.strip()]
    else:
        items = [str(a).strip() for a in address if str(a).strip()]
    if not items:
        raise ValueError("no server address given")
    if len(items) == 1:
        return items[0]
    families = set()
    for item in items:
        host, _ = _split_host_port(item)
        try:
            families.add(ipaddress.ip_address(host.strip("[]")).version)
        except ValueError:
            raise ValueError(f"a list of replicas takes IP:PORT items, got {item!r}; name replicas by one DNS name "
                             "that resolves to all of them instead (dns:///NAME:PORT, e.g. a headless Service)") \
                from None
    if len(families) > 1:
        raise ValueError("a list of replicas cannot mix IPv4 and IPv6 addresses")
    return ("ipv4:" if families == {4} else "ipv6:") + ",".join(items)


def is_address_list(target: str) -> bool:
    """True when the target names several replicas by IP (the TLS name check then needs a server name)."""
    return target.startswith(("ipv4:", "ipv6:")) and "," in target


def names_one_address(target: str) -> bool:
    """True when the target is a single ``ip:port``: it cannot resolve to several replicas."""
    if "," in target or target.split(":", 1)[0] in TARGET_SCHEMES:
        return False
    try:
        ipaddress.ip_address(_split_host_port(target)[0].strip("[]"))
    except ValueError:
        return False
    return True


def service_config(health_service: str = HEALTH_SERVICE) -> str:
    """The channel's service config: round_robin over every resolved replica, each health-checked (gRFC A17)."""
    return json.dumps({"loadBalancingConfig": [{"round_robin": {}}],
                       "healthCheckConfig": {"serviceName": health_service}})


def balancing_options(health_service: str = HEALTH_SERVICE) -> list[tuple[str, object]]:
    """Channel options for balanced, health-checked, quickly reconnecting channels."""
    initial_ms, max_ms = RECONNECT_BACKOFF_MS
    return [("grpc.service_config", service_config(health_service)),
            ("grpc.initial_reconnect_backoff_ms", initial_ms),
            ("grpc.max_reconnect_backoff_ms", max_ms)]
