"""peft LoRA adapters as llama.cpp GGUF LoRA adapters, and a check that one fits its base model.

The layout follows llama.cpp's ``convert_lora_to_gguf.py``: header ``general.type=adapter``,
``adapter.type=lora``, ``adapter.lora.alpha`` (llama.cpp scales by alpha/r, as peft does) and the
base model's ``general.architecture``; per adapted matrix ``W`` (GGUF name ``blk.N.attn_q.weight``)
two tensors ``blk.N.attn_q.weight.lora_a`` (peft ``lora_A``, numpy shape (r, in), GGUF ne [in, r]) and
``...lora_b`` (peft ``lora_B``, numpy (out, r), GGUF ne [r, out]). For the ``llama`` architecture
``convert_hf_to_gguf.py`` permutes the rows of q and k for its rotary-embedding layout, so lora_b of
q/k gets the same row permutation (``LlamaModel.permute``); Gemma 3 keeps the Hugging Face layout.

``merge_gguf`` bakes such an adapter into a re-encoded copy of the base once (cached), which llama.cpp
runs with no run-time adapter at the base model's speed.
"""

from __future__ import annotations

import json
import re
import shutil
from functools import lru_cache
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..infra import artifacts
from ..infra.cache import cache_dir

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


MERGE_DTYPES = ("F16", "Q8_0", "F32")
MERGE_DTYPE = "F16"  # prompt processing here (AVX2): F16 0.93-1.0x of Q8_0's time, see merge_gguf
_KV_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUF scalar value types


def gguf_tensors(path) -> dict[str, tuple[int, tuple[int, ...], int]]:
    """A GGUF file's tensors, ``name -> (ggml type, shape in GGUF ne order, absolute data offset)``.

    Skips the metadata without decoding it: ``gguf.GGUFReader`` builds Python objects for every token
    of a vocabulary and takes ~20-40 s on Gemma's 262k tokens, this takes well under a second.
    """
    import struct

    buf = np.memmap(path, dtype=np.uint8, mode="r")
    u32, u64 = (lambda o: struct.unpack_from("<I", buf, o)[0]), (lambda o: struct.unpack_from("<Q", buf, o)[0])
    if bytes(buf[:4]) != b"GGUF":
        raise InputError("not a GGUF file", path=path)
    n_tensors, n_kv, off, align = u64(8), u64(16), 24, 32

    def skip(off, vtype):
        if vtype == 8:
            return off + 8 + u64(off)
        if vtype != 9:
            return off + _KV_SIZES[vtype]
        etype, n, off = u32(off), u64(off + 4), off + 12
        if etype not in (8, 9):
            return off + n * _KV_SIZES[etype]
        for _ in range(n):
            off = skip(off, etype)
        return off

    for _ in range(n_kv):
        key = bytes(buf[off + 8:off + 8 + u64(off)]).decode()
        off += 8 + u64(off)
        if key == "general.alignment":
            align = u32(off + 4)
        off = skip(off + 4, u32(off))
    infos = []
    for _ in range(n_tensors):
        name = bytes(buf[off + 8:off + 8 + u64(off)]).decode()
        off += 8 + u64(off)
        ne = tuple(u64(off + 4 + 8 * d) for d in range(u32(off)))
        off += 4 + 8 * len(ne)
        infos.append((name, u32(off), ne, u64(off + 4)))
        off += 12
    start = -(-off // align) * align
    return {name: (ggml, ne, start + rel) for name, ggml, ne, rel in infos}


def _tensor_view(buf: np.ndarray, ggml: int, ne: tuple[int, ...], offset: int) -> np.ndarray:
    """The bytes of one tensor in ``buf``, shaped as ``gguf.quants.dequantize`` expects (rows, row bytes)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    block, size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml)]
    row = ne[0] // block * size
    return buf[offset:offset + row * int(np.prod(ne[1:]))].reshape(*reversed(ne[1:]), row)


def merged_path(adapter_gguf, base_model: str, dtype: str = MERGE_DTYPE) -> Path:
    """Where :func:`merge_gguf` caches a merge: keyed by the adapter's bytes, the base file and ``dtype``."""
    from . import registry

    src = registry.locate(base_model, "llm")
    st = src.stat()
    key = artifacts.digest({"v": 1, "adapter": artifacts.file_sha256(adapter_gguf), "dtype": dtype,
                            "base": str(src.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns})[:16]
    return cache_dir() / "merged" / f"{registry.display_name(base_model)}-{key}.{dtype}.gguf"


def merge_gguf(adapter_gguf, base_model: str, out_path=None, dtype: str = MERGE_DTYPE) -> Path:
    """The base model with a GGUF LoRA adapter merged in, as a GGUF that llama.cpp runs with no adapter.

    The file is the base re-encoded as ``dtype`` by llama.cpp (``registry.requantized``) with each
    adapted weight replaced in place by ``dequant(packaged W) + alpha/r * B @ A`` (llama.cpp's run-time
    scale, in the GGUF tensors' numpy orientation, so llama's permuted q/k rows match) encoded as
    ``dtype``: header, metadata, tokenizer, tensor names, types, order and alignment are the base
    file's bytes. Without ``out_path`` it is cached at ``merged_path`` and reused.
    """
    from gguf import GGMLQuantizationType as T
    from gguf.quants import dequantize, quantize

    from . import registry

    if dtype not in MERGE_DTYPES:
        raise InputError(f"merge dtype must be one of {', '.join(MERGE_DTYPES)}, not {dtype!r}", param="dtype")
    src = registry.locate(base_model, "llm")
    alpha = check_adapter(adapter_gguf, src)["alpha"]
    if out_path is None:
        out_path = merged_path(adapter_gguf, base_model, dtype)
        if out_path.exists():
            return out_path
    out_path = Path(out_path)
    ad, ad_buf = gguf_tensors(adapter_gguf), np.memmap(adapter_gguf, dtype=np.uint8, mode="r")
    lo = {name: dequantize(_tensor_view(ad_buf, *t), T(t[0])) for name, t in ad.items()}  # a (r, in), b (out, r)
    native, src_buf = gguf_tensors(src), np.memmap(src, dtype=np.uint8, mode="r")
    with artifacts.atomic_path(out_path) as tmp:
        shutil.copyfile(registry.requantized(base_model, dtype), tmp)
        out = np.memmap(tmp, dtype=np.uint8, mode="r+")
        for name, (ggml, ne, offset) in gguf_tensors(tmp).items():
            if f"{name}.lora_a" not in lo:
                continue
            a, b = lo[f"{name}.lora_a"], lo[f"{name}.lora_b"]
            scale = alpha / a.shape[0] if alpha else 1.0  # llama.cpp: alpha / rank, 1 when alpha is 0
            w = dequantize(_tensor_view(src_buf, *native[name]), T(native[name][0])) + np.float32(scale) * (b @ a)
            _tensor_view(out, ggml, ne, offset)[...] = quantize(w.astype(np.float32), T(ggml)).view(np.uint8)
        out.flush()
        del out
    return out_path


def random_adapter(base_model: str, out_dir, rank: int = 8, alpha: float = 16,
                   modules=("q_proj", "k_proj", "v_proj", "o_proj"), std: float = 0.05, seed: int = 0) -> Path:
    """A random, nonzero peft LoRA folder for ``base_model`` (tests and benchmarks; numpy, no torch):
    lora_A ~ N(0, 1/in), lora_B ~ N(0, std^2), the shapes and key names of ``finetune``'s adapters."""
    from safetensors.numpy import save_file

    from . import registry

    info = _base_info(registry.locate(base_model, "llm"))
    rng = np.random.default_rng(seed)
    tensors = {}
    for layer in range(info["n_layer"]):
        for proj in modules:
            n_in, n_out = info["tensors"][f"blk.{layer}.{PEFT_TO_GGUF[proj]}.weight"]
            block = "mlp" if PEFT_TO_GGUF[proj].startswith("ffn") else "self_attn"
            key = f"base_model.model.model.layers.{layer}.{block}.{proj}"
            tensors[f"{key}.lora_A.weight"] = rng.normal(0, n_in ** -0.5, (rank, n_in)).astype(np.float32)
            tensors[f"{key}.lora_B.weight"] = rng.normal(0, std, (n_out, rank)).astype(np.float32)
    out_dir = Path(out_dir)
    artifacts.write_json(out_dir / "adapter_config.json", {"peft_type": "LORA", "r": rank, "lora_alpha": alpha,
                                                           "target_modules": list(modules)})
    with artifacts.atomic_path(out_dir / "adapter_model.safetensors") as tmp:
        save_file(tensors, str(tmp))
    return out_dir
