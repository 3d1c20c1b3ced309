"""The course models load offline, have the documented shapes, and behave like language models."""

import pytest
import torch

from utils import models
from utils.paths import MODELS_DIR


def test_tokenizer_round_trips_text():
    tokenizer = models.load_tokenizer()
    text = "In the beginning God created the heaven and the earth."
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert len(tokenizer) == models.VOCAB_SIZE
    assert len(ids) < len(text.split()) * 2  # BPE merges whole words of this corpus


@pytest.mark.parametrize("name, low, high", [("small", 1e6, 4e6), ("teacher", 10e6, 20e6)])
def test_course_model_sizes_and_architecture(name, low, high):
    model, tokenizer = models.load_course_model(name)
    n_params = sum(p.numel() for p in model.parameters())
    assert low <= n_params <= high
    spec = models.SPECS[name]
    assert model.config.num_key_value_heads == spec.num_kv_heads < spec.num_heads  # GQA
    assert model.config.model_type == "llama" and not model.training
    ids = tokenizer("And God said,", return_tensors="pt")["input_ids"]
    assert model(input_ids=ids).logits.shape == (1, ids.shape[1], models.VOCAB_SIZE)


def test_teacher_beats_unigram_baseline_on_held_out_text():
    from utils.metrics import perplexity

    tokenizer = models.load_tokenizer()
    val = models.encode_split("validation", tokenizer)[:4096]
    train = models.encode_split("train", tokenizer)
    teacher, _ = models.load_course_model("teacher")
    assert perplexity(teacher, val) * 5 < models.unigram_perplexity(train, val)


def test_unknown_model_name_and_missing_files_are_clear(tmp_path):
    with pytest.raises(ValueError, match="name must be one of"):
        models.load_course_model("giant")
    with pytest.raises(FileNotFoundError, match="run `python -m utils.models train-tokenizer`"):
        models.load_tokenizer(tmp_path / "tokenizer.json")


def test_hub_model_offline_fails_with_a_clear_message(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import
    monkeypatch.setenv(models.HUB_ENV_VAR, "no-such-org/no-such-model")
    with pytest.raises(RuntimeError, match="could not load hub model 'no-such-org/no-such-model'"):
        models.load_course_model("teacher")


def test_minilm_embeddings_are_normalised_and_meaningful():
    model, tokenizer = models.load_minilm()
    assert model.config.model_type == "bert" and model.config.num_hidden_layers == 6
    emb = models.embed_sentences(model, tokenizer, [
        "The shepherd watched over his sheep.", "A herdsman guarded the flock.",
        "Quarterly tax rates rose sharply."])
    assert emb.shape == (3, 384)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(3), atol=1e-5)
    related, unrelated = (emb[0] @ emb[1]).item(), (emb[0] @ emb[2]).item()
    assert related > unrelated + 0.2
    with pytest.raises(ValueError, match="non-empty list"):
        models.embed_sentences(model, tokenizer, "not a list")


def test_checkpoints_are_safetensors_and_small():
    files = list(MODELS_DIR.rglob("*.safetensors"))
    # the two course models, and chapter 04's two students (fp16) under models/results
    assert {f.parent.name for f in files} == {"teacher", "small", "ce", "kd"}
    assert sum(f.stat().st_size for f in files) < 70e6
