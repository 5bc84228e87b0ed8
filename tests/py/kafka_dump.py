#!/usr/bin/env python3
"""Reads a whole Kafka topic with the Confluent client and prints every message.

    kafka_dump.py --brokers 127.0.0.1:9092 --topic T [--expect N] [--timeout 60]

Reads every partition from the beginning to its end (partition EOF at or past the high
watermark taken at start), and with --expect until at least N messages are read. Prints
{"messages": [{"partition", "offset", "key", "headers": {name: value}, "timestamp":
[type, ms], "value"}, ...]} with key, header values and value as UTF-8 text (null when
absent). For small topics: the tests look at single messages.
"""

import argparse
import time
import uuid

from confluent_kafka import Consumer, KafkaError, TopicPartition

from _envelope import emit, fail


def text(b):
    return None if b is None else b.decode("utf-8", "replace")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--brokers", required=True)
    ap.add_argument("--topic", required=True)
    ap.add_argument("--expect", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=60.0)
    args = ap.parse_args()
    deadline = time.monotonic() + args.timeout
    c = Consumer({"bootstrap.servers": args.brokers, "group.id": f"sluice-dump-{uuid.uuid4()}",
                  "enable.auto.commit": False, "enable.partition.eof": True, "auto.offset.reset": "earliest"})
    md = c.list_topics(topic=args.topic, timeout=10)
    tm = md.topics.get(args.topic)
    if tm is None or tm.error is not None or not tm.partitions:
        fail(f"topic {args.topic!r} is not available: {tm.error if tm else 'not in metadata'}")
    parts = sorted(tm.partitions)
    floor = {p: c.get_watermark_offsets(TopicPartition(args.topic, p), timeout=10)[1] for p in parts}
    at_end = {p: False for p in parts}
    c.assign([TopicPartition(args.topic, p, 0) for p in parts])
    out = []
    while True:
        for m in c.consume(num_messages=1000, timeout=0.5):
            err = m.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    at_end[m.partition()] = m.offset() >= floor[m.partition()]
                continue
            at_end[m.partition()] = False
            out.append({"partition": m.partition(), "offset": m.offset(), "key": text(m.key()),
                        "headers": {k: text(v) for k, v in (m.headers() or [])},
                        "timestamp": list(m.timestamp()), "value": text(m.value())})
        if all(at_end.values()) and len(out) >= args.expect:
            break
        if time.monotonic() > deadline:
            fail(f"timed out with {len(out)} of {args.expect} messages of {args.topic}")
    c.close()
    emit({"messages": out})


if __name__ == "__main__":
    main()
