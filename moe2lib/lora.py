"""peft LoRA adapters as llama.cpp GGUF LoRA adapters, and a check that one fits its base model.

The layout follows llama.cpp's ``convert_lora_to_gguf.py``: header ``general.type=adapter``,
``adapter.type=lora``, ``adapter.lora.alpha`` (llama.cpp scales by alpha/r, as peft does) and the
base model's ``general.architecture``; per adapted matrix ``W`` (GGUF name ``blk.N.attn_q.weight``)
two tensors ``blk.N.attn_q.weight.lora_a`` (peft ``lora_A``, numpy shape (r, in), GGUF ne [in, r]) and
``...lora_b`` (peft ``lora_B``, numpy (out, r), GGUF ne [r, out]). For the ``llama`` architecture
``convert_hf_to_gguf.py`` permutes the rows of q and k for its rotary-embedding layout, so lora_b of
q/k gets the same row permutation (``LlamaModel.permute``); Gemma 3 keeps the Hugging Face layout.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path

import numpy as np

from . import artifacts
from .errors import InputError

PEFT_TO_GGUF = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
                "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
ROPE_PERMUTED = {"llama"}  # architectures whose q/k rows convert_hf_to_gguf.py permutes
_PEFT_KEY = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")
_GGUF_NAME = re.compile(r"^(blk\.\d+\.\w+\.weight)\.lora_([ab])$")


def llama_permute(rows: np.ndarray, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """convert_hf_to_gguf.py's ``LlamaModel.permute`` on the first axis (output rows) of ``rows``."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    shape = rows.shape
    return rows.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def _base_info(base_gguf) -> dict:
    """Architecture, layer and head counts and tensor shapes (GGUF ne order) of a base GGUF, cached."""
    base_gguf = Path(base_gguf)
    if not base_gguf.is_file():
        raise InputError("base model GGUF not found", path=base_gguf)
    st = base_gguf.stat()
    return _cached_base_info(str(base_gguf.resolve()), st.st_size, st.st_mtime_ns)


@lru_cache(maxsize=8)
def _cached_base_info(base_gguf: str, size: int, mtime_ns: int) -> dict:
    # parsing a GGUF header with a 262k-token vocabulary takes ~18 s here: keep the summary on disk
    from .models import cache_dir

    key = artifacts.digest({"path": base_gguf, "size": size, "mtime_ns": mtime_ns})[:16]
    cached = cache_dir() / "gguf_info" / f"{Path(base_gguf).stem}-{key}.json"
    if cached.exists():
        info = artifacts.read_json(cached)
        info["tensors"] = {k: tuple(v) for k, v in info["tensors"].items()}
        return info
    info = _read_base_info(Path(base_gguf))
    artifacts.write_json(cached, info)
    return info


def _read_base_info(base_gguf: Path) -> dict:
    from gguf import GGUFReader

    try:
        reader = GGUFReader(base_gguf, "r")
        arch = reader.fields["general.architecture"].contents()
        info = {"arch": arch, "tensors": {t.name: tuple(int(x) for x in t.shape) for t in reader.tensors},
                "n_layer": int(reader.fields[f"{arch}.block_count"].contents())}
        heads = reader.fields.get(f"{arch}.attention.head_count")
        kv = reader.fields.get(f"{arch}.attention.head_count_kv")
        info["n_head"] = None if heads is None else int(heads.contents())
        info["n_head_kv"] = info["n_head"] if kv is None else int(kv.contents())
    except Exception as exc:  # any failure to parse is the same answer: not a usable base GGUF
        raise InputError(f"not a readable GGUF base model ({type(exc).__name__}: {exc})", path=base_gguf) from None
    return info


def read_peft(adapter_dir) -> tuple[dict, dict[str, np.ndarray]]:
    """A peft adapter folder's config and tensors (safetensors only; no pickle)."""
    from safetensors.numpy import load_file

    adapter_dir = Path(adapter_dir)
    cfg_path, st_path = adapter_dir / "adapter_config.json", adapter_dir / "adapter_model.safetensors"
    for p in (cfg_path, st_path):
        if not p.is_file():
            raise InputError("a peft adapter folder needs adapter_config.json and adapter_model.safetensors",
                             path=p)
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    if cfg.get("peft_type") != "LORA":
        raise InputError(f"peft_type is {cfg.get('peft_type')!r}, only LORA exports", path=cfg_path)
    for key in ("use_dora", "rank_pattern", "alpha_pattern", "fan_in_fan_out"):
        if cfg.get(key):
            raise InputError(f"{key} is not supported by the GGUF export", path=cfg_path, param=key)
    return cfg, load_file(str(st_path))


def export_gguf(adapter_dir, base_gguf, out_path, dtype: str = "F32") -> Path:
    """Write the peft adapter in ``adapter_dir`` as a GGUF LoRA adapter for ``base_gguf``; checked, atomic."""
    import gguf

    cfg, tensors = read_peft(adapter_dir)
    base = _base_info(base_gguf)
    arch = base["arch"]
    r = int(cfg["r"])
    alpha = float(cfg["lora_alpha"])
    if cfg.get("use_rslora"):
        alpha = alpha * np.sqrt(r)  # peft scales by alpha/sqrt(r), llama.cpp by alpha/r
    np_dtype = {"F32": np.float32, "F16": np.float16}.get(dtype)
    if np_dtype is None:
        raise InputError(f"dtype must be F32 or F16, not {dtype!r}", param="dtype")
    out = {}
    for key, value in tensors.items():
        m = _PEFT_KEY.search(key)
        if m is None or m.group(2) not in PEFT_TO_GGUF:
            raise InputError(f"tensor {key!r} is not a LoRA matrix of a known projection "
                             f"({', '.join(PEFT_TO_GGUF)})", path=Path(adapter_dir) / "adapter_model.safetensors")
        layer, module, ab = int(m.group(1)), m.group(2), m.group(3)
        value = np.asarray(value, dtype=np.float32)
        if ab == "B" and arch in ROPE_PERMUTED and module in ("q_proj", "k_proj"):
            value = llama_permute(value, base["n_head"], base["n_head"] if module == "q_proj" else base["n_head_kv"])
        out[f"blk.{layer}.{PEFT_TO_GGUF[module]}.weight.lora_{ab.lower()}"] = np.ascontiguousarray(value, np_dtype)
    out_path = Path(out_path)
    with artifacts.atomic_path(out_path) as tmp:
        writer = gguf.GGUFWriter(str(tmp), arch)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        for name in sorted(out, key=_tensor_order):
            writer.add_tensor(name, out[name])
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        check_adapter(tmp, base_gguf, _base=base, _shown=out_path)
    return out_path


def _tensor_order(name: str):
    m = re.match(r"blk\.(\d+)\.(.*)", name)
    return (int(m.group(1)), m.group(2)) if m else (-1, name)


def check_adapter(path, base_gguf, *, _base: dict | None = None, _shown=None) -> dict:
    """Check that ``path`` is a GGUF LoRA adapter that fits ``base_gguf``; InputError naming ``path`` if not.

    llama.cpp rejects some mismatches with a bare "failed to apply lora adapter" and crashes on
    others; this checks the header, the architecture, that every lora_a has its lora_b, and the shapes
    llama.cpp expects (a: [in, r], b: [r, out] against the base weight [in, out]). Returns a summary.
    """
    from gguf import GGUFReader

    path = Path(path)
    shown = Path(_shown) if _shown is not None else path
    if not path.is_file():
        raise InputError("LoRA adapter file not found", path=shown)
    try:
        reader = GGUFReader(path, "r")
        fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
        shapes = {t.name: tuple(int(x) for x in t.shape) for t in reader.tensors}
    except Exception as exc:
        raise InputError(f"not a readable GGUF file ({type(exc).__name__}: {exc})", path=shown) from None
    if fields.get("general.type") != "adapter" or fields.get("adapter.type") != "lora":
        raise InputError(f"not a GGUF LoRA adapter (general.type={fields.get('general.type')!r}, "
                         f"adapter.type={fields.get('adapter.type')!r})", path=shown)
    base = _base or _base_info(base_gguf)
    if fields.get("general.architecture") != base["arch"]:
        raise InputError(f"adapter is for architecture {fields.get('general.architecture')!r}, the base model "
                         f"{Path(base_gguf).name} is {base['arch']!r}", path=shown)
    alpha = fields.get("adapter.lora.alpha")
    if not isinstance(alpha, (int, float)):
        raise InputError("adapter.lora.alpha is missing", path=shown)
    pairs: dict[str, dict[str, tuple]] = {}
    for name, shape in shapes.items():
        m = _GGUF_NAME.match(name)
        if m is None:
            raise InputError(f"tensor {name!r} is not named <base tensor>.lora_a/.lora_b", path=shown)
        pairs.setdefault(m.group(1), {})[m.group(2)] = shape
    if not pairs:
        raise InputError("adapter holds no LoRA tensors", path=shown)
    ranks = set()
    for target, ab in sorted(pairs.items()):
        if set(ab) != {"a", "b"}:
            raise InputError(f"{target} has lora_{'a' if 'a' in ab else 'b'} without its partner", path=shown)
        if target not in base["tensors"]:
            raise InputError(f"{target} does not exist in the base model {Path(base_gguf).name} "
                             f"({base['arch']}, {base['n_layer']} layers)", path=shown)
        w, a, b = base["tensors"][target], ab["a"], ab["b"]
        if len(a) != 2 or len(b) != 2 or a[0] != w[0] or b[1] != w[1] or a[1] != b[0]:
            raise InputError(f"{target}: lora_a {list(a)} and lora_b {list(b)} do not fit the base weight "
                             f"{list(w)} of {Path(base_gguf).name} (need a=[{w[0]}, r], b=[r, {w[1]}])",
                             path=shown)
        ranks.add(a[1])
    return {"arch": base["arch"], "alpha": float(alpha), "ranks": sorted(ranks), "n_targets": len(pairs),
            "modules": sorted({t.split(".")[2] for t in pairs})}
