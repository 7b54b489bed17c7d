#!/usr/bin/env python3
"""Envoy RLS v3 against running nodes, with an independent client (grpcio
and the xds-protos stubs): the smoke check of a deployment.

Usage: rls_smoke.py HOST:PORT [HOST:PORT...]

Sends ShouldRateLimit for one fresh descriptor carrying its own limit (3
per minute) nine times, round robin over the given nodes, and checks that
exactly 3 are OK and the rest OVER_LIMIT: the nodes serve Envoy's API and
decide as one. Exits non-zero otherwise.
"""

import sys
import time

import grpc
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc


def main(targets):
    stubs = [rls_pb2_grpc.RateLimitServiceStub(grpc.insecure_channel(t)) for t in targets]
    user = "smoke-%d" % time.time_ns()
    codes = []
    for i in range(9):
        d = ratelimit_pb2.RateLimitDescriptor(
            entries=[ratelimit_pb2.RateLimitDescriptor.Entry(key="user", value=user)]
        )
        d.limit.requests_per_unit = 3
        d.limit.unit = 2  # MINUTE
        reply = stubs[i % len(stubs)].ShouldRateLimit(
            rls_pb2.RateLimitRequest(domain="smoke", descriptors=[d]), timeout=5
        )
        codes.append(reply.overall_code)
        # Sequential requests, as one client sends them.
        time.sleep(0.03)
    ok = codes.count(rls_pb2.RateLimitResponse.OK)
    print("Envoy RLS through %d node(s): %d of 9 OK (limit 3 per minute)" % (len(targets), ok))
    return 0 if ok == 3 else 1


if __name__ == "__main__":
    if len(sys.argv) < 2:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    sys.exit(main(sys.argv[1:]))
