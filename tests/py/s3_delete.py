#!/usr/bin/env python3
"""Deletes one object from a bucket with boto3 (what an over-eager lifecycle rule or a
person does), to show that reconciliation names what went with it.

    s3_delete.py --endpoint http://127.0.0.1:PORT --bucket B --key K

Prints {"deleted": K}.
"""

import argparse

from _envelope import emit
from _s3 import client


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--endpoint", required=True)
    ap.add_argument("--bucket", required=True)
    ap.add_argument("--key", required=True)
    args = ap.parse_args()
    client(args.endpoint).delete_object(Bucket=args.bucket, Key=args.key)
    emit({"deleted": args.key})


if __name__ == "__main__":
    main()
