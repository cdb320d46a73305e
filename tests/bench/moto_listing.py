#!/usr/bin/env python3
"""How long moto takes to answer one S3 prefix listing as its bucket grows.

Run as ``.venv/bin/python tests/bench/moto_listing.py``: in process (``mock_aws``), puts keys
straight through moto's backend (10, 1,000, 10,000, then 100,000 under ``manifests/``) and
times ``list_objects_v2(Prefix="locks/")``, which answers no key, 7 times each (median). The
engine's incremental backup makes one such listing (its lock check); on moto its cost grows with
the bucket (moto walks every key), on S3 it does not. Not a pytest test.
"""

from __future__ import annotations

import os
import time

import boto3
from moto import mock_aws
from moto.core import DEFAULT_ACCOUNT_ID
from moto.s3.models import s3_backends

BUCKET = "bench-bucket"


def main() -> None:
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    with mock_aws():
        client = boto3.client("s3", region_name="us-east-1")
        client.create_bucket(Bucket=BUCKET)
        backend = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]
        have = 0
        for count in (10, 1000, 10000, 100000):
            for index in range(have, count):
                backend.put_object(BUCKET, f"manifests/{index:08d}", b"m" * 200)
            have = count
            times = []
            for _ in range(7):
                begin = time.perf_counter()
                client.list_objects_v2(Bucket=BUCKET, Prefix="locks/")
                times.append(time.perf_counter() - begin)
            times.sort()
            print(f"{count:>7} keys: one listing of locks/ (no key in it): median {1000 * times[3]:.1f} ms")
        print(f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
