"""The course model (utils.llama) against transformers: same logits, same greedy tokens."""

import pytest
import torch

from utils.llama import CourseLlama, LlamaConfig, StaticKVCache, generate_with_cache
from utils.models import model_dir

ATOL = RTOL = 1e-4


def test_from_checkpoint_and_from_llama_match_transformers_logits(small, rng):
    ids = torch.randint(0, 4096, (2, 40), generator=rng)
    with torch.no_grad():
        ref = small(ids).logits
        for course in (CourseLlama.from_checkpoint(model_dir("small")),
                       CourseLlama.from_llama(small)):
            torch.testing.assert_close(course(ids), ref, atol=ATOL, rtol=RTOL)


def test_teacher_checkpoint_loads_and_matches():
    from utils.models import load_course_model

    teacher, _ = load_course_model("teacher")
    course = CourseLlama.from_checkpoint(model_dir("teacher"))
    ids = torch.arange(1, 33)[None]
    with torch.no_grad():
        torch.testing.assert_close(course(ids), teacher(ids).logits, atol=ATOL, rtol=RTOL)
    assert course.config == LlamaConfig.from_hf(teacher.config)


def test_static_cache_prefill_then_decode_equals_full_forward(small, rng):
    course = CourseLlama.from_llama(small)
    ids = torch.randint(0, 4096, (2, 12), generator=rng)
    cache = StaticKVCache(course.config, batch_size=2, max_length=16)
    with torch.no_grad():
        full = course(ids)
        pre = course(ids[:, :9], cache, torch.arange(9))  # prefill 9 tokens
        steps = [course(ids[:, t:t + 1], cache, torch.tensor([t])) for t in range(9, 12)]
    torch.testing.assert_close(pre, full[:, :9], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(torch.cat(steps, 1), full[:, 9:], atol=ATOL, rtol=RTOL)
    c = course.config  # K and V x layers x B x Hkv x L x D x 4 bytes
    assert cache.nbytes() == 2 * c.num_layers * 2 * c.num_kv_heads * 16 * c.head_dim * 4


def test_generate_with_cache_matches_transformers_greedy(small):
    course = CourseLlama.from_llama(small)
    prompt = torch.tensor([[5, 17, 300, 42, 9, 1000]])
    ours = generate_with_cache(course, prompt, new_tokens=10)
    theirs = small.generate(prompt, max_new_tokens=10, do_sample=False, min_new_tokens=10)
    assert torch.equal(ours, theirs)


def test_random_model_of_any_size_has_tied_weights():
    config = LlamaConfig(vocab_size=128, hidden_size=64, num_layers=2, num_heads=4,
                         num_kv_heads=2, intermediate_size=96, max_positions=32)
    model = CourseLlama.from_config(config)
    assert model.lm_head.weight is model.embed.weight
    assert model(torch.zeros(1, 5, dtype=torch.long)).shape == (1, 5, 128)
    assert model.config == config


@pytest.mark.parametrize("bad, match", [
    (dict(num_heads=5), "must divide"),
    (dict(hidden_size=0), "hidden_size must be a positive integer"),
    (dict(num_heads=64), "head_dim"),  # 64 / 64 = 1: odd, RoPE needs pairs
])
def test_config_rejects_bad_shapes_by_name(bad, match):
    args = dict(vocab_size=128, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                intermediate_size=96, max_positions=32) | bad
    with pytest.raises(ValueError, match=match):
        LlamaConfig(**args)


def test_cache_misuse_is_named(small):
    course = CourseLlama.from_llama(small)
    cache = StaticKVCache(course.config, batch_size=1, max_length=8)
    with pytest.raises(ValueError, match="positions must be"):
        course(torch.zeros(1, 3, dtype=torch.long), cache)
    with pytest.raises(ValueError, match="exceed the cache length"):
        generate_with_cache(course, torch.zeros(1, 6, dtype=torch.long), 5, cache)
