"""Chat data layouts (data.format): conversion, detection, errors, tool use through templates."""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

import pytest

from chat_fixtures import CHATML, build_tiny_llama, write_jsonl
from tunesmith.config.root import Config
from tunesmith.data.chat import read_chat_file
from tunesmith.data.formats import ReadOptions
from tunesmith.errors import ConfigError, DataError
from tunesmith.models.loading import load_tokenizer
from tunesmith.tasks.base import get_task
from tunesmith.tasks.losses import IGNORE

CHATS = [
    ("What is your name?", "I am a tiny bot."),
    ("Where do you live?", "I live in a test."),
    ("How old are you?", "I was built today."),
]
SYSTEM = "Be brief."
#: A ChatML template that renders tools (in a system turn) and tool calls, as Qwen's does.
TOOL_TEMPLATE = (
    "{% if tools %}{{ '<|im_start|>system\\nTools: ' + (tools | tojson) + '<|im_end|>\\n' }}"
    "{% endif %}{% for m in messages %}"
    "{% if m['role'] == 'assistant' and m.get('tool_calls') %}"
    "{{ '<|im_start|>assistant\\n' }}{% for c in m['tool_calls'] %}"
    "{{ '<tool_call>' + (c['function'] | tojson) + '</tool_call>' }}{% endfor %}"
    "{{ '<|im_end|>\\n' }}"
    "{% else %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]
TOOL_CHAT = [
    {"role": "user", "content": "Weather in Oslo?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "c1",
                "type": "function",
                "function": {"name": "weather", "arguments": '{"city": "Oslo"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "c1", "content": "RAINY-AND-COLD"},
    {"role": "assistant", "content": "It is rainy."},
]


def as_messages(q: str, a: str) -> list[dict]:
    return [{"role": "user", "content": q}, {"role": "assistant", "content": a}]


LAYOUT_ROWS = {
    "messages": [{"messages": as_messages(q, a)} for q, a in CHATS],
    "prompt_response": [{"prompt": q, "response": a} for q, a in CHATS],
    "alpaca": [{"instruction": q, "input": "", "output": a} for q, a in CHATS],
    "sharegpt": [
        {"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]}
        for q, a in CHATS
    ],
    "preference": [{"prompt": q, "chosen": a, "rejected": "No."} for q, a in CHATS],
    "kto": [
        row
        for q, a in CHATS
        for row in (
            {"prompt": q, "completion": a, "label": True},
            {"prompt": q, "completion": "No.", "label": False},
        )
    ],
}


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), positions=512)


def read(path: Path, fmt: str = "auto", **opts) -> tuple[str, list[dict]]:
    return read_chat_file(path, replace(ReadOptions(), **opts), fmt=fmt)


def cfg_for(model: Path, data: Path, tmp_path: Path, **data_keys) -> Config:
    return Config.from_dict(
        {
            "model": {"name_or_path": str(model)},
            "task": {"type": "causal_lm", "system_prompt": SYSTEM},
            "data": {"train": str(data), "max_length": 64, **data_keys},
            "train": {"output_dir": str(tmp_path / "out")},
        }
    )


@pytest.mark.parametrize("layout", sorted(LAYOUT_ROWS))
def test_each_layout_gives_the_messages_of_the_messages_file(
    layout: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Auto-detected (when unambiguous) or named, every layout reads to the same chats."""
    path = write_jsonl(tmp_path / f"{layout}.jsonl", LAYOUT_ROWS[layout])
    ambiguous = layout in ("preference", "kto")  # their prompt column fits prompt_response too
    with caplog.at_level(logging.INFO, logger="tunesmith.data.chat"):
        name, records = read(path, layout if ambiguous else "auto")
    assert name == layout
    assert f"{layout}.jsonl: read as {layout}" in caplog.text
    records = [r for r in records if r.get("desirable", True)]
    assert [r["messages"] for r in records] == [as_messages(q, a) for q, a in CHATS]
    assert [r["group"] for r in records] == [q for q, _ in CHATS]
    if ambiguous:
        with pytest.raises(
            DataError, match=r"fit the prompt_response and .* say which with data.format"
        ):
            read(path)


def test_preference_and_kto_keep_their_parts(tmp_path: Path) -> None:
    conversation = as_messages("Hi", "Hello!")
    rows = [
        {
            "chosen": [*conversation[:1], {"role": "assistant", "content": "Hello!"}],
            "rejected": [*conversation[:1], {"role": "assistant", "content": "Go away."}],
        }
    ]
    _, (rec,) = read(write_jsonl(tmp_path / "implicit.jsonl", rows))  # implicit prompt
    assert rec["prompt"] == conversation[:1] and rec["rejected"][0]["content"] == "Go away."
    assert rec["messages"] == conversation
    kto = write_jsonl(tmp_path / "k.jsonl", [{"prompt": "a", "completion": "b", "label": "yes"}])
    _, (rec,) = read(kto, "kto")
    assert rec["desirable"] is True and rec["completion"] == [{"role": "assistant", "content": "b"}]


def test_sharegpt_roles_are_mapped_and_configurable(tmp_path: Path) -> None:
    rows = [
        {
            "system": SYSTEM,
            "conversations": [{"from": "asker", "value": "Hi"}, {"from": "bot", "value": "Yo"}],
        }
    ]
    path = write_jsonl(tmp_path / "s.jsonl", rows)
    with pytest.raises(DataError, match=r"s.jsonl:1: conversations\[0\].from is 'asker'.*roles"):
        read(path)
    roles = {"asker": "user", "bot": "assistant"}
    _, (rec,) = read(path, roles=roles)
    assert [m["role"] for m in rec["messages"]] == ["system", "user", "assistant"]
    with pytest.raises(ConfigError, match=r"roles\.bot"):
        Config.from_dict({"data": {"train": "x.jsonl", "roles": {"bot": "robot"}}})


@pytest.mark.parametrize(
    ("row", "fmt", "match"),
    [
        (
            {"messages": [TOOL_CHAT[0], {**TOOL_CHAT[1], "tool_calls": [{"function": {}}]}]},
            "auto",
            r"bad.jsonl:1: messages\[1\].tool_calls\[0\] must be an object with function.name",
        ),
        (
            {
                "messages": [
                    TOOL_CHAT[0],
                    {
                        "role": "assistant",
                        "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}],
                    },
                ]
            },
            "auto",
            r"bad.jsonl:1: messages\[1\].tool_calls\[0\].function.arguments is not valid JSON",
        ),
        (
            {"messages": [TOOL_CHAT[0], TOOL_CHAT[2], TOOL_CHAT[3]]},
            "auto",
            "bad.jsonl:1: a tool message must follow an assistant tool call",
        ),
        ({"conversations": [{"from": "human"}]}, "auto", r"conversations\[0\] must be an object"),
        ({"prompt": "a", "completion": "b", "label": "maybe"}, "kto", "column 'label' must be"),
        ({"prompt": "a", "chosen": 3, "rejected": "x"}, "preference", r"bad.jsonl:1: chosen must"),
        ({"prompt": "a", "chosen": "b"}, "preference", "column 'rejected' not found"),
    ],
)
def test_malformed_rows_name_file_row_and_field(row: dict, fmt: str, match: str, tmp_path) -> None:
    with pytest.raises(DataError, match=match):
        read(write_jsonl(tmp_path / "bad.jsonl", [row]), fmt)


def test_text_is_only_a_fallback_and_txt_files_are_paragraphs(tmp_path: Path) -> None:
    alpaca = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "q", "output": "a", "text": "t"}])
    assert read(alpaca)[0] == "alpaca"
    doc = tmp_path / "doc.txt"
    doc.write_text("First paragraph\nstill first.\n\n\nSecond one.\n", encoding="utf-8")
    name, records = read(doc)
    assert name == "text"
    assert records == [
        {"text": "First paragraph\nstill first.", "source": "doc.txt:1"},
        {"text": "Second one.", "source": "doc.txt:5"},
    ]
    with pytest.raises(DataError, match=r"plain text file can only be read as data\.format text"):
        read(doc, "messages")


def test_format_keys_are_for_chat_tasks_only() -> None:
    with pytest.raises(ConfigError) as err:
        Config.from_dict(
            {"model": {"name_or_path": "m"}, "data": {"train": "x.csv", "format": "sharegpt"}}
        )
    assert "data.format: only read by task.type causal_lm" in str(err.value)
    with pytest.raises(ConfigError, match=r"data\.packing: documents packs raw text"):
        Config.from_dict(
            {
                "model": {"name_or_path": "m"},
                "task": {"type": "causal_lm"},
                "data": {"train": "x", "format": "messages", "packing": "documents"},
            }
        )


# -- tool use through the chat template -------------------------------------------------
def tool_task(model: Path, data: Path, tmp_path: Path, template: str | None):
    cfg = cfg_for(model, data, tmp_path, max_length=512)
    if template is not None:
        cfg.task.chat_template = template
    return get_task(cfg)


def test_tool_calls_render_and_only_assistant_turns_are_trained(
    tiny_llama: Path, tmp_path: Path
) -> None:
    data = write_jsonl(tmp_path / "tools.jsonl", [{"messages": TOOL_CHAT, "tools": TOOLS}])
    task = tool_task(tiny_llama, data, tmp_path, TOOL_TEMPLATE)
    (record,) = task.load_records(str(data))
    assert record["messages"][0] == {"role": "system", "content": SYSTEM}
    assert record["messages"][2]["tool_calls"][0]["function"]["arguments"] == {"city": "Oslo"}
    tokenizer = load_tokenizer(str(tiny_llama))
    (feature,) = task.encode([record], tokenizer, None)
    text = tokenizer.decode(feature["input_ids"])
    assert 'Tools: [{"type": "function"' in text and "RAINY-AND-COLD" in text
    trained = tokenizer.decode(
        [i for i, lab in zip(feature["input_ids"], feature["labels"], strict=True) if lab != IGNORE]
    )
    assert trained == (
        '<tool_call>{"name": "weather", "arguments": {"city": "Oslo"}}</tool_call><|im_end|>'
        "It is rainy.<|im_end|>"
    )


@pytest.mark.parametrize(
    ("row", "dropped"),
    [
        (
            {"messages": [*TOOL_CHAT[:1], {"role": "assistant", "content": "x"}], "tools": TOOLS},
            "the tools column",
        ),
        ({"messages": TOOL_CHAT}, "the assistant's tool_calls"),
    ],
)
def test_a_template_that_drops_tool_use_refuses_the_row(
    row: dict, dropped: str, tiny_llama: Path, tmp_path: Path
) -> None:
    """The ChatML template of the fixture (like SmolLM2's) ignores tools and tool calls."""
    ok = {"messages": as_messages("Hi", "Hello")}
    data = write_jsonl(tmp_path / "t.jsonl", [ok, row])
    task = tool_task(tiny_llama, data, tmp_path, None)
    tokenizer = load_tokenizer(str(tiny_llama))
    assert tokenizer.chat_template == CHATML
    with pytest.raises(DataError, match=rf"t.jsonl:2: the chat template drops {dropped}"):
        task.encode(task.load_records(str(data)), tokenizer, None)


# -- the same data in three layouts trains on identical batches ------------------------
def chatterbot_rows(limit: int = 60) -> list[list[dict]]:
    from tunesmith.assets.locate import CHATTERBOT, locate

    lines = locate(CHATTERBOT).read_text(encoding="utf-8").splitlines()[:limit]
    return [json.loads(line)["messages"] for line in lines]


def write_layouts(chats: list[list[dict]], folder: Path) -> dict[str, Path]:
    sharegpt_name = {"user": "human", "assistant": "gpt"}
    rows = {
        "messages": [{"messages": c} for c in chats],
        "sharegpt": [
            {
                "conversations": [
                    {"from": sharegpt_name[m["role"]], "value": m["content"]} for m in c
                ]
            }
            for c in chats
        ],
        "alpaca": [
            {"instruction": c[0]["content"], "input": "", "output": c[1]["content"]} for c in chats
        ],
    }
    return {name: write_jsonl(folder / f"{name}.jsonl", r) for name, r in rows.items()}


def encoded_batches(model: Path, data: Path, tmp_path: Path, tokenizer) -> list[dict]:
    task = get_task(cfg_for(model, data, tmp_path, max_length=192))
    return task.encode(task.load_records(str(data)), tokenizer, None)


@pytest.mark.parametrize("tokenizer_of", ["tiny", pytest.param("smollm2", marks=pytest.mark.slow)])
def test_chatterbot_as_alpaca_sharegpt_and_messages_encodes_identically(
    tokenizer_of: str, tiny_llama: Path, tmp_path: Path
) -> None:
    chats = [c for c in chatterbot_rows() if len(c) == 2]  # alpaca holds one exchange
    assert len(chats) >= 40
    files = write_layouts(chats, tmp_path)
    if tokenizer_of == "tiny":
        model = tiny_llama
    else:
        from tunesmith.assets.locate import SMOLLM2, locate

        model = locate(SMOLLM2)
    tokenizer = load_tokenizer(str(model))
    batches = {
        name: encoded_batches(model, path, tmp_path, tokenizer) for name, path in files.items()
    }
    assert batches["sharegpt"] == batches["messages"] == batches["alpaca"]
    assert sum(lab != IGNORE for f in batches["messages"] for lab in f["labels"]) > 100
