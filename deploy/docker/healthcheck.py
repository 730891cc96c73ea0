"""Container health check: ask the local server over the standard grpc.health.v1 protocol.

    python deploy/docker/healthcheck.py                      # localhost:$HDB_PORT (default 50051)
    python deploy/docker/healthcheck.py --target host:port --service ""

Exit 0 when the service answers SERVING, 1 otherwise (NOT_SERVING while the models load or
the server drains, or no answer). Why not `hdb client health`: the `hdb` entry point imports
every subcommand (torch, diffusers ...), which costs seconds to a minute of CPU on every probe;
this imports only grpc. Plaintext only, like Kubernetes' native gRPC probes.
"""

from __future__ import annotations

import argparse
import os
import sys

#: = serving.stubs.SERVICE_NAME (tests/deploy checks they agree): SERVING only once the models
#: are loaded, whereas the "" (whole server) entry would say the same; either works.
SERVICE = "hyperdreambooth.v1.PersonalizationService"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default=f"localhost:{os.environ.get('HDB_PORT') or 50051}",
                        help="HOST:PORT (default localhost:$HDB_PORT, else 50051)")
    parser.add_argument("--service", default=SERVICE, help=f"health service name (default {SERVICE})")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the answer")
    args = parser.parse_args(argv)

    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(args.target) as channel:
        try:
            resp = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout)
        except grpc.RpcError as e:
            print(f"unhealthy: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
    print(status)
    return 0 if resp.status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    sys.exit(main())
