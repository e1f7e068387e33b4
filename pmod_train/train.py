"""Train the tiny p-MoD-LLaVA (and its dense twin) on the shapes task, on CPU, deterministically.

    python -m pmod_train train --out checkpoints/shapes-pmod            # p-MoD, the released PRD schedule
    python -m pmod_train train --dense --out checkpoints/shapes-dense   # same dimensions, no MoD layers

Everything is trained jointly from a seeded initialisation: CLIP tower, projector, LLM and the
p-MoD routers (which learn through the STRing weights, as in the paper; no auxiliary loss). The
loss is the cross-entropy of the answer tokens and EOS given ``vicuna_v1(image, question)``, the
prompt the server renders. Batches are drawn from `pmod_train.shapes` with the training seed;
the same seed, step count, batch size and thread count give the same weights.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from pmod_reference.model import PmodReference
from pmod_train import checkpoint, forward, shapes

DEFAULTS = {"steps": 600, "batch_size": 16, "lr": 2e-3, "warmup": 40, "weight_decay": 0.01, "seed": 0}


def load_trainable(checkpoint_dir: str | Path) -> PmodReference:
    """The reference model of a checkpoint, in training mode with gradients on every weight."""
    reference = PmodReference(checkpoint_dir)
    reference.module.train()
    for parameter in reference.module.parameters():
        parameter.requires_grad_(True)
    return reference


def batch_of(reference: PmodReference, seed: int, start: int, size: int) -> forward.Batch:
    """Training pictures ``start .. start+size-1`` of the stream ``seed``, each with its conversation."""
    items = [shapes.conversation(seed, index) for index in range(start, start + size)]
    return forward.make_batch(reference, [image for image, _ in items], [turns for _, turns in items])


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to a tenth."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(reference: PmodReference, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, parameter in reference.module.named_parameters():
        (decay if parameter.dim() >= 2 and "embed" not in name else no_decay).append(parameter)
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr, betas=(0.9, 0.98), eps=1e-8,
    )


@torch.no_grad()
def teacher_forced_accuracy(reference: PmodReference, batch: forward.Batch) -> float:
    """Share of rows whose every answer token (and EOS) is the argmax: what greedy decoding answers."""
    logits = forward.answer_logits(reference, batch)
    valid = batch.labels != -100
    right = (logits.argmax(-1) == batch.labels) | ~valid
    return float(right.all(dim=1).float().mean())


def train_steps(reference: PmodReference, steps: int, *, batch_size: int, lr: float, warmup: int,
                weight_decay: float, seed: int, log_every: int = 0, total_steps: int | None = None,
                optimizer: torch.optim.Optimizer | None = None) -> list[float]:
    """Run ``steps`` optimiser steps; returns the loss of every step."""
    total = total_steps or steps
    optimizer = optimizer or make_optimizer(reference, lr, weight_decay)
    losses = []
    started = time.monotonic()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, total, lr, warmup)
        batch = batch_of(reference, seed, step * batch_size, batch_size)
        value = forward.loss(reference, batch)
        optimizer.zero_grad(set_to_none=True)
        value.backward()
        torch.nn.utils.clip_grad_norm_(reference.module.parameters(), 1.0)
        optimizer.step()
        losses.append(value.item())
        if log_every and (step % log_every == 0 or step == steps - 1):
            recent = losses[-log_every:]
            valid = ""
            if step % (4 * log_every) == 0 or step == steps - 1:
                items = [shapes.example(shapes.VALID_SEED, i) for i in range(64)]
                valid = f"  valid acc {teacher_forced_accuracy(reference, forward.single_turn_batch(reference, items)):.3f}"
            print(f"[train] step {step:4d}  loss {sum(recent) / len(recent):.4f}  "
                  f"lr {optimizer.param_groups[0]['lr']:.2e}  {time.monotonic() - started:.0f}s{valid}", flush=True)
    return losses


def train(out_dir: str | Path, *, dense: bool, steps: int, batch_size: int, lr: float, warmup: int,
          weight_decay: float, seed: int, threads: int, log_every: int = 25,
          command: str | None = None) -> dict[str, Any]:
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="pmod-train-init-") as tmp:
        init_dir = checkpoint.build_initial_checkpoint(Path(tmp) / "init", dense=dense, seed=seed)
        reference = load_trainable(init_dir)
        config = json.loads((init_dir / "config.json").read_text())
        tokenizer = (init_dir / "tokenizer.model").read_bytes()
    print(f"[train] {'dense' if dense else 'p-MoD'} model, {sum(p.numel() for p in reference.module.parameters()):,} "
          f"weights, p-MoD layers {dict((k, round(v, 3)) for k, v in reference.schedule.retention_ratio.items())}",
          flush=True)
    losses = train_steps(reference, steps, batch_size=batch_size, lr=lr, warmup=warmup,
                         weight_decay=weight_decay, seed=seed, log_every=log_every)
    reference.module.eval()
    heldout = [shapes.example(shapes.HELDOUT_SEED, i) for i in range(256)]
    accuracy = sum(
        teacher_forced_accuracy(reference, forward.single_turn_batch(reference, chunk))
        * len(chunk)
        for chunk in (heldout[i : i + 64] for i in range(0, len(heldout), 64))
    ) / len(heldout)
    record = {
        "model": "dense" if dense else "pmod",
        "steps": steps, "batch_size": batch_size, "lr": lr, "warmup": warmup,
        "weight_decay": weight_decay, "seed": seed, "threads": threads,
        "examples_seen": steps * batch_size,
        "final_loss_mean_last_25": sum(losses[-25:]) / len(losses[-25:]),
        "first_loss": losses[0],
        "heldout_teacher_forced_accuracy_256": accuracy,
        "train_seconds": round(time.monotonic() - started, 1),
        "torch_version": torch.__version__,
        "command": command,
    }
    state = {name: tensor.detach() for name, tensor in reference.module.state_dict().items()}
    checkpoint.write_checkpoint(out_dir, config, state, tokenizer, {"training.json": record})
    print(f"[train] held-out accuracy (teacher-forced, 256 examples) {accuracy:.3f}; wrote {out_dir} "
          f"in {record['train_seconds']:.0f}s", flush=True)
    return record


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pmod_train train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--dense", action="store_true", help="the dense baseline: no p-MoD layers")
    parser.add_argument("--steps", type=int, default=DEFAULTS["steps"])
    parser.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"])
    parser.add_argument("--lr", type=float, default=DEFAULTS["lr"])
    parser.add_argument("--warmup", type=int, default=DEFAULTS["warmup"])
    parser.add_argument("--weight-decay", type=float, default=DEFAULTS["weight_decay"])
    parser.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the bits of the result depend on it)")
    args = parser.parse_args(argv)
    import shlex
    import sys

    command = "python -m pmod_train train " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    train(args.out, dense=args.dense, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
          warmup=args.warmup, weight_decay=args.weight_decay, seed=args.seed, threads=args.threads,
          command=command)


if __name__ == "__main__":
    main()
