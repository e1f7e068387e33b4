"""Weight loading is declared by name mapping (`PmodLlavaLlamaForCausalLM.hf_to_vllm_mapper`): a
released-layout checkpoint loads (the exactness tests), and a checkpoint with a weight the model
does not have, or without one it needs, fails at start-up with the weight's name."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

pytestmark = pytest.mark.engine  # starts engines


def edited_checkpoint(tiny_next, tmp_path, edit):
    """A copy of the tiny checkpoint whose last shard went through `edit(tensors)`."""
    target = tmp_path / "checkpoint"
    shutil.copytree(tiny_next, target)
    index_path = target / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    tensors = load_file(target / shard)
    edit(tensors)
    save_file(tensors, target / shard, metadata={"format": "pt"})
    index["weight_map"] = {n: f for n, f in index["weight_map"].items() if f != shard} | {n: shard for n in tensors}
    index_path.write_text(json.dumps(index))
    return target


def start(checkpoint):
    from vllm import LLM

    return LLM(model=str(checkpoint), dtype="float32", max_model_len=4096, enforce_eager=True)


def test_unknown_weight_is_refused_by_name(tiny_next, tmp_path):
    def add(tensors):
        tensors["model.layers.9.router.extra.weight"] = torch.zeros(4)

    with pytest.raises(Exception, match=r"router\.extra"):
        start(edited_checkpoint(tiny_next, tmp_path, add))


def test_missing_weight_is_refused_by_name(tiny_next, tmp_path):
    def drop(tensors):
        del tensors[next(n for n in sorted(tensors) if n.endswith("router.router.weight"))]

    with pytest.raises(Exception, match=r"router\.router\.weight"):
        start(edited_checkpoint(tiny_next, tmp_path, drop))
