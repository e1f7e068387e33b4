"""Batched training forward of the reference model (`pmod_reference.model`), with gradients.

The reference runs one sequence at a time; on 2 CPU cores that is ~100 ms per training example,
dominated by Python overhead. Training runs a batch of sequences through the *same modules* (the
reference's embeddings, CLIP tower, projector, image merge, RMSNorms, q/k/v/o projections, RoPE
module, MLPs, routers, weight norm, final norm and LM head); only two things are re-written here
for a batch, from docs/p-mod.md ("A p-MoD layer at prefill"), and `tests/test_trained.py` checks that they give the reference's
logits and kept tokens:
  - causal attention among the kept tokens by original position (softmax(q k^T / sqrt(d)) v);
  - the p-MoD routing: per sequence, the top ``trunc(T * ratio)`` target tokens by router weight
    ``w = TanhNorm(z)`` are kept with every non-target token; kept tokens go through the layer
    (``h = x + Attn(LN1(x))``, ``m = MLP(LN2(h))``), outputs are STRing-re-weighted: kept target
    ``h + w m``, kept non-target ``h + m``, skipped target ``w x``.
Gradients reach the routers through ``w`` (STRing), as in the paper: no auxiliary loss.

Every sequence of a batch holds one image with the same number of visual tokens ``T`` (the task's
pictures are all square), so every p-MoD layer keeps the same number of tokens in every row and the
kept tokens form a dense ``[batch, kept, hidden]`` tensor. Rows are right-padded; pad tokens come
after every real token, so causal attention never lets a real token see them.

The tokens before the image (BOS, the vicuna system prompt, ``USER:``) are the same in every row
and, causal attention being what it is, so are their hidden states: they run once per batch, as a
row of their own (text tokens: every layer, p-MoD or not, processes them in full), and every row
attends to their keys and values.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image

from model_registry import VICUNA_V1_SYSTEM_PROMPT
from pmod_reference.model import LlamaDecoderLayer, PmodDecoderLayer, PmodReference
from pmod_serve.multimodal.image_processing import preprocess
from pmod_serve.pmod.image_layout import merge_image_features
from pmod_serve.pmod.schedule import kept_target_count

VICUNA_SYSTEM = VICUNA_V1_SYSTEM_PROMPT


def vicuna_prompt(question: str) -> str:
    """The released single-turn vicuna_v1 prompt with one image (what the chat template renders)."""
    return f"{VICUNA_SYSTEM} USER: <image>\n{question} ASSISTANT:"


@dataclass
class Batch:
    """Rows hold the tokens after the shared prefix; indices below count from the prefix's end."""

    prefix_embeds: torch.Tensor  # [1, P, hidden]: the tokens every row starts with
    inputs_embeds: torch.Tensor  # [B, N, hidden]: each row's tokens after the prefix
    positions: torch.Tensor  # [B, N]: their positions in the sequence (P, P+1, ...)
    target_index: torch.Tensor  # [B, T] row index of every target (visual) token
    label_index: torch.Tensor  # [B, A] row indices whose next-token logits are scored
    labels: torch.Tensor  # [B, A] answer ids (-100 where a row has fewer)


def answer_ids(reference: PmodReference, answer: str) -> list[int]:
    """What the model must generate after ``ASSISTANT:``: the answer, then EOS (LLaVA's ``</s>``)."""
    return [*reference.tokenizer.encode(answer), reference.tokenizer.eos_id]


def make_batch(reference: PmodReference, images: Sequence[Image.Image],
               conversations: Sequence[Sequence[tuple[str, str]]]) -> Batch:
    """Embeddings of each row's conversation (teacher forcing), one image per row.

    A row is LLaVA's multi-turn training format: the served single-turn prompt
    ``vicuna_v1(image, q1)``, then ``a1</s>``, then ``USER: q2 ASSISTANT: a2</s>`` and so on. The
    first turn is token for token what the server sees; every answer token and EOS is scored.
    """
    model = reference.model
    tokenizer = reference.tokenizer
    pixels = torch.cat([preprocess(image, reference.layout) for image in images]).to(reference.dtype)
    features = model.mm_projector(model.vision_tower(pixels))  # [B * crops, patches, hidden]
    if features.shape[0] != len(images):
        raise ValueError("the batched training forward takes layouts with one crop per image (pad)")

    rows, target_rows, scored, prefixes = [], [], [], []
    for i, (image, turns) in enumerate(zip(images, conversations)):
        (first_question, _), *_ = turns
        inputs = reference.prompt_inputs(vicuna_prompt(first_question), [image])
        ids = list(inputs.token_ids)
        labels: list[tuple[int, int]] = []  # (position predicting it, token id)
        for number, (question, answer) in enumerate(turns):
            if number:
                ids += tokenizer.encode(f"USER: {question} ASSISTANT:")
            for token in answer_ids(reference, answer):
                labels.append((len(ids) - 1, token))
                ids.append(token)
        ids = ids[:-1]  # the last EOS is predicted, never fed
        (span,) = inputs.image_spans
        ids_tensor = torch.tensor(ids)
        is_text = torch.ones(len(ids), dtype=torch.bool)
        is_text[span] = False
        embeds = model.embed_tokens(ids_tensor.masked_fill(~is_text, 0))
        visual = merge_image_features(features[i : i + 1], *image.size, reference.layout, model.image_newline)
        # The prefix (everything before the image) is embedded once, from the first row.
        prefixes.append(tuple(ids[: span.start]))
        if i == 0:
            prefix_embeds = embeds[None, : span.start]
        rows.append(torch.cat([visual, embeds[span.stop :]]))
        target_rows.append(inputs.target_mask.nonzero().squeeze(-1) - span.start)
        scored.append([(position - span.start, token) for position, token in labels])
    if len(set(prefixes)) != 1:
        raise ValueError("every row of a batch must start with the same tokens before its image")
    if len({len(t) for t in target_rows}) != 1:
        raise ValueError("every row of a batch needs the same number of target tokens")

    start = len(prefixes[0])
    longest = max(len(r) for r in rows)
    inputs_embeds = torch.stack([F.pad(r, (0, 0, 0, longest - len(r))) for r in rows])
    most = max(len(s) for s in scored)
    label_index = torch.zeros(len(rows), most, dtype=torch.long)
    labels_tensor = torch.full((len(rows), most), -100, dtype=torch.long)
    for i, labels in enumerate(scored):
        label_index[i, : len(labels)] = torch.tensor([position for position, _ in labels])
        labels_tensor[i, : len(labels)] = torch.tensor([token for _, token in labels])
    positions = torch.arange(start, start + longest).expand(len(rows), longest)
    return Batch(prefix_embeds, inputs_embeds, positions, torch.stack(target_rows), label_index, labels_tensor)


def single_turn_batch(reference: PmodReference, items: Sequence) -> Batch:
    """A batch of `shapes.Example`s, one question each: exactly the served prompts."""
    return make_batch(reference, [e.image for e in items], [[(e.question, e.answer)] for e in items])


# Keys, values ([1, heads, P, head_dim], after RoPE) and positions ([P]) of the shared prefix at a layer.
Past = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _attention(layer: LlamaDecoderLayer, x: torch.Tensor, positions: torch.Tensor,
               past: Past | None = None) -> tuple[torch.Tensor, Past]:
    """``Attn(x)`` of the reference's LlamaAttention for ``[B, L, hidden]``, causal by position, over
    ``past`` (the prefix, shared by every row) and the row's own tokens; also returns the rows' own
    keys, values and positions."""
    attn = layer.self_attn
    batch, length, _ = x.shape
    heads, kv_heads, head_dim = attn.num_heads, attn.num_kv_heads, attn.head_dim

    def split(t: torch.Tensor, n: int) -> torch.Tensor:  # -> [n, B * L, head_dim] for the RoPE module
        return t.view(batch * length, n, head_dim).transpose(0, 1)

    q, k = attn.rotary_emb(split(attn.q_proj(x), heads), split(attn.k_proj(x), kv_heads), positions.reshape(-1))
    v = split(attn.v_proj(x), kv_heads)

    def unsplit(t: torch.Tensor) -> torch.Tensor:  # -> [B, n, L, head_dim]
        return t.view(t.shape[0], batch, length, head_dim).transpose(0, 1)

    q, k, v = unsplit(q), unsplit(k), unsplit(v)
    own = (k, v, positions)
    key_positions = positions
    if past is not None:
        past_k, past_v, past_positions = past
        k = torch.cat([past_k.expand(batch, -1, -1, -1), k], dim=2)
        v = torch.cat([past_v.expand(batch, -1, -1, -1), v], dim=2)
        key_positions = torch.cat([past_positions.expand(batch, -1), positions], dim=1)
    if kv_heads != heads:
        k, v = k.repeat_interleave(heads // kv_heads, dim=1), v.repeat_interleave(heads // kv_heads, dim=1)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(head_dim)
    future = key_positions[:, None, :] > positions[:, :, None]  # [B, query, key]
    scores = scores.masked_fill(future[:, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    out = (probs @ v).transpose(1, 2).reshape(batch, length, heads * head_dim)
    return attn.o_proj(out), own


def _residual_parts(layer: LlamaDecoderLayer, x: torch.Tensor, positions: torch.Tensor,
                    past: Past | None = None) -> tuple[torch.Tensor, torch.Tensor, Past]:
    attended, own = _attention(layer, layer.input_layernorm(x), positions, past)
    h = x + attended
    return h, layer.mlp(layer.post_attention_layernorm(h)), own


@dataclass
class BatchRouting:
    kept_index: torch.Tensor  # [B, kept] sequence indices, ascending per row
    kept_targets: torch.Tensor  # [B, k] sequence indices of the kept target tokens, ascending
    target_weights: torch.Tensor  # [B, T] router weight w of each target token


def _pmod_layer(layer: PmodDecoderLayer, x: torch.Tensor, positions: torch.Tensor,
                target_index: torch.Tensor, past: Past | None) -> tuple[torch.Tensor, BatchRouting]:
    batch, length, hidden = x.shape
    logits = layer.router(x).gather(1, target_index)  # [B, T]
    weights = layer.weight_norm.apply(logits)  # w = 0.2 * tanh(z) + 1 (elementwise for tanh)
    k = kept_target_count(target_index.shape[1], layer.retention_ratio)
    top = torch.topk(weights, k, dim=1).indices
    kept_targets = target_index.gather(1, top).sort(dim=1).values
    kept_mask = torch.ones(batch, length, dtype=torch.bool)
    kept_mask.scatter_(1, target_index, False)
    kept_mask.scatter_(1, kept_targets, True)
    kept_index = kept_mask.nonzero()[:, 1].view(batch, -1)  # row-major: ascending per row

    gather = kept_index[..., None].expand(-1, -1, hidden)
    h, m, _ = _residual_parts(layer.decoder_layer, x.gather(1, gather), positions.gather(1, kept_index), past)
    weight = torch.ones(batch, length, dtype=x.dtype).scatter(1, target_index, weights.to(x.dtype))
    y = weight[..., None] * x  # skipped target: w x
    y = y.scatter(1, gather, h + weight.gather(1, kept_index)[..., None] * m)  # kept: h + w m (w = 1 for text)
    return y, BatchRouting(kept_index, kept_targets, weights)


def decoder_forward(reference: PmodReference, batch: Batch) -> tuple[torch.Tensor, dict[int, BatchRouting]]:
    """Final-norm hidden states ``[B, N, hidden]`` of the rows and each p-MoD layer's routing."""
    prefix = batch.prefix_embeds
    prefix_positions = torch.arange(prefix.shape[1])[None]
    hidden = batch.inputs_embeds
    routings: dict[int, BatchRouting] = {}
    for index, layer in enumerate(reference.model.layers):
        past = None
        if prefix.shape[1]:
            # Text tokens: a p-MoD layer keeps them all and its output is h + m, as an ordinary layer's.
            dense = layer.decoder_layer if isinstance(layer, PmodDecoderLayer) else layer
            h, m, (past_k, past_v, _) = _residual_parts(dense, prefix, prefix_positions)
            prefix, past = h + m, (past_k, past_v, prefix_positions[0])
        if isinstance(layer, PmodDecoderLayer):
            hidden, routings[index] = _pmod_layer(layer, hidden, batch.positions, batch.target_index, past)
        else:
            h, m, _ = _residual_parts(layer, hidden, batch.positions, past)
            hidden = h + m
    return reference.model.norm(hidden), routings


def answer_logits(reference: PmodReference, batch: Batch) -> torch.Tensor:
    """``[B, A, vocab]`` logits at the positions that predict the answer tokens."""
    hidden, _ = decoder_forward(reference, batch)
    picked = hidden.gather(1, batch.label_index[..., None].expand(-1, -1, hidden.shape[-1]))
    return reference.module.lm_head(picked)


def loss(reference: PmodReference, batch: Batch) -> torch.Tensor:
    """Mean cross-entropy over the answer tokens (EOS included) of the batch."""
    logits = answer_logits(reference, batch)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), batch.labels.reshape(-1),
                           ignore_index=-100)
