import os

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    """The smoke pipeline run once per test session: (output root, each stage's outcome, the log)."""
    from moe2lib import pipeline

    root = tmp_path_factory.mktemp("smoke")
    logs = []
    outcome = pipeline.reproduce("smoke", out=root, log=logs.append)
    return root, outcome, logs
