"""GGUF LoRA export: llama.cpp with the exported adapter answers like transformers+peft, on both bases.

The adapter is built, not trained: peft's LoRA on q/k/v/o (r=8, alpha=16) with lora_B drawn from
N(0, 0.1^2) (seeded; peft starts lora_B at zero, which would change nothing). Stated tolerance over
the answer-letter distributions of 8 MMLU prompts, llama.cpp+GGUF adapter vs transformers+peft:
max |Δp| <= 0.15 and mean |Δp| <= 0.04 (seen here: SmolLM2 0.079 / 0.014, Gemma 0.094 / 0.019; the
base models alone agree within 0.1 / 0.02, see test_experts.py). The adapter must move llama.cpp's
answer well beyond that: mean |Δp| vs the base model >= 0.08 (seen: SmolLM2 0.10, Gemma 0.23). A
missing llama q/k row permutation fails the first check (seen: max |Δp| 0.49).
"""

import numpy as np
import pytest

from moe2lib.data import loaders
from moe2lib.errors import InputError
from moe2lib.models import experts, lora, registry

pytestmark = pytest.mark.slow
MODELS = ["smollm2-135m-instruct", "gemma3-270m"]


def random_peft_adapter(name: str, out_dir, std: float = 0.1, seed: int = 0):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(registry.hf_model_dir(name), dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, task_type="CAUSAL_LM",
                                            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    with torch.no_grad():
        for key, p in model.named_parameters():
            if "lora_B" in key:
                p.normal_(0, std)
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


@pytest.fixture(scope="module")
def prompts():
    return [loaders.format_prompt(q) for q in loaders.mmlu_sample(8, seed=3)]


@pytest.fixture(scope="module", params=MODELS)
def exported(request, tmp_path_factory):
    name = request.param
    root = tmp_path_factory.mktemp(name)
    peft_dir = random_peft_adapter(name, root / "peft")
    gguf_path = lora.export_gguf(peft_dir, registry.locate(name, "llm"), root / f"{name}.gguf")
    return name, peft_dir, gguf_path


def test_export_header_and_shapes(exported):
    from gguf import GGUFReader

    name, peft_dir, path = exported
    reader = GGUFReader(path)
    fields = {k: f.contents() for k, f in reader.fields.items()}
    arch = "llama" if name.startswith("smollm2") else "gemma3"
    assert (fields["general.type"], fields["adapter.type"], fields["general.architecture"]) == ("adapter", "lora", arch)
    assert fields["adapter.lora.alpha"] == 16.0
    shapes = {t.name: t.shape.tolist() for t in reader.tensors}
    hidden, n_layer = (576, 30) if arch == "llama" else (640, 18)
    assert len(shapes) == n_layer * 4 * 2
    assert shapes["blk.0.attn_q.weight.lora_a"] == [hidden, 8]  # ne order: [in, r]
    assert shapes["blk.0.attn_output.weight.lora_b"] == [8, hidden]  # [r, out]
    info = lora.check_adapter(path, registry.locate(name, "llm"))
    assert info["ranks"] == [8] and info["modules"] == ["attn_k", "attn_output", "attn_q", "attn_v"]


def test_llama_cpp_adapter_matches_peft(exported, prompts):
    name, peft_dir, path = exported
    with experts.make_expert(name, adapter=str(path), n_threads=1) as ll, \
            experts.make_expert(name, n_threads=1) as base:
        p_ll, p_base = ll.choice_probs(prompts), base.choice_probs(prompts)
    hf = experts.make_expert(name, adapter=str(peft_dir), backend="transformers", n_threads=1)
    p_hf = hf.choice_probs(prompts)
    diff, moved = np.abs(p_ll - p_hf), np.abs(p_ll - p_base)
    print(f"{name}: vs peft max {diff.max():.3f} mean {diff.mean():.3f}; vs base max {moved.max():.3f} "
          f"mean {moved.mean():.3f}")
    assert diff.max() <= 0.15 and diff.mean() <= 0.04, (diff.max(), diff.mean())
    assert moved.mean() >= 0.08, moved.mean()


def test_llama_permutation_interleaves_the_rotary_halves():
    rows = np.arange(24 * 3, dtype=np.float32).reshape(24, 3)
    out = lora.llama_permute(rows, n_head=3)
    assert sorted(out[:, 0].tolist()) == rows[:, 0].tolist() and not np.array_equal(out, rows)
    # per head of 8 rows: the two rotary halves [0..3], [4..7] are interleaved to 0,4,1,5,2,6,3,7
    assert out[:8, 0].tolist() == [rows[i, 0] for i in (0, 4, 1, 5, 2, 6, 3, 7)]


def _write_adapter(path, arch, tensors, general_type="adapter"):
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_type(general_type)
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, 16.0)
    for name, arr in tensors.items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_bad_adapters_raise_input_error_naming_the_file(tmp_path):
    smol, gemma = registry.locate("smollm2-135m-instruct", "llm"), registry.locate("gemma3-270m", "llm")
    a, b = np.zeros((8, 576), np.float32), np.zeros((576, 8), np.float32)
    good = _write_adapter(tmp_path / "good.gguf", "llama", {"blk.0.attn_q.weight.lora_a": a,
                                                            "blk.0.attn_q.weight.lora_b": b})
    assert lora.check_adapter(good, smol)["n_targets"] == 1
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(good.read_bytes()[:200])
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"not a gguf at all" * 10)
    cases = {
        corrupt: "not a readable GGUF",
        garbage: "not a readable GGUF",
        _write_adapter(tmp_path / "model.gguf", "llama", {"x.weight": a}, general_type="model"): "not a GGUF LoRA",
        good: "architecture 'llama'",  # checked against Gemma below
        _write_adapter(tmp_path / "layer.gguf", "llama", {"blk.30.attn_q.weight.lora_a": a,
                                                          "blk.30.attn_q.weight.lora_b": b}): "does not exist",
        _write_adapter(tmp_path / "shape.gguf", "llama", {"blk.0.attn_k.weight.lora_a": a,
                                                          "blk.0.attn_k.weight.lora_b": b}): "do not fit",
        _write_adapter(tmp_path / "half.gguf", "llama", {"blk.0.attn_q.weight.lora_a": a}): "without its partner",
    }
    for path, message in cases.items():
        with pytest.raises(InputError, match=message) as err:
            lora.check_adapter(path, gemma if path == good else smol)
        assert str(path) in str(err.value)
    with pytest.raises(InputError, match="shape.gguf"):
        experts.make_expert("smollm2-135m-instruct", adapter=str(tmp_path / "shape.gguf")).letter_logits(["x"])
    with pytest.raises(InputError, match="good.gguf"):
        experts.make_expert("gemma3-270m", adapter=str(good)).letter_logits(["x"])
