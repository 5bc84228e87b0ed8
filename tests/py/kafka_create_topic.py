#!/usr/bin/env python3
"""Creates a Kafka topic with the Confluent admin client and waits until metadata shows it.

    kafka_create_topic.py --brokers 127.0.0.1:9092 --topic T [--partitions N] [--timeout 30]
                          [--config max.message.bytes=262144 ...]

Idempotent: a topic that exists already with N partitions is fine (exit 0); one with a
different partition count is an error. Prints {"topic": T, "partitions": N, "created": bool}.
tansu does not create topics on produce, so every test creates its topics first.
"""

import argparse
import sys
import time

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

from _envelope import emit, fail


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--brokers", required=True, help="bootstrap servers, HOST:PORT[,HOST:PORT]")
    ap.add_argument("--topic", required=True)
    ap.add_argument("--partitions", type=int, default=1)
    ap.add_argument("--replication-factor", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=30.0, help="seconds (default 30)")
    ap.add_argument("--config", action="append", default=[], metavar="KEY=VALUE",
                    help="a topic config, e.g. max.message.bytes=262144 (repeatable)")
    args = ap.parse_args()
    configs = dict(c.split("=", 1) for c in args.config)

    deadline = time.monotonic() + args.timeout
    admin = AdminClient({"bootstrap.servers": args.brokers, "error_cb": lambda e: print(f"kafka: {e}", file=sys.stderr)})
    created = False
    while True:
        fut = admin.create_topics(
            [NewTopic(args.topic, num_partitions=args.partitions, replication_factor=args.replication_factor,
                      config=configs)],
            request_timeout=max(1.0, min(10.0, deadline - time.monotonic())),
        )[args.topic]
        try:
            fut.result()
            created = True
            break
        except KafkaException as e:
            err = e.args[0]
            if err.code() == KafkaError.TOPIC_ALREADY_EXISTS:
                break
            if not err.retriable() and err.code() not in (KafkaError._TRANSPORT, KafkaError._TIMED_OUT):
                fail(f"cannot create topic {args.topic}: {err}")
            if time.monotonic() >= deadline:
                fail(f"cannot create topic {args.topic} within {args.timeout}s: {err}")
        time.sleep(0.2)

    while True:
        try:
            tm = admin.list_topics(topic=args.topic, timeout=5).topics.get(args.topic)
        except KafkaException as e:
            tm = None
            why = e
        else:
            why = tm.error if tm is not None else "not in metadata"
        if tm is not None and tm.error is None and tm.partitions:
            n = len(tm.partitions)
            if n != args.partitions:
                fail(f"topic {args.topic} exists with {n} partitions, not {args.partitions}")
            emit({"topic": args.topic, "partitions": n, "created": created})
            return
        if time.monotonic() >= deadline:
            fail(f"topic {args.topic} is not in the metadata after {args.timeout}s: {why}")
        time.sleep(0.1)


if __name__ == "__main__":
    main()
