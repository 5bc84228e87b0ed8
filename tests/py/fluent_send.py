#!/usr/bin/env python3
"""Sends numbered events to a Fluentd Forward server (the sluice relay) like a Fluentd peer.

    fluent_send.py --host 127.0.0.1 --port P --tag T --count N [--prefix "line "]
                   [--first 1] [--time 2026-11-23T05:00:00Z] [--ack [--batch 1000] [--tls-ca CA]]

Each event is {"message": "<prefix><number zero-padded to 8>"}, numbers --first ..
--first+N-1, with an EventTime (nanoseconds) of --time (default: now), or spread evenly
over the --spread seconds after --time. --field KEY=V1,V2,... adds field KEY to event i
with value V[i % count] (an empty value leaves the field out). --source S (with --ack)
sends sluice provenance: source id S, seq = each event's number. Prints {"sent": N}
on success; exits 1 if any event could not be sent (or, with --ack, was not acknowledged).

Default mode: the official `fluent-logger` client (fluent.sender.FluentSender), which
sends Message mode `[tag, time, record]` over plain TCP. fluent-logger 0.11 has NO
acknowledgement support (no require_ack / chunk option; it even reads and discards what
the server sends), no TLS and no shared-key handshake, so in this mode "sent" means
"written to the socket without error": the relay must listen in insecure mode, and the
caller checks delivery at the sinks.

--ack: a minimal Forward-mode sender built on msgpack (the library fluent-logger itself
uses), for what fluent-logger cannot do: each batch of --batch events goes as
`[tag, [[time, record], ...], {"chunk": <base64 id>, "size": n}]` and the sender waits
for `{"ack": <id>}` before the next batch (--ack-timeout seconds, default 30), the way
Fluentd's out_forward with require_ack_response does. --tls-ca CA wraps the connection in
TLS verified against that CA (server name = --host, or --server-name). No shared-key
(HELO/PING/PONG) handshake.
"""

import argparse
import base64
import datetime
import os
import socket
import ssl
import sys
import time

import msgpack
from fluent.sender import EventTime, FluentSender

from _envelope import emit, fail


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--tag", required=True)
    ap.add_argument("--count", type=int, required=True)
    ap.add_argument("--prefix", default="line ", help='message prefix (default "line ")')
    ap.add_argument("--first", type=int, default=1, help="number of the first event (default 1)")
    ap.add_argument("--time", help="event time, RFC 3339 (default: now)")
    ap.add_argument("--pad", type=int, default=0, help="append this many 'x' to every message (default 0)")
    ap.add_argument("--spread", type=float, default=0.0,
                    help="with --time: event i of N is stamped --time + i*spread/N seconds (default 0)")
    ap.add_argument("--timeout", type=float, default=10.0, help="socket timeout in seconds (default 10)")
    ap.add_argument("--ack", action="store_true", help="Forward mode with chunk ids, wait for each ack")
    ap.add_argument("--batch", type=int, default=1000, help="events per acknowledged chunk (--ack)")
    ap.add_argument("--ack-timeout", type=float, default=30.0, help="seconds to wait for one ack (--ack)")
    ap.add_argument("--tls-ca", help="CA file: connect with TLS (--ack only)")
    ap.add_argument("--server-name", help="TLS server name (default --host)")
    ap.add_argument("--source", help="--ack: send sluice provenance, source id S and seq = the event's number")
    ap.add_argument("--field", action="append", default=[], metavar="KEY=V1,V2,...",
                    help="add KEY to event i with value V[i %% count]; empty values leave it out (repeatable)")
    args = ap.parse_args()
    fields = []
    for f in args.field:
        key, sep, values = f.partition("=")
        if not sep or not key:
            fail(f"--field {f!r}: expected KEY=V1,V2,...")
        fields.append((key, values.split(",")))

    def record(n):
        r = {"message": f"{args.prefix}{n:08d}" + "x" * args.pad}
        for key, values in fields:
            v = values[(n - args.first) % len(values)]
            if v:
                r[key] = v
        return r

    args.record = record
    if args.count < 0 or args.batch < 1:
        fail("--count must be >= 0 and --batch >= 1")
    if args.tls_ca and not args.ack:
        fail("--tls-ca needs --ack (fluent-logger has no TLS)")

    if args.time:
        t = datetime.datetime.fromisoformat(args.time.replace("Z", "+00:00"))
        if t.tzinfo is None:
            t = t.replace(tzinfo=datetime.timezone.utc)
        epoch = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)
        delta = t - epoch
        fixed_ns = (delta.days * 86400 + delta.seconds) * 10**9 + delta.microseconds * 1000
    else:
        fixed_ns = None

    sent = [0]

    def event_time():
        i, sent[0] = sent[0], sent[0] + 1
        if fixed_ns is None:
            return EventTime.from_unix_nano(time.time_ns())
        return EventTime.from_unix_nano(fixed_ns + int(i * args.spread * 1e9 / max(args.count, 1)))

    numbers = range(args.first, args.first + args.count)
    if args.ack:
        send_with_acks(args, numbers, event_time)
    else:
        send_with_fluent_logger(args, numbers, event_time)
    emit({"sent": args.count})


def send_with_fluent_logger(args, numbers, event_time):
    sender = FluentSender(args.tag, host=args.host, port=args.port, timeout=args.timeout, nanosecond_precision=True)
    failed = 0
    first_error = None
    for n in numbers:
        if not sender.emit_with_time(None, event_time(), args.record(n)):
            failed += 1
            if first_error is None:
                first_error = sender.last_error
            sender.clear_last_error()
    left = bool(sender.pendings)
    sender.close()
    if failed or left:
        fail(f"{failed} of {args.count} emits failed (first error: {first_error}); "
             f"{'some events were never written' if left else 'they were retried on later emits'}")


def send_with_acks(args, numbers, event_time):
    try:
        sock = socket.create_connection((args.host, args.port), timeout=args.timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if args.tls_ca:
            ctx = ssl.create_default_context(cafile=args.tls_ca)
            sock = ctx.wrap_socket(sock, server_hostname=args.server_name or args.host)
    except OSError as e:
        fail(f"cannot connect to {args.host}:{args.port}: {e}")
    unpacker = msgpack.Unpacker(raw=False)
    numbers = list(numbers)
    try:
        for i in range(0, len(numbers), args.batch):
            batch = numbers[i : i + args.batch]
            chunk = base64.b64encode(os.urandom(16)).decode()
            entries = [[event_time(), args.record(n)] for n in batch]
            sock.settimeout(args.timeout)
            options = {"chunk": chunk, "size": len(entries)}
            if args.source:
                options["sluice"] = {"src": args.source, "seq": list(batch)}
            sock.sendall(msgpack.packb([args.tag, entries, options]))
            wait_ack(sock, unpacker, chunk, args.ack_timeout)
    except (OSError, ValueError) as e:
        fail(f"sending to {args.host}:{args.port} failed after {i} of {len(numbers)} events: {e}")
    finally:
        sock.close()


def wait_ack(sock, unpacker, chunk, timeout):
    deadline = time.monotonic() + timeout
    while True:
        for msg in unpacker:
            if isinstance(msg, dict) and msg.get("ack") == chunk:
                return
            raise ValueError(f"unexpected answer {msg!r} while waiting for ack {chunk}")
        left = deadline - time.monotonic()
        if left <= 0:
            raise ValueError(f"no ack for chunk {chunk} within {timeout}s")
        sock.settimeout(left)
        try:
            data = sock.recv(65536)
        except socket.timeout:
            continue
        if not data:
            raise ValueError(f"connection closed while waiting for ack {chunk}")
        unpacker.feed(data)


if __name__ == "__main__":
    main()
