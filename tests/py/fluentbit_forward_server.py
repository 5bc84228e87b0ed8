#!/usr/bin/env python3
"""A Forward server over TLS whose handshake behaves like Fluent Bit's in_forward with
`shared_key`, for tests of the sluice agent (Fluent Bit itself cannot be installed here).

    fluentbit_forward_server.py --cert C --key K --shared-key S --status FILE
                                [--self-hostname fluent-bit] [--user NAME:PASSWORD ...]
                                [--wrong-key close|pong]

Written from the Forward protocol v1 spec and from how Fluent Bit 5.x in_forward answers
(plugins/in_forward/fw_prot.c), with msgpack (the library fluent-logger uses), not with
sluice's codec:

- HELO is `["HELO", {"nonce": str(16 random bytes), "auth": str(16 random bytes)}]`:
  an auth salt is ALWAYS there, users or not, and there is no keepalive key;
- PING must be an array of 6 strs (a bin salt is refused, as Fluent Bit does: "Invalid
  shared_key_salt type message", connection closed without PONG);
- the shared-key digest is checked; when it is wrong, `--wrong-key close` (Fluent Bit
  5.x) closes without a PONG, `--wrong-key pong` (the spec, Fluentd) answers
  `["PONG", false, "shared_key mismatch", "", ""]` and closes;
- users are checked only when `--user` is given (like Fluent Bit: none configured, the
  PING's user name and password digest are ignored); a failure answers
  `["PONG", false, "username/password mismatch", "", ""]`;
- success answers `["PONG", true, "", self_hostname, sha512_hex(salt + self_hostname +
  nonce + key)]`; then Message, Forward, PackedForward and gzip CompressedPackedForward
  frames are accepted, heartbeats (nil) skipped, and every frame with a `chunk` option
  is acknowledged with `{"ack": chunk}` once its records are written.

Every record's `message` goes, one a line, to `<status>.messages` (flushed before the
ack). After binding, and after every handshake and frame, `--status` is rewritten
(atomically) as one JSON object: `{"port", "handshakes": [{"peer", "hostname",
"username", "password_digest", "result"}], "frames", "events", "acks"}`. Runs until
killed; diagnostics on stderr.
"""

import argparse
import gzip
import hashlib
import hmac
import json
import os
import secrets
import socket
import ssl
import sys
import threading

import msgpack


def raw_str(raw: bytes) -> bytes:
    """A msgpack str holding raw bytes, which need not be UTF-8 (Fluent Bit packs its
    random nonce and salt this way)."""
    assert len(raw) < 32
    return bytes([0xA0 | len(raw)]) + raw


def helo(nonce: bytes, salt: bytes) -> bytes:
    return (
        b"\x92"
        + raw_str(b"HELO")
        + b"\x82"
        + raw_str(b"nonce")
        + raw_str(nonce)
        + raw_str(b"auth")
        + raw_str(salt)
    )


def sha512_hex(*parts: bytes) -> str:
    h = hashlib.sha512()
    for p in parts:
        h.update(p)
    return h.hexdigest()


class State:
    def __init__(self, path: str):
        self.path = path
        self.lock = threading.Lock()
        self.status = {"port": 0, "handshakes": [], "frames": 0, "events": 0, "acks": 0}
        self.messages = open(path + ".messages", "a", encoding="utf-8")

    def update(self, fn):
        with self.lock:
            fn(self.status)
            tmp = self.path + ".tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(self.status, f)
            os.replace(tmp, self.path)

    def write_messages(self, messages):
        with self.lock:
            for m in messages:
                self.messages.write(m.replace("\n", "\\n") + "\n")
            self.messages.flush()


def log(msg: str):
    print(f"fluentbit_forward_server: {msg}", file=sys.stderr, flush=True)


def records(frame):
    """(time, record) pairs of one event frame, and its option map."""
    entries = frame[1]
    options = frame[2] if len(frame) > 2 and isinstance(frame[2], dict) else {}
    if isinstance(entries, (bytes, bytearray)):  # PackedForward, maybe gzipped
        if options.get("compressed") == "gzip":
            entries = gzip.decompress(entries)
        unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
        unpacker.feed(entries)
        pairs = [(e[0], e[1]) for e in unpacker]
    elif isinstance(entries, list):  # Forward
        pairs = [(e[0], e[1]) for e in entries]
    else:  # Message: [tag, time, record, option?]
        options = frame[3] if len(frame) > 3 and isinstance(frame[3], dict) else {}
        pairs = [(frame[1], frame[2])]
    return pairs, options


def message_of(record) -> str:
    m = record.get("message") if isinstance(record, dict) else None
    if isinstance(m, (bytes, bytearray)):
        return m.decode("utf-8", "replace")
    return "" if m is None else str(m)


def handshake(conn, unpacker, args, users, peer, state) -> bool:
    nonce = secrets.token_bytes(16)
    salt = secrets.token_bytes(16)
    conn.sendall(helo(nonce, salt))
    ping = next_object(conn, unpacker)
    entry = {"peer": peer, "hostname": None, "username": None, "password_digest": None}

    def done(result: str) -> bool:
        entry["result"] = result
        state.update(lambda s: s["handshakes"].append(entry))
        log(f"{peer}: handshake {result}")
        return result == "ok"

    if not isinstance(ping, list) or len(ping) != 6 or ping[0] != "PING":
        return done("invalid PING message")
    for i, what in enumerate(
        ["hostname", "shared_key_salt", "shared_key_digest", "username", "password_digest"], 1
    ):
        if not isinstance(ping[i], str):  # Fluent Bit: msgpack str only, never bin
            return done(f"invalid {what} type message")
    _, hostname, key_salt, key_digest, username, password_digest = ping
    entry.update(hostname=hostname, username=username, password_digest=password_digest)
    key = args.shared_key.encode()
    expected = sha512_hex(key_salt.encode(), hostname.encode(), nonce, key)
    if not hmac.compare_digest(expected, key_digest):
        if args.wrong_key == "pong":
            conn.sendall(msgpack.packb(["PONG", False, "shared_key mismatch", "", ""]))
        return done("shared_key mismatch")
    if users:
        password = users.get(username)
        ok = password is not None and hmac.compare_digest(
            sha512_hex(salt, username.encode(), password.encode()), password_digest
        )
        if not ok:
            conn.sendall(msgpack.packb(["PONG", False, "username/password mismatch", "", ""]))
            return done("username/password mismatch")
    me = args.self_hostname.encode()
    digest = sha512_hex(key_salt.encode(), me, nonce, key)
    conn.sendall(msgpack.packb(["PONG", True, "", args.self_hostname, digest]))
    return done("ok")


class Closed(Exception):
    pass


def next_object(conn, unpacker):
    while True:
        try:
            return next(unpacker)
        except StopIteration:
            data = conn.recv(65536)
            if not data:
                raise Closed()
            unpacker.feed(data)


def serve(raw_sock, peer, ctx, args, users, state):
    try:
        conn = ctx.wrap_socket(raw_sock, server_side=True)
    except (ssl.SSLError, OSError) as e:
        log(f"{peer}: TLS handshake failed: {e}")
        raw_sock.close()
        return
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
    try:
        if not handshake(conn, unpacker, args, users, peer, state):
            # close_notify, then close: the client sees the connection end, not a TLS error.
            try:
                conn.unwrap()
            except (ssl.SSLError, OSError):
                pass
            return
        while True:
            frame = next_object(conn, unpacker)
            if frame is None:  # heartbeat
                continue
            pairs, options = records(frame)
            state.write_messages([message_of(r) for _, r in pairs])
            n = len(pairs)
            state.update(lambda s: s.update(frames=s["frames"] + 1, events=s["events"] + n))
            chunk = options.get("chunk")
            if chunk is not None:
                conn.sendall(msgpack.packb({"ack": chunk}))
                state.update(lambda s: s.update(acks=s["acks"] + 1))
    except (Closed, ssl.SSLError, OSError, ValueError) as e:
        if not isinstance(e, Closed):
            log(f"{peer}: connection ended: {e!r}")
    finally:
        try:
            conn.close()
        except OSError:
            pass


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cert", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--shared-key", required=True)
    p.add_argument("--status", required=True)
    p.add_argument("--self-hostname", default="fluent-bit")
    p.add_argument("--user", action="append", default=[], help="NAME:PASSWORD")
    p.add_argument("--wrong-key", choices=["close", "pong"], default="close")
    args = p.parse_args()
    users = dict(u.split(":", 1) for u in args.user)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(args.cert, args.key)
    state = State(args.status)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    state.update(lambda s: s.update(port=port))
    log(f"listening on 127.0.0.1:{port}")
    while True:
        sock, addr = listener.accept()
        peer = f"{addr[0]}:{addr[1]}"
        threading.Thread(
            target=serve, args=(sock, peer, ctx, args, users, state), daemon=True
        ).start()


if __name__ == "__main__":
    main()
