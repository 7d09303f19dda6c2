#!/usr/bin/env python3
"""Checks nodekeeper's gRPC API from an independent implementation (Python grpcio).

Stubs are generated at run time from the repository's proto/ with grpc_tools.protoc, so this
script always speaks the schema in the checkout, not a copy. Runs one scenario against --addr,
prints a JSON result on stdout and exits non-zero with a message on stderr on any failure.

Scenarios:
  basic            GetNode, GetMetrics, two WatchMetrics messages, grpc.health.v1, reflection v1
  watch-until-end  WatchMetrics until the server ends the stream; OK only for a clean end
  interval-floor   WatchMetrics with 10ms: snapshots still arrive >= ~1s apart
  exclude-pods     GetMetrics lists pods (--expect-pod-uid), and none with exclude_pods
  max-streams      with api.maxWatchStreams 1: a second stream gets RESOURCE_EXHAUSTED,
                   and the slot is free again once the first is cancelled
  health-watch-until-end
                   grpc.health.v1 Watch("") until the server ends it; OK only for a clean end
  drain            a full Drain (needs a connected agent and credentials), streamed to `completed`
  cordon-uncordon  Cordon then Uncordon (needs a connected agent and credentials): the returned
                   and the re-read NodeStatus.unschedulable flip true, then false

Credentials: --tls-ca (server CA; switches to TLS), --tls-cert/--tls-key (client certificate for
mTLS), --token (sent as `authorization: Bearer <token>` on control calls).

Needs grpcio, grpcio-tools, grpcio-health-checking, grpcio-reflection.
"""

import argparse
import glob
import importlib
import json
import os
import sys
import tempfile
import time

import grpc

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_PROTO_DIR = os.path.normpath(os.path.join(HERE, "..", "..", "proto"))

# "1 s apart", measured on the agent's collected_at (collection time varies by a few ms).
MIN_GAP_SECONDS = 0.9
# Receive times on this side also carry client scheduling jitter: only a sanity bound, still far
# above what an unfloored 10 ms interval would give.
MIN_WALL_GAP_SECONDS = 0.5

# grpcio-reflection ships the v1alpha messages, which are identical on the wire to v1's: used
# here with the v1 method path to check v1 (tests/py/reflection_client.py covers v1alpha).
REFLECTION_V1_METHOD = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"


class CheckFailed(Exception):
    pass


def check(cond, msg):
    if not cond:
        raise CheckFailed(msg)


def generate_stubs(proto_dir, out_dir):
    """Compiles every .proto under proto_dir into out_dir; returns (pb2, pb2_grpc) of agent.proto."""
    from grpc_tools import protoc

    wkt_include = os.path.join(os.path.dirname(protoc.__file__), "_proto")
    protos = sorted(
        os.path.relpath(p, proto_dir)
        for p in glob.glob(os.path.join(proto_dir, "**", "*.proto"), recursive=True)
    )
    check(protos, f"no .proto files under {proto_dir}")
    rc = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{proto_dir}",
            f"-I{wkt_include}",
            f"--python_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            *protos,
        ]
    )
    check(rc == 0, f"grpc_tools.protoc failed with {rc} for {protos} in {proto_dir}")
    # Regular packages, so an unrelated installed "nodekeeper" can never shadow these.
    for dirpath, _dirs, _files in os.walk(out_dir):
        if dirpath != out_dir:
            open(os.path.join(dirpath, "__init__.py"), "a").close()
    sys.path.insert(0, out_dir)
    pb2 = importlib.import_module("nodekeeper.v1.agent_pb2")
    pb2_grpc = importlib.import_module("nodekeeper.v1.agent_pb2_grpc")
    return pb2, pb2_grpc


def ts_seconds(ts):
    return ts.seconds + ts.nanos / 1e9


def emit(obj):
    print(json.dumps(obj, sort_keys=True), flush=True)


def duration(pb_duration_cls, seconds):
    d = pb_duration_cls()
    d.FromNanoseconds(int(round(seconds * 1e9)))
    return d


def read_file(path):
    with open(path, "rb") as f:
        return f.read()


class Client:
    def __init__(self, addr, timeout, tls_ca=None, tls_cert=None, tls_key=None, token=None):
        self.addr = addr
        self.timeout = timeout
        # Call metadata for control RPCs; never printed.
        self.metadata = [("authorization", f"Bearer {token}")] if token else []
        # Never route loopback test traffic through a proxy from the environment.
        options = [("grpc.enable_http_proxy", 0)]
        if tls_ca:
            creds = grpc.ssl_channel_credentials(
                root_certificates=read_file(tls_ca),
                private_key=read_file(tls_key) if tls_key else None,
                certificate_chain=read_file(tls_cert) if tls_cert else None,
            )
            self.channel = grpc.secure_channel(addr, creds, options=options)
        else:
            self.channel = grpc.insecure_channel(addr, options=options)
        try:
            grpc.channel_ready_future(self.channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            raise CheckFailed(f"cannot connect to {addr} within {timeout}s")

    def close(self):
        self.channel.close()


def watch_request(pb2, interval_seconds, exclude_pods=False):
    from google.protobuf import duration_pb2

    return pb2.WatchMetricsRequest(
        interval=duration(duration_pb2.Duration, interval_seconds), exclude_pods=exclude_pods
    )


def read_two(pb2, stub, interval_seconds, timeout):
    """Opens WatchMetrics, reads two messages, cancels; returns (first, second, wall gap)."""
    call = stub.WatchMetrics(watch_request(pb2, interval_seconds), timeout=timeout)
    try:
        first = next(call)
        t1 = time.monotonic()
        second = next(call)
        t2 = time.monotonic()
    except StopIteration:
        raise CheckFailed("WatchMetrics ended before sending two snapshots")
    finally:
        call.cancel()
    return first, second, t2 - t1


def scenario_basic(args, pb2, pb2_grpc, client):
    stub = pb2_grpc.NodeAgentStub(client.channel)
    result = {}

    node = stub.GetNode(pb2.GetNodeRequest(), timeout=args.timeout)
    check(node.node_name, "GetNode: node_name is empty")
    if args.expect_version is not None:
        check(
            node.version == args.expect_version,
            f"GetNode: version {node.version!r}, expected {args.expect_version!r}",
        )
    check(node.HasField("started_at"), "GetNode: started_at is not set")
    caps = {c.name: c for c in node.capabilities}
    for name in ("metrics", "api"):
        check(name in caps, f"GetNode: capability {name!r} missing; have {sorted(caps)}")
        state = pb2.HealthState.Name(caps[name].state)
        check(
            state == "HEALTH_STATE_SERVING",
            f"GetNode: capability {name!r} is {state} ({caps[name].detail!r}), expected SERVING",
        )
    result["node_name"] = node.node_name
    result["version"] = node.version
    result["capabilities"] = {n: pb2.HealthState.Name(c.state) for n, c in caps.items()}

    snap = stub.GetMetrics(pb2.GetMetricsRequest(), timeout=args.timeout)
    check(snap.HasField("collected_at"), "GetMetrics: collected_at is not set")
    check(ts_seconds(snap.collected_at) > 0, "GetMetrics: collected_at is zero")
    check(len(snap.node.cpus) > 0, "GetMetrics: node.cpus is empty")
    check(snap.node.memory.total_bytes > 0, "GetMetrics: node.memory.total_bytes is 0")
    check(snap.node_name == node.node_name, f"GetMetrics: node_name {snap.node_name!r}")
    result["cpus"] = len(snap.node.cpus)
    result["unavailable"] = list(snap.unavailable)

    first, second, wall = read_two(pb2, stub, 1.0, args.timeout)
    gap = ts_seconds(second.collected_at) - ts_seconds(first.collected_at)
    check(
        gap >= MIN_GAP_SECONDS,
        f"WatchMetrics(1s): second snapshot only {gap:.3f}s after the first",
    )
    result["watch_gap_seconds"] = round(gap, 3)
    result["watch_wall_gap_seconds"] = round(wall, 3)

    from grpc_health.v1 import health_pb2, health_pb2_grpc

    health = health_pb2_grpc.HealthStub(client.channel)
    serving = health_pb2.HealthCheckResponse.SERVING
    for service in ("", "metrics"):
        resp = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=args.timeout)
        check(
            resp.status == serving,
            f"health Check({service!r}): {health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)}",
        )
    try:
        resp = health.Check(
            health_pb2.HealthCheckRequest(service="no-such-capability"), timeout=args.timeout
        )
        raise CheckFailed(f"health Check('no-such-capability') answered {resp.status}, expected NOT_FOUND")
    except grpc.RpcError as e:
        check(
            e.code() == grpc.StatusCode.NOT_FOUND,
            f"health Check('no-such-capability'): {e.code().name}, expected NOT_FOUND",
        )
    result["health"] = "ok"

    result["reflection_services"] = reflection_check(client, args.timeout)
    return result


def reflection_check(client, timeout):
    from google.protobuf import descriptor_pb2
    from grpc_reflection.v1alpha import reflection_pb2

    call = client.channel.stream_stream(
        REFLECTION_V1_METHOD,
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    requests = [
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="nodekeeper.v1.NodeAgent"),
    ]
    responses = list(call(iter(requests), timeout=timeout))
    check(len(responses) == 2, f"reflection: {len(responses)} responses to 2 requests")
    listed, symbol = responses
    check(
        listed.HasField("list_services_response"),
        f"reflection list_services: {listed.WhichOneof('message_response')}: {listed}",
    )
    services = sorted(s.name for s in listed.list_services_response.service)
    for want in ("nodekeeper.v1.NodeAgent", "grpc.health.v1.Health"):
        check(want in services, f"reflection: {want} not listed; have {services}")
    check(
        symbol.HasField("file_descriptor_response"),
        f"reflection file_containing_symbol: {symbol.WhichOneof('message_response')}: {symbol}",
    )
    files = [
        descriptor_pb2.FileDescriptorProto.FromString(raw)
        for raw in symbol.file_descriptor_response.file_descriptor_proto
    ]
    agent = [f for f in files if f.package == "nodekeeper.v1"]
    check(agent, f"reflection: no nodekeeper.v1 file; got {[f.name for f in files]}")
    methods = sorted(m.name for s in agent[0].service if s.name == "NodeAgent" for m in s.method)
    expected = sorted(
        ["GetNode", "GetMetrics", "WatchMetrics", "Cordon", "Uncordon", "Drain", "GetDrain", "CancelDrain"]
    )
    check(methods == expected, f"reflection: NodeAgent methods {methods}, expected {expected}")
    return services


def scenario_watch_until_end(args, pb2, pb2_grpc, client):
    """Reads WatchMetrics until the server ends the stream. Only a clean end (status OK) passes."""
    stub = pb2_grpc.NodeAgentStub(client.channel)
    call = stub.WatchMetrics(watch_request(pb2, 1.0), timeout=args.timeout)
    return read_until_end(call, "WatchMetrics")


def scenario_health_watch_until_end(args, pb2, pb2_grpc, client):
    """Reads grpc.health.v1 Watch("") until the server ends it. Only status OK passes."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    health = health_pb2_grpc.HealthStub(client.channel)
    call = health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=args.timeout)
    return read_until_end(call, "health Watch")


def read_until_end(call, what):
    """Prints {"event":"first"} after the first message, then reads until the stream ends."""
    messages = 0
    try:
        for _snap in call:
            messages += 1
            if messages == 1:
                emit({"event": "first"})
        code = call.code()
    except grpc.RpcError as e:
        code = e.code()
        detail = e.details()
        emit({"event": "end", "messages": messages, "status": code.name, "details": detail})
        raise CheckFailed(f"{what} ended with {code.name} ({detail!r}), expected OK")
    emit({"event": "end", "messages": messages, "status": code.name})
    check(messages >= 1, f"{what} ended before its first message")
    check(code == grpc.StatusCode.OK, f"{what} ended with {code.name}, expected OK")
    return {"messages": messages, "status": code.name}


def scenario_interval_floor(args, pb2, pb2_grpc, client):
    stub = pb2_grpc.NodeAgentStub(client.channel)
    first, second, wall = read_two(pb2, stub, 0.010, args.timeout)
    gap = ts_seconds(second.collected_at) - ts_seconds(first.collected_at)
    check(
        gap >= MIN_GAP_SECONDS,
        f"WatchMetrics(10ms): snapshots {gap:.3f}s apart, expected the 1s floor",
    )
    check(
        wall >= MIN_WALL_GAP_SECONDS,
        f"WatchMetrics(10ms): second snapshot arrived {wall:.3f}s after the first",
    )
    return {"gap_seconds": round(gap, 3), "wall_gap_seconds": round(wall, 3)}


def scenario_exclude_pods(args, pb2, pb2_grpc, client):
    stub = pb2_grpc.NodeAgentStub(client.channel)
    with_pods = stub.GetMetrics(pb2.GetMetricsRequest(), timeout=args.timeout)
    uids = sorted(p.uid for p in with_pods.pods)
    check(uids, "GetMetrics without exclude_pods: no pods (is the fake cgroup tree in place?)")
    if args.expect_pod_uid:
        check(
            args.expect_pod_uid in uids,
            f"GetMetrics: pod {args.expect_pod_uid} missing; have {uids}",
        )
    without = stub.GetMetrics(pb2.GetMetricsRequest(exclude_pods=True), timeout=args.timeout)
    check(
        len(without.pods) == 0,
        f"GetMetrics(exclude_pods): {len(without.pods)} pods: {[p.uid for p in without.pods]}",
    )
    check(len(without.node.cpus) > 0, "GetMetrics(exclude_pods): node resources missing")
    call = stub.WatchMetrics(watch_request(pb2, 1.0, exclude_pods=True), timeout=args.timeout)
    try:
        watched = next(call)
    finally:
        call.cancel()
    check(
        len(watched.pods) == 0,
        f"WatchMetrics(exclude_pods): {len(watched.pods)} pods",
    )
    return {"pods": uids, "pods_excluded": 0}


def scenario_max_streams(args, pb2, pb2_grpc, client):
    """Expects api.maxWatchStreams: 1."""
    stub = pb2_grpc.NodeAgentStub(client.channel)
    first = stub.WatchMetrics(watch_request(pb2, 1.0), timeout=args.timeout)
    next(first)  # the stream holds its slot once the server answered
    second = stub.WatchMetrics(watch_request(pb2, 1.0), timeout=args.timeout)
    try:
        next(second)
        second.cancel()
        raise CheckFailed("a second WatchMetrics stream was accepted with maxWatchStreams 1")
    except grpc.RpcError as e:
        check(
            e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"second WatchMetrics: {e.code().name} ({e.details()!r}), expected RESOURCE_EXHAUSTED",
        )
        rejected = e.details()
    first.cancel()

    # The cancelled stream must give its slot back (promptly, not at the next tick).
    deadline = time.monotonic() + 3.0
    while True:
        third = stub.WatchMetrics(watch_request(pb2, 1.0), timeout=args.timeout)
        try:
            next(third)
            break
        except grpc.RpcError as e:
            check(
                e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and time.monotonic() < deadline,
                f"WatchMetrics after cancelling the first: {e.code().name}; slot not released",
            )
            time.sleep(0.05)
        finally:
            third.cancel()
    return {"rejected": rejected, "slot_released": True}


def scenario_cordon_uncordon(args, pb2, pb2_grpc, client):
    """Cordon, then Uncordon; NodeStatus.unschedulable must follow, in replies and in GetNode."""
    stub = pb2_grpc.NodeAgentStub(client.channel)
    md = client.metadata
    before = stub.GetNode(pb2.GetNodeRequest(), timeout=args.timeout, metadata=md)
    check(not before.unschedulable, "GetNode: the node is already unschedulable")
    check(before.kubernetes_connected, "GetNode: the agent is not connected to Kubernetes")
    cordoned = stub.Cordon(
        pb2.CordonRequest(reason="grpc_check cordon-uncordon"), timeout=args.timeout, metadata=md
    )
    check(cordoned.unschedulable, "Cordon: NodeStatus.unschedulable is false")
    seen = stub.GetNode(pb2.GetNodeRequest(), timeout=args.timeout, metadata=md)
    check(seen.unschedulable, "GetNode after Cordon: unschedulable is false")
    uncordoned = stub.Uncordon(pb2.UncordonRequest(), timeout=args.timeout, metadata=md)
    check(not uncordoned.unschedulable, "Uncordon: NodeStatus.unschedulable is still true")
    seen = stub.GetNode(pb2.GetNodeRequest(), timeout=args.timeout, metadata=md)
    check(not seen.unschedulable, "GetNode after Uncordon: unschedulable is still true")
    return {"node_name": seen.node_name, "cordoned": True, "uncordoned": True}


def scenario_drain(args, pb2, pb2_grpc, client):
    """A full Drain streamed to its end; the last event must be `completed`."""
    stub = pb2_grpc.NodeAgentStub(client.channel)
    req = pb2.DrainRequest(
        id="grpc-check-drain",
        reason="grpc_check drain",
        requester="python-grpcio",
        evict_unreplicated=True,
        delete_emptydir_data=True,
    )
    req.timeout.seconds = 300
    kinds = {}
    last = None
    for event in stub.Drain(req, timeout=330, metadata=client.metadata):
        kind = event.WhichOneof("event")
        kinds[kind] = kinds.get(kind, 0) + 1
        last = event
    check(last is not None, "Drain: the stream ended without an event")
    check(last.WhichOneof("event") == "completed", "Drain: ended with %r, not completed" % last.WhichOneof("event"))
    check(kinds.get("planned") == 1, "Drain: expected exactly one planned event, got %r" % kinds)
    check(kinds.get("deleted", 0) == len(last.completed.done), "Drain: deleted events %r vs done %d" % (kinds, len(last.completed.done)))
    return {"events": kinds, "done": len(last.completed.done)}


SCENARIOS = {
    "basic": scenario_basic,
    "watch-until-end": scenario_watch_until_end,
    "interval-floor": scenario_interval_floor,
    "exclude-pods": scenario_exclude_pods,
    "max-streams": scenario_max_streams,
    "health-watch-until-end": scenario_health_watch_until_end,
    "cordon-uncordon": scenario_cordon_uncordon,
    "drain": scenario_drain,
}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("scenario", choices=sorted(SCENARIOS))
    p.add_argument("--addr", required=True, help="the agent's gRPC address, HOST:PORT")
    p.add_argument("--proto-dir", default=DEFAULT_PROTO_DIR, help="root of the .proto files")
    p.add_argument("--expect-version", help="basic: the version GetNode must report")
    p.add_argument("--expect-pod-uid", help="exclude-pods: a pod UID GetMetrics must list")
    p.add_argument("--timeout", type=float, default=30.0, help="per-call deadline, seconds")
    p.add_argument("--tls-ca", help="PEM CA of the agent's server certificate; enables TLS")
    p.add_argument("--tls-cert", help="PEM client certificate (mTLS); needs --tls-ca, --tls-key")
    p.add_argument("--tls-key", help="PEM key of --tls-cert")
    p.add_argument("--token", help="bearer token sent on the calls of cordon-uncordon")
    args = p.parse_args()
    if (args.tls_cert or args.tls_key) and not (args.tls_cert and args.tls_key and args.tls_ca):
        p.error("--tls-cert and --tls-key go together, and need --tls-ca")

    try:
        with tempfile.TemporaryDirectory(prefix="nodekeeper-pb-") as out_dir:
            pb2, pb2_grpc = generate_stubs(args.proto_dir, out_dir)
            client = Client(
                args.addr, args.timeout, args.tls_ca, args.tls_cert, args.tls_key, args.token
            )
            try:
                result = SCENARIOS[args.scenario](args, pb2, pb2_grpc, client)
            finally:
                client.close()
    except CheckFailed as e:
        print(f"grpc_check {args.scenario}: FAILED: {e}", file=sys.stderr)
        emit({"scenario": args.scenario, "ok": False, "error": str(e)})
        return 1
    except grpc.RpcError as e:
        msg = f"unexpected RPC error {e.code().name}: {e.details()}"
        print(f"grpc_check {args.scenario}: FAILED: {msg}", file=sys.stderr)
        emit({"scenario": args.scenario, "ok": False, "error": msg})
        return 1
    emit({"scenario": args.scenario, "ok": True, "result": result})
    return 0


if __name__ == "__main__":
    sys.exit(main())
