#!/usr/bin/env python3
"""Produces copies of records already in a topic, with the Confluent client: what a
misbehaving producer (or a replay done twice by hand) leaves behind.

    kafka_duplicate.py --brokers 127.0.0.1:9092 --topic T --count N [--timeout 120]

Reads the first N messages of partition 0 that carry a `source` header and produces each
again to the same partition with the same key, value, headers and timestamp. Prints
{"duplicated": N, "sources": {source: [lowest seq, highest seq, copies]}}.
"""

import argparse
import time

from confluent_kafka import Consumer, Producer, TopicPartition

from _envelope import emit, fail


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--brokers", required=True)
    ap.add_argument("--topic", required=True)
    ap.add_argument("--count", type=int, required=True)
    ap.add_argument("--timeout", type=float, default=120.0)
    args = ap.parse_args()
    deadline = time.monotonic() + args.timeout
    consumer = Consumer({
        "bootstrap.servers": args.brokers,
        "group.id": f"dup-{time.time()}",
        "enable.auto.commit": False,
        "auto.offset.reset": "earliest",
    })
    consumer.assign([TopicPartition(args.topic, 0, 0)])
    picked = []
    while len(picked) < args.count:
        if time.monotonic() > deadline:
            fail(f"found only {len(picked)} of {args.count} messages in partition 0")
        msg = consumer.poll(1.0)
        if msg is None:
            continue
        if msg.error():
            fail(f"consume: {msg.error()}")
        headers = dict(msg.headers() or [])
        if b"source" not in {k.encode() if isinstance(k, str) else k for k in headers}:
            continue
        picked.append(msg)
    consumer.close()
    producer = Producer({"bootstrap.servers": args.brokers, "linger.ms": 20})
    sources = {}
    errors = []

    def on_delivery(err, _msg):
        if err is not None:
            errors.append(str(err))

    for msg in picked:
        _, ms = msg.timestamp()
        producer.produce(args.topic, value=msg.value(), key=msg.key(), headers=msg.headers(),
                         partition=0, timestamp=ms, on_delivery=on_delivery)
        h = dict(msg.headers())
        source, seq = h["source"].decode(), int(h["seq"])
        lo, hi, n = sources.get(source, (seq, seq, 0))
        sources[source] = (min(lo, seq), max(hi, seq), n + 1)
        producer.poll(0)
    left = producer.flush(max(1.0, deadline - time.monotonic()))
    if left or errors:
        fail(f"{left} messages not delivered; errors: {errors[:5]}")
    emit({"duplicated": len(picked), "sources": {s: list(v) for s, v in sources.items()}})


if __name__ == "__main__":
    main()
