#!/usr/bin/env python3
"""Creates an S3 bucket with boto3; succeeds when it exists already (idempotent).

    s3_make_bucket.py --endpoint http://127.0.0.1:PORT --bucket B

Prints {"bucket": B, "created": true|false} (false: it was there already).
"""

import argparse

from _envelope import emit, fail
from _s3 import client


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--endpoint", required=True, help="S3 endpoint URL, e.g. http://127.0.0.1:5000")
    ap.add_argument("--bucket", required=True)
    args = ap.parse_args()

    s3 = client(args.endpoint)
    kwargs = {"Bucket": args.bucket}
    region = s3.meta.region_name
    if region != "us-east-1":
        kwargs["CreateBucketConfiguration"] = {"LocationConstraint": region}
    try:
        s3.head_bucket(Bucket=args.bucket)
        created = False
    except s3.exceptions.ClientError:
        created = True
    except Exception as e:
        fail(f"cannot reach {args.endpoint}: {e}")
    if created:
        try:
            s3.create_bucket(**kwargs)
        except (s3.exceptions.BucketAlreadyOwnedByYou, s3.exceptions.BucketAlreadyExists):
            created = False
        except Exception as e:
            fail(f"cannot create bucket {args.bucket} at {args.endpoint}: {e}")
    try:
        s3.head_bucket(Bucket=args.bucket)
    except Exception as e:
        fail(f"bucket {args.bucket} is not there after creating it: {e}")
    emit({"bucket": args.bucket, "created": created})


if __name__ == "__main__":
    main()
