"""Pruning: sparsity reached, zeros kept through recovery, exact slicing, reload, the command.

A tiny BERT is trained on the toy sentiment data (so recovery has a real loss
to lower and the metric before/after means something), then pruned in memory
and through ``prune_checkpoint`` / ``tunesmith prune``. Structured pruning is
checked against the original model with the removed heads/neurons zeroed:
slicing must compute exactly that.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from conftest import tiny_config, toy_rows, write_csv
from helpers import PEFT_TEST_MARKS, build_model, train_tiny_methods
from tunesmith.api import evaluate, load_checkpoint, predict, train
from tunesmith.config.root import Config
from tunesmith.data.batching import Collator, FeatureDataset
from tunesmith.deploy import prune_magnitude as pm
from tunesmith.deploy.int8_export import export_int8
from tunesmith.deploy.prune_run import PruneSettings, prune_checkpoint, recover
from tunesmith.errors import ConfigError, DataError, ModelError
from tunesmith.models import prune_structured as ps
from tunesmith.models.folders import read_manifest
from tunesmith.models.pruned_format import SPEC, WEIGHTS

pytestmark = PEFT_TEST_MARKS  # includes the one_thread fixture


@pytest.fixture(scope="module")
def runs(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``best/`` of a trained full run, a short LoRA run and a one-step bottleneck run."""
    tmp = tmp_path_factory.mktemp("prune-runs")
    lengths = {"full": {"epochs": 4}, "lora": {"max_steps": 3}, "bottleneck": {"max_steps": 1}}
    return train_tiny_methods(tiny_bert, tmp, 96, lengths)


def toy_batch(checkpoint: Path, n: int = 24) -> dict[str, torch.Tensor]:
    """Model inputs of ``n`` fresh toy sentences (another seed than the training data)."""
    _cfg, task, _model, tokenizer, _labels = load_checkpoint(checkpoint)
    features = task.encode(toy_rows(n, seed=11), tokenizer, None)
    return task.model_inputs(Collator(tokenizer.pad_token_id, tokenizer.padding_side)(features))


@torch.no_grad()
def logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model.eval()(**batch).logits


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# -- magnitude pruning -------------------------------------------------------------------
@pytest.mark.parametrize("sparsity", [0.3, 0.75])
def test_magnitude_reaches_the_target_globally_and_in_every_layer(runs, sparsity):
    original = load_checkpoint(runs["full"])[2]
    for scope in ("global", "per_layer"):
        model = copy.deepcopy(original)
        masks = pm.prune_magnitude(model, sparsity, scope)
        stats = pm.sparsity_stats(model)
        assert abs(stats["pruned_sparsity"] - sparsity) <= 0.01
        if scope == "per_layer":
            assert all(abs(s - sparsity) <= 0.01 for s in stats["per_layer"].values())
        else:  # global ranking prunes layers unevenly
            assert len({round(s, 3) for s in stats["per_layer"].values()}) > 1
        assert set(masks) == set(pm.prunable_linears(model))
        # Embeddings, LayerNorms, pooler and head are untouched.
        after = dict(model.named_parameters())
        for name, param in original.named_parameters():
            pruned_linear = name.endswith(".weight") and name[: -len(".weight")] in masks
            if not pruned_linear:
                assert torch.equal(param, after[name]), name
    assert not any("classifier" in n or "pooler" in n for n in masks)
    assert not any("embeddings" in n or "LayerNorm" in n for n in masks)


def test_rounds_grow_masks_monotonically_to_the_target():
    model = build_model("bert")
    targets = pm.round_targets(0.6, 3)
    assert targets[-1] == pytest.approx(0.6) and targets == sorted(targets)
    masks = None
    for target in targets:
        previous = masks
        masks = pm.prune_magnitude(model, target, "global", masks)
        assert abs(pm.sparsity_stats(model)["pruned_sparsity"] - target) <= 0.01
        if previous is not None:  # nothing pruned earlier comes back
            assert all(not (masks[n] & ~previous[n]).any() for n in masks)


def test_pruned_weights_stay_exactly_zero_through_recovery(runs):
    cfg, task, model, tokenizer, labels = load_checkpoint(runs["full"])
    label2id = {lab: i for i, lab in enumerate(labels)}
    train_set = FeatureDataset(task.encode(toy_rows(64, seed=3), tokenizer, label2id))
    collator = Collator(tokenizer.pad_token_id, tokenizer.padding_side)
    settings = PruneSettings(kind="magnitude", sparsity=0.5, recover_steps=4)
    unprotected = copy.deepcopy(model)

    masks = pm.prune_magnitude(model, 0.5, "global")
    before = {n: m.weight.detach().clone() for n, m in pm.prunable_linears(model).items()}
    model, losses = recover(model, cfg, task, train_set, collator, labels, settings, masks=masks)
    assert len(losses) >= 2
    for name, linear in pm.prunable_linears(model).items():
        assert not linear.weight[~masks[name]].any(), name  # exactly zero
        assert not torch.equal(linear.weight[masks[name]], before[name][masks[name]]), name
    assert abs(pm.sparsity_stats(model)["pruned_sparsity"] - 0.5) <= 0.01
    # The control: the same recovery without the masks revives pruned weights.
    masks = pm.prune_magnitude(unprotected, 0.5, "global")
    unprotected, _ = recover(unprotected, cfg, task, train_set, collator, labels, settings)
    revived = [n for n, m in pm.prunable_linears(unprotected).items() if m.weight[~masks[n]].any()]
    assert revived


def test_prune_checkpoint_saves_plain_weights_with_zeros(runs, tmp_path):
    settings = PruneSettings(kind="magnitude", sparsity=0.6, rounds=2, recover_steps=3)
    result = prune_checkpoint(runs["full"], tmp_path / "pruned", settings)
    assert [round(r["target"], 3) for r in result.rounds] == [0.525, 0.6]
    assert abs(result.achieved - 0.6) <= 0.01
    assert result.after["parameters"] == result.before["parameters"]
    assert result.after["nonzero_parameters"] < result.before["nonzero_parameters"]
    files = {f.name for f in result.folder.iterdir()}
    assert "model.safetensors" in files and SPEC not in files
    assert not any(f.endswith((".bin", ".pt", ".pth")) for f in files)
    tensors = load_file(result.folder / "model.safetensors")
    assert not any("weight_orig" in k or "weight_mask" in k for k in tensors)
    zeros = tensors["bert.encoder.layer.0.attention.self.query.weight"] == 0
    assert 0.3 < float(zeros.float().mean()) < 0.9
    manifest = read_manifest(result.folder)
    assert manifest["pruned"]["kind"] == "magnitude" and manifest["pruned"]["target"] == 0.6
    assert abs(manifest["pruned"]["achieved"] - 0.6) <= 0.01
    assert "validation" not in manifest
    reloaded = load_checkpoint(result.folder)[2]
    assert abs(pm.sparsity_stats(reloaded)["pruned_sparsity"] - result.achieved) < 1e-9


def test_lora_is_merged_then_pruned(runs, tmp_path):
    settings = PruneSettings(kind="magnitude", sparsity=0.4)
    result = prune_checkpoint(runs["lora"], tmp_path / "pruned", settings)
    manifest = read_manifest(result.folder)
    assert (manifest["method"], manifest["adapter"], manifest["merged_from"]) == (
        "full",
        False,
        "lora",
    )
    model = load_checkpoint(result.folder)[2]
    assert not any("lora" in n for n, _ in model.named_parameters())
    assert abs(pm.sparsity_stats(model)["pruned_sparsity"] - 0.4) <= 0.01


# -- structured pruning ------------------------------------------------------------------
def zeroed_like(original: nn.Module, kind: str, kept: ps.Kept) -> nn.Module:
    """``original`` with every unit not in ``kept`` switched off by zeroing its output columns."""
    model = copy.deepcopy(original)
    for layer, ids in zip(ps.encoder_layers(model), kept[kind], strict=True):
        out = layer.attention.output.dense if kind == "heads" else layer.output.dense
        size = layer.attention.self.attention_head_size if kind == "heads" else 1
        with torch.no_grad():
            for unit in range(out.in_features // size):
                if unit not in ids:
                    out.weight[:, unit * size : (unit + 1) * size] = 0
    return model


@pytest.mark.parametrize("kind", ["heads", "neurons"])
@pytest.mark.parametrize("scope", ["global", "per_layer"])
def test_slicing_equals_zeroing_the_removed_units(runs, kind, scope):
    original = load_checkpoint(runs["full"])[2]
    batch = toy_batch(runs["full"])
    pruned = copy.deepcopy(original)
    kept = ps.prune_units(pruned, kind, 0.5, ps.full_kept(pruned), scope=scope)
    # tiny BERT: 2 layers x 4 heads of size 8, FFN 64, hidden 32
    per_layer, own = (4, 4 * 32 * 8 + 3 * 8) if kind == "heads" else (64, 2 * 32 + 1)
    removed = 2 * per_layer - ps.unit_counts(kept)[kind]
    assert removed == per_layer  # half of them
    if scope == "per_layer":
        assert all(len(ids) == per_layer // 2 for ids in kept[kind])
    assert count(original) - count(pruned) == removed * own
    reference = zeroed_like(original, kind, kept)
    assert torch.allclose(logits(pruned, batch), logits(reference, batch), atol=1e-5)
    assert not torch.allclose(logits(pruned, batch), logits(original, batch), atol=1e-3)


def test_every_layer_keeps_a_head_and_rounds_compose_original_ids():
    model = build_model("bert")  # 2 layers x 2 heads
    kept = ps.prune_units(model, "heads", 0.9, ps.full_kept(model), scope="global")
    assert [len(ids) for ids in kept["heads"]] == [1, 1]
    model = build_model("bert", layers=1)
    original = copy.deepcopy(model)
    kept = ps.full_kept(model)
    for target in (0.25, 0.5):  # neurons: 32 -> 24 -> 16, ids of the original layer
        kept = ps.prune_units(model, "neurons", target, kept, scope="per_layer")
    assert len(kept["neurons"][0]) == 16 and kept["neurons"][0] == sorted(kept["neurons"][0])
    ids = torch.randint(4, 50, (2, 7))
    reference = zeroed_like(original, "neurons", kept)
    assert torch.allclose(logits(model, {"input_ids": ids}), logits(reference, {"input_ids": ids}))


def test_gradient_importance_is_the_gate_gradient(runs):
    _cfg, task, model, tokenizer, labels = load_checkpoint(runs["full"])
    label2id = {lab: i for i, lab in enumerate(labels)}
    features = task.encode(toy_rows(8, seed=4), tokenizer, label2id)
    batch = Collator(tokenizer.pad_token_id, tokenizer.padding_side)(features)
    scores = ps.gradient_scores(model, "neurons", [batch], task.loss_sum, task.model_inputs)
    # The same quantity with an explicit gate on each FFN neuron of layer 1.
    layer = ps.encoder_layers(model)[1]
    gate = torch.ones(layer.intermediate.dense.out_features, requires_grad=True)
    handle = layer.intermediate.register_forward_hook(lambda _m, _i, out: out * gate)
    try:
        model.eval()
        task.loss_sum(model(**task.model_inputs(batch)), batch).backward()
    finally:
        handle.remove()
    assert torch.allclose(scores[1], gate.grad.abs(), rtol=1e-4, atol=1e-6)


def test_structured_folder_reloads_to_identical_logits(runs, tmp_path):
    settings = PruneSettings(kind="heads", sparsity=0.5, scope="per_layer")
    result = prune_checkpoint(runs["full"], tmp_path / "heads", settings)
    files = {f.name for f in result.folder.iterdir()}
    assert {WEIGHTS, SPEC, "config.json", "tunesmith.json"} <= files
    assert "model.safetensors" not in files  # transformers must not half-load it
    spec = json.loads((result.folder / SPEC).read_text())
    assert [len(ids) for ids in spec["kept"]["heads"]] == [2, 2]
    assert [len(ids) for ids in spec["kept"]["neurons"]] == [64, 64]
    assert result.achieved == 0.5 and read_manifest(result.folder)["pruned"]["kind"] == "heads"

    in_memory = load_checkpoint(runs["full"])[2]
    ps.prune_units(in_memory, "heads", 0.5, ps.full_kept(in_memory), scope="per_layer")
    reloaded = load_checkpoint(result.folder)[2]
    assert count(reloaded) == count(in_memory) == result.after["parameters"]
    assert reloaded.bert.encoder.layer[0].attention.self.query.out_features == 16
    batch = toy_batch(runs["full"])
    assert torch.equal(logits(reloaded, batch), logits(in_memory, batch))


def test_eval_and_predict_load_a_structured_folder(runs):
    out = runs["full"].parent / "neurons"  # inside the run: its splits are found
    settings = PruneSettings(kind="neurons", sparsity=0.25, recover_steps=2)
    prune_checkpoint(runs["full"], out, settings)
    assert 0 <= evaluate(out, split="validation")["accuracy"] <= 1
    rows = predict(out, ["the film was superb and fun", "a dull boring story"])
    assert {r["label"] for r in rows} <= {"pos", "neg"}


def test_load_refuses_a_pruning_manifest_that_does_not_fit(runs, tmp_path):
    settings = PruneSettings(kind="heads", sparsity=0.5)
    folder = prune_checkpoint(runs["full"], tmp_path / "heads", settings).folder
    with pytest.raises(ConfigError, match="already had heads or neurons removed"):
        prune_checkpoint(folder, tmp_path / "again", settings)
    with pytest.raises(ConfigError, match="int8 export takes unpruned or magnitude-pruned"):
        export_int8(folder, tmp_path / "int8")
    copy_dir = Path(shutil.copytree(folder, tmp_path / "copy"))
    spec = json.loads((copy_dir / SPEC).read_text())
    spec["kept"]["heads"][0] = [0, 1, 2, 3]  # shapes then differ from the saved tensors
    (copy_dir / SPEC).write_text(json.dumps(spec))
    with pytest.raises(ModelError, match=r"cannot load the pruned model|do not fit"):
        load_checkpoint(copy_dir)
    spec["kept"]["heads"][0] = [3, 9]
    (copy_dir / SPEC).write_text(json.dumps(spec))
    with pytest.raises(ModelError, match=r"pruning.json: does not fit the architecture"):
        load_checkpoint(copy_dir)


# -- refusals ----------------------------------------------------------------------------
def test_refusals(runs, tmp_path):
    with pytest.raises(ConfigError, match="already exists"):
        prune_checkpoint(runs["full"], runs["full"], PruneSettings("magnitude", 0.5))
    for sparsity in (0.0, 1.0, 1.5):
        with pytest.raises(ConfigError, match="between 0 and 1"):
            PruneSettings("magnitude", sparsity).check()
    with pytest.raises(ConfigError, match="unknown --kind 'rows'"):
        PruneSettings("rows", 0.5).check()
    with pytest.raises(ConfigError, match="unknown --scope 'all'; use global or per_layer"):
        PruneSettings("heads", 0.5, scope="all").check()
    with pytest.raises(ConfigError, match="--rounds must be at least 1"):
        PruneSettings("heads", 0.5, rounds=0).check()
    int8 = export_int8(runs["full"], tmp_path / "int8")
    with pytest.raises(ConfigError, match="is int8; prune the fp32 checkpoint"):
        prune_checkpoint(int8, tmp_path / "q", PruneSettings("magnitude", 0.5))
    with pytest.raises(ConfigError, match="prune: method 'bottleneck' cannot be merged"):
        prune_checkpoint(runs["bottleneck"], tmp_path / "b", PruneSettings("magnitude", 0.5))
    with pytest.raises(ModelError, match=r"'distilbert' model; .*BERT-like encoders only"):
        ps.encoder_layers(build_model("distilbert"))
    loose = Path(shutil.copytree(runs["full"], tmp_path / "loose"))  # no splits.json next to it
    with pytest.raises(DataError, match="recovery needs the run's training rows"):
        prune_checkpoint(loose, tmp_path / "r", PruneSettings("magnitude", 0.5, recover_steps=2))
    assert not any((tmp_path / name).exists() for name in ("b", "r", "q"))
    rows = str(runs["full"].parents[1] / "train.csv")  # --train-data: recovery on a file
    settings = PruneSettings("magnitude", 0.5, recover_steps=2, train_data=rows)
    assert prune_checkpoint(loose, tmp_path / "t", settings).rounds[0]["recovery_loss_last"] > 0


# -- the command -------------------------------------------------------------------------
def test_prune_command_prints_the_table(runs, capsys):
    from tunesmith.cli import main

    out = runs["full"].parent / "heads-cli"
    args = ["prune", str(runs["full"]), str(out), "--sparsity", "0.5", "--kind", "heads"]
    assert main([*args, "--recover-steps", "2", "--batch-size", "8"]) == 0
    printed = capsys.readouterr().out
    assert f"pruned model written to {out}" in printed
    assert "attention heads removed (requested 0.50)" in printed and "+0.00 points" in printed
    for row in ("parameters", "weights on disk (MB)", "latency batch 1", "throughput batch 8"):
        assert row in printed
    assert "accuracy" in printed and "validation split (" in printed
    report = json.loads((out / "prune_report.json").read_text())
    assert report["after"]["parameters"] < report["before"]["parameters"]
    assert report["comparison"]["after"]["throughput"] > 0


def test_command_errors_are_one_line(runs, tiny_bert, tmp_path, capsys):
    from transformers import AutoModel

    from tunesmith.cli import main

    base = ["prune", str(runs["full"])]
    cases = [
        ([*base, str(runs["full"]), "--sparsity", "0.5"], "already exists; choose a new folder"),
        ([*base, str(tmp_path / "a"), "--sparsity", "1.5"], "between 0 and 1 (exclusive)"),
        ([*base, str(tmp_path / "a"), "--sparsity", "0"], "between 0 and 1 (exclusive)"),
    ]
    # A tiny DistilBERT run: structured pruning refuses it by name.
    distil = tmp_path / "distil"
    AutoModel.from_config(build_model("distilbert").config).save_pretrained(distil)
    for f in tiny_bert.iterdir():
        if f.name.startswith(("tokenizer", "vocab", "special")):
            shutil.copy(f, distil / f.name)
    data = write_csv(tmp_path / "d.csv", toy_rows(32))
    cfg = tiny_config(distil, data, tmp_path / "drun", train={"max_steps": 1, "precision": "fp32"})
    best = train(Config.from_dict(cfg), progress=False, test=False).best_dir
    cases.append(
        (
            ["prune", str(best), str(tmp_path / "h"), "--sparsity", "0.5", "--kind", "heads"],
            "'distilbert' model; heads and neurons can be pruned in BERT-like encoders only",
        )
    )
    capsys.readouterr()  # the training run's log
    for args, message in cases:
        assert main(args) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
    assert not any((tmp_path / name).exists() for name in ("a", "h"))
