#!/usr/bin/env python3
"""A gRPC client that knows nothing of nodekeeper's schema: every type comes from the agent's
server reflection, through Python's own reflection client (grpcio-reflection, which speaks
grpc.reflection.v1alpha only). No .proto file, no generated stub.

Resolves nodekeeper.v1.NodeAgent, calls GetNode, opens WatchMetrics and decodes one message,
all with message classes built from the reflected descriptors. Prints a JSON result on stdout;
exits non-zero with the reason on stderr on any failure.

Needs grpcio, grpcio-reflection (and protobuf, which they bring).
"""

import argparse
import json
import sys

import grpc
from google.protobuf import descriptor_pool, json_format, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

SERVICE = "nodekeeper.v1.NodeAgent"


class CheckFailed(Exception):
    pass


def check(cond, msg):
    if not cond:
        raise CheckFailed(msg)


def method_call(channel, pool, method_name, streaming):
    """A callable for SERVICE/method_name with request/response classes from the pool."""
    method = pool.FindServiceByName(SERVICE).FindMethodByName(method_name)
    request_cls = message_factory.GetMessageClass(method.input_type)
    response_cls = message_factory.GetMessageClass(method.output_type)
    make = channel.unary_stream if streaming else channel.unary_unary
    call = make(
        f"/{SERVICE}/{method_name}",
        request_serializer=request_cls.SerializeToString,
        response_deserializer=response_cls.FromString,
    )
    return call, request_cls


def run(addr, timeout):
    result = {}
    with grpc.insecure_channel(addr) as channel:
        # The database asks the server (v1alpha) for each symbol and file the pool needs.
        reflection_db = ProtoReflectionDescriptorDatabase(channel)
        services = list(reflection_db.get_services())
        check(SERVICE in services, f"reflection: {SERVICE} not listed; have {services}")
        result["services"] = sorted(services)
        pool = descriptor_pool.DescriptorPool(reflection_db)

        get_node, request_cls = method_call(channel, pool, "GetNode", streaming=False)
        node = get_node(request_cls(), timeout=timeout)
        check(node.node_name, "GetNode: node_name is empty")
        check(node.HasField("started_at"), "GetNode: started_at is not set")
        state_enum = node.DESCRIPTOR.fields_by_name["capabilities"].message_type.fields_by_name[
            "state"
        ].enum_type
        caps = {c.name: state_enum.values_by_number[c.state].name for c in node.capabilities}
        check(
            caps.get("metrics") == "HEALTH_STATE_SERVING",
            f"GetNode: metrics capability {caps.get('metrics')}; have {caps}",
        )
        result["node_name"] = node.node_name
        result["version"] = node.version
        result["capabilities"] = caps

        watch, request_cls = method_call(channel, pool, "WatchMetrics", streaming=True)
        request = request_cls()
        request.interval.seconds = 1  # a google.protobuf.Duration, resolved by reflection too
        stream = watch(request, timeout=timeout)
        try:
            snapshot = next(stream)
        except StopIteration:
            raise CheckFailed("WatchMetrics ended before its first message")
        finally:
            stream.cancel()
        check(snapshot.node_name == node.node_name, f"WatchMetrics: node_name {snapshot.node_name!r}")
        check(snapshot.collected_at.seconds > 0, "WatchMetrics: collected_at is zero")
        check(len(snapshot.node.cpus) > 0, "WatchMetrics: node.cpus is empty")
        check(snapshot.node.memory.total_bytes > 0, "WatchMetrics: node.memory.total_bytes is 0")
        # The whole message decodes to JSON by its reflected descriptor (every nested type known).
        decoded = json.loads(json_format.MessageToJson(snapshot))
        result["snapshot_fields"] = sorted(decoded)
        result["cpus"] = len(snapshot.node.cpus)
    return result


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--addr", required=True, help="the agent's gRPC address, HOST:PORT")
    p.add_argument("--timeout", type=float, default=30.0, help="per-call deadline, seconds")
    args = p.parse_args()
    try:
        result = run(args.addr, args.timeout)
    except (CheckFailed, KeyError) as e:
        print(f"reflection_client: FAILED: {e}", file=sys.stderr)
        print(json.dumps({"ok": False, "error": str(e)}))
        return 1
    except grpc.RpcError as e:
        msg = f"RPC error {e.code().name}: {e.details()}"
        print(f"reflection_client: FAILED: {msg}", file=sys.stderr)
        print(json.dumps({"ok": False, "error": msg}))
        return 1
    print(json.dumps({"ok": True, "result": result}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
