"""`--teacher-cache topk` across tokenizers: the cache holds, per teacher response token, the teacher's top-k
log-probs + ids in its own vocabulary and the log-prob of the actual token; a cross step with it is the served
teacher's (--teacher-url) step: at k = the teacher's whole vocabulary the live teacher's loss and gradients, at a
small k the loss and gradients of the same batch scored by a teacher server; the cache is built once and read back;
a top-k cache written before the actual tokens' log-probs were stored is rebuilt, not read."""

from __future__ import annotations

import copy
import json
import threading
from http.server import ThreadingHTTPServer
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from distillm.crosstok.trainer import CrossRemoteScores
from distillm.models import real_vocab_size
from distillm.pipeline.modality import CrossModality
from distillm.teacher import loopback
from distillm.teacher.client import TeacherClient
from distillm.teacher.remote import RemoteScores
from distillm.training.teacher_cache import TeacherCache
from tolerances import batch_tokens, model_atol

from test_cross_cache import cross_rows, cross_trainer, live_step_and_twin, pair  # noqa: F401 (pair: a fixture)
from test_fused_methods import loss_and_grads, method_for
from test_teacher_cache import RowCounter


def build_topk_cache(directory, setup, teacher, method, rows, k) -> TeacherCache:
    """The top-k cache as `pipeline.training.train` builds it in a cross run: the fixed sequences in the teacher's
    tokens (`CrossModality.teacher_cache_sequences`), k over the teacher's vocabulary."""
    modality = CrossModality(setup.teacher_tok, setup.student_tok)
    sequences, pad = modality.teacher_cache_sequences(SimpleNamespace(cross=setup),
                                                      [method.sequences(row)[0] for row in rows])
    return TeacherCache(directory, "topk", k=k, vocab_size=real_vocab_size(setup.teacher_tok)).build(
        teacher, sequences, max_length=256, pad_token_id=pad, batch_size=3)


def _tolerance(setup, teacher, student, batch):
    # the deeper, wider network of the two bounds the rounding (as test_cross_cache), over both sides' tokens
    assert teacher.config.num_hidden_layers >= student.config.num_hidden_layers
    assert teacher.config.hidden_size >= student.config.hidden_size
    return batch_tokens(batch) + int(batch["teacher_attention_mask"].sum())


def _assert_same(loss, grads, loss_ref, grads_ref, config, n):
    assert loss_ref.abs() > 0 and grads_ref
    torch.testing.assert_close(loss, loss_ref, rtol=0, atol=model_atol(config, n, loss_ref))
    assert grads.keys() == grads_ref.keys()
    for key in grads_ref:
        torch.testing.assert_close(grads[key], grads_ref[key], rtol=0, atol=model_atol(config, n, grads_ref[key]),
                                   msg=key)


@pytest.mark.parametrize("name,impl", [("distillm2", "fused"), ("distillm2", "plain"), ("kd", "fused")])
def test_topk_cache_at_the_whole_vocabulary_gives_the_live_teachers_step(tmp_path, pair, name, impl):
    """At k = V_t every shared teacher id is known: the coarse-grained 1:1 term is the full one, the ULD terms see
    the whole distribution, the merged spans the exact actual-token log-probs (crosstok.losses.topk_group_values)."""
    setup, teacher, student = pair
    rows = cross_rows(setup)
    batch, loss_live, grads_live, cached, method = live_step_and_twin(tmp_path, setup, teacher, student, name, rows,
                                                                      impl)
    v_t = real_vocab_size(setup.teacher_tok)
    cached.teacher_cache = build_topk_cache(tmp_path / "cache", setup, teacher, method, rows, v_t)
    assert cached.teacher_cache.hidden.shape[1] == v_t
    counter = RowCounter(teacher)
    loss, grads = loss_and_grads(cached, batch)
    # the teacher ran on the student responses of the pairs only (re-tokenized for it, turned into the top-k form
    # from that pass); kd: not at all
    assert counter.rows == (len(rows) if name == "distillm2" else 0)
    assert cached.teacher_cache.cached_rows == len(rows)
    assert cached.teacher_cache.teacher_rows == (len(rows) if name == "distillm2" else 0)
    _assert_same(loss, grads, loss_live, grads_live, teacher.config, _tolerance(setup, teacher, student, batch))


@pytest.fixture
def served(pair):
    """A teacher server (the loopback one, in this process) over the pair's teacher and its tokenizer."""
    setup, teacher, _ = pair
    state = loopback._State(teacher, setup.teacher_tok, real_vocab_size(setup.teacher_tok), {}, None, "teacher")
    server = ThreadingHTTPServer(("127.0.0.1", 0), loopback._handler(state))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join(timeout=30)


@pytest.mark.parametrize("name", ["distillm2", "kd"])
def test_topk_cache_at_small_k_gives_the_served_teachers_step(tmp_path, pair, served, name):
    """k = 5 of the teacher's vocabulary: far from the full loss, the same as the --teacher-url path's (the same
    top-5 + actual-token log-probs, computed by the server per unpadded sequence, here from a padded batch)."""
    setup, teacher, student = pair
    rows = cross_rows(setup)
    k, v_t = 5, real_vocab_size(setup.teacher_tok)
    remote = cross_trainer(tmp_path, setup, teacher, copy.deepcopy(student), method_for(name, {}), rows, "fused")
    client = TeacherClient(served)
    remote.teacher_service = CrossRemoteScores(RemoteScores(client, k, v_t), setup)
    batch = remote.data_collator(rows)
    try:
        loss_remote, grads_remote = loss_and_grads(remote, batch)
        assert remote.teacher_service.rows == (2 if name == "distillm2" else 1) * len(rows)
    finally:
        client.close()

    method = method_for(name, {})
    cached = cross_trainer(tmp_path, setup, teacher, copy.deepcopy(student), method, rows, "fused")
    cached.teacher_cache = build_topk_cache(tmp_path / "cache", setup, teacher, method, rows, k)
    loss, grads = loss_and_grads(cached, batch)
    assert cached.teacher_cache.cached_rows == len(rows)
    n = _tolerance(setup, teacher, student, batch)
    _assert_same(loss, grads, loss_remote, grads_remote, teacher.config, n)

    live = cross_trainer(tmp_path, setup, teacher, copy.deepcopy(student), method_for(name, {}), rows, "fused")
    loss_live, _ = loss_and_grads(live, batch)
    assert abs(loss.item() - loss_live.item()) > 10 * model_atol(teacher.config, n, loss_live)  # not the full loss


def test_topk_cache_built_once_read_back_with_the_actual_tokens_log_probs(tmp_path, pair):
    setup, teacher, _ = pair
    rows, method = cross_rows(setup), method_for("distillm2", {})
    v_t = real_vocab_size(setup.teacher_tok)
    counter = RowCounter(teacher)
    first = build_topk_cache(tmp_path, setup, teacher, method, rows, v_t)
    assert counter.rows == len(rows) and first.built_rows == len(rows)
    tokens = sum(length for _, length in first.index.values())
    assert first.hidden.shape == first.ids.shape == (tokens, v_t) and first.target.shape == (tokens,)
    # at k = V_t every token is in the top-k: the stored actual-token log-prob is its entry there, exactly (the
    # same float32 log-softmax). The actual tokens: the teacher's own response ids, in order.
    modality = CrossModality(setup.teacher_tok, setup.student_tok)
    sequences, _ = modality.teacher_cache_sequences(SimpleNamespace(cross=setup),
                                                    [method.sequences(row)[0] for row in rows])
    actual = np.concatenate([response for _, response in sequences])
    assert actual.shape == (tokens,)
    values, ids = np.asarray(first.hidden), np.asarray(first.ids)
    np.testing.assert_array_equal(np.asarray(first.target), values[ids == actual[:, None]])
    assert (np.asarray(first.target) < 0).all()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 4 and any(name.endswith(".target.npy") for name in files)

    again = build_topk_cache(tmp_path, setup, teacher, method, rows, v_t)  # a later round, or a resumed run
    assert counter.rows == len(rows) and again.built_rows == 0  # read from disk: the teacher did not run
    for name in ("hidden", "ids", "target"):
        np.testing.assert_array_equal(np.asarray(getattr(again, name)), np.asarray(getattr(first, name)))
    assert sorted(p.name for p in tmp_path.iterdir()) == files


def _make_old_format(directory) -> None:
    """Turn a top-k cache into the format before this change: two arrays (log-probs, ids), a manifest without
    "format" whose SHA list names only those two."""
    manifest_path = next(directory.glob("*.json"))
    manifest = json.loads(manifest_path.read_text())
    manifest.pop("format")
    manifest["sha256"] = manifest["sha256"][:2]
    manifest_path.write_text(json.dumps(manifest))
    next(directory.glob("*.target.npy")).unlink()


@pytest.mark.parametrize("damage", ["old format", "old format, stray target", "target corrupted"])
def test_an_old_format_or_damaged_topk_cache_is_rebuilt(tmp_path, pair, caplog, damage):
    setup, teacher, _ = pair
    rows, method = cross_rows(setup), method_for("distillm2", {})
    first = build_topk_cache(tmp_path, setup, teacher, method, rows, 5)
    good = {name: np.array(getattr(first, name)) for name in ("hidden", "ids", "target")}
    target_path = next(tmp_path.glob("*.target.npy"))
    if damage == "target corrupted":
        np.save(target_path, np.zeros_like(good["target"]))
    else:
        _make_old_format(tmp_path)
        if damage == "old format, stray target":  # the array present but the manifest of the old format
            np.save(target_path, good["target"])
    counter = RowCounter(teacher)
    rebuilt = build_topk_cache(tmp_path, setup, teacher, method, rows, 5)
    assert counter.rows == len(rows) and rebuilt.built_rows == len(rows)  # the teacher ran again: not misread
    assert "rebuilding" in caplog.text
    assert ("format 1" in caplog.text) == damage.startswith("old format")
    for name, array in good.items():
        np.testing.assert_array_equal(np.asarray(getattr(rebuilt, name)), array)
    again = build_topk_cache(tmp_path, setup, teacher, method, rows, 5)
    assert again.built_rows == 0 and counter.rows == len(rows)


def test_an_exact_cache_from_before_the_format_field_is_still_read(tmp_path, pair):
    """Only the top-k cache's format changed: an exact cache's manifest without "format" (as written before) is
    read, not rebuilt."""
    from test_cross_cache import build_cache

    setup, teacher, _ = pair
    rows, method = cross_rows(setup), method_for("distillm2", {})
    first = build_cache(tmp_path, setup, teacher, method, rows)
    manifest_path = next(tmp_path.glob("*.json"))
    manifest = json.loads(manifest_path.read_text())
    assert manifest.pop("format") == 1
    manifest_path.write_text(json.dumps(manifest))
    counter = RowCounter(teacher)
    again = build_cache(tmp_path, setup, teacher, method, rows)
    assert again.built_rows == 0 and counter.rows == 0
    np.testing.assert_array_equal(np.asarray(again.hidden), np.asarray(first.hidden))
