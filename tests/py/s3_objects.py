#!/usr/bin/env python3
"""Reads every object under a prefix of a bucket with boto3 and prints them.

    s3_objects.py --endpoint http://127.0.0.1:PORT --bucket B [--prefix P]

Prints {"objects": [{"key": k, "size": n, "json": <the body parsed as JSON, or null>,
"text": <the body as text when it is not JSON>}, ...]}, sorted by key. For the small
objects the tests look at one by one (dead letters).
"""

import argparse
import json

from _envelope import emit
from _s3 import client


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--endpoint", required=True)
    ap.add_argument("--bucket", required=True)
    ap.add_argument("--prefix", default="")
    args = ap.parse_args()
    s3 = client(args.endpoint)
    out = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=args.bucket, Prefix=args.prefix):
        for obj in page.get("Contents", []):
            body = s3.get_object(Bucket=args.bucket, Key=obj["Key"])["Body"].read()
            try:
                parsed, raw = json.loads(body), None
            except ValueError:
                parsed, raw = None, body.decode("utf-8", "replace")
            out.append({"key": obj["Key"], "size": obj["Size"], "json": parsed, "text": raw})
    emit({"objects": sorted(out, key=lambda o: o["key"])})


if __name__ == "__main__":
    main()
