"""The in-process HF engine on tiny random Qwen2.5-VL and Qwen3-VL models (fp32, CPU)."""

import contextlib

import pytest
import torch
from PIL import Image

from zoomless.engines.base import SamplingParams, conversation
from zoomless.engines.hf import HFEngine
from zoomless.models.loading import encode_conversations, vision_token_ids
from zoomless.models.tiny import build_tiny_vlm

FAMILIES = ["qwen2_5_vl", "qwen3_vl", "qwen3_5"]


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {
        f: HFEngine.from_dir(build_tiny_vlm(root / f, family=f, size="test"), dtype="float32", device="cpu", batch_size=4)
        for f in FAMILIES
    }


@pytest.fixture
def engine(engines):
    return engines["qwen2_5_vl"]


def image(w, h, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy())


A = image(64, 64, seed=1)
B = image(112, 84, seed=2)
CONVS = [
    conversation([A], "What colour is the small car?"),
    conversation([B], "How many red circles are there? Answer with the option's letter from the given choices directly."),
]


@contextlib.contextmanager
def logit_bias(model, token_ids, value):
    """Add `value` to the raw logits of `token_ids` (to make a random model prefer them)."""
    bias = torch.zeros(model.lm_head.out_features)
    bias[token_ids] = value
    handle = model.lm_head.register_forward_hook(lambda mod, inp, out: out + bias)
    try:
        yield
    finally:
        handle.remove()


def teacher_forced_logprobs(engine, conv, token_ids, temperature=1.0):
    """log p(token_ids | prompt) from one forward pass over prompt + response (what a trainer computes)."""
    inputs = encode_conversations(engine.processor, [conv])
    n = len(token_ids)
    inputs["input_ids"] = torch.cat([inputs["input_ids"], torch.tensor([token_ids])], dim=1)
    inputs["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones(1, n, dtype=torch.long)], dim=1)
    inputs["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros(1, n, dtype=torch.long)], dim=1)
    with torch.no_grad():
        logits = engine.model(**inputs).logits[0, -n - 1 : -1]
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return logp.gather(1, torch.tensor(token_ids)[:, None]).squeeze(1)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_is_deterministic_and_n_copies(engines, family):
    engine = engines[family]
    params = SamplingParams(max_new_tokens=8, n=3)
    first = engine.generate(CONVS, params)
    assert [len(gens) for gens in first] == [3, 3]
    assert all(g.token_ids == gens[0].token_ids and g.text == gens[0].text for gens in first for g in gens)
    again = engine.generate(CONVS, SamplingParams(max_new_tokens=8))
    assert [gens[0].token_ids for gens in again] == [gens[0].token_ids for gens in first]
    for gens in first:
        g = gens[0]
        if g.finish_reason == "stop":  # a random model may say eos: then it is the last token
            assert g.token_ids[-1] in engine.eos_ids and not set(g.token_ids[:-1]) & set(engine.eos_ids)
        else:
            assert g.finish_reason == "length" and len(g.token_ids) == 8
        assert g.text == engine.tokenizer.decode(g.token_ids, skip_special_tokens=True).strip()
        assert g.logprobs is None and g.error is None


@pytest.mark.parametrize("family", FAMILIES)
def test_mixed_image_sizes_in_one_batch_match_single_runs(engines, family):
    engine = engines[family]
    params = SamplingParams(max_new_tokens=10, logprobs=True)
    batched = [gens[0] for gens in engine.generate(CONVS, params)]
    alone = [engine.generate([c], params)[0][0] for c in CONVS]
    assert [g.token_ids for g in batched] == [g.token_ids for g in alone]
    for b, a in zip(batched, alone):
        assert torch.allclose(torch.tensor(b.logprobs), torch.tensor(a.logprobs), atol=1e-4)
    # The whole first-step distribution agrees too (left padding and multimodal positions are right).
    proc, model = engine.processor, engine.model
    with torch.no_grad():
        batch_logits = model(**encode_conversations(proc, CONVS)).logits[:, -1]
        for row, conv in enumerate(CONVS):
            single = model(**encode_conversations(proc, [conv])).logits[0, -1]
            assert torch.allclose(batch_logits[row], single, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_static_cache_gives_the_same_samples(engines, family):
    """A preallocated KV cache (what `rollout_cache: static` asks for) decodes exactly what the
    dynamic one does: greedy and seeded samples, and their log-probs, with left-padded prompts
    of different lengths in one batch."""
    dynamic = engines[family]
    static = HFEngine(dynamic.model, dynamic.processor, batch_size=4, cache_implementation="static", compile=False)
    for params in (SamplingParams(max_new_tokens=10, logprobs=True),
                   SamplingParams(max_new_tokens=10, n=2, temperature=1.0, seed=3, logprobs=True)):
        a, b = dynamic.generate(CONVS, params), static.generate(CONVS, params)
        assert [[g.token_ids for g in gens] for gens in a] == [[g.token_ids for g in gens] for gens in b]
        for ga, gb in zip([g for gens in a for g in gens], [g for gens in b for g in gens]):
            assert torch.allclose(torch.tensor(ga.logprobs), torch.tensor(gb.logprobs), atol=1e-5)


def test_seeded_sampling_is_deterministic_and_leaves_global_rng_alone(engine):
    params = SamplingParams(max_new_tokens=8, temperature=1.0, n=2, seed=7)
    state = torch.get_rng_state()
    first = engine.generate(CONVS, params)
    assert torch.equal(torch.get_rng_state(), state)
    second = engine.generate(CONVS, params)
    assert [[g.token_ids for g in gens] for gens in first] == [[g.token_ids for g in gens] for gens in second]
    assert first[0][0].token_ids != first[0][1].token_ids  # the n samples are different draws
    other = engine.generate(CONVS, SamplingParams(max_new_tokens=8, temperature=1.0, n=2, seed=8))
    assert [[g.text for g in gens] for gens in other] != [[g.text for g in gens] for gens in first]


def test_n_samples_shape_across_batches(engine):
    convs = [conversation([image(40 + 8 * i, 48, seed=i)], f"question {i}") for i in range(3)]
    results = engine.generate(convs, SamplingParams(max_new_tokens=4, temperature=1.0, n=3, seed=0))
    assert [len(gens) for gens in results] == [3, 3, 3]  # 9 rows in batches of 4
    assert all(len(g.token_ids) == 4 for gens in results for g in gens)
    assert engine.generate([], SamplingParams()) == []


@pytest.mark.parametrize("family", FAMILIES)
def test_vision_tokens_are_never_generated(engines, family):
    engine = engines[family]
    vision = vision_token_ids(engine.processor)
    with logit_bias(engine.model, vision, 30.0):
        with torch.no_grad():  # the biased model prefers a vision token...
            logits = engine.model(**encode_conversations(engine.processor, CONVS[:1])).logits[0, -1]
        assert int(logits.argmax()) in vision
        for params in (SamplingParams(max_new_tokens=6), SamplingParams(max_new_tokens=6, temperature=1.0, n=4, seed=0)):
            for gens in engine.generate(CONVS, params):  # ...but never emits one
                for g in gens:
                    assert len(g.token_ids) == 6 and not set(g.token_ids) & set(vision)


def test_ids_past_the_tokenizer_are_never_generated(engine):
    padding_ids = list(range(len(engine.tokenizer), engine.model.lm_head.out_features))
    assert len(padding_ids) == 48  # the test model's 2000 tokens, logits rounded up to 2048
    with logit_bias(engine.model, padding_ids, 30.0):
        gens = engine.generate(CONVS, SamplingParams(max_new_tokens=4, temperature=1.0, seed=0))
    assert all(t < len(engine.tokenizer) for (g,) in gens for t in g.token_ids)


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_logprobs_match_a_teacher_forced_forward(engine, temperature):
    params = SamplingParams(max_new_tokens=6, temperature=temperature, top_p=0.9, n=2, seed=3, logprobs=True)
    for conv, gens in zip(CONVS, engine.generate(CONVS, params)):
        for g in gens:
            assert len(g.logprobs) == len(g.token_ids) == 6
            assert all(lp <= 0 for lp in g.logprobs)
            expected = teacher_forced_logprobs(engine, conv, g.token_ids, temperature or 1.0)
            assert torch.allclose(torch.tensor(g.logprobs), expected, atol=1e-4)


def test_eos_stops_and_is_kept_in_token_ids(engine):
    im_end = engine.tokenizer.convert_tokens_to_ids("<|im_end|>")
    with logit_bias(engine.model, [im_end], 30.0):
        gens = engine.generate(CONVS, SamplingParams(max_new_tokens=5, logprobs=True))
    for (g,) in gens:
        assert g.token_ids == [im_end] and g.finish_reason == "stop" and g.text == ""
        assert len(g.logprobs) == 1 and g.logprobs[0] > -1e-3


def test_eos_mid_batch_cuts_padding(engine):
    """A row that stops early gets padding after eos inside generate; token_ids must not include it."""
    im_end = engine.tokenizer.convert_tokens_to_ids("<|im_end|>")
    free = engine.generate(CONVS[:1], SamplingParams(max_new_tokens=6))[0][0].token_ids
    step = {"n": 0}

    def force_eos_at_step_3_for_row_0(mod, inp, out):
        step["n"] += 1
        if step["n"] == 4:  # prefill is call 1, so this is the 4th generated token
            out = out.clone()
            out[0, -1, im_end] += 100.0
        return out

    handle = engine.model.lm_head.register_forward_hook(force_eos_at_step_3_for_row_0)
    try:
        g0, g1 = (gens[0] for gens in engine.generate(CONVS, SamplingParams(max_new_tokens=6)))
    finally:
        handle.remove()
    assert g0.token_ids == free[:3] + [im_end] and g0.finish_reason == "stop"
    assert len(g1.token_ids) == 6 and g1.finish_reason == "length"


def test_bad_conversation_becomes_an_error_generation(engine):
    bad = [{"role": "user", "content": [{"type": "image", "image": None}, {"type": "text", "text": "x"}]}]
    results = engine.generate([CONVS[0], bad], SamplingParams(max_new_tokens=3))
    assert results[0][0].error is None and len(results[0][0].token_ids) == 3
    assert results[1][0].finish_reason == "error" and "image item" in results[1][0].error and results[1][0].text == ""


@pytest.mark.parametrize(
    "bad, field",
    [(dict(n=0), "n"), (dict(max_new_tokens=0), "max_new_tokens"), (dict(temperature=-1.0), "temperature"),
     (dict(temperature=1.0, top_p=0.0), "top_p")],
)
def test_bad_params_raise(engine, bad, field):
    with pytest.raises(ValueError, match=f"SamplingParams.{field} "):
        engine.generate(CONVS, SamplingParams(**bad))


def test_text_only_conversation_and_stats(engine):
    before = dict(engine.stats)
    (gens,) = engine.generate([[{"role": "user", "content": "Say hi."}]], SamplingParams(max_new_tokens=3))
    assert len(gens[0].token_ids) == 3
    assert engine.stats["prompts"] == before["prompts"] + 1
    assert engine.stats["generated_tokens"] == before["generated_tokens"] + 3
    assert engine.stats["seconds"] > before["seconds"] and engine.last_call_seconds > 0
