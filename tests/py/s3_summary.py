#!/usr/bin/env python3
"""Reads every gzip NDJSON object of a bucket with boto3 and summarizes the sluice envelopes.

    s3_summary.py --endpoint http://127.0.0.1:PORT --bucket B [--prefix P]

Lists every object under the prefix (paginated), downloads each key ending in
`.ndjson.gz`, gunzips it (multi-member gzip is fine) and reads one envelope per
non-empty line. Prints one JSON object with the same fields as kafka_summary.py:

    {"messages", "distinct_messages", "distinct_provenance", "duplicates",
     "per_tag_hour": {"<tag>|<YYYY-MM-DDTHH>": n}, "bad",
     "objects": .ndjson.gz objects read, "other_objects": other keys (manifests, ...),
     "misplaced": events in an object whose key says another partition}

`misplaced` checks the event-time partitioning: for a key containing
`<tag>/dt=<YYYY-MM-DD>/hour=<HH>/` (the default key template; `tag=<tag>/` before
templates), every event in it must have that tag (compared URL-decoded) and an event
time in that date and hour. Keys without that pattern are not checked. An object that is not valid gzip counts one `bad` and is reported on stderr.
"""

import argparse
import gzip
import re
import sys
import zlib
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import unquote

from _envelope import Summary, emit, fail
from _s3 import client

_PART = re.compile(r"(?:^|/)(?:tag=)?([^/]+)/dt=(\d{4}-\d\d-\d\d)/hour=(\d\d)/")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--endpoint", required=True, help="S3 endpoint URL, e.g. http://127.0.0.1:5000")
    ap.add_argument("--bucket", required=True)
    ap.add_argument("--prefix", default="", help="only keys starting with this")
    args = ap.parse_args()

    s3 = client(args.endpoint)
    keys, others = [], 0
    try:
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=args.bucket, Prefix=args.prefix):
            for obj in page.get("Contents", ()):
                if obj["Key"].endswith(".ndjson.gz"):
                    keys.append(obj["Key"])
                else:
                    others += 1
    except Exception as e:
        fail(f"cannot list s3://{args.bucket}/{args.prefix} at {args.endpoint}: {e}")

    def fetch(key):
        return key, s3.get_object(Bucket=args.bucket, Key=key)["Body"].read()

    summary = Summary()
    misplaced = 0
    with ThreadPoolExecutor(max_workers=8) as pool:
        for key, body in pool.map(fetch, sorted(keys)):
            try:
                text = gzip.decompress(body)
            except (OSError, EOFError, zlib.error) as e:
                summary.messages += 1
                summary.bad += 1
                print(f"bad object {key}: not gzip: {e}", file=sys.stderr)
                continue
            part = _PART.search(key)
            for n, line in enumerate(text.split(b"\n"), 1):
                if not line.strip():
                    continue
                ev = summary.add(line, f" in {key} line {n}")
                if ev is not None and part is not None:
                    tag, dt, hour = part.groups()
                    if ev["tag"] != unquote(tag) or ev["time"][:13] != f"{dt}T{hour}":
                        misplaced += 1

    result = summary.result()
    result["objects"] = len(keys)
    result["other_objects"] = others
    result["misplaced"] = misplaced
    emit(result)


if __name__ == "__main__":
    main()
