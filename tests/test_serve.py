"""``tunesmith serve``: the official openai client against a live server on loopback.

Three LoRA adapters, a bottleneck and a DoRA adapter on one tiny Llama (each
taught its own reply), two LoRA classifiers on the tiny BERT and a fully fine-tuned NER
model, all served by one process.
"""

from __future__ import annotations

import json
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from helpers import CONTRACT_TRAIN, contract_config, task_data
from serve_fixtures import live_server, train_chat_adapters, train_classifiers
from tunesmith.api import predict, train
from tunesmith.config.root import Config
from tunesmith.serve.app import ServeSettings, create_app
from tunesmith.serve.catalog import Catalog

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

KEY = "test-key"
QUESTION = "What is your name? 3"
CHAT = ["bot", "home", "joke", "neck", "dora"]
PREFIX = {"name": "prefix", "num_virtual_tokens": 4}


@pytest.fixture(scope="module")
def checkpoints(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("serve")
    out = train_chat_adapters(tmp / "chat")
    from serve_fixtures import CLASSIFIERS

    kinds = {**CLASSIFIERS, "ia3": ("two", {"name": "ia3"}), "prefix": ("three", PREFIX)}
    out.update(train_classifiers(tiny_bert, tmp / "cls", runs=kinds))
    ner = task_data("token_classification", tmp / "ner")
    cfg = contract_config(ner, tmp / "ner-run", train={**CONTRACT_TRAIN, "max_steps": 6})
    result = train(Config.from_dict(cfg), progress=False)
    out["ner"] = result.best_dir or result.final_dir
    return out


@pytest.fixture(scope="module")
def library(checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A library folder holding copies of the chat adapters (for the admin route)."""
    lib = tmp_path_factory.mktemp("library")
    for name in CHAT:
        shutil.copytree(checkpoints[name], lib / name)
    return lib


@pytest.fixture(scope="module")
def catalog(checkpoints: dict[str, Path], library: Path) -> Catalog:
    cat = Catalog(library)
    for name, folder in checkpoints.items():
        cat.add(name, folder)
    return cat


@pytest.fixture(scope="module")
def url(catalog: Catalog) -> Any:
    settings = ServeSettings(api_key=KEY, max_tokens=100, max_body_bytes=20_000, max_wait_ms=20)
    with live_server(create_app(catalog, settings)) as base:
        yield base


@pytest.fixture(scope="module")
def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def greedy(checkpoints: dict[str, Path]) -> dict[str, str]:
    """What ``tunesmith predict`` answers QUESTION with, per chat adapter."""
    return {
        name: predict(checkpoints[name], [QUESTION], generate={"max_new_tokens": 8})[0]["generated"]
        for name in CHAT
    }


def ask(client: openai.OpenAI, model: str, text: str = QUESTION, **kw: Any) -> Any:
    settings = {"temperature": 0, "max_tokens": 8, **kw}
    return client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": text}], **settings
    )


# -- the openai client ----------------------------------------------------------------------
def test_greedy_chat_equals_predict_and_adapters_answer_differently(client, greedy, catalog):
    answers = {}
    for name in CHAT:
        reply = ask(client, name)
        answers[name] = reply.choices[0].message.content
        assert answers[name] == greedy[name], name
        assert reply.model == name and reply.object == "chat.completion"
        assert reply.choices[0].finish_reason in ("stop", "length")
        assert reply.usage.completion_tokens >= 1
        assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert len(set(answers.values())) >= 4, answers  # the adapters are really applied
    trees = {name: catalog.get(name).tree for name in CHAT}
    assert trees["bot"] is trees["home"] is trees["joke"] and trees["bot"].mixed
    assert len({id(t) for t in trees.values()}) == 3  # LoRA's, the bottleneck's, DoRA's


def test_streamed_chat_joins_to_the_whole_answer(client):
    for stop in (None, ["ck", " a"]):
        whole = ask(client, "joke", "Tell me a joke. 7", stop=stop, max_tokens=12)
        stream = ask(
            client,
            "joke",
            "Tell me a joke. 7",
            stop=stop,
            max_tokens=12,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == whole.choices[0].message.content
        finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
        assert finishes[-1] == whole.choices[0].finish_reason and finishes.count(None) >= 2
        assert chunks[0].choices[0].delta.role == "assistant"
        assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_n_completions_follow_the_seed(client):
    first = ask(client, "home", n=3, temperature=1.0, seed=11, max_tokens=6)
    again = ask(client, "home", n=3, temperature=1.0, seed=11, max_tokens=6)
    texts = [c.message.content for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert texts == [c.message.content for c in again.choices]
    assert len(set(texts)) > 1  # three samples, not one repeated
    assert first.usage.completion_tokens >= 3


def test_text_completions_take_several_prompts(client, catalog):
    tok = catalog.get("bot").tokenizer
    prompts = ["hello world", "the quick brown"]
    out = client.completions.create(model="bot", prompt=prompts, max_tokens=5, temperature=0, n=2)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    assert out.choices[0].text == out.choices[1].text  # greedy: both rows equal
    assert out.usage.prompt_tokens == sum(len(tok(p)["input_ids"]) for p in prompts)
    streamed = client.completions.create(
        model="bot", prompt=prompts[1], max_tokens=5, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices) == out.choices[2].text


def test_models_lists_every_id(client):
    listed = {m.id: m for m in client.models.list()}
    assert set(listed) == {*CHAT, "sentiment", "three", "ia3", "prefix", "ner"}
    assert listed["three"].model_extra["labels"] == ["meh", "neg!", "pos!"]
    assert listed["neck"].model_extra["method"] == "bottleneck"


# -- batching -------------------------------------------------------------------------------
def test_32_concurrent_clients_get_their_adapters_answers(url, greedy):
    names = ["bot", "home", "joke"]

    def one(i: int) -> tuple[str, str]:
        c = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
        name = names[i % 3]
        return name, ask(c, name).choices[0].message.content

    before = httpx.get(f"{url}/metrics", headers=_auth()).json()["batches"]["rounds"]
    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(one, range(32)))
    for name, text in answers:
        assert text == greedy[name], name
    after = httpx.get(f"{url}/metrics", headers=_auth()).json()
    assert after["batches"]["rounds"] - before < 32  # requests shared batches
    assert max(int(k) for k in after["batches"]["rows"]) > 1


def test_a_mixed_batch_gives_each_request_its_alone_output(catalog, greedy):
    """Three LoRA adapters in one forward, bottleneck and DoRA in their sub-batches, one round."""
    from tunesmith.models.completions import GenerationRequest
    from tunesmith.serve.metrics import Metrics
    from tunesmith.serve.scheduler import GenerateJob, Scheduler

    lora = catalog.get("bot").tree
    seen: list[Any] = []
    forward = lora.model.forward

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.append(kwargs.get("adapter_names"))
        return forward(*args, **kwargs)

    metrics = Metrics()
    scheduler = Scheduler(metrics, max_batch=len(CHAT), max_wait_s=5.0)
    prompt = catalog.get("bot").task.encode(
        [{"messages": [{"role": "user", "content": QUESTION}]}], catalog.get("bot").tokenizer, None
    )[0]["input_ids"]
    jobs = []
    for name in CHAT:
        served = catalog.get(name)
        request = GenerationRequest(prompt, max_new_tokens=8, adapter=served.adapter)
        jobs.append(GenerateJob(served, request))
    lora.model.forward = spy
    try:
        for job in jobs:
            scheduler.submit(job)
        scheduler.start()
        results = [job.future.result(timeout=60) for job in jobs]
    finally:
        scheduler.stop()
        lora.model.forward = forward
    assert metrics.rounds == 1 and metrics.batch_rows == {len(CHAT): 1}
    for name, result in zip(CHAT, results, strict=True):
        assert result.completions[0].text == greedy[name], name
    assert seen and seen[0] == ["bot", "home", "joke"]  # one forward, three adapters


def test_a_failing_request_fails_alone(catalog, greedy):
    from tunesmith.models.completions import GenerationRequest
    from tunesmith.serve.metrics import Metrics
    from tunesmith.serve.scheduler import GenerateJob, Scheduler

    served = catalog.get("bot")
    prompt = served.task.encode(
        [{"messages": [{"role": "user", "content": QUESTION}]}], served.tokenizer, None
    )[0]["input_ids"]
    good = GenerateJob(served, GenerationRequest(prompt, max_new_tokens=8, adapter="bot"))
    # Past the model's 128 positions: refused by the generator, after the HTTP checks.
    bad = GenerateJob(served, GenerationRequest(prompt, max_new_tokens=500, adapter="bot"))
    scheduler = Scheduler(Metrics(), max_batch=2, max_wait_s=5.0)
    scheduler.submit(bad)
    scheduler.submit(good)
    scheduler.start()
    try:
        assert good.future.result(timeout=60).completions[0].text == greedy["bot"]
        with pytest.raises(Exception, match="exceeds the model's 128 positions"):
            bad.future.result(timeout=60)
    finally:
        scheduler.stop()


def test_a_round_waits_only_for_announced_requests(catalog):
    from tunesmith.models.completions import GenerationRequest
    from tunesmith.serve.metrics import Metrics
    from tunesmith.serve.scheduler import GenerateJob, Scheduler

    served = catalog.get("bot")

    def job() -> GenerateJob:
        return GenerateJob(served, GenerationRequest([5, 6, 7], max_new_tokens=2, adapter="bot"))

    metrics = Metrics()
    scheduler = Scheduler(metrics, max_batch=8, max_wait_s=60.0)
    scheduler.start()
    try:
        lone = scheduler.submit(job())
        lone.result(timeout=20)  # nobody else was coming: no 60 s wait
        scheduler.arrive()  # a request is being received
        first = scheduler.submit(job())
        time.sleep(0.3)
        scheduler.arrive(-1)
        second = scheduler.submit(job())
        first.result(timeout=20), second.result(timeout=20)
    finally:
        scheduler.stop()
    assert metrics.batch_rows == {1: 1, 2: 1}  # the announced one joined the round


# -- classifiers -----------------------------------------------------------------------------
def test_classify_returns_what_predict_returns(url, checkpoints):
    texts = ["the movie was great", "a dull plot", "it was fun"]
    for name in ("sentiment", "three", "ia3", "prefix"):  # shared LoRA tree, own trees
        got = _post(url, "/v1/classify", {"model": name, "input": texts})
        assert got.status_code == 200, got.text
        want = predict(checkpoints[name], texts)
        for row, expected in zip(got.json()["data"], want, strict=True):
            assert row["label"] == expected["label"]
            for label, p in expected["probabilities"].items():
                assert row["probabilities"][label] == pytest.approx(p, abs=1e-5)
    ner = _post(url, "/v1/classify", {"model": "ner", "input": "alice lives in paris ."})
    want = predict(checkpoints["ner"], ["alice lives in paris ."])[0]["entities"]
    assert ner.json()["data"][0]["entities"] == want


def test_drift_statistics_compare_served_inputs_with_training(url):
    for _ in range(3):
        _post(url, "/v1/classify", {"model": "sentiment", "input": ["a dull plot"] * 5})
    stats = httpx.get(f"{url}/metrics", headers=_auth()).json()["models"]["sentiment"]
    drift = stats["drift"]
    assert set(drift["train_label_shares"]) == {"neg", "pos"}
    assert drift["window"] >= 15 and drift["labels_psi"] is not None
    assert drift["input_tokens_psi"] > 0.25  # one short text repeated: far from training
    assert drift["train_input_tokens_mean"] > drift["input_tokens_mean"]
    text = httpx.get(f"{url}/metrics?format=prometheus", headers=_auth()).text
    assert 'tunesmith_drift_input_tokens_psi{model="sentiment"}' in text
    assert 'tunesmith_requests_total{model="sentiment"}' in text


# -- refusals --------------------------------------------------------------------------------
def _auth(key: str = KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _post(url: str, path: str, body: Any, key: str = KEY, raw: bytes | None = None) -> Any:
    content = raw if raw is not None else json.dumps(body).encode()
    headers = {**_auth(key), "Content-Type": "application/json"}
    return httpx.post(f"{url}{path}", content=content, headers=headers, timeout=60)


CHAT_BODY = {"model": "bot", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


@pytest.mark.parametrize(
    ("body", "status", "fragment", "param"),
    [
        (b"{not json", 400, "not valid JSON", None),
        (b"[1, 2]", 400, "JSON object", None),
        ({**CHAT_BODY, "model": "nope"}, 404, "not served", "model"),
        ({**CHAT_BODY, "temperature": -1}, 400, "temperature", "temperature"),
        ({**CHAT_BODY, "top_p": 0}, 400, "top_p", "top_p"),
        ({**CHAT_BODY, "max_tokens": 10_000}, 400, "limit of 100", "max_tokens"),
        ({**CHAT_BODY, "n": 50}, 400, "at most 8", "n"),
        ({**CHAT_BODY, "frequency_penalty": 1}, 400, "frequency_penalty", None),
        ({**CHAT_BODY, "messages": []}, 400, "messages", "messages"),
        ({**CHAT_BODY, "messages": [{"role": "wizard", "content": "x"}]}, 400, "role", None),
        (
            {**CHAT_BODY, "messages": [{"role": "assistant", "content": "x"}]},
            400,
            "last message",
            "messages",
        ),
        ({**CHAT_BODY, "stop": ["a", "b", "c", "d", "e"]}, 400, "at most 4", "stop"),
        ({**CHAT_BODY, "model": "sentiment"}, 400, "/v1/classify", "model"),
        (
            {**CHAT_BODY, "messages": [{"role": "user", "content": "x " * 12000}]},
            413,
            "limit",
            None,
        ),
        (
            {
                **CHAT_BODY,
                "max_tokens": 100,
                "messages": [{"role": "user", "content": "joke " * 80}],
            },
            400,
            "positions",
            None,
        ),
    ],
)
def test_bad_requests_get_an_error_object_and_the_server_goes_on(
    url, client, body, status, fragment, param
):
    raw = body if isinstance(body, bytes) else None
    got = _post(url, "/v1/chat/completions", body, raw=raw)
    assert got.status_code == status, got.text
    error = got.json()["error"]
    assert fragment in error["message"] and "Traceback" not in got.text
    assert error["param"] == param or param is None
    assert ask(client, "bot").choices[0].message.content  # still serving


def test_refusals_through_the_official_client(url, client):
    with pytest.raises(openai.AuthenticationError):
        ask(openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0), "bot")
    with pytest.raises(openai.NotFoundError, match="not served"):
        ask(client, "missing")
    with pytest.raises(openai.BadRequestError, match="temperature"):
        ask(client, "bot", temperature=5)
    assert httpx.get(f"{url}/v1/models").status_code == 401  # no key
    assert httpx.get(f"{url}/health").status_code == 200  # open
    other = _post(url, "/v1/classify", {"model": "bot", "input": ["x"]})
    assert other.status_code == 400 and "does not classify" in other.json()["error"]["message"]
    assert httpx.get(f"{url}/nowhere", headers=_auth()).json()["error"]["type"] == "not_found_error"


def test_a_chunked_body_over_the_limit_is_refused_while_read(url, client):
    def body():
        yield b'{"model": "bot", "messages": [{"role": "user", "content": "'
        for _ in range(40):
            yield b"x" * 1000
        yield b'"}]}'

    got = httpx.post(f"{url}/v1/chat/completions", content=body(), headers=_auth())
    assert got.status_code == 413 and "limit" in got.json()["error"]["message"]
    assert ask(client, "bot").choices[0].message.content


def test_too_many_requests_in_flight_are_refused_with_429(catalog):
    settings = ServeSettings(api_key=None, max_concurrent=0)
    with live_server(create_app(catalog, settings)) as base:
        got = httpx.post(f"{base}/v1/chat/completions", json=CHAT_BODY)
        assert got.status_code == 429 and got.json()["error"]["code"] == "rate_limit_exceeded"
        assert httpx.get(f"{base}/health").status_code == 200


# -- admin -----------------------------------------------------------------------------------
def test_admin_loads_and_unloads_models_from_the_library_only(
    url, client, greedy, catalog, library
):
    load = _post(url, "/admin/models", {"model": "joke2", "path": "joke"})
    assert load.status_code == 200, load.text
    assert ask(client, "joke2").choices[0].message.content == greedy["joke"]
    assert catalog.get("joke2").tree is catalog.get("bot").tree  # joined the LoRA batch
    assert _post(url, "/admin/models", {"model": "joke2", "path": "joke"}).status_code == 409
    for path, why in (("../", "inside"), ("/etc", "inside"), ("nothing-here", "checkpoint")):
        bad = _post(url, "/admin/models", {"model": "x", "path": path})
        assert bad.status_code == 400 and why in bad.json()["error"]["message"], bad.text
    pickled = library / "pickled"
    shutil.copytree(library / "bot", pickled)
    (pickled / "adapter_model.safetensors").rename(pickled / "adapter_model.bin")
    bad = _post(url, "/admin/models", {"model": "x", "path": "pickled"})
    assert bad.status_code == 400 and "safetensors" in bad.json()["error"]["message"], bad.text
    assert (
        _post(url, "/admin/models", {"model": "y", "path": "bot"}, key="wrong").status_code == 401
    )
    gone = httpx.delete(f"{url}/admin/models/joke2", headers=_auth())
    assert gone.status_code == 200 and "joke2" not in {m.id for m in client.models.list()}
    assert ask(client, "joke").choices[0].message.content == greedy["joke"]  # others unharmed
    assert httpx.delete(f"{url}/admin/models/joke2", headers=_auth()).status_code == 404


def test_admin_routes_are_off_without_an_api_key(catalog):
    with live_server(create_app(catalog, ServeSettings(api_key=None))) as base:
        got = httpx.post(f"{base}/admin/models", json={"model": "z", "path": "bot"})
        assert got.status_code == 403 and "--api-key" in got.json()["error"]["message"]


def test_adapters_share_the_base_weights(catalog):
    lora, neck = catalog.get("bot").tree.model, catalog.get("neck").tree.model
    embed = lora.get_base_model().model.embed_tokens.weight
    assert neck.model.embed_tokens.weight is embed
    q_lora = lora.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight
    assert q_lora is neck.model.layers[0].self_attn.q_proj.weight
    assert catalog.get("home").tokenizer is catalog.get("neck").tokenizer  # loaded once
    assert catalog.get("sentiment").tokenizer is not catalog.get("bot").tokenizer


# -- the command ----------------------------------------------------------------------------
def test_the_serve_command_answers_the_openai_client(checkpoints, greedy):
    import os
    import subprocess
    import sys

    from serve_fixtures import free_port

    port = free_port()
    env = {**os.environ, "TUNESMITH_API_KEY": KEY, "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "tunesmith", "serve", str(checkpoints["bot"])]
    command += [f"joker={checkpoints['joke']}", "--port", str(port)]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, proc.stdout.read().decode()  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.3)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY)
        assert {m.id for m in client.models.list()} == {"run-bot", "joker"}
        assert ask(client, "joker").choices[0].message.content == greedy["joke"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_model_ids_come_from_names_or_run_folders(tmp_path):
    from tunesmith.errors import ConfigError
    from tunesmith.serve.launch import build_catalog, model_id

    assert model_id("chat=runs/x/best") == ("chat", Path("runs/x/best"))
    assert model_id(str(tmp_path / "run-a" / "best"))[0] == "run-a"
    assert model_id(str(tmp_path / "mine"))[0] == "mine"
    with pytest.raises(ConfigError, match="nothing to serve"):
        build_catalog([], None)
    with pytest.raises(ConfigError, match="served as 'x'"):
        build_catalog(["x=a", "x=b"], None)
