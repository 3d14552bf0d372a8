"""The saved-for-backward tally (``evaluation.activations``) counts what autograd keeps, where."""

from __future__ import annotations

import torch

from tunesmith.training.activations import OUTSIDE, SavedActivations, default_group


def test_saved_tensors_are_counted_once_by_the_module_that_saved_them():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    x = torch.randn(5, 8)
    with SavedActivations(model) as saved:
        out = torch.log_softmax(model(x), dim=-1)  # the "loss", outside the model
    floats = 4
    # Linear 0 keeps its input (for its weight's gradient), ReLU its output; Linear 2's
    # input is that same storage (counted once); weights are not activations.
    assert saved.by_group == {
        "0": 5 * 8 * floats,
        "1": 5 * 16 * floats,
        OUTSIDE: 5 * 4 * floats,
    }
    assert saved.total == (5 * 8 + 5 * 16 + 5 * 4) * floats
    out.sum().backward()  # the hooks left the graph intact
    assert model[0].weight.grad is not None
    with torch.no_grad(), SavedActivations(model) as nothing:
        model(x)
    assert nothing.total == 0


def test_groups_name_blocks_head_and_embeddings():
    assert default_group("model.layers.3.self_attn.q_proj") == "block 3"
    assert default_group("base_model.model.model.layers.12.mlp") == "block 12"
    assert default_group("lm_head") == "lm head"
    assert default_group("model.embed_tokens") == "embeddings"
    assert default_group("model.norm") == "norm"
