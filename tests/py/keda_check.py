#!/usr/bin/env python3
"""Checks nodekeeper's KEDA external scaler (on a node agent or the aggregator) from KEDA's side
of the wire: a Python grpcio client generated at run time from proto/keda/externalscaler.proto
with grpc_tools.protoc, calling the service as KEDA's `external` scaler does.

Reads a JSON list of cases (--cases FILE), each a ScaledObject trigger and what it must give:

  {"name": "web pool", "namespace": "shop",
   "metadata": {"scalerAddress": "...", "metric": "established", "target": "5", ...},
   "value": 10.0,            # GetMetrics' metricValueFloat (and GetMetricSpec must agree on the name)
   "active": true,           # optional: IsActive's result, and the first StreamIsActive message
   "error": "INVALID_ARGUMENT", "message": "scalerMetadata.target"}   # instead: the call must fail

For a case with a value: GetMetricSpec returns one spec whose targetSizeFloat is the metadata's
target and whose name (or the metricName override) is then used for GetMetrics, as KEDA does;
the answer carries that name, metricValueFloat == value and metricValue == round(value).
For an error case, GetMetricSpec, GetMetrics and IsActive (or only the ones listed in "rpcs")
must fail with that code and a message containing `message`. Prints {"ok": true, "cases": N} on success; exits 1 naming the
case otherwise.

With --cacert (and --cert/--key) the channel is TLS as KEDA's trigger authentication sets it
up (caCert, tlsClientCert, tlsClientKey: a CA to verify the scaler and a client certificate);
--server-name is the name verified in the scaler's certificate (KEDA verifies the host of
scalerAddress).

Needs grpcio and grpcio-tools.
"""

import argparse
import importlib
import json
import os
import sys
import tempfile

import grpc

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_PROTO = os.path.normpath(os.path.join(HERE, "..", "..", "proto", "keda", "externalscaler.proto"))


class CheckFailed(Exception):
    pass


def check(cond, msg):
    if not cond:
        raise CheckFailed(msg)


def generate_stubs(proto, out_dir):
    """Compiles KEDA's proto into out_dir; returns (pb2, pb2_grpc)."""
    from grpc_tools import protoc

    include = os.path.dirname(proto)
    rc = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{include}",
            f"--python_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            os.path.basename(proto),
        ]
    )
    check(rc == 0, f"grpc_tools.protoc failed with {rc} for {proto}")
    sys.path.insert(0, out_dir)
    return (
        importlib.import_module("externalscaler_pb2"),
        importlib.import_module("externalscaler_pb2_grpc"),
    )


def run_case(pb2, stub, case, timeout):
    name = case["name"]
    ref = pb2.ScaledObjectRef(
        name=case.get("scaledObject", "workload"),
        namespace=case.get("namespace", ""),
        scalerMetadata=case["metadata"],
    )
    if "error" in case:
        want = getattr(grpc.StatusCode, case["error"])
        calls = {
            "GetMetricSpec": lambda: stub.GetMetricSpec(ref, timeout=timeout),
            "GetMetrics": lambda: stub.GetMetrics(
                pb2.GetMetricsRequest(scaledObjectRef=ref, metricName="x"), timeout=timeout
            ),
            "IsActive": lambda: stub.IsActive(ref, timeout=timeout),
        }
        # A value error (no pod selected) leaves GetMetricSpec answering: the spec needs no pods.
        for rpc in case.get("rpcs", list(calls)):
            call = calls[rpc]
            try:
                call()
            except grpc.RpcError as e:
                check(e.code() == want, f"{name}: {rpc} gave {e.code()} ({e.details()}), want {want}")
                check(
                    case["message"] in (e.details() or ""),
                    f"{name}: {rpc} message {e.details()!r} does not contain {case['message']!r}",
                )
                continue
            raise CheckFailed(f"{name}: {rpc} succeeded, want {want}")
        return

    spec = stub.GetMetricSpec(ref, timeout=timeout)
    check(len(spec.metricSpecs) == 1, f"{name}: {len(spec.metricSpecs)} metric specs, want 1")
    s = spec.metricSpecs[0]
    target = float(case["metadata"]["target"])
    check(s.targetSizeFloat == target, f"{name}: targetSizeFloat {s.targetSizeFloat}, want {target}")
    if "metricName" in case["metadata"]:
        check(s.metricName == case["metadata"]["metricName"], f"{name}: metricName {s.metricName!r}")
    else:
        metric = case["metadata"]["metric"].replace("_", "-")
        prefix = f"nodekeeper-{metric}-{case['metadata'].get('podNamespace', case.get('namespace'))}-"
        check(s.metricName.startswith(prefix), f"{name}: metricName {s.metricName!r}, want {prefix}...")
    again = stub.GetMetricSpec(ref, timeout=timeout).metricSpecs[0].metricName
    check(again == s.metricName, f"{name}: metricName not stable: {s.metricName!r} then {again!r}")

    got = stub.GetMetrics(pb2.GetMetricsRequest(scaledObjectRef=ref, metricName=s.metricName), timeout=timeout)
    check(len(got.metricValues) == 1, f"{name}: {len(got.metricValues)} metric values, want 1")
    v = got.metricValues[0]
    check(v.metricName == s.metricName, f"{name}: value named {v.metricName!r}, spec {s.metricName!r}")
    check(
        abs(v.metricValueFloat - case["value"]) < 1e-9,
        f"{name}: metricValueFloat {v.metricValueFloat}, want {case['value']}",
    )
    check(v.metricValue == round(case["value"]), f"{name}: metricValue {v.metricValue}")

    if "active" in case:
        active = stub.IsActive(ref, timeout=timeout).result
        check(active == case["active"], f"{name}: IsActive {active}, want {case['active']}")
        stream = stub.StreamIsActive(ref, timeout=timeout)
        first = next(iter(stream))
        check(first.result == case["active"], f"{name}: StreamIsActive first {first.result}")
        stream.cancel()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--addr", required=True, help="the scaler's gRPC address, HOST:PORT")
    p.add_argument("--cases", required=True, help="JSON file with the cases")
    p.add_argument("--proto", default=DEFAULT_PROTO, help="KEDA's externalscaler.proto")
    p.add_argument("--timeout", type=float, default=20.0, help="per-call deadline, seconds")
    p.add_argument("--cacert", help="PEM CA the scaler's certificate must chain to (TLS)")
    p.add_argument("--cert", help="PEM client certificate (mTLS, with --key)")
    p.add_argument("--key", help="PEM private key of --cert")
    p.add_argument("--server-name", help="the name verified in the scaler's certificate")
    a = p.parse_args()
    try:
        with open(a.cases) as f:
            cases = json.load(f)
        check(cases, "no cases")
        with tempfile.TemporaryDirectory() as out:
            pb2, pb2_grpc = generate_stubs(a.proto, out)
            options = [("grpc.enable_http_proxy", 0)]
            if a.cacert:
                def read(path):
                    with open(path, "rb") as f:
                        return f.read()

                creds = grpc.ssl_channel_credentials(
                    root_certificates=read(a.cacert),
                    private_key=read(a.key) if a.key else None,
                    certificate_chain=read(a.cert) if a.cert else None,
                )
                if a.server_name:
                    options.append(("grpc.ssl_target_name_override", a.server_name))
                channel = grpc.secure_channel(a.addr, creds, options=options)
            else:
                channel = grpc.insecure_channel(a.addr, options=options)
            grpc.channel_ready_future(channel).result(timeout=a.timeout)
            stub = pb2_grpc.ExternalScalerStub(channel)
            for case in cases:
                run_case(pb2, stub, case, a.timeout)
            channel.close()
    except (CheckFailed, grpc.RpcError, grpc.FutureTimeoutError) as e:
        print(f"keda_check: {e}", file=sys.stderr)
        sys.exit(1)
    print(json.dumps({"ok": True, "cases": len(cases)}), flush=True)


if __name__ == "__main__":
    main()
