"""Shared test configuration; the real servers live in tests/fixtures, one plugin each."""

pytest_plugins = [
    "tests.fixtures.s3",
    "tests.fixtures.http",
    "tests.fixtures.mlflow",
    "tests.fixtures.rclone",
]
