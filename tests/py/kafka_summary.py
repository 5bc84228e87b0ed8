#!/usr/bin/env python3
"""Reads a whole Kafka topic with the Confluent client and summarizes the sluice envelopes.

    kafka_summary.py --brokers 127.0.0.1:9092 --topic T [--timeout 60] [--expect N]

Consumes every partition from the beginning (assigned partitions, a fresh group id, no
commits) until each partition is at its end, and prints one JSON object:

    {"messages": total, "distinct_messages": distinct record.message,
     "distinct_provenance": distinct non-null (source, seq), "duplicates": ...,
     "per_tag_hour": {"<tag>|<YYYY-MM-DDTHH>": n}, "bad": invalid envelopes,
     "header_mismatch": n, "timestamp_mismatch": n, "partitions": n, "timed_out": bool}

`duplicates` is messages - bad - distinct_messages (bad messages are neither).
`header_mismatch` counts valid events whose Kafka key or headers disagree with the
envelope: key must be the source id (no key when source is null), header `tag` must be
the tag, headers `source` / `seq` (when present, and required when the envelope's value
is not null) must equal the envelope's source / decimal seq. `timestamp_mismatch` counts
valid events whose Kafka timestamp is not a CreateTime equal to the envelope's event
time in milliseconds (rounded down).

"At its end" is the partition-EOF event librdkafka raises when a fetch reaches the high
watermark the broker reports in its Fetch response, at an offset at least the high
watermark from ListOffsets taken at start (get_watermark_offsets). Both are needed:
tansu 0.6.0 answers ListOffsets(latest) with the base offset of the last record batch
+ 1, which is short of the real end whenever the last batch holds several records.

With --expect N it keeps reading (new messages may still arrive) until it has read at
least N messages and is at the end of every partition, or until --timeout; on a timeout
it still prints the summary, with "timed_out": true (and a warning on stderr), so the
caller sees the counts. Without --expect a timeout is an error (exit 1). A topic that
does not exist is waited for until the timeout, then an error.
"""

import argparse
import sys
import time
import uuid

from confluent_kafka import TIMESTAMP_CREATE_TIME, Consumer, KafkaError, TopicPartition

from _envelope import Summary, emit, fail


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--brokers", required=True, help="bootstrap servers, HOST:PORT[,HOST:PORT]")
    ap.add_argument("--topic", required=True)
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds (default 60)")
    ap.add_argument("--expect", type=int, default=0, help="read until at least this many messages")
    args = ap.parse_args()

    deadline = time.monotonic() + args.timeout
    consumer = Consumer(
        {
            "bootstrap.servers": args.brokers,
            "group.id": f"sluice-summary-{uuid.uuid4()}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "enable.partition.eof": True,
            "fetch.wait.max.ms": 100,
            "queued.max.messages.kbytes": 16384,
            "error_cb": _on_error,
        }
    )
    try:
        result = summarize(consumer, args.topic, args.expect, deadline)
    finally:
        consumer.close()
    if result["timed_out"]:
        msg = f"timed out after {args.timeout}s reading {args.topic}: {result['messages']} messages"
        if args.expect:
            print(f"warning: {msg} of {args.expect} expected", file=sys.stderr)
        else:
            fail(f"{msg}, not at the end of every partition")
    emit(result)


def _on_error(err):
    print(f"kafka: {err}", file=sys.stderr)


def event_millis(time_text):
    """`2026-11-23T05:00:00.123456789Z` (fraction optional) -> Unix milliseconds."""
    import datetime

    whole, _, frac = time_text.rstrip("Z").partition(".")
    secs = datetime.datetime.strptime(whole, "%Y-%m-%dT%H:%M:%S").replace(tzinfo=datetime.timezone.utc)
    return int(secs.timestamp()) * 1000 + int((frac + "000")[:3])


def timestamp_agrees(ev, timestamp):
    kind, millis = timestamp
    return kind == TIMESTAMP_CREATE_TIME and millis == event_millis(ev["time"])


def partitions_of(consumer, topic, deadline):
    while True:
        left = deadline - time.monotonic()
        try:
            md = consumer.list_topics(topic=topic, timeout=max(1.0, min(5.0, left)))
            tm = md.topics.get(topic)
            if tm is not None and tm.error is None and tm.partitions:
                return sorted(tm.partitions)
            why = tm.error if tm is not None else "not in metadata"
        except Exception as e:  # KafkaException while the broker is unreachable
            why = e
        if time.monotonic() >= deadline:
            fail(f"topic {topic!r} is not available: {why}")
        time.sleep(0.2)


def summarize(consumer, topic, expect, deadline):
    parts = partitions_of(consumer, topic, deadline)
    # Lower bounds for each partition's end (see the module doc for why not the end).
    floor = {}
    for p in parts:
        _low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
        floor[p] = high
    at_end = {p: False for p in parts}
    eof_offset = {p: -1 for p in parts}
    consumer.assign([TopicPartition(topic, p, 0) for p in parts])

    summary = Summary()
    header_mismatch = 0
    timestamp_mismatch = 0
    timed_out = False
    while True:
        for m in consumer.consume(num_messages=10000, timeout=1):
            err = m.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    at_end[m.partition()] = True
                    eof_offset[m.partition()] = m.offset()
                elif err.fatal():
                    fail(f"fatal consumer error: {err}")
                else:
                    print(f"consumer: {err}", file=sys.stderr)
                continue
            at_end[m.partition()] = False
            ev = summary.add(m.value(), f" at {topic}/{m.partition()}@{m.offset()}")
            if ev is not None and not headers_agree(ev, m.key(), m.headers()):
                header_mismatch += 1
            if ev is not None and not timestamp_agrees(ev, m.timestamp()):
                timestamp_mismatch += 1
        complete = all(at_end[p] and eof_offset[p] >= floor[p] for p in parts)
        if complete and summary.messages >= expect:
            break
        if time.monotonic() >= deadline:
            timed_out = True
            break

    result = summary.result()
    result["header_mismatch"] = header_mismatch
    result["timestamp_mismatch"] = timestamp_mismatch
    result["partitions"] = len(parts)
    result["timed_out"] = timed_out
    return result


def headers_agree(ev, key, headers):
    h = dict(headers) if headers else {}
    if h.get("tag") != ev["tag"].encode():
        return False
    source, seq = ev["source"], ev["seq"]
    want_source = None if source is None else (source.encode() or None)
    want_seq = None if seq is None else str(seq).encode()
    return (key or None) == want_source and (h.get("source") or None) == want_source and (h.get("seq") or None) == want_seq


if __name__ == "__main__":
    main()
