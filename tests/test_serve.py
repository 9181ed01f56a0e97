"""`depthkit serve`: continuous and depth-wise batching give each sequence exactly what decoding it
alone gives, on every tiny architecture; the HTTP API speaks OpenAI's format and errors; a real
server on the loopback address holds many concurrent streams and frees a disconnected client's row."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
import uvicorn
from fastapi.testclient import TestClient

from depthkit.data import DataSpec, token_stream
from depthkit.models.loading import GEMMA3, default_model_dir, load_model, load_tokenizer, offline_model_dir
from depthkit.models.tiny import TINY_ARCHITECTURES, tiny_model
from depthkit.recursive.generate import generate
from depthkit.recursive.model import RecursiveModel
from depthkit.recursive.relaxed import relax
from depthkit.serve.app import ServedModel, create_app
from depthkit.serve.engine import HEAD_PATIENCE, SCHEDULES, Engine, GenerationParams, Sequence
from depthkit.serve.models import eos_token_ids, load_servable
from depthkit.serve.text import TextStream

PROMPT_LENGTHS = (5, 11, 3, 9)  # longer than the tiny Gemma window (8) too
NEW_TOKENS = 5


def prompts(seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 200, (n,), generator=generator).tolist() for n in PROMPT_LENGTHS]


def serve_all(model: RecursiveModel, schedule: str, plans: list[tuple[float | None, str]] | None = None,
              rows: int = 2, head_patience: float = HEAD_PATIENCE) -> list[Sequence]:
    """Every prompt through one engine with fewer rows than prompts (rows are reused); `plans` gives
    each prompt its early exit (threshold, rule)."""
    engine = Engine(model, set(), rows=rows, capacity=64, schedule=schedule, head_patience=head_patience)
    plans = plans or [(None, "kl")] * len(PROMPT_LENGTHS)
    sequences = [engine.submit(Sequence(p, GenerationParams(max_tokens=NEW_TOKENS, temperature=0,
                                                            exit_threshold=threshold, exit_rule=rule)))
                 for p, (threshold, rule) in zip(prompts(), plans)]
    engine.run_until_idle()
    assert engine.free_rows == rows and not engine.running
    return sequences


def greedy_without_cache(base, prompt: list[int]) -> list[int]:
    """Reference: plain transformers, the whole prefix re-run for every new token."""
    ids = torch.tensor([prompt])
    for _ in range(NEW_TOKENS):
        ids = torch.cat([ids, base(ids).logits[:, -1:].argmax(-1)], dim=1)
    return ids[0, len(prompt):].tolist()


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_plain_model_batched_equals_transformers_alone(arch, one_thread):
    base = tiny_model(arch)
    expected = [greedy_without_cache(base, p) for p in prompts()]
    model = RecursiveModel.wrap(base, num_loops=1, feedback="vanilla")
    for schedule in SCHEDULES:
        assert [s.tokens for s in serve_all(model, schedule)] == expected, schedule


# Per prompt: full depth, then both exit rules at thresholds that stop early and that do not.
EXIT_PLANS = [(None, "kl"), (1e-4, "kl"), (0.1, "hidden"), (0.01, "hidden")]


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_looped_model_batched_equals_generate_alone(arch, one_thread):
    """Fixed depth and early exit by either rule (KV reuse included), prelude and coda around the loop,
    sequences at different steps in one pass, both schedules: the same tokens and loop counts as
    `generate` decoding each sequence alone."""
    model = RecursiveModel.wrap(tiny_model(arch), ends=1, num_loops=3, connector_k=2)
    alone = [generate(model, torch.tensor([p]), NEW_TOKENS, 3, threshold, exit_rule=rule)
             for p, (threshold, rule) in zip(prompts(), EXIT_PLANS)]
    assert sum(map(sum, (r.loops.steps_used for r in alone))) < 3 * sum(len(r.loops.steps_used) for r in alone)
    for schedule, rows in [(schedule, rows) for schedule in SCHEDULES for rows in (2, 3)]:
        # 3 rows: a done token waits for the head while fewer than half the rows do
        served = serve_all(model, schedule, EXIT_PLANS, rows=rows)
        assert [s.tokens for s in served] == [r.new_tokens for r in alone], (schedule, rows)
        # the prompt's first token is decoded at full depth (not counted); each later one may exit early
        assert [s.steps_used for s in served] == [r.loops.steps_used for r in alone], (schedule, rows)


def test_requests_at_different_depths_share_a_batch(one_thread):
    """Each request's own `loops` (1..R) in one batch, both schedules: each gets `generate`'s tokens at
    its depth (depth-wise rows at different steps, lockstep rows done after fewer steps)."""
    model = RecursiveModel.wrap(tiny_model("llama", num_layers=4), ends=1, num_loops=3, connector_k=2)
    depths = (1, 3, 2, 3)
    alone = [generate(model, torch.tensor([p]), NEW_TOKENS, loops).new_tokens for p, loops in zip(prompts(), depths)]
    other_depth = [generate(model, torch.tensor([p]), NEW_TOKENS, 4 - loops).new_tokens
                   for p, loops in zip(prompts(), depths)]
    assert other_depth != alone  # the depth changes the tokens: a server ignoring `loops` fails
    for schedule in SCHEDULES:
        engine = Engine(model, set(), rows=3, capacity=64, schedule=schedule)
        served = [engine.submit(Sequence(p, GenerationParams(max_tokens=NEW_TOKENS, temperature=0, loops=loops)))
                  for p, loops in zip(prompts(), depths)]
        engine.run_until_idle()
        assert [s.tokens for s in served] == alone, schedule
        assert [set(s.steps_used) for s in served] == [{loops} for loops in depths], schedule


def test_done_tokens_wait_to_share_the_lm_head(one_thread, monkeypatch):
    """The LM head costs about the same for one row as for many, so a done token waits for it: the
    more patient the rule, the fewer head calls, and always `generate`'s tokens."""
    model = RecursiveModel.wrap(tiny_model("llama", num_layers=4), ends=1, num_loops=6, feedback="vanilla")
    # done at different steps; the kl row runs the head at every step, and the rows waiting ride along
    plans = [(0.3, "hidden"), (0.05, "kl"), (0.8, "hidden"), (None, "kl")]
    alone = [generate(model, torch.tensor([p]), NEW_TOKENS, 6, threshold, exit_rule=rule).new_tokens
             for p, (threshold, rule) in zip(prompts(), plans)]
    original, calls = model.decode, []
    monkeypatch.setattr(model, "decode", lambda hidden, *args: calls.append(hidden.shape[1] == 1) or
                        original(hidden, *args))
    head_calls = {}
    for patience in (0.0, HEAD_PATIENCE, 1e9):  # 1e9: the head waits until no row is left computing
        calls.clear()
        served = serve_all(model, "depthwise", plans, rows=4, head_patience=patience)
        assert [s.tokens for s in served] == alone, patience
        assert min(served[1].steps_used) < 6 and min(served[0].steps_used) < 6  # both rules exit early
        head_calls[patience] = sum(calls)  # one query per row: the decode phase's, not the prompts'
    assert head_calls[0.0] >= head_calls[HEAD_PATIENCE] >= head_calls[1e9]
    assert head_calls[1e9] < head_calls[0.0]


def test_hidden_rule_runs_the_coda_once_per_token(one_thread, monkeypatch):
    """A `hidden`-rule exit needs no logits to decide, so the coda runs once per token, in the last
    step's cache slots (where fixed depth runs it): in `generate` after the exit, in the engine
    within the batched head call. Never once per step, which would cost a coda per pass."""
    model = RecursiveModel.wrap(tiny_model("llama", num_layers=4), ends=1, num_loops=4, feedback="vanilla")
    original, coda_steps = model.run_coda, []
    monkeypatch.setattr(model, "run_coda", lambda step, *args: coda_steps.append(step) or original(step, *args))
    alone = generate(model, torch.tensor([prompts()[0]]), NEW_TOKENS, 4, 1e9, exit_rule="hidden")  # exit at step 2
    assert alone.loops.steps_used == [2] * (NEW_TOKENS - 1)
    assert coda_steps == [3] * NEW_TOKENS  # the prompt's and each new token's, all in step 4's slots
    for schedule in SCHEDULES:
        engine = Engine(model, set(), rows=2, capacity=64, schedule=schedule)
        served = [engine.submit(Sequence(p, GenerationParams(max_tokens=NEW_TOKENS, temperature=0, exit_threshold=1e9,
                                                             exit_rule="hidden"))) for p in prompts()[:2]]
        engine.run_until_idle()
        assert served[0].tokens == alone.new_tokens, schedule
        assert engine.calls["coda"] == engine.calls["head"] < engine.calls["tokens"], schedule


def test_relaxed_model_runs_each_loop_with_its_own_adapters(one_thread):
    """Per-loop LoRA: a depth-wise pass splits rows by step, and still equals `generate` alone."""
    model = relax(tiny_model("llama", num_layers=4), 2, rank=2)
    with torch.no_grad():
        for lora in model.adapters.relax.values():
            lora.lora_B.normal_(0, 0.05)  # make the loops differ
    engine = Engine(model, set(), rows=2, capacity=64)
    assert engine.per_loop_weights
    alone = [generate(model, torch.tensor([p]), NEW_TOKENS, None, threshold, exit_rule=rule).new_tokens
             for p, (threshold, rule) in zip(prompts(), EXIT_PLANS)]
    assert [s.tokens for s in serve_all(model, "depthwise", EXIT_PLANS)] == alone


def test_depthwise_early_exit_needs_fewer_passes_than_lockstep(one_thread):
    """What depth-wise batching is for: a row freed by an early exit is refilled at once, so the same
    work takes fewer block passes than lockstep, where the row waits for the slowest token. (The head
    runs whenever a token is done: whether the timed rent-or-buy rule waits depends on the machine.)"""
    model = RecursiveModel.wrap(tiny_model("llama", num_layers=6), num_loops=4, feedback="vanilla")
    passes = {}
    for schedule in SCHEDULES:
        engine = Engine(model, set(), rows=2, capacity=64, schedule=schedule, head_patience=0)
        served = [engine.submit(Sequence(prompts()[index % len(PROMPT_LENGTHS)],
                                         GenerationParams(max_tokens=8, temperature=0, exit_threshold=threshold)))
                  for index, threshold in enumerate((1e9, None, 1e9, 1e9, None, 1e9))]  # 1e9: exit at step 2
        engine.run_until_idle()
        steps = [step for sequence in served for step in sequence.steps_used]
        assert engine.calls["tokens"] == len(steps) and {2, 4} <= set(steps)
        passes[schedule] = engine.calls["block"]
        assert passes[schedule] >= sum(steps) / 2  # at most 2 rows per pass
    assert passes["depthwise"] < passes["lockstep"]


def test_cancelled_sequence_frees_its_row(one_thread):
    model = RecursiveModel.wrap(tiny_model("llama"), num_loops=2, feedback="vanilla")
    engine = Engine(model, set(), rows=1, capacity=64)
    first = engine.submit(Sequence(prompts()[0], GenerationParams(max_tokens=40, temperature=0)))
    second = engine.submit(Sequence(prompts()[1], GenerationParams(max_tokens=3, temperature=0)))
    engine.iteration()
    first.cancel()
    engine.run_until_idle()
    assert first.finish_reason == "cancelled" and len(first.tokens) < 40
    assert second.finish_reason == "length" and len(second.tokens) == 3


def test_sampling_is_reproducible_with_a_seed(one_thread):
    model = RecursiveModel.wrap(tiny_model("llama"), num_loops=1, feedback="vanilla")
    runs = []
    for _ in range(2):
        engine = Engine(model, set(), rows=2, capacity=64)
        sequence = engine.submit(Sequence(prompts()[0], GenerationParams(max_tokens=8, temperature=1.0, top_p=0.9,
                                                                          seed=7)))
        engine.run_until_idle()
        runs.append(sequence.tokens)
    assert runs[0] == runs[1]


def test_text_stream_holds_back_stop_strings_and_split_characters():
    tokenizer = load_model("tiny:llama")[1]
    ids = tokenizer("Hello world, été. STOP here", add_special_tokens=False).input_ids
    stream = TextStream(tokenizer, ["STOP"])
    text = ""
    for token in ids:
        text += stream.push(token)
        assert "\ufffd" not in text
        if stream.stopped:
            break
    assert stream.stopped and text == "Hello world, été. "
    plain = TextStream(tokenizer, [])
    assert "".join(plain.push(t) for t in ids) + plain.finish() == "Hello world, été. STOP here"


@pytest.mark.parametrize("name", ["tiny:llama", "smollm2", "gemma3"])
def test_text_stream_gives_the_whole_decode_of_real_text(name):
    """Decoding each token in a short window (not the whole completion again) loses nothing: over
    thousands of tokens of a novel, with split multi-byte characters, the streamed pieces are the
    whole decode, on byte-level (SmolLM2) and SentencePiece-style (Gemma 3) tokenizers alike."""
    folder = {"smollm2": default_model_dir(), "gemma3": offline_model_dir(GEMMA3)}.get(name)
    tokenizer = load_model(name)[1] if folder is None else load_tokenizer(str(folder))
    odd = tokenizer("Naïve café, 東京 🙂 «quotes» , spaced . out", add_special_tokens=False).input_ids
    ids = odd + token_stream(tokenizer, DataSpec("austen:prideprejudice", "all"))[:2000].tolist() + odd
    stream = TextStream(tokenizer, [])
    pieces = [stream.push(token) for token in ids] + [stream.finish()]
    assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True)
    assert "\ufffd" not in "".join(pieces) and sum(1 for piece in pieces if piece) > len(ids) // 2


# -- the HTTP API ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_served():
    model, tokenizer = load_servable("tiny:llama", "float32")
    engine = Engine(model, eos_token_ids(model, tokenizer), rows=4, capacity=256)
    return ServedModel(engine, tokenizer, "tiny")


@pytest.fixture(scope="module")
def client(tiny_served):
    with TestClient(create_app(tiny_served)) as test_client:
        yield test_client


def test_completions_chat_and_models(client):
    models = client.get("/v1/models").json()
    assert models["data"][0]["id"] == "tiny" and client.get("/health").json()["status"] == "ok"
    body = {"model": "tiny", "prompt": "The capital of France is", "max_tokens": 6, "temperature": 0}
    result = client.post("/v1/completions", json=body).json()
    assert result["object"] == "text_completion" and result["usage"]["completion_tokens"] <= 6
    assert result["choices"][0]["finish_reason"] in ("length", "stop")
    chat = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4,
                                                     "temperature": 0}).json()
    assert chat["object"] == "chat.completion" and chat["choices"][0]["message"]["role"] == "assistant"


def test_streaming_gives_the_same_text_as_one_response(client):
    body = {"prompt": "Once upon a time", "max_tokens": 12, "temperature": 0, "seed": 1}
    whole = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    with client.stream("POST", "/v1/completions", json=body | {"stream": True}) as response:
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole
    assert chunks[-1]["choices"][0]["finish_reason"] is not None and "usage" in chunks[-1]
    # OpenAI's stream_options.include_usage: one more chunk, with no choices and the usage
    asked = body | {"stream": True, "stream_options": {"include_usage": True}}
    with client.stream("POST", "/v1/completions", json=asked) as response:
        with_usage = [json.loads(line.removeprefix("data: ")) for line in response.iter_lines()
                      if line and line != "data: [DONE]"]
    assert [c["choices"] for c in with_usage[:-1]] == [c["choices"] for c in chunks]
    assert with_usage[-1]["choices"] == [] and with_usage[-1]["usage"] == chunks[-1]["usage"]


BAD_REQUESTS = [
    ("/v1/completions", "{not json", 400, None),
    ("/v1/completions", "[1, 2]", 400, None),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, None),
    ("/v1/completions", {"prompt": "x", "max_tokens": -3}, 400, None),
    ("/v1/completions", {"prompt": "x", "max_tokens": 10**9}, 400, "context_length_exceeded"),
    ("/v1/completions", {"prompt": "word " * 400, "max_tokens": 4}, 400, "context_length_exceeded"),
    ("/v1/completions", {"prompt": "x", "model": "gpt-4"}, 404, "model_not_found"),
    ("/v1/completions", {"prompt": "x", "loops": 99}, 400, None),
    ("/v1/completions", {"prompt": "x", "loops": 0}, 400, None),
    ("/v1/completions", {"prompt": "x", "temperature": "hot"}, 400, None),
    ("/v1/completions", {"prompt": "x", "temperature": -1}, 400, None),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, 400, None),
    ("/v1/completions", {"prompt": "x", "exit_threshold": -1}, 400, None),
    ("/v1/completions", {"prompt": "x", "exit_rule": "magic"}, 400, None),
    ("/v1/completions", {"prompt": "x", "n": 2}, 400, None),
    ("/v1/completions", {"prompt": "x", "stop": 5}, 400, None),
    ("/v1/completions", {"prompt": "x", "stream": True, "stream_options": {"include_usage": "yes"}}, 400, None),
    ("/v1/completions", {"prompt": ["a", "b"]}, 400, None),
    ("/v1/completions", {}, 400, None),
    ("/v1/chat/completions", {"messages": []}, 400, None),
    ("/v1/chat/completions", {"messages": [{"content": "no role"}]}, 400, None),
    ("/v1/chat/completions", {"messages": "hello"}, 400, None),
]


@pytest.mark.parametrize(("path", "body", "status", "code"), BAD_REQUESTS)
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(client, path, body, status, code):
    content = body if isinstance(body, str) else json.dumps(body)
    response = client.post(path, content=content, headers={"content-type": "application/json"})
    assert response.status_code == status
    error = response.json()["error"]
    assert error["message"] and error["type"] == "invalid_request_error" and error["code"] == code
    ok = client.post("/v1/completions", json={"prompt": "still there?", "max_tokens": 2})
    assert ok.status_code == 200


def test_the_base_folder_of_a_looped_model_is_not_served(tmp_path):
    model = RecursiveModel.wrap(tiny_model("llama"), num_loops=2, feedback="vanilla")
    model.save_pretrained(tmp_path / "looped", load_model("tiny:llama")[1])
    served, _ = load_servable(str(tmp_path / "looped"), "float32")
    assert served.config.num_loops == 2
    with pytest.raises(Exception, match="base of the looped model"):
        load_servable(str(tmp_path / "looped" / "base"), "float32")


def test_serve_defaults_to_the_early_exit_saved_in_the_folder(tmp_path, monkeypatch, capsys):
    """`recursive train --save-exit-threshold` (save_pretrained's exit_threshold) is the server's default
    as it is transformers'; --exit-threshold and --exit-rule still win, `off` turns it off."""
    import depthkit.serve.app
    from depthkit.cli.main import main

    served = []
    monkeypatch.setattr(depthkit.serve.app, "create_app", lambda model: served.append(model) or "app")
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: None)
    model = RecursiveModel.wrap(tiny_model("llama"), num_loops=2, feedback="vanilla")
    model.save_pretrained(tmp_path / "looped", load_model("tiny:llama")[1], exit_threshold=0.25, exit_rule="hidden")
    for flags, expected in [([], (0.25, "hidden")), (["--exit-threshold", "off"], (None, "hidden")),
                            (["--exit-threshold", "0.5", "--exit-rule", "kl"], (0.5, "kl"))]:
        assert main(["serve", str(tmp_path / "looped"), "--dtype", "float32", *flags]) == 0
        assert (served[-1].default_exit_threshold, served[-1].default_exit_rule) == expected
    assert "early exit hidden < 0.25 (saved in the folder)" in capsys.readouterr().out


# -- a real server on the loopback address -----------------------------------------------------------
@pytest.fixture
def live_server(tiny_served):
    config = uvicorn.Config(create_app(tiny_served), host="127.0.0.1", port=0, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}", tiny_served.engine
    server.should_exit = True
    thread.join(timeout=30)


def stream_completion(url: str, max_tokens: int) -> tuple[int, str]:
    body = {"prompt": "Tell me a story", "max_tokens": max_tokens, "temperature": 0.8, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as response:
        lines = [line for line in response.iter_lines() if line]
    return response.status_code, lines[-1]


def test_sixty_four_concurrent_streams_and_a_disconnect_frees_its_row(live_server, monkeypatch):
    url, engine = live_server
    with ThreadPoolExecutor(64) as pool:
        results = list(pool.map(lambda _: stream_completion(url, 6), range(64)))
    assert all(status == 200 and last == "data: [DONE]" for status, last in results)
    finish, reasons = engine._finish, []
    monkeypatch.setattr(engine, "_finish", lambda sequence, reason, *args: reasons.append(reason) or
                        finish(sequence, reason, *args))
    body = {"prompt": "A long story", "max_tokens": 200, "temperature": 0.8, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as response:
        next(line for line in response.iter_lines() if line)  # one chunk, then hang up
    deadline = time.time() + 20
    while (engine.running or engine.waiting) and time.time() < deadline:
        time.sleep(0.1)
    assert not engine.running and not engine.waiting and engine.free_rows == 4
    assert reasons == ["cancelled"]  # ended because the client left, not by running to its end


@pytest.mark.integration
def test_smollm2_served_answers_the_chat_like_transformers(smollm2):
    base, tokenizer = smollm2
    model = RecursiveModel.wrap(base, num_loops=1, feedback="vanilla")
    served = ServedModel(Engine(model, eos_token_ids(model, tokenizer), rows=2, capacity=256), tokenizer, "smol")
    with TestClient(create_app(served)) as test_client:
        answer = test_client.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 16,
            "temperature": 0}).json()["choices"][0]["message"]["content"]
    assert "Paris" in answer
