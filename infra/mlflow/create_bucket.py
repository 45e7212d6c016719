"""Create the MLflow artifact bucket in MinIO/S3 if it does not exist (idempotent).

Run once by the `create-bucket` service of compose.yaml. Reads everything from
the environment: MLFLOW_ARTIFACT_BUCKET, MLFLOW_S3_ENDPOINT_URL,
AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY.
"""

import os
import sys
import time

import boto3
from botocore.exceptions import ClientError, EndpointConnectionError


def main() -> int:
    bucket = os.environ["MLFLOW_ARTIFACT_BUCKET"]
    s3 = boto3.client("s3", endpoint_url=os.environ.get("MLFLOW_S3_ENDPOINT_URL"))
    for attempt in range(30):
        try:
            s3.head_bucket(Bucket=bucket)
            print(f"bucket {bucket!r} exists")
            return 0
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchBucket"):
                s3.create_bucket(Bucket=bucket)
                print(f"bucket {bucket!r} created")
                return 0
            raise
        except EndpointConnectionError:
            print(f"waiting for the object store ({attempt + 1}/30)", file=sys.stderr)
            time.sleep(2)
    return 1


if __name__ == "__main__":
    sys.exit(main())
