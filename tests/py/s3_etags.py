#!/usr/bin/env python3
"""Lists every object of a bucket with boto3 and prints {"<key>": "<etag>", ...} as JSON.

    s3_etags.py --endpoint http://127.0.0.1:PORT --bucket B

A test compares two listings to prove that no object was replaced (same key, other
ETag) or removed.
"""

import argparse
import json

from _envelope import fail
from _s3 import client


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--endpoint", required=True)
    ap.add_argument("--bucket", required=True)
    args = ap.parse_args()
    s3 = client(args.endpoint)
    etags = {}
    try:
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=args.bucket):
            for obj in page.get("Contents", ()):
                etags[obj["Key"]] = obj["ETag"]
    except Exception as e:
        fail(f"cannot list s3://{args.bucket} at {args.endpoint}: {e}")
    print(json.dumps(etags))


if __name__ == "__main__":
    main()
