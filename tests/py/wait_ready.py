#!/usr/bin/env python3
"""Waits until the test services answer real requests (used by scripts/lib/services.sh).

    wait_ready.py [--kafka HOST:PORT] [--s3 URL] [--pid PID ...] [--timeout 60]

--kafka: the Confluent admin client gets the cluster metadata from the broker, and the
broker advertises exactly HOST:PORT (so clients that follow the metadata reach it too).
--s3: boto3 lists the buckets. --pid: fails at once when that process has exited (a
service that could not start). Polls every 0.1 s until all are ready or --timeout passes;
prints {"ready": true, "seconds": t}, or exits 1 saying what was not ready.
"""

import argparse
import os
import socket
import sys
import time

from _envelope import emit, fail


def tcp_open(host, port):
    try:
        socket.create_connection((host, port), timeout=1).close()
        return True
    except OSError:
        return False


def kafka_ready(brokers):
    host, _, port = brokers.rpartition(":")
    if not tcp_open(host, int(port)):
        return "not accepting connections"
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": brokers, "log_level": 0})
    try:
        md = admin.list_topics(timeout=2)
    except Exception as e:
        return f"no metadata: {e}"
    advertised = sorted(f"{b.host}:{b.port}" for b in md.brokers.values())
    if advertised != [f"{host}:{port}"]:
        return f"advertises {advertised}, not {brokers}"
    return None


def s3_ready(endpoint):
    from _s3 import client

    try:
        client(endpoint).list_buckets()
    except Exception as e:
        return f"list_buckets failed: {e}"
    return None


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # an exited child its parent has not reaped yet
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kafka", help="HOST:PORT of the Kafka-API broker")
    ap.add_argument("--s3", help="S3 endpoint URL")
    ap.add_argument("--pid", type=int, action="append", default=[], help="service process to watch")
    ap.add_argument("--timeout", type=float, default=60.0)
    args = ap.parse_args()

    start = time.monotonic()
    checks = []
    if args.kafka:
        checks.append(("kafka " + args.kafka, lambda: kafka_ready(args.kafka)))
    if args.s3:
        checks.append(("s3 " + args.s3, lambda: s3_ready(args.s3)))
    while checks:
        for pid in args.pid:
            if not alive(pid):
                fail(f"process {pid} exited before it was ready")
        still = []
        for name, check in checks:
            why = check()
            if why is not None:
                still.append((name, check, why))
        checks = [(n, c) for n, c, _ in still]
        if not checks:
            break
        if time.monotonic() - start > args.timeout:
            fail("not ready after %.0fs: %s" % (args.timeout, "; ".join(f"{n}: {w}" for n, _, w in still)))
        time.sleep(0.1)
    emit({"ready": True, "seconds": round(time.monotonic() - start, 3)})


if __name__ == "__main__":
    sys.exit(main())
