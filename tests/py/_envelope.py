"""Shared checks for the sluice event envelope, used by kafka_summary.py and s3_summary.py.

Every event the relay writes to Kafka (the message value) is

    {"time": "2026-11-23T05:00:00.123456789Z", "tag": "app.log",
     "source": "<source id>" | null, "seq": <u64> | null, "record": {...}}

and every line of a gzip NDJSON object is the record itself with four fields after its
own, read here as the same envelope:

    {...record..., "_time": "...", "_tag": "app.log", "_source": ... | null, "_seq": ... | null}

`Summary.add` validates one serialized envelope and counts it. An event is *bad* when it
is not JSON, not an object, lacks one of the five keys, or a key has the wrong type
(time must be RFC 3339 UTC with a `Z`, e.g. `2026-11-23T05:00:00.123456789Z`).
Bad events count in `messages` and `bad` only.

The distinct key of an event is `record.message` when the record has a string
`message`, otherwise the record itself serialized with sorted keys.
"""

import json
import re
import sys
from collections import Counter

_DECODER = json.JSONDecoder()
_NUMBERED = re.compile(r"line (\d{8}) ")
_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,9})?Z\Z")
_BAD_EXAMPLES = 3


class Summary:
    """Counts envelopes; `result()` gives the JSON fields shared by both readers."""

    def __init__(self):
        self.messages = 0
        self.bad = 0
        self._distinct = set()
        self._provenance = set()
        self._per_tag_hour = Counter()
        self._bad_shown = 0
        self.number_min = None
        self.number_max = None

    def add(self, raw, where=""):
        """Counts one serialized envelope (bytes or str). Returns the parsed envelope, or
        None when it is bad."""
        self.messages += 1
        try:
            text = raw.decode("utf-8") if isinstance(raw, (bytes, bytearray)) else raw
            ev, end = _DECODER.raw_decode(text)
            ev = _from_flat(ev)
            problem = _problem(ev) if end == len(text) or not text[end:].strip() else "data after the JSON value"
        except (ValueError, TypeError, AttributeError) as e:
            ev, problem = None, f"not JSON: {e}"
        if problem:
            self.bad += 1
            if self._bad_shown < _BAD_EXAMPLES:
                self._bad_shown += 1
                text = raw if isinstance(raw, str) else bytes(raw or b"").decode("utf-8", "replace")
                print(f"bad envelope{where}: {problem}: {text[:300]!r}", file=sys.stderr)
            return None
        record = ev["record"]
        msg = record.get("message")
        if not isinstance(msg, str):
            msg = "\0" + json.dumps(record, sort_keys=True, separators=(",", ":"))
        self._distinct.add(msg)
        if ev["source"] is not None and ev["seq"] is not None:
            self._provenance.add((ev["source"], ev["seq"]))
        numbered = _NUMBERED.match(msg) if isinstance(msg, str) else None
        if numbered:
            n = int(numbered.group(1))
            self.number_min = n if self.number_min is None else min(self.number_min, n)
            self.number_max = n if self.number_max is None else max(self.number_max, n)
        self._per_tag_hour[ev["tag"] + "|" + ev["time"][:13]] += 1
        return ev

    def result(self):
        distinct = len(self._distinct)
        return {
            "messages": self.messages,
            "distinct_messages": distinct,
            "distinct_provenance": len(self._provenance),
            # Bad events are neither distinct nor duplicates.
            "duplicates": self.messages - self.bad - distinct,
            "per_tag_hour": dict(sorted(self._per_tag_hour.items())),
            "bad": self.bad,
            # Smallest and largest N of test lines "line NNNNNNNN ..." (null without any).
            "number_min": self.number_min,
            "number_max": self.number_max,
        }


_FLAT = ("_time", "_tag", "_source", "_seq")


def _from_flat(ev):
    """An object line (record + `_time`, `_tag`, `_source`, `_seq`) as an envelope; any
    other value as it is. A line with some but not all four fields is left as it is (and
    is then bad: it has no "time")."""
    if not isinstance(ev, dict) or not all(k in ev for k in _FLAT):
        return ev
    record = {k: v for k, v in ev.items() if k not in _FLAT and k != "_offset"}
    out = {"time": ev["_time"], "tag": ev["_tag"], "source": ev["_source"], "seq": ev["_seq"], "record": record}
    if "_offset" in ev:  # events read from files: the byte offset the event began at
        out["offset"] = ev["_offset"]
    return out


def _problem(ev):
    """Why `ev` is not a valid envelope, or None."""
    if not isinstance(ev, dict):
        return "not a JSON object"
    for key in ("time", "tag", "source", "seq", "record"):
        if key not in ev:
            return f"no {key!r}"
    t = ev["time"]
    if not isinstance(t, str) or not _TIME.match(t):
        return "time is not RFC 3339 UTC (YYYY-MM-DDTHH:MM:SS[.fffffffff]Z)"
    if not isinstance(ev["tag"], str) or not ev["tag"]:
        return "tag is not a non-empty string"
    if ev["source"] is not None and not isinstance(ev["source"], str):
        return "source is neither a string nor null"
    seq = ev["seq"]
    if seq is not None and (isinstance(seq, bool) or not isinstance(seq, int) or not 0 <= seq < 2**64):
        return "seq is neither a u64 nor null"
    offset = ev.get("offset")
    if "offset" in ev and (isinstance(offset, bool) or not isinstance(offset, int) or not 0 <= offset < 2**64):
        return "offset is present but not a u64"
    if not isinstance(ev["record"], dict):
        return "record is not an object"
    return None


def emit(obj):
    """Prints the one JSON object a helper answers with."""
    sys.stdout.write(json.dumps(obj, sort_keys=True) + "\n")
    sys.stdout.flush()


def fail(msg, code=1):
    print(msg, file=sys.stderr)
    sys.exit(code)
