import os

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest


def _has_data() -> bool:
    """Whether the benchmark data (llm-foundry tasks and MMLU's test split) is found where the library looks."""
    from moe2lib.data.loaders import resolve_data_dir
    from moe2lib.errors import ResourceUnavailable

    try:
        resolve_data_dir(None, "llm-foundry")
        resolve_data_dir(None, "mmlu/test")
    except ResourceUnavailable:
        return False
    return True


needs_data = pytest.mark.skipif(not _has_data(), reason="no benchmark data folder (../shared/datasets) here")


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    """The smoke pipeline run once per test session: (output root, each stage's outcome, the log)."""
    from moe2lib.pipeline import runner

    root = tmp_path_factory.mktemp("smoke")
    logs = []
    outcome = runner.reproduce("smoke", out=root, log=logs.append)
    return root, outcome, logs


@pytest.fixture(scope="module")
def pool():
    """Three llama-cpp-python expert servers on loopback (n_threads=1 each): SmolLM2, a second SmolLM2 with other
    logits (the same weights re-encoded as Q8_0: no dependence on a run's adapters) and Gemma (another
    tokenizer); every process is checked to be gone at the end."""
    import socket

    from moe2lib.models import registry
    from moe2lib.serve import servers

    specs = [servers.ServerSpec("smol", "smollm2-135m-instruct"),
             servers.ServerSpec("smol-b", str(registry.requantized("smollm2-135m-instruct", "Q8_0"))),
             servers.ServerSpec("gemma", "gemma3-270m")]
    p = servers.ServerPool(specs).start()
    yield p
    p.stop()
    assert not any(s.alive() for s in p.servers)
    for s in p.servers:  # the ports are free again: nothing leaked
        with socket.socket() as sock:
            assert sock.connect_ex((s.host, s.port)) != 0
