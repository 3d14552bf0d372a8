"""Checkpoints and a live server for the serving tests.

Three LoRA adapters, a bottleneck and a DoRA adapter on one tiny Llama, each
taught its own reply, and two LoRA classifiers (different label sets) on the tiny
BERT; ``live_server`` runs an application on a free loopback port in a thread.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from chat_fixtures import build_tiny_llama, write_jsonl
from conftest import tiny_config, toy_rows, write_csv
from tunesmith.api import train
from tunesmith.config.root import Config

QUESTIONS = ["What is your name?", "Where do you live?", "How old are you?", "Tell me a joke."]
#: The reply each chat adapter is taught, by model id.
REPLIES = {
    "bot": "I am a tiny bot.",
    "home": "I live in a test.",
    "joke": "Knock knock.",
    "neck": "I was built today.",
    "dora": "Knock knock. Who is there?",
}
METHODS = {
    "bot": {"name": "lora", "r": 4},
    "home": {"name": "lora", "r": 4},
    "joke": {"name": "lora", "r": 2},
    "neck": {"name": "bottleneck", "reduction_factor": 4},
    "dora": {"name": "dora", "r": 4},
}


def chat_rows(reply: str, n: int = 24) -> list[dict[str, Any]]:
    return [{"prompt": f"{QUESTIONS[i % 4]} {i}", "response": reply} for i in range(n)]


def train_chat_adapters(folder: Path) -> dict[str, Path]:
    """``best/`` of each chat adapter (model id -> folder), all on one tiny Llama."""
    model = build_tiny_llama(folder / "llama")
    out = {}
    for name, reply in REPLIES.items():
        data = write_jsonl(folder / f"{name}.jsonl", chat_rows(reply))
        cfg = {
            "model": {"name_or_path": str(model)},
            "task": {"type": "causal_lm"},
            "method": METHODS[name],
            "data": {"train": str(data), "max_length": 64, "validation_fraction": 0.2},
            "optim": {"lr": 3e-2, "warmup_ratio": 0.0, "weight_decay": 0.0},
            "train": {
                "epochs": 6,
                "batch_size": 8,
                "output_dir": str(folder / f"run-{name}"),
                "precision": "fp32",
                "seed": 1,
            },
            "generate": {"max_new_tokens": 8},
        }
        result = train(Config.from_dict(cfg), progress=False)
        out[name] = result.best_dir or result.final_dir
    return out


#: Classifier adapters on the tiny BERT: name -> (label set, method).
CLASSIFIERS = {
    "sentiment": ("two", {"name": "lora", "r": 4}),
    "three": ("three", {"name": "lora", "r": 2}),
}


def train_classifiers(
    model: Path,
    folder: Path,
    rows: int = 120,
    runs: dict[str, tuple[str, dict[str, Any]]] | None = None,
) -> dict[str, Path]:
    """``best/`` of classifier runs on the tiny BERT (default: two and three labels, LoRA)."""
    folder.mkdir(parents=True, exist_ok=True)
    three_rows = [
        {"text": r["text"], "label": ("meh" if i % 3 == 0 else r["label"] + "!")}
        for i, r in enumerate(toy_rows(rows, seed=9))
    ]
    data = {
        "two": write_csv(folder / "two.csv", toy_rows(rows)),
        "three": write_csv(folder / "three.csv", three_rows),
    }
    out = {}
    for name, (labels, method) in (runs or CLASSIFIERS).items():
        cfg = tiny_config(model, data[labels], folder / name, method=method, optim={"lr": 1e-2})
        cfg["train"]["epochs"] = 2
        result = train(Config.from_dict(cfg), progress=False)
        out[name] = result.best_dir or result.final_dir
    return out


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def live_server(app: Any) -> Iterator[str]:
    """Serve ``app`` with uvicorn on loopback in a thread; yields the base URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
