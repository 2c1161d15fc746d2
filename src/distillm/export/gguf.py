"""Write a (quantized) student as a GGUF file that llama.cpp and ollama load, exactly.

Exact means: every weight read back from the file (by llama.cpp's or gguf's dequantizer) equals, bit for bit, the
weight the student used in torch. For the quantized linears this holds by construction: a `QuantizedWeight`'s codes
and fp16 scales are packed into llama.cpp blocks as they are, never re-derived from floats:

- Q4_0 (bits <= 4): a block is an fp16 `d` and 16 bytes of nibbles for 32 weights (byte j: low nibble element j,
  high nibble element j + 16); llama.cpp reads weight = (nibble - 8) * d in fp32. A symmetric code c in [-8, 7]
  is stored as nibble c + 8 with d = the group's scale, so int4, int3 ([-4, 3]) and int2 codes all store exactly.
- Q8_0 (5 <= bits <= 8): an fp16 `d` and 32 int8 codes; weight = code * d.
A group of 64, 96, ... weights with one scale is stored as 2, 3, ... blocks with the same `d`; groups that are not
a multiple of 32 cannot be stored exactly in any llama.cpp block and are refused.

Tensors that are not quantized (norms, the embedding, a float head) are written in the smallest encoding that
reproduces them exactly: 1-D tensors in F32 (llama.cpp requires it); a 2-D tensor in its reference GGUF's bytes
when it still equals the reference tensor (an untouched embedding keeps the teacher's Q8_0 verbatim), else in Q8_0
when its values already lie on a Q8_0 grid, else F16 when fp16 holds them, else F32.

Metadata (tokenizer, chat template, general.*) is copied from a reference GGUF (the teacher's) when one is given;
the architecture's hyper-parameters always come from the model's config (a pruned student has fewer blocks than
its teacher). Without a reference, the tokenizer is described from the Hugging Face tokenizer (byte-level BPE only).

Only the llama architecture (Llama, SmolLM, ... in transformers: model_type "llama") is supported for now.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import tempfile
from pathlib import Path

import gguf
import numpy as np
import torch

from ..errors import DistillmError
from ..quant import QuantizedWeight

logger = logging.getLogger("distillm")

BLOCK = 32  # weights per Q4_0 / Q8_0 block

#: HF parameter name suffix inside a decoder layer -> GGUF tensor name suffix (llama).
_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_GLOBAL_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


class GGUFExportError(DistillmError):
    """The student cannot be written (or read back) as an exact GGUF file; the message says why and what to do."""


# ----------------------------------------------------------------------------------------------------------------
# Names and the llama.cpp rope permutation
# ----------------------------------------------------------------------------------------------------------------

def hf_to_gguf_name(name: str) -> str | None:
    """The GGUF tensor name of a llama HF parameter, or None when the name is not a llama parameter."""
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    parts = name.split(".", 3)
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[2].isdigit() and parts[3] in _LAYER_NAMES:
        return f"blk.{parts[2]}.{_LAYER_NAMES[parts[3]]}"
    return None


def gguf_to_hf_name(name: str) -> str | None:
    for hf, gg in _GLOBAL_NAMES.items():
        if name == gg:
            return hf
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit():
        for hf, gg in _LAYER_NAMES.items():
            if parts[2] == gg:
                return f"model.layers.{parts[1]}.{hf}"
    return None


def rope_row_order(n_rows: int, n_head: int) -> np.ndarray:
    """Row order llama.cpp stores q_proj (n_head = attention heads) and k_proj (n_head = kv heads) in.

    HF's rotary embedding pairs dimension i with i + head_dim/2 inside each head; llama.cpp's "normal" rope pairs
    neighbours 2i, 2i+1. llama.cpp's converter therefore interleaves the two halves of each head: GGUF row
    h*head_dim + 2i + j holds HF row h*head_dim + j*head_dim/2 + i. Returned: for each GGUF row, its HF row.
    """
    if n_rows % (2 * n_head):
        raise GGUFExportError(f"{n_rows} rows cannot be split into {n_head} heads of even size")
    half = n_rows // n_head // 2
    return np.arange(n_rows).reshape(n_head, 2, half).transpose(0, 2, 1).reshape(-1)


def _rope_heads(hf_name: str, n_head: int, n_head_kv: int) -> int | None:
    if hf_name.endswith("self_attn.q_proj.weight"):
        return n_head
    if hf_name.endswith("self_attn.k_proj.weight"):
        return n_head_kv
    return None


# ----------------------------------------------------------------------------------------------------------------
# Block packing (exact: codes and scales are stored as they are)
# ----------------------------------------------------------------------------------------------------------------

def _block_scales(q: QuantizedWeight) -> np.ndarray:
    """fp16 scales, one per block of 32 (a group of 32k weights is k blocks sharing its scale)."""
    scales = q.scales.detach().cpu().numpy()
    return np.repeat(scales, q.group_size // BLOCK, axis=1) if q.group_size != BLOCK else scales


def pack_q4_0(codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Q4_0 bytes [rows, cols/32*18] from int codes in [-8, 7] [rows, cols] and fp16 scales [rows, cols/32]."""
    rows, cols = codes.shape
    nb = cols // BLOCK
    nibbles = (codes.astype(np.int16) + 8).astype(np.uint8).reshape(rows, nb, BLOCK)
    qs = nibbles[..., : BLOCK // 2] | (nibbles[..., BLOCK // 2:] << 4)
    d = np.ascontiguousarray(scales.astype("<f2")).view(np.uint8).reshape(rows, nb, 2)
    return np.concatenate([d, qs], axis=-1).reshape(rows, nb * (2 + BLOCK // 2))


def pack_q8_0(codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Q8_0 bytes [rows, cols/32*34] from int codes in [-128, 127] and fp16 scales [rows, cols/32]."""
    rows, cols = codes.shape
    nb = cols // BLOCK
    qs = codes.astype(np.int8).reshape(rows, nb, BLOCK).view(np.uint8)
    d = np.ascontiguousarray(scales.astype("<f2")).view(np.uint8).reshape(rows, nb, 2)
    return np.concatenate([d, qs], axis=-1).reshape(rows, nb * (2 + BLOCK))


def _bits_equal(a: np.ndarray, b: np.ndarray) -> bool:
    a32, b32 = np.ascontiguousarray(a, dtype=np.float32), np.ascontiguousarray(b, dtype=np.float32)
    return a32.shape == b32.shape and np.array_equal(a32.view(np.uint32), b32.view(np.uint32))


def q8_0_codes_of(w: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(codes, fp16 scales) that reproduce the fp32 matrix `w` bit for bit as Q8_0, or None when there are none.

    Values that came from a Q8_0 tensor (llama.cpp: d = fp16(amax/127), code = round(x/d)) are exactly
    code * d with |code| = 127 at the block's largest value, so d = amax/127 is recovered exactly (127*d is
    exact in fp32, so is the division); a symmetric int8 grid whose largest code is -128 gives d = amax/128.
    Each block takes the first candidate that reproduces it element by element.
    """
    rows, cols = w.shape
    if cols % BLOCK:
        return None
    blocks = np.ascontiguousarray(w, dtype=np.float32).reshape(rows, cols // BLOCK, BLOCK)
    amax = np.abs(blocks).max(axis=-1)
    codes = np.zeros(blocks.shape, dtype=np.int8)
    scales = np.zeros(amax.shape, dtype=np.float16)
    todo = np.ones(amax.shape, dtype=bool)
    for top in (127, 128):
        if not todo.any():
            break
        with np.errstate(over="ignore"):
            d = (amax[todo] / np.float32(top)).astype(np.float16)
        d32 = d.astype(np.float32)[:, None]
        x = blocks[todo]
        with np.errstate(divide="ignore", invalid="ignore"):
            c = np.where(d32 > 0, np.rint(x / np.where(d32 > 0, d32, 1)), 0)
        ok = np.isfinite(d) & (np.abs(c) <= 128).all(axis=-1) & (c <= 127).all(axis=-1)
        c = np.clip(c, -128, 127).astype(np.int8)
        ok &= ((c.astype(np.float32) * d32).view(np.uint32) == x.view(np.uint32)).all(axis=-1)
        idx = np.flatnonzero(todo.reshape(-1))[ok]
        codes.reshape(-1, BLOCK)[idx] = c[ok]
        scales.reshape(-1)[idx] = d[ok]
        todo.reshape(-1)[idx] = False
    if todo.any():
        return None
    return codes.reshape(rows, cols), scales


# ----------------------------------------------------------------------------------------------------------------
# A small GGUF reader: gguf.GGUFReader builds a numpy view per string and takes ~20 s (over a minute on a busy
# machine) to parse SmolLM2's 49k tokens and 49k merges; one pass with struct takes a fraction of a second.
# ----------------------------------------------------------------------------------------------------------------

_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1", 10: "<u8", 11: "<i8",
          12: "<f8"}
_STRING, _ARRAY = 8, 9


class GGUFFile:
    """The metadata and tensors of a little-endian GGUF (v2/v3) file.

    fields: key -> (value, value type, array element type or None), values as Python objects (lists for arrays).
    tensors: GGUF name -> (ggml type, (rows, cols) or (n,), raw data: float32/float16 for F32/F16, else uint8
    [rows, bytes per row]), memory-mapped.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise GGUFExportError(f"GGUF file not found: {self.path}")
        mm = np.memmap(self.path, dtype=np.uint8, mode="r")
        data = self._data = memoryview(mm)
        self._pos = 0
        try:
            if mm.size < 24 or bytes(data[:4]) != b"GGUF":
                raise GGUFExportError(f"{self.path} is not a GGUF file (no GGUF magic).")
            version, n_tensors, n_kv = struct.unpack_from("<IQQ", data, 4)
            if version not in (2, 3):
                raise GGUFExportError(f"{self.path}: GGUF version {version} is not supported (2 or 3).")
            self._pos = 24
            self.fields = {}
            for _ in range(n_kv):
                key = self._str()
                vtype = self._u32()
                if vtype == _ARRAY:
                    sub, count = self._u32(), self._u64()
                    self.fields[key] = (self._array(sub, count), vtype, sub)
                else:
                    self.fields[key] = (self._value(vtype), vtype, None)
            infos = []
            for _ in range(n_tensors):
                name = self._str()
                n_dims = self._u32()
                dims = struct.unpack_from(f"<{n_dims}Q", data, self._pos)
                self._pos += 8 * n_dims
                qtype, offset = self._u32(), self._u64()
                infos.append((name, dims, qtype, offset))
        except struct.error as err:
            raise GGUFExportError(f"{self.path} is truncated or corrupt: {err}") from err
        align = int(self.fields.get("general.alignment", (32,))[0])
        start = -(-self._pos // align) * align
        self.tensors = {}
        for name, dims, qtype, offset in infos:
            qtype = gguf.GGMLQuantizationType(qtype)
            block, type_size = gguf.GGML_QUANT_SIZES[qtype]
            shape = tuple(int(d) for d in reversed(dims))
            n_bytes = int(np.prod(shape)) // block * type_size
            if start + offset + n_bytes > mm.size:
                raise GGUFExportError(f"{self.path} is truncated: tensor '{name}' runs past the end of the file.")
            chunk = mm[start + offset: start + offset + n_bytes]
            if qtype == gguf.GGMLQuantizationType.F32:
                arr = chunk.view("<f4").reshape(shape)
            elif qtype == gguf.GGMLQuantizationType.F16:
                arr = chunk.view("<f2").reshape(shape)
            else:
                arr = chunk.reshape(*shape[:-1], shape[-1] // block * type_size)
            self.tensors[name] = (qtype, shape, arr)
        del self._data

    def value(self, key: str, default=None):
        return self.fields[key][0] if key in self.fields else default

    def _u32(self) -> int:
        (v,) = struct.unpack_from("<I", self._data, self._pos)
        self._pos += 4
        return v

    def _u64(self) -> int:
        (v,) = struct.unpack_from("<Q", self._data, self._pos)
        self._pos += 8
        return v

    def _str(self) -> str:
        n = self._u64()
        s = bytes(self._data[self._pos: self._pos + n]).decode("utf-8")
        self._pos += n
        return s

    def _value(self, vtype: int):
        if vtype == _STRING:
            return self._str()
        fmt = _SCALAR[vtype]
        (v,) = struct.unpack_from(fmt, self._data, self._pos)
        self._pos += struct.calcsize(fmt)
        return v

    def _array(self, sub: int, count: int) -> list:
        if sub == _STRING:
            return [self._str() for _ in range(count)]
        if sub == _ARRAY:
            raise GGUFExportError(f"{self.path}: nested GGUF arrays are not supported.")
        dtype = np.dtype(_NUMPY[sub])
        arr = np.frombuffer(self._data, dtype=dtype, count=count, offset=self._pos)
        self._pos += dtype.itemsize * count
        return arr.astype(bool).tolist() if sub == 7 else arr.tolist()

# ----------------------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------------------

def _llama_hparams(config, model_type: str) -> dict:
    """The llama.* hyper-parameters llama.cpp needs, from a transformers config; refuses what llama.cpp's plain
    llama graph would compute differently."""
    if model_type != "llama":
        raise GGUFExportError(
            f"GGUF export supports the llama architecture only (Llama, SmolLM, TinyLlama...: model_type 'llama'); "
            f"this student is '{model_type}'. Save it as a Hugging Face directory and convert it with llama.cpp's "
            "convert_hf_to_gguf.py instead (that is not exact for quantized students).")
    problems = []
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        problems.append("linear biases (attention_bias / mlp_bias)")
    if getattr(config, "hidden_act", "silu") != "silu":
        problems.append(f"hidden_act '{config.hidden_act}' (llama.cpp's llama uses silu)")
    rope = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", None):
        problems.append(f"rope scaling '{rope_type}'")
    if problems:
        raise GGUFExportError(f"GGUF export does not support this llama variant's {', '.join(problems)} yet.")
    theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    n_head = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    return dict(
        context_length=config.max_position_embeddings,
        embedding_length=config.hidden_size,
        block_count=config.num_hidden_layers,
        feed_forward_length=config.intermediate_size,
        head_count=n_head,
        head_count_kv=getattr(config, "num_key_value_heads", None) or n_head,
        rope_freq_base=float(theta),
        rms_eps=float(config.rms_norm_eps),
        vocab_size=config.vocab_size,
        head_dim=head_dim,
    )


def _check_quantized(quantized: dict[str, QuantizedWeight], params: dict[str, torch.Tensor], tied: bool) -> dict:
    """Validate the quantized weights against the model before any packing; returns GGUF name -> (hf name, q)."""
    out = {}
    for name, q in quantized.items():
        key = "model.embed_tokens.weight" if tied and name == "lm_head.weight" else name
        gname = hf_to_gguf_name(key)
        if gname is None or key not in params:
            hint = (" (a PEFT-wrapped model: merge the adapters and pass the plain model and its own parameter "
                    "names)" if "base_model" in name or "lora" in name else "")
            raise GGUFExportError(f"quantized weight '{name}' is not a parameter of this llama model{hint}.")
        if not isinstance(q, QuantizedWeight):
            raise GGUFExportError(f"quantized['{name}'] is a {type(q).__name__}, not a distillm.quant.QuantizedWeight")
        if tuple(q.codes.shape) != tuple(params[key].shape):
            raise GGUFExportError(f"quantized weight '{name}' has shape {tuple(q.codes.shape)} but the model's "
                                  f"parameter has {tuple(params[key].shape)}.")
        if q.group_size % BLOCK:
            raise GGUFExportError(
                f"quantized weight '{name}' uses groups of {q.group_size}; llama.cpp's Q4_0/Q8_0 blocks hold 32 "
                "weights with one scale, so only group sizes that are multiples of 32 store exactly "
                "(--student-quant-group-size 32).")
        if not 2 <= q.bits <= 8:
            raise GGUFExportError(f"quantized weight '{name}' has {q.bits} bits; GGUF export stores 2 to 8 bits "
                                  "(Q4_0 up to 4 bits, Q8_0 up to 8).")
        if gname in out:
            raise GGUFExportError(f"quantized weights '{out[gname][0]}' and '{name}' are the same tied tensor; "
                                  "pass one of them.")
        out[gname] = (name, q)
    return out


def _read_reference(path: str | os.PathLike) -> GGUFFile:
    path = Path(path)
    if not path.is_file():
        raise GGUFExportError(f"reference GGUF not found: {path} (the teacher's GGUF, whose tokenizer and chat "
                              "template the student's file copies; pass reference_gguf=None to describe the "
                              "tokenizer from the Hugging Face tokenizer instead).")
    try:
        return GGUFFile(path)
    except GGUFExportError:
        raise
    except Exception as err:  # noqa: BLE001 - any parse failure is a bad file
        raise GGUFExportError(f"cannot read reference GGUF {path}: {err}") from err


def _check_reference_tokenizer(reader, tokenizer, vocab_rows: int, ref_path) -> None:
    theirs = reader.value("tokenizer.ggml.tokens")
    if theirs is None:
        raise GGUFExportError(f"reference GGUF {ref_path} holds no tokenizer (tokenizer.ggml.tokens).")
    n = len(theirs)
    if n != vocab_rows:
        raise GGUFExportError(f"reference GGUF {ref_path} has {n} tokens but the student's embedding has "
                              f"{vocab_rows} rows: it is not this student's teacher.")
    if tokenizer is not None:
        ours = tokenizer.convert_ids_to_tokens(list(range(min(n, len(tokenizer)))))
        bad = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
        if bad is not None or len(tokenizer) > n:
            where = f"token {bad}: '{theirs[bad]}' there, '{ours[bad]}' here" if bad is not None else "its size"
            raise GGUFExportError(f"reference GGUF {ref_path} has a different tokenizer from the student's "
                                  f"({where}): pass the teacher's GGUF the student was distilled from.")


def _tokenizer_metadata(writer, tokenizer, vocab_rows: int) -> None:
    """Describe a byte-level BPE Hugging Face tokenizer the way llama.cpp's converter does (model 'gpt2')."""
    if tokenizer is None:
        raise GGUFExportError("GGUF export needs the tokenizer (or a reference GGUF holding it): pass tokenizer=.")
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = json.loads(backend.to_str()) if backend is not None else {}
    model = spec.get("model", {})
    if model.get("type") != "BPE" or "ByteLevel" not in json.dumps(spec.get("pre_tokenizer")):
        raise GGUFExportError(
            "without a reference GGUF, GGUF export describes byte-level BPE tokenizers only; this tokenizer is "
            f"'{model.get('type', type(tokenizer).__name__)}'. Pass reference_gguf= (the teacher's GGUF).")
    n = len(tokenizer)
    if n > vocab_rows:
        raise GGUFExportError(f"the tokenizer has {n} tokens but the embedding only {vocab_rows} rows.")
    tokens = tokenizer.convert_ids_to_tokens(list(range(n)))
    special = set(tokenizer.all_special_ids)
    added = set(tokenizer.added_tokens_decoder)
    types = [gguf.TokenType.CONTROL if i in special else gguf.TokenType.USER_DEFINED if i in added
             else gguf.TokenType.NORMAL for i in range(n)]
    # Embedding rows past the tokenizer are padding; llama.cpp needs one (unused) token per row.
    tokens += [f"[PAD{i}]" for i in range(n, vocab_rows)]
    types += [gguf.TokenType.UNUSED] * (vocab_rows - n)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([int(t) for t in types])
    writer.add_token_merges(merges)
    for attr, add in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id),
                      ("unk_token_id", writer.add_unk_token_id), ("pad_token_id", writer.add_pad_token_id)):
        if getattr(tokenizer, attr, None) is not None:
            add(int(getattr(tokenizer, attr)))
    writer.add_add_bos_token(False)
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)


def _float_tensor(gname: str, w: np.ndarray, reference: GGUFFile | None) -> tuple[np.ndarray, object]:
    """The smallest exact encoding of a float tensor (in GGUF row order): (data, ggml type)."""
    T = gguf.GGMLQuantizationType
    if w.ndim == 1:
        return w.astype(np.float32), T.F32

    def bytes_per_weight(qtype):
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        return type_size / block

    def from_reference():
        ref = reference.tensors.get(gname) if reference is not None else None
        if ref is None or ref[1] != w.shape or ref[0] == T.Q8_0:  # Q8_0 is recovered below, without decoding
            return None
        if _bits_equal(gguf.quants.dequantize(ref[2], ref[0]).reshape(w.shape), w):
            return np.array(ref[2]), ref[0]
        return None

    def as_q8_0():
        found = q8_0_codes_of(w)
        return (pack_q8_0(*found), T.Q8_0) if found is not None else None

    ref = reference.tensors.get(gname) if reference is not None else None
    small_ref = ref is not None and bytes_per_weight(ref[0]) < bytes_per_weight(T.Q8_0)
    for attempt in ((from_reference, as_q8_0) if small_ref else (as_q8_0, from_reference)):
        found = attempt()
        if found is not None:
            return found
    if _bits_equal(w.astype(np.float16).astype(np.float32), w):
        return w.astype(np.float16), T.F16
    return w.astype(np.float32), T.F32


def _file_type(types: dict[str, object], shapes: dict[str, tuple]) -> int:
    """general.file_type as llama.cpp's converter sets it: the type holding most of the 2-D weights other than
    the token embedding (which converters often keep at higher precision), e.g. MOSTLY_Q4_0."""
    T, F = gguf.GGMLQuantizationType, gguf.LlamaFileType
    weights: dict = {}
    for name, qtype in types.items():
        if len(shapes[name]) == 2 and name != "token_embd.weight":
            weights[qtype] = weights.get(qtype, 0) + int(np.prod(shapes[name]))
    if not weights:
        weights = {types.get("token_embd.weight", T.F32): 1}
    bulk = max(weights, key=weights.get)
    named = {T.F32: F.ALL_F32, T.F16: F.MOSTLY_F16, T.BF16: F.MOSTLY_BF16}
    return int(named.get(bulk) or getattr(F, f"MOSTLY_{bulk.name}", F.GUESSED))


def write_gguf(
    path: str | os.PathLike,
    model,
    quantized: dict[str, QuantizedWeight],
    *,
    reference_gguf: str | os.PathLike | None,
    tokenizer=None,
    verify: bool = True,
) -> Path:
    """Write `model` as a GGUF file at `path` (atomically: a temporary file renamed into place).

    model: the plain (not PEFT-wrapped) HF llama model; its parameters supply every tensor not in `quantized`.
    quantized: HF parameter name -> QuantizedWeight, stored exactly as Q4_0 (bits <= 4) or Q8_0 (bits <= 8).
    reference_gguf: a GGUF of the same tokenizer (the teacher's) whose tokenizer, chat template and general.*
        metadata are copied, and whose tensors are reused verbatim where the student's still equal them.
    verify: after packing, dequantize every quantized tensor with gguf's reference dequantizer and check it equals
        QuantizedWeight.dequantize() bit for bit (cheap next to the write).
    Returns the path written.
    """
    path = Path(path)
    config = model.config
    hp = _llama_hparams(config, getattr(config, "model_type", type(model).__name__))
    params = {name: p.detach().cpu() for name, p in model.state_dict(keep_vars=False).items()}
    tied = bool(getattr(config, "tie_word_embeddings", False))
    if tied:
        params.pop("lm_head.weight", None)
    unknown = [n for n in params if hf_to_gguf_name(n) is None]
    if unknown:
        raise GGUFExportError(f"GGUF export (llama) does not know the parameters {unknown[:3]}; pass the plain "
                              "Hugging Face model (merge LoRA adapters first).")
    qmap = _check_quantized(quantized, params, tied)
    vocab_rows = params["model.embed_tokens.weight"].shape[0]
    reader = _read_reference(reference_gguf) if reference_gguf is not None else None
    if reader is not None:
        arch = reader.value("general.architecture")
        if arch != "llama":
            raise GGUFExportError(f"reference GGUF {reference_gguf} is not a llama model "
                                  f"(general.architecture: {arch}).")
        _check_reference_tokenizer(reader, tokenizer, vocab_rows, reference_gguf)

    writer = gguf.GGUFWriter(path=None, arch="llama")
    # Tensors first (the file type depends on them); GGUF row order = reversed ggml shape.
    types, shapes = {}, {}
    for name, tensor in params.items():
        gname = hf_to_gguf_name(name)
        heads = _rope_heads(name, hp["head_count"], hp["head_count_kv"])
        order = rope_row_order(tensor.shape[0], heads) if heads is not None else None
        if gname in qmap:
            qname, q = qmap[gname]
            codes, scales = q.codes.detach().cpu().numpy(), _block_scales(q)
            if order is not None:
                codes, scales = codes[order], scales[order]
            if q.bits <= 4:
                data, qtype = pack_q4_0(codes, scales), gguf.GGMLQuantizationType.Q4_0
            else:
                data, qtype = pack_q8_0(codes, scales), gguf.GGMLQuantizationType.Q8_0
            if verify:
                expected = q.dequantize().detach().cpu().numpy()
                expected = expected[order] if order is not None else expected
                if not _bits_equal(gguf.quants.dequantize(data, qtype), expected):
                    raise GGUFExportError(f"internal error: '{qname}' does not read back exactly from {qtype.name}")
        else:
            w = tensor.float().numpy()
            data, qtype = _float_tensor(gname, w[order] if order is not None else w, reader)
        types[gname], shapes[gname] = qtype, tuple(tensor.shape)
        if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            writer.add_tensor(gname, np.ascontiguousarray(data))
        else:
            writer.add_tensor(gname, np.ascontiguousarray(data), raw_dtype=qtype)

    # Metadata: general.* and tokenizer.* from the reference, hyper-parameters from the config.
    skip = {"general.architecture", "general.file_type", "general.quantization_version", "general.alignment"}
    if reader is not None:
        for key, (value, vtype, sub) in reader.fields.items():
            if key.startswith(("general.", "tokenizer.")) and key not in skip:
                writer.add_key_value(key, value, gguf.GGUFValueType(vtype),
                                     gguf.GGUFValueType(sub) if sub is not None else None)
    else:
        writer.add_name(getattr(config, "_name_or_path", "") or "distillm student")
        _tokenizer_metadata(writer, tokenizer, vocab_rows)
    writer.add_context_length(hp["context_length"])
    writer.add_embedding_length(hp["embedding_length"])
    writer.add_block_count(hp["block_count"])
    writer.add_feed_forward_length(hp["feed_forward_length"])
    writer.add_head_count(hp["head_count"])
    writer.add_head_count_kv(hp["head_count_kv"])
    writer.add_rope_freq_base(hp["rope_freq_base"])
    writer.add_layer_norm_rms_eps(hp["rms_eps"])
    writer.add_vocab_size(vocab_rows)
    writer.add_rope_dimension_count(hp["head_dim"])
    if hp["head_dim"] != hp["embedding_length"] // hp["head_count"]:
        writer.add_key_length(hp["head_dim"])
        writer.add_value_length(hp["head_dim"])
    writer.add_file_type(_file_type(types, shapes))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        writer.write_header_to_file(path=Path(tmp))
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        writer.close()
        Path(tmp).unlink(missing_ok=True)
        raise
    counts = {t.name: list(types.values()).count(t) for t in set(types.values())}
    logger.info("Wrote %s (%.1f MB; tensors: %s)", path, path.stat().st_size / 1e6,
                ", ".join(f"{n} {k}" for k, n in sorted(counts.items())))
    return path


# ----------------------------------------------------------------------------------------------------------------
# Reading back
# ----------------------------------------------------------------------------------------------------------------

def read_gguf_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of a llama GGUF, de-quantized to fp32 by gguf's reference dequantizer, under its HF name and
    in HF row order (q/k un-permuted). A tied head has no tensor of its own: only model.embed_tokens.weight."""
    reader = GGUFFile(path)
    arch = reader.value("general.architecture")
    if arch != "llama":
        raise GGUFExportError(f"{path} is a '{arch}' GGUF; read_gguf_weights reads llama files only.")
    n_head = int(reader.value("llama.attention.head_count"))
    n_head_kv = int(reader.value("llama.attention.head_count_kv", n_head))
    out = {}
    for gname, (qtype, shape, data) in reader.tensors.items():
        name = gguf_to_hf_name(gname)
        if name is None:
            raise GGUFExportError(f"{path}: unknown llama tensor '{gname}'")
        w = np.asarray(gguf.quants.dequantize(np.asarray(data), qtype), dtype=np.float32).reshape(shape)
        heads = _rope_heads(name, n_head, n_head_kv)
        if heads is not None:
            w = w[np.argsort(rope_row_order(shape[0], heads))]
        out[name] = torch.from_numpy(np.array(w))
    return out
