import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Hypothesis keeps its caches (and the fuzz profile its examples) outside the working tree.
HYPOTHESIS_HOME = Path(os.environ.setdefault("HYPOTHESIS_STORAGE_DIRECTORY",
                                             str(Path(tempfile.gettempdir()) / "moe2-hypothesis")))

import pytest
from hypothesis import HealthCheck, settings
from hypothesis.database import DirectoryBasedExampleDatabase

# Hypothesis profiles, chosen by HYPOTHESIS_PROFILE (or pytest's --hypothesis-profile):
# - "ci", the default (`bash run.sh test`, .ci/run, `make test`, `make test-fast`): derandomised, so every run
#   draws the same examples and passes or fails with the code, not by chance; no example database; no
#   deadline or too-slow health check (timings on 2 busy cores are not the code's fault).
# - "fuzz" (`make fuzz`): fresh randomness on each run and FUZZ_FACTOR times the examples (MOE2_FUZZ_FACTOR,
#   default 10); a failure's example is kept in HYPOTHESIS_HOME/examples and tried first on the next run,
#   and its reproduce blob printed. A failure found this way belongs in the test as an @example.
FUZZ_FACTOR = int(os.environ.get("MOE2_FUZZ_FACTOR", "10"))
settings.register_profile("ci", settings.get_profile("ci"), derandomize=True, database=None, deadline=None,
                          print_blob=True, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("fuzz", settings.get_profile("ci"), derandomize=False, print_blob=True,
                          max_examples=settings.get_profile("ci").max_examples * FUZZ_FACTOR,
                          database=DirectoryBasedExampleDatabase(HYPOTHESIS_HOME / "examples"))
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or "ci")


def examples(n: int) -> int:
    """``max_examples`` for a property test that asks for ``n`` under the ci profile: scaled with the active
    profile's ``max_examples`` (the fuzz profile's FUZZ_FACTOR), which a bare ``max_examples=n`` would pin."""
    return max(1, n * settings().max_examples // settings.get_profile("ci").max_examples)


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


HAS_DATA = _has_data()
needs_data = pytest.mark.skipif(not HAS_DATA, reason="no benchmark data folder (../shared/datasets) here")
# What the library says when a test reaches for benchmark data that is not here (in the test's own process,
# a notebook or a subprocess): without data, such a test is skipped, saying so; with data, it runs as ever.
MISSING_DATA = ("ResourceUnavailable: no ", "no data folder holds ", "cannot reach https://")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A clone without the benchmark data (no ./data, no ../shared/datasets, no network to fetch it) passes
    `bash run.sh test`: a test that fails only because the data is missing is reported as skipped."""
    outcome = yield
    report = outcome.get_result()
    if HAS_DATA or not report.failed or call.excinfo is None:
        return
    text = str(report.longrepr)
    if any(m in text for m in MISSING_DATA) and ("found in" in text or "data fetch" in text or "holds" in text):
        report.outcome = "skipped"
        report.longrepr = (str(item.path), item.location[1] or 0, "Skipped: needs the benchmark data, not found "
                           "here (./data, ../shared/datasets; python -m moe2lib data fetch)")


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
