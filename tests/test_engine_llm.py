"""nrt.LLM on the CPU backend: generate, stream, stop rules, limits, defaults, the runner protocol."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers")

from helpers_hf import EOS_ID, checkpoint, copy_checkpoint, hf_greedy, load_hf  # noqa: E402

import nexusrt as nrt  # noqa: E402
from nexusrt.backends.base import ModelRunner, generate_tokens  # noqa: E402
from nexusrt.errors import BackendUnavailable  # noqa: E402
from nexusrt.models.loader import GenerationDefaults  # noqa: E402
from nexusrt.reference.sampling import SamplingParams  # noqa: E402

PROMPT = "Once upon a time, a small model"


@pytest.fixture
def llm(cpu_rt):
    with nrt.LLM(checkpoint("mistral"), backend="cpu") as model:
        yield model


def test_generate_matches_hf_and_reports(llm):
    r = llm.generate(PROMPT, max_new_tokens=32, temperature=0)
    ids = llm.tokenizer.encode(PROMPT)
    ref, _ = hf_greedy(load_hf(checkpoint("mistral")), ids, 32)
    assert r.token_ids == ref[:len(r.token_ids)]
    assert (r.finish_reason, len(r.token_ids)) == ("length", 32) or r.token_ids[-1] == EOS_ID
    assert r.prompt_tokens == len(ids)
    assert r.text == llm.tokenizer.decode(r.token_ids) and r.text
    assert r.ttft_s > 0 and r.tokens_per_s > 0 and r.timings["total_s"] >= r.ttft_s
    assert set(r.to_dict()) >= {"text", "token_ids", "prompt_tokens", "ttft_s", "tokens_per_s"}


def test_list_in_list_out_and_stream_equals_generate(llm):
    prompts = [PROMPT, "The quick brown fox"]
    results = llm.generate(prompts, max_new_tokens=12, temperature=0)
    assert isinstance(results, list) and len(results) == 2
    assert results[1].token_ids == llm.generate(prompts[1], max_new_tokens=12, temperature=0).token_ids
    pieces = list(llm.stream(prompts[0], max_new_tokens=12, temperature=0))
    assert len([p for p in pieces if p]) > 1
    assert "".join(pieces) == results[0].text
    assert llm.last_result.token_ids == results[0].token_ids


def test_seeded_sampling_is_reproducible(llm):
    kw = dict(max_new_tokens=16, temperature=1.0, top_k=50, top_p=0.95)
    a = llm.generate(PROMPT, seed=7, **kw)
    assert a.seed == 7 and a.token_ids == llm.generate(PROMPT, seed=7, **kw).token_ids
    assert "".join(llm.stream(PROMPT, seed=7, **kw)) == a.text
    others = [llm.generate(PROMPT, seed=s, **kw).token_ids for s in (8, 9, 10)]
    assert any(o != a.token_ids for o in others)
    assert llm.generate(PROMPT, **kw).seed is not None  # a random seed is chosen and reported


def test_stop_strings(llm):
    full = llm.generate(PROMPT, max_new_tokens=32, temperature=0)
    text = full.text
    stop = text[len(text) // 2: len(text) // 2 + 2]
    cut = text.find(stop)
    r = llm.generate(PROMPT, max_new_tokens=32, temperature=0, stop=["never-appears", stop])
    assert (r.text, r.finish_reason) == (text[:cut], "stop")
    assert r.token_ids == full.token_ids[:len(r.token_ids)] and len(r.token_ids) < len(full.token_ids)
    assert llm.tokenizer.decode(r.token_ids).find(stop) >= 0  # the last id completed the stop string
    pieces = list(llm.stream(PROMPT, max_new_tokens=32, temperature=0, stop=stop))
    assert "".join(pieces) == text[:cut]


def test_eos_from_generation_config(llm):
    full = llm.generate(PROMPT, max_new_tokens=20, temperature=0).token_ids
    eos = full[6]
    llm.model.generation.eos_token_ids = (eos,)
    r = llm.generate(PROMPT, max_new_tokens=20, temperature=0)
    k = full.index(eos)
    assert r.token_ids == full[:k + 1] and r.finish_reason == "eos"
    assert r.text == llm.tokenizer.decode(full[:k])


def test_context_limits(cpu_rt):
    llm = nrt.LLM(checkpoint("qwen2"), backend="cpu", max_context=12)
    with pytest.raises(ValueError, match=r"prompt is \d\d tokens but the context holds 12 \(max_position_embeddings in .*config.json"):
        llm.generate("The quick brown fox jumps over the lazy dog again and again")
    prompt_len = len(llm.tokenizer.encode("The quick"))
    r = llm.generate("The quick", max_new_tokens=50, temperature=0)
    assert len(r.token_ids) == 12 - prompt_len + 1 and r.finish_reason == "context"
    with pytest.raises(ValueError, match="max_context must be a positive integer"):
        nrt.LLM(checkpoint("qwen2"), backend="cpu", max_context=0)


def test_bad_arguments(llm):
    with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 1"):
        llm.generate(PROMPT, max_new_tokens=0)
    with pytest.raises(ValueError, match="^temperature must"):
        llm.generate(PROMPT, temperature=-1)
    with pytest.raises(ValueError, match="^top_p must"):
        llm.generate(PROMPT, top_p=0)
    with pytest.raises(TypeError, match="prompt must be a string"):
        llm.generate(42)
    with pytest.raises(ValueError, match="backend must be one of"):
        nrt.LLM("synthetic:tiny", backend="tpu")


def test_chat_prompt(llm):
    r = llm.generate("Count to three.", max_new_tokens=4, temperature=0, chat=True)
    expected = llm.tokenizer.encode_chat([{"role": "user", "content": "Count to three."}])
    assert r.prompt_tokens == len(expected) == len(llm.tokenizer.encode(llm.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Count to three."}]), add_special_tokens=False))


class _CountingRunner:
    """A runner that counts the engine's calls of ``generate_tokens`` and passes them on."""

    def __init__(self, inner):
        self.inner, self.calls = inner, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def generate_tokens(self, prompt_ids, max_new_tokens, params, on_token):
        self.calls += 1
        return self.inner.generate_tokens(prompt_ids, max_new_tokens, params, on_token)


def test_the_cpu_runner_implements_the_protocol_with_the_reference_loop(llm):
    assert isinstance(llm.runner, ModelRunner)
    ids = llm.tokenizer.encode(PROMPT)
    ours, ref = [], []
    params = SamplingParams(temperature=0.8, top_p=0.9, seed=3)
    assert llm.runner.generate_tokens(ids, 12, params, lambda t: ours.append(t) or False) == 12
    assert generate_tokens(llm.runner, ids, 12, params, lambda t: ref.append(t) or False) == 12
    assert ours == ref


def test_generate_and_stream_go_through_the_runners_generate_tokens(llm):
    ref = llm.generate(PROMPT, max_new_tokens=16, temperature=0)
    stop = ref.text[4:6]
    ref_stop = llm.generate(PROMPT, max_new_tokens=16, temperature=0, stop=stop)
    llm.runner = fast = _CountingRunner(llm.runner)
    assert llm.generate(PROMPT, max_new_tokens=16, temperature=0).token_ids == ref.token_ids
    assert "".join(llm.stream(PROMPT, max_new_tokens=16, temperature=0)) == ref.text
    assert "".join(llm.stream(PROMPT, max_new_tokens=16, temperature=0, stop=stop)) == ref_stop.text
    assert llm.last_result.token_ids == ref_stop.token_ids
    assert fast.calls == 3


def test_synthetic_tiny(cpu_rt):
    llm = nrt.LLM("synthetic:tiny", backend="cpu")
    r = llm.generate("hello", max_new_tokens=20, temperature=0.8, seed=1)
    assert len(r.token_ids) == 20 and r.finish_reason == "length" and r.prompt_tokens == 6
    assert r.token_ids == llm.generate("hello", max_new_tokens=20, temperature=0.8, seed=1).token_ids
    llm.close()
    llm.close()  # twice is fine


def test_cuda_backend_on_a_cpu_runtime_is_a_clear_error(cpu_rt):
    with pytest.raises(BackendUnavailable, match="backend='cuda' needs the runtime booted on CUDA.*use backend='cpu'"):
        nrt.LLM("synthetic:tiny", backend="cuda")


def test_generation_defaults(tmp_path):
    f = tmp_path / "generation_config.json"
    f.write_text(json.dumps({"do_sample": True, "temperature": 0.6, "top_p": 0.9, "eos_token_id": [5, 6]}))
    d = GenerationDefaults.from_file(f, fallback_eos=(1,))
    assert (d.eos_token_ids, d.temperature, d.top_k, d.top_p) == ((5, 6), 0.6, 0, 0.9)
    f.write_text(json.dumps({"temperature": 0.6, "eos_token_id": 3}))
    assert GenerationDefaults.from_file(f, (1,)) == GenerationDefaults(eos_token_ids=(3,))
    assert GenerationDefaults.from_file(tmp_path / "absent.json", (1,)).eos_token_ids == (1,)


def test_sampling_defaults_come_from_generation_config(tmp_path, cpu_rt):
    path = copy_checkpoint("qwen3", tmp_path / "m")
    (path / "generation_config.json").write_text(json.dumps({"do_sample": True, "temperature": 5.0, "top_k": 0}))
    llm = nrt.LLM(path, backend="cpu")
    runs = {tuple(llm.generate(PROMPT, max_new_tokens=8, seed=s).token_ids) for s in range(4)}
    assert len(runs) > 1  # sampled, although no temperature was passed
    greedy = {tuple(llm.generate(PROMPT, max_new_tokens=8, seed=s, temperature=0).token_ids) for s in range(2)}
    assert len(greedy) == 1
