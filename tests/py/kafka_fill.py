#!/usr/bin/env python3
"""Fills a Kafka topic with another producer's sluice envelopes, as another relay of a
cluster sharing the topic would write them, with the Confluent producer.

    kafka_fill.py --brokers 127.0.0.1:9092 --topic T --count N [--sources 97]
                  [--relay other-relay] [--timeout 600]

Message i: key and header `source` = "other-host-<i % sources>:app", header `seq` = i,
`tag` = "other", `relay` = --relay, value the JSON envelope with record
{"message": "other line <i>"}, CreateTime = the envelope's time. Keys spread the
messages over every partition. Prints {"produced": N, "seconds": s, "per_second": r}.
"""

import argparse
import time

from confluent_kafka import Producer

from _envelope import emit, fail


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--brokers", required=True)
    ap.add_argument("--topic", required=True)
    ap.add_argument("--count", type=int, required=True)
    ap.add_argument("--sources", type=int, default=97)
    ap.add_argument("--relay", default="other-relay")
    ap.add_argument("--timeout", type=float, default=600.0)
    args = ap.parse_args()

    errors = []

    def on_delivery(err, _msg):
        if err is not None and len(errors) < 5:
            errors.append(str(err))

    producer = Producer(
        {
            "bootstrap.servers": args.brokers,
            "enable.idempotence": True,
            "linger.ms": 20,
            "batch.size": 1000000,
            "compression.type": "lz4",
            "queue.buffering.max.messages": 1000000,
        }
    )
    started = time.monotonic()
    deadline = started + args.timeout
    base_ms = int(time.time() * 1000) - 3_600_000
    relay = args.relay.encode()
    sources = [f"other-host-{s}:app" for s in range(args.sources)]
    stamp, stamp_second = "", None
    for i in range(args.count):
        source = sources[i % args.sources]
        ms = base_ms + i // 100
        if ms // 1000 != stamp_second:
            stamp_second = ms // 1000
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(stamp_second))
        value = (f'{{"time":"{stamp}.{ms % 1000:03d}Z","tag":"other","source":"{source}",'
                 f'"seq":{i},"record":{{"message":"other line {i}"}}}}')
        headers = [("tag", b"other"), ("source", source.encode()), ("seq", str(i).encode()), ("relay", relay)]
        while True:
            try:
                producer.produce(args.topic, value=value, key=source, headers=headers, timestamp=ms, on_delivery=on_delivery)
                break
            except BufferError:
                producer.poll(0.05)
                if time.monotonic() > deadline:
                    fail(f"timed out after {i} of {args.count} messages")
        if i % 10000 == 0:
            producer.poll(0)
    left = producer.flush(max(1.0, deadline - time.monotonic()))
    if left or errors:
        fail(f"{left} messages not delivered; errors: {errors}")
    took = time.monotonic() - started
    emit({"produced": args.count, "seconds": round(took, 2), "per_second": round(args.count / took)})


if __name__ == "__main__":
    main()
