"""Load on ``tunesmith serve``: throughput and latency by concurrency, batching on and off.

Stages, each kept in ``--work`` and skipped when done:

1. adapters: three short LoRA runs of the SmolLM2 chat example (seeds 0-2,
   ``--sft-steps`` steps: their weights differ, their cost is what is measured)
   and two LoRA classifiers on MiniLM (Rotten Tomatoes, ``--cls-steps`` steps),
   copied into one adapter library;
2. load: for dynamic batching on (``--max-batch 32``) and off (``--max-batch 1``)
   a ``tunesmith serve --library`` process is started, and 1, 8 and 32
   concurrent clients (asyncio, HTTP/1.1) send chat completions round-robin over
   the three chat adapters (greedy, ``--max-tokens`` tokens at most, chatterbot
   questions), then classification requests (one review each) over the two
   classifiers. Throughput (requests/s, generated tokens/s) and client-side
   p50/p95 latency per level;
3. memory: resident memory of a fresh process holding SmolLM2 with 1, 4 and 8
   LoRA adapters loaded (the chat adapters under several ids).

Writes ``results.json`` and prints the tables (docs/serve.md has them).

    python benchmarks/serve_load.py --work runs/serve_load          # the documented run
    python benchmarks/serve_load.py --work runs/serve_quick --quick  # a smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil

from tunesmith.api import train
from tunesmith.assets.locate import CHATTERBOT, locate
from tunesmith.config.root import Config

ROOT = Path(__file__).resolve().parent.parent
KEY = "bench"
CHAT = ["chat-a", "chat-b", "chat-c"]
CLASSIFIERS = ["cls-a", "cls-b"]
REVIEWS = [
    "a gripping, beautifully acted film that stays with you",
    "tedious, overlong and never once funny",
    "the plot is thin but the performances carry it",
    "an utter mess from start to finish",
]


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--work", type=Path, default=Path("runs/serve_load"))
    p.add_argument("--sft-steps", type=int, default=4)
    p.add_argument("--cls-steps", type=int, default=20)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--levels", default="1,8,32", help="Concurrent clients, comma-separated.")
    p.add_argument("--chat-requests", type=int, default=2, help="Chat requests per client.")
    p.add_argument("--min-chat-requests", type=int, default=8)
    p.add_argument("--cls-requests", type=int, default=12, help="Classify requests per client.")
    p.add_argument("--quick", action="store_true", help="Tiny numbers: a smoke run.")
    args = p.parse_args()
    if args.quick:
        args.sft_steps, args.cls_steps, args.max_tokens = 1, 2, 8
        args.levels, args.chat_requests, args.min_chat_requests = "1,4", 1, 2
        args.cls_requests = 2
    return args


# -- stage 1: adapters ------------------------------------------------------------------------
def adapters(args: argparse.Namespace) -> Path:
    library = args.work / "library"
    if all((library / n / "tunesmith.json").is_file() for n in CHAT + CLASSIFIERS):
        return library
    library.mkdir(parents=True, exist_ok=True)
    for seed, name in enumerate(CHAT):
        overrides = [
            f"train.max_steps={args.sft_steps}",
            "train.eval_at_start=false",
            f"train.eval_steps={args.sft_steps}",
            f"train.seed={seed}",
            "data.max_train_samples=96",
            f"train.output_dir={args.work / 'runs' / name}",
            "train.overwrite=true",
        ]
        _train(ROOT / "examples/sft_smollm2.yaml", overrides, library / name)
    for seed, name in enumerate(CLASSIFIERS):
        overrides = [
            "method.name=lora",
            "method.r=8",
            "optim.lr=5e-4",
            f"train.max_steps={args.cls_steps}",
            f"train.eval_steps={args.cls_steps}",
            f"train.seed={seed}",
            f"train.output_dir={args.work / 'runs' / name}",
            "train.overwrite=true",
        ]
        _train(ROOT / "examples/sentiment.yaml", overrides, library / name)
    return library


def _train(config: Path, overrides: list[str], target: Path) -> None:
    if (target / "tunesmith.json").is_file():
        return
    result = train(Config.load(config, overrides), progress=False, test=False)
    shutil.copytree(result.best_dir or result.final_dir, target)


# -- stage 2: load ------------------------------------------------------------------------------
def serve(library: Path, max_batch: int, port: int) -> subprocess.Popen:
    command = [sys.executable, "-m", "tunesmith", "serve", "--library", str(library)]
    command += ["--port", str(port), "--max-batch", str(max_batch), "--max-tokens", "256"]
    env = {**os.environ, "TUNESMITH_API_KEY": KEY, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(command, env=env)
    deadline = time.monotonic() + 300
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("the server did not start")
        time.sleep(0.5)


def questions() -> list[str]:
    rows = [json.loads(line) for line in locate(CHATTERBOT).read_text().splitlines()[:400]]
    return [r["messages"][0]["content"] for r in rows if r["messages"][0]["role"] == "user"]


async def level(
    url: str, bodies: list[tuple[str, dict[str, Any]]], clients: int
) -> dict[str, float]:
    """Send ``bodies`` with ``clients`` concurrent clients; throughput and latency."""
    queue: asyncio.Queue[tuple[str, dict[str, Any]]] = asyncio.Queue()
    for item in bodies:
        queue.put_nowait(item)
    latencies: list[float] = []
    tokens = 0

    async def client() -> None:
        nonlocal tokens
        async with httpx.AsyncClient(
            base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=600
        ) as http:
            while not queue.empty():
                path, body = queue.get_nowait()
                started = time.perf_counter()
                got = await http.post(path, json=body)
                got.raise_for_status()
                latencies.append(time.perf_counter() - started)
                tokens += got.json()["usage"].get("completion_tokens", 0)

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    wall = time.perf_counter() - started
    return {
        "clients": clients,
        "requests": len(bodies),
        "wall_s": round(wall, 2),
        "requests_per_s": round(len(bodies) / wall, 3),
        "tokens_per_s": round(tokens / wall, 1),
        "p50_s": round(float(np.percentile(latencies, 50)), 3),
        "p95_s": round(float(np.percentile(latencies, 95)), 3),
    }


def load(args: argparse.Namespace, library: Path) -> dict[str, Any]:
    asked = questions()
    out: dict[str, Any] = {}
    for mode, max_batch in (("batched", 32), ("one at a time", 1)):
        port = 8790 + max_batch
        proc = serve(library, max_batch, port)
        url = f"http://127.0.0.1:{port}"
        try:
            rows = []
            for clients in [int(c) for c in args.levels.split(",")]:
                n = max(args.min_chat_requests, clients * args.chat_requests)
                chat = [
                    (
                        "/v1/chat/completions",
                        {
                            "model": CHAT[i % 3],
                            "messages": [{"role": "user", "content": asked[i % len(asked)]}],
                            "max_tokens": args.max_tokens,
                            "temperature": 0,
                        },
                    )
                    for i in range(n)
                ]
                row = asyncio.run(level(url, chat, clients))
                print(f"{mode} chat", row, flush=True)
                rows.append({"kind": "chat", **row})
                m = clients * args.cls_requests
                cls = [
                    ("/v1/classify", {"model": CLASSIFIERS[i % 2], "input": REVIEWS[i % 4]})
                    for i in range(m)
                ]
                row = asyncio.run(level(url, cls, clients))
                print(f"{mode} classify", row, flush=True)
                rows.append({"kind": "classify", **row})
            metrics = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {KEY}"})
            out[mode] = {"levels": rows, "batches": metrics.json()["batches"]}
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    return out


# -- stage 3: memory ----------------------------------------------------------------------------
MEMORY_CHILD = """
import gc, json, sys
import psutil
from tunesmith.serve.catalog import Catalog
from tunesmith.training.allocator import release_free_memory
lib, names = sys.argv[1], sys.argv[2].split(",")
cat, out = Catalog(), {}
def rss():
    gc.collect(); release_free_memory()
    return psutil.Process().memory_info().rss / 2**20
out["process"] = rss()
for i in range(8):
    cat.add(f"m{i}", f"{lib}/{names[i % len(names)]}")
    if i + 1 in (1, 4, 8):
        out[str(i + 1)] = {"resident_mb": round(rss(), 1), "stored_mb": cat.storage_bytes() / 2**20}
print(json.dumps(out))
"""


def memory(library: Path) -> dict[str, Any]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    got = subprocess.run(
        [sys.executable, "-c", MEMORY_CHILD, str(library), ",".join(CHAT)],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    result = json.loads(got.stdout.strip().splitlines()[-1])
    size = (library / CHAT[0] / "adapter_model.safetensors").stat().st_size / 2**20
    result["adapter_mb_on_disk"] = round(size, 2)
    return result


def main() -> None:
    args = parse()
    args.work.mkdir(parents=True, exist_ok=True)
    print(f"cpu: {psutil.cpu_count()} cores; torch threads as set by the server", flush=True)
    library = adapters(args)
    results = {"load": load(args, library), "memory": memory(library)}
    (args.work / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
