#!/usr/bin/env python3
"""Reads a bucket's hour partitions with boto3: objects, their lines, manifests, markers.

    s3_hours.py --endpoint http://127.0.0.1:PORT --bucket B [--prefix P]

For the default key template (`<prefix>/<tag>/dt=<YYYY-MM-DD>/hour=<HH>/<name>`) prints

    {"partitions": {"<tag>|<YYYY-MM-DDTHH>": {
         "objects": {"<key>": <lines>}, "lines": n,
         "manifests": {"<relay>-<incarnation>": [{"revision": r, "records": n,
                        "objects": {"<key>": n}, "late_records": n,
                        "closed_at": "<RFC 3339>"}, ...]},   # by revision
         "success": {"<relay>-<incarnation>": {"revision": r, "records": n}}}},
     "markers": {"<YYYY-MM-DDTHH>": {"<relay>-<incarnation>": {"<tag>": records}}},
     "ledgers": {"<YYYY-MM-DDTHH>": {"<relay>-<incarnation>": <the published ledger document>}}}

The tag is the folder name URL-decoded. Every object is downloaded and its non-empty
lines counted (gzip, multi-member fine); each manifest's `objects` are its own claim,
so a test compares them with what boto3 found.
"""

import argparse
import gzip
import json
import re
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import unquote

from _envelope import emit, fail
from _s3 import client

_PART = re.compile(r"^(?:(.*)/)?([^/]+)/dt=(\d{4}-\d\d-\d\d)/hour=(\d\d)/(.+)$")
_MARKER = re.compile(r"(?:^|/)_sluice/hours/dt=(\d{4}-\d\d-\d\d)/hour=(\d\d)/([^/]+)\.json$")
_LEDGER = re.compile(r"(?:^|/)_sluice/ledger/dt=(\d{4}-\d\d-\d\d)/hour=(\d\d)/([^/]+)\.json$")
_MANIFEST = re.compile(r"^_manifests/(.+)\.r(\d{6})\.json$")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--endpoint", required=True)
    ap.add_argument("--bucket", required=True)
    ap.add_argument("--prefix", default="")
    args = ap.parse_args()
    s3 = client(args.endpoint)
    keys = []
    try:
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=args.bucket, Prefix=args.prefix):
            keys.extend(obj["Key"] for obj in page.get("Contents", ()))
    except Exception as e:
        fail(f"cannot list s3://{args.bucket} at {args.endpoint}: {e}")

    def fetch(key):
        return key, s3.get_object(Bucket=args.bucket, Key=key)["Body"].read()

    partitions, markers, ledgers = {}, {}, {}
    with ThreadPoolExecutor(max_workers=8) as pool:
        for key, body in pool.map(fetch, sorted(keys)):
            m = _MARKER.search(key)
            if m:
                dt, hh, writer = m.groups()
                doc = json.loads(body)
                markers.setdefault(f"{dt}T{hh}", {})[writer] = {t: v["records"] for t, v in doc["tags"].items()}
                continue
            m = _LEDGER.search(key)
            if m:
                dt, hh, writer = m.groups()
                ledgers.setdefault(f"{dt}T{hh}", {})[writer] = json.loads(body)
                continue
            m = _PART.match(key)
            if not m or "/_sluice/" in f"/{key}":
                continue
            _, tag, dt, hh, rest = m.groups()
            part = partitions.setdefault(
                f"{unquote(tag)}|{dt}T{hh}", {"objects": {}, "lines": 0, "manifests": {}, "success": {}}
            )
            if rest.endswith(".ndjson.gz"):
                lines = sum(1 for line in gzip.decompress(body).split(b"\n") if line.strip())
                part["objects"][key] = lines
                part["lines"] += lines
            elif _MANIFEST.match(rest):
                writer, rev = _MANIFEST.match(rest).groups()
                doc = json.loads(body)
                part["manifests"].setdefault(writer, []).append({
                    "revision": int(rev),
                    "records": doc["records"],
                    "late_records": doc["late_records"],
                    "closed_at": doc["closed_at"],
                    "objects": {o["key"]: o["records"] for o in doc["objects"]},
                })
            elif rest.startswith("_SUCCESS-"):
                doc = json.loads(body)
                part["success"][rest[len("_SUCCESS-"):]] = {"revision": doc["revision"], "records": doc["records"]}
    for part in partitions.values():
        for revs in part["manifests"].values():
            revs.sort(key=lambda r: r["revision"])
    emit({"partitions": partitions, "markers": markers, "ledgers": ledgers})


if __name__ == "__main__":
    main()
