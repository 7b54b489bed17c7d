#!/usr/bin/env python3
"""Envoy RLS v3 conformance of a real 3-node `drl cluster`, driven by an
independent client: grpcio with the generated stubs that the `xds-protos`
package ships (envoy/service/ratelimit/v3/rls_pb2_grpc.py).

Usage: rls_conformance.py PATH_TO_DRL

Starts `drl cluster --nodes 3` in a temporary folder on free ports, with its
own rules file, runs every case, stops the cluster (SIGTERM, then waits),
and prints "N passed, N failed". Exits non-zero if any case failed or the
cluster could not start.
"""

import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback

import grpc
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc

RULES = """
[[rules]]
name = "edge-per-ip"
domain = "edge"
match = { remote_address = "*" }
limits = [ { algorithm = "fixed_window", limit = 5, window = "1m" } ]

[[rules]]
name = "per-path"
match = { path = "*" }
limits = [ { algorithm = "fixed_window", limit = 1000, window = "1h" } ]

[[rules]]
name = "spread"
match = { tenant = "*" }
limits = [ { algorithm = "sliding_window", limit = 30, window = "1h" } ]
"""

# In a cluster under the strict share policy a node admits at most its
# in-flight share of a limit (2% of it, at least one hit) until its peers
# acknowledge, and it reserves its peers' shares: `limit_remaining` is what
# this node may still admit. The cases below therefore leave the node time
# to hear the acknowledgements between requests (SETTLE), compare remaining
# counts with each other, never with the bare limit, and send costs above 1
# only under a limit whose in-flight share covers them (1000: 20 hits).
SETTLE = 0.03

OK = rls_pb2.RateLimitResponse.OK
OVER = rls_pb2.RateLimitResponse.OVER_LIMIT
NODES = 3


def ports_free(base, count, kind):
    for port in range(base, base + count):
        s = socket.socket(socket.AF_INET, kind)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        finally:
            s.close()
    return True


def free_bases():
    """HTTP, peer (UDP) and gRPC base ports, each with NODES free ports."""
    rng = random.Random()
    for _ in range(200):
        http = rng.randrange(20000, 30000)
        peer = rng.randrange(30000, 40000)
        grpc_ = rng.randrange(40000, 50000)
        if (
            ports_free(http, NODES, socket.SOCK_STREAM)
            and ports_free(peer, NODES, socket.SOCK_DGRAM)
            and ports_free(grpc_, NODES, socket.SOCK_STREAM)
        ):
            return http, peer, grpc_
    raise RuntimeError("no free ports")


class Cluster:
    def __init__(self, drl):
        self.dir = tempfile.mkdtemp(prefix="drl-rls-")
        with open(os.path.join(self.dir, "rules.toml"), "w") as f:
            f.write(RULES)
        self.http, self.peer, self.grpc = free_bases()
        self.log = open(os.path.join(self.dir, "cluster.log"), "w+")
        self.proc = subprocess.Popen(
            [
                drl, "cluster", "--nodes", str(NODES), "--dir", self.dir,
                "--base-port", str(self.http),
                "--peer-base-port", str(self.peer),
                "--grpc-base-port", str(self.grpc),
            ],
            stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )

    def wait_ready(self, timeout=90):
        deadline = time.time() + timeout
        while time.time() < deadline:
            self.log.seek(0)
            text = self.log.read()
            if "nodes ready" in text:
                return text
            if self.proc.poll() is not None:
                raise RuntimeError("drl cluster exited:\n" + text)
            time.sleep(0.2)
        raise RuntimeError("drl cluster not ready in time")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()

    def target(self, node):
        return "127.0.0.1:%d" % (self.grpc + node)


def descriptor(entries, hits=None, limit=None, unit=1):
    d = ratelimit_pb2.RateLimitDescriptor(
        entries=[
            ratelimit_pb2.RateLimitDescriptor.Entry(key=k, value=v)
            for k, v in entries
        ]
    )
    if hits is not None:
        d.hits_addend.value = hits
    if limit is not None:
        d.limit.requests_per_unit = limit
        d.limit.unit = unit
    return d


def request(domain, descriptors, hits=0):
    return rls_pb2.RateLimitRequest(
        domain=domain, descriptors=descriptors, hits_addend=hits
    )


def header(response, name):
    for h in response.response_headers_to_add:
        if h.key.lower() == name:
            return h.value
    return None


def expect(cond, what):
    if not cond:
        raise AssertionError(what)


class Cases:
    def __init__(self, stubs, target):
        self.stubs = stubs
        self.target = target

    def ask(self, req, node=0):
        return self.stubs[node].ShouldRateLimit(req, timeout=10)

    def settled(self, req):
        time.sleep(SETTLE)
        return self.ask(req)

    def path_remaining(self, path):
        """Asks once for `path` (one hit) and returns what is left after it."""
        r = self.settled(request("edge", [descriptor([("path", path)])]))
        expect(r.overall_code == OK, r)
        return r.statuses[0].limit_remaining

    def spend(self, ip):
        """Asks for `ip` until it is over its limit; returns the OKs."""
        oks, last = [], None
        for _ in range(40):
            r = self.settled(request("edge", [descriptor([("remote_address", ip)])]))
            if r.overall_code != OK:
                return oks, r
            oks.append(r)
        raise AssertionError("never over the limit of 5: %r" % last)

    def case_ok_then_over_limit(self):
        oks, over = self.spend("10.0.0.1")
        expect(1 <= len(oks) <= 5, "admitted %d of a limit of 5" % len(oks))
        for a, b in zip(oks, oks[1:]):
            expect(b.statuses[0].limit_remaining == a.statuses[0].limit_remaining - 1, oks)
        for r in oks:
            s = r.statuses[0]
            expect(s.code == OK, s)
            expect(s.current_limit.name == "edge-per-ip", s)
            expect(s.current_limit.requests_per_unit == 5, s)
            expect(s.current_limit.unit == rls_pb2.RateLimitResponse.RateLimit.MINUTE, s)
            expect(s.HasField("duration_until_reset"), s)
            expect(0 < s.duration_until_reset.seconds + s.duration_until_reset.nanos * 1e-9 <= 60, s)
        expect(over.overall_code == OVER and over.statuses[0].code == OVER, over)
        expect(over.statuses[0].limit_remaining == 0, over)
        # Still over: the limit holds.
        r = self.settled(request("edge", [descriptor([("remote_address", "10.0.0.1")])]))
        expect(r.overall_code == OVER, r)
        # Another address has its own counter.
        r = self.settled(request("edge", [descriptor([("remote_address", "10.0.0.2")])]))
        expect(r.overall_code == OK, r)

    def case_headers_to_add(self):
        r = self.settled(request("edge", [descriptor([("path", "/headers")])]))
        left = r.statuses[0].limit_remaining
        expect(header(r, "ratelimit-policy") == '"per-path";q=1000;w=3600', r)
        expect(header(r, "ratelimit").startswith('"per-path";r=%d;t=' % left), r)
        expect(header(r, "retry-after") is None, r)
        _, over = self.spend("10.0.0.3")
        expect(header(over, "ratelimit-policy") == '"edge-per-ip";q=5;w=60', over)
        expect(header(over, "ratelimit").startswith('"edge-per-ip";r=0;t='), over)
        retry = int(header(over, "retry-after"))
        expect(1 <= retry <= 60, over)
        # No rule matched: no headers.
        r = self.settled(request("edge", [descriptor([("nobody", "x")])]))
        expect(len(r.response_headers_to_add) == 0, r)

    def case_per_descriptor_statuses(self):
        # Spend an address, then ask for a path, the address and an unknown
        # key together: only the address is over, and the path is not charged.
        self.spend("10.9.9.9")
        before = self.path_remaining("/statuses")
        both = [
            descriptor([("path", "/statuses")]),
            descriptor([("remote_address", "10.9.9.9")]),
            descriptor([("whatever", "x")]),
        ]
        r = self.settled(request("edge", both))
        expect(r.overall_code == OVER, r)
        expect([s.code for s in r.statuses] == [OK, OVER, OK], r)
        expect(r.statuses[0].current_limit.name == "per-path", r)
        expect(r.statuses[1].current_limit.name == "edge-per-ip", r)
        expect(not r.statuses[2].HasField("current_limit"), r)
        expect(header(r, "retry-after") is not None, r)
        expect(self.path_remaining("/statuses") == before - 1, "the path paid for a refused request")

    def case_hits_addend_zero_and_more(self):
        path = lambda: [descriptor([("path", "/hits")])]
        r0 = self.settled(request("d", path(), hits=0)).statuses[0].limit_remaining
        r1 = self.settled(request("d", path(), hits=0)).statuses[0].limit_remaining
        expect(r1 == r0 - 1, "hits_addend 0 is one hit: %d then %d" % (r0, r1))
        r2 = self.settled(request("d", path(), hits=2)).statuses[0].limit_remaining
        expect(r2 == r1 - 2, "hits_addend 2: %d then %d" % (r1, r2))
        r = self.settled(request("d", [descriptor([("path", "/hits")], hits=2)], hits=1))
        expect(r.overall_code == OK, r)
        expect(r.statuses[0].limit_remaining == r2 - 2, "a descriptor's own hits_addend wins")
        r = self.settled(request("d", path(), hits=1001))
        expect(r.overall_code == OVER, "more than the limit can ever admit: %r" % r)
        r = self.settled(request("d", path(), hits=1))
        expect(r.statuses[0].limit_remaining == r2 - 3, "the refused request counted")

    def case_unknown_descriptors(self):
        for _ in range(20):
            r = self.ask(request("edge", [descriptor([("nobody", "knows")])]))
            expect(r.overall_code == OK, r)
            expect(not r.statuses[0].HasField("current_limit"), r)
        # A domain-scoped rule does not apply to another domain.
        for _ in range(10):
            r = self.ask(request("other", [descriptor([("remote_address", "10.0.0.1")])]))
            expect(r.overall_code == OK, r)
            expect(not r.statuses[0].HasField("current_limit"), r)

    def expect_invalid(self, req):
        try:
            self.ask(req)
        except grpc.RpcError as e:
            expect(e.code() == grpc.StatusCode.INVALID_ARGUMENT, e)
            expect(e.details(), e)
            return
        raise AssertionError("accepted: %r" % req)

    def case_empty_domain(self):
        before = self.path_remaining("/empty")
        self.expect_invalid(request("", [descriptor([("path", "/empty")])]))
        expect(self.path_remaining("/empty") == before - 1, "the refused request counted")

    def case_limit_override(self):
        # A descriptor's own limit is a request-defined limit: exactly its
        # own quota (3 per minute here) through every node, whatever the
        # rules say about the path (per-path would allow 1000 per hour).
        path = "/override-%d" % time.time_ns()
        oks = 0
        last = None
        for i in range(6):
            time.sleep(SETTLE)
            last = self.ask(
                request("edge", [descriptor([("path", path)], limit=3, unit=2)]),
                node=i % len(self.stubs),
            )
            if last.overall_code == OK:
                oks += 1
                s = last.statuses[0]
                expect(s.current_limit.requests_per_unit == 3, s)
                expect(s.current_limit.unit == rls_pb2.RateLimitResponse.RateLimit.MINUTE, s)
        expect(oks == 3, "admitted %d of an override of 3 per minute" % oks)
        expect(last.overall_code == OVER, last)

    def case_malformed_requests(self):
        before = self.path_remaining("/malformed")
        good = lambda: descriptor([("path", "/malformed")])
        for req in [
            request("edge", []),
            request("edge", [good(), descriptor([])]),
            request("edge", [good(), descriptor([("Bad-Key", "v")])]),
            request("edge", [good(), descriptor([("path", "")])]),
            request("edge", [good(), descriptor([("domain", "x")])]),
            # An override with a unit Envoy does not define.
            request("edge", [good(), descriptor([("path", "/a")], limit=5, unit=99)]),
            request("edge", [good(), descriptor([("a", "1"), ("a", "2")])]),
            request("bad\x7fdomain", [good()]),
        ]:
            self.expect_invalid(req)
        # Not a RateLimitRequest at all: bytes that do not parse.
        raw = grpc.insecure_channel(self.target).unary_unary(
            "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit",
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )
        try:
            raw(b"\xff\xff\xff", timeout=10)
            raise AssertionError("garbage accepted")
        except grpc.RpcError as e:
            expect(e.code() != grpc.StatusCode.OK, e)
        expect(self.path_remaining("/malformed") == before - 1, "a refused request counted")

    def case_one_key_over_three_nodes(self):
        allowed = 0
        for i in range(90):
            r = self.ask(request("edge", [descriptor([("tenant", "t1")])]), node=i % 3)
            if r.overall_code == OK:
                allowed += 1
        # Slowly now, so that every node hears the others: the total admitted
        # reaches the limit and never passes it.
        for i in range(60):
            time.sleep(SETTLE)
            r = self.ask(request("edge", [descriptor([("tenant", "t1")])]), node=i % 3)
            if r.overall_code == OK:
                allowed += 1
        expect(allowed <= 30, "admitted %d of a limit of 30" % allowed)
        expect(allowed >= 20, "admitted only %d of 30" % allowed)


def main():
    if len(sys.argv) != 2:
        print(__doc__)
        return 2
    cluster = Cluster(sys.argv[1])
    passed = failed = 0
    try:
        banner = cluster.wait_ready()
        for i in range(NODES):
            expect(
                "grpc://%s" % cluster.target(i) in banner,
                "banner lacks node-%d's gRPC address:\n%s" % (i, banner),
            )
        channels = [grpc.insecure_channel(cluster.target(i)) for i in range(NODES)]
        for ch in channels:
            grpc.channel_ready_future(ch).result(timeout=30)
        cases = Cases(
            [rls_pb2_grpc.RateLimitServiceStub(ch) for ch in channels], cluster.target(0)
        )
        for name in sorted(n for n in dir(cases) if n.startswith("case_")):
            try:
                getattr(cases, name)()
                print("ok     %s" % name)
                passed += 1
            except Exception:
                print("FAILED %s" % name)
                traceback.print_exc()
                failed += 1
    except Exception:
        traceback.print_exc()
        failed += 1
    finally:
        cluster.stop()
    print("%d passed, %d failed" % (passed, failed))
    return 0 if failed == 0 and passed > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
