"""LoRA recovery fine-tuning after pruning (LLM-Pruner's recovery stage), merged back into a checkpoint.

The whole model is loaded in float32 (stock transformers, or `load_pruned` when layers differ in
size), LoRA adapters (peft) are put on the chosen linear layers of the decoder blocks, and the causal
LM loss is minimized on windows of calibration text with AdamW at a constant learning rate (no
weight decay, no warm-up). On CUDA the forward and backward passes run under bfloat16 autocast where
the GPU supports it (the weights, the adapters and the optimizer state stay float32); on the CPU
everything is float32. The adapters are then merged (`merge_and_unload`) and the changed weights
written back, cast once to each tensor's own dtype, under the input's tensor names and shard files;
every other tensor is copied unchanged.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, cast

import torch
from torch import nn

from llmprune.errors import UsageError
from llmprune.model.checkpoint import Checkpoint
from llmprune.model.skeleton import find_blocks, linear_input_axis

PEFT_HINT = "pip install 'llmprune[finetune]'"
LOSS_WINDOW = 10  # steps averaged for the first and last loss of the summary
# Training diverged when the loss of the first batch, after the last step, is above
# max(DIVERGED_FACTOR x its loss before the first step, that loss + DIVERGED_MARGIN) (or not finite)
DIVERGED_FACTOR = 2.0
DIVERGED_MARGIN = 1.0
# ... or when an adapted weight's merged update is larger than this many times the weight itself
# (recovery changes a weight by a small fraction of its size; a large learning rate can leave the
# loss of a small model unmoved, a normalized layer hiding the damage, while destroying the weights)
MAX_RELATIVE_UPDATE = 10.0


@dataclass
class LoraSettings:
    rank: int
    alpha: float
    dropout: float
    targets: tuple[str, ...]
    targets_given: bool = False  # explicit --targets: every name must match; default: those present


@dataclass
class TrainSettings:
    steps: int
    batch_size: int
    lr: float
    seed: int = 0


@dataclass
class TrainResult:
    losses: list[float]
    tokens: int
    seconds: float
    precision: str
    modules: list[str] = field(default_factory=list)
    trainable_params: int = 0
    loss_after: float = math.nan  # the first batch's loss after the last step (dropout off)

    def window(self) -> int:
        """Steps averaged for the first and the last loss: LOSS_WINDOW, or half the steps when
        fewer, so the two means never share a step (with one step, both are its loss)."""
        return max(1, min(LOSS_WINDOW, len(self.losses) // 2))

    def loss_first(self) -> float:
        return _mean(self.losses[: self.window()])

    def loss_last(self) -> float:
        return _mean(self.losses[-self.window() :])


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else math.nan


def require_peft() -> None:
    try:
        import peft  # noqa: F401
    except ImportError as exc:
        raise UsageError(f"fine-tuning needs the `peft` package, which is not installed ({exc})", hint=PEFT_HINT) from None


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------


def load_model(model_dir: Path) -> tuple[nn.Module, str]:
    """The whole checkpoint as a float32 CPU causal LM, and which loader built it."""
    from llmprune.model.pruned import load_pruned, needs_load_pruned

    if needs_load_pruned(model_dir):  # structurally pruned, layers of different sizes
        return load_pruned(model_dir, dtype=torch.float32), "llmprune.load_pruned"
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # our own bar comes next; stderr stays quiet until then
    try:
        return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32), "transformers"
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def target_modules(model: nn.Module, lora: LoraSettings) -> list[str]:
    """Full names of the decoder blocks' linear layers whose own name is one of the targets."""
    path, blocks = find_blocks(model)
    found: dict[str, list[str]] = {}
    for i, block in enumerate(blocks):
        for name, mod in block.named_modules():
            if name and linear_input_axis(mod) is not None:
                found.setdefault(name.rsplit(".", 1)[-1], []).append(f"{path}.{i}.{name}")
    available = ", ".join(sorted(found))
    missing = [t for t in lora.targets if t not in found]
    if len(missing) == len(lora.targets) or (lora.targets_given and missing):
        raise UsageError(
            f"--targets {','.join(missing)}: no such linear layer in the decoder blocks",
            hint=f"this model's block linears are: {available}",
        )
    return [m for t in lora.targets for m in found.get(t, [])]


def _precision(device: torch.device) -> tuple[str, torch.dtype | None]:
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bfloat16-autocast", torch.bfloat16
    return "float32", None


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def batch_indices(n: int, batch_size: int, steps: int, seed: int):
    """`steps` batches of row indices of n rows, each epoch in a fresh random order (per `seed`)."""
    gen = torch.Generator().manual_seed(seed)
    done = 0
    while done < steps:
        order = torch.randperm(n, generator=gen)
        for start in range(0, n, batch_size):
            if done == steps:
                return
            yield order[start : start + batch_size]
            done += 1


def batches(samples: torch.Tensor, batch_size: int, steps: int, seed: int):
    """`steps` batches of rows of `samples`, each epoch in a fresh random order (per `seed`)."""
    for idx in batch_indices(samples.shape[0], batch_size, steps, seed):
        yield samples[idx]


@dataclass
class Distill:
    """Distillation from a teacher-logit sidecar (calibration/teacher.py): the loss is
    alpha x KL(teacher || student) + (1 - alpha) x the next-token loss."""

    teacher: Any  # TeacherLogits
    alpha: float = 1.0


def _loss(model: nn.Module, samples: torch.Tensor, idx: torch.Tensor, device: torch.device, distill: Distill | None) -> torch.Tensor:
    ids = samples[idx].to(device)
    if distill is None:
        return model(input_ids=ids, labels=ids, use_cache=False).loss
    from llmprune.calibration.teacher import kd_loss

    t = distill.teacher
    out = model(input_ids=ids, labels=ids if distill.alpha < 1 else None, use_cache=False)
    kd = kd_loss(out.logits, t.topk_ids[idx].to(device), t.topk_logprobs[idx].to(device), t.rest_logprob[idx].to(device))
    return kd if distill.alpha >= 1 else distill.alpha * kd + (1 - distill.alpha) * out.loss


def train_lora(
    model: nn.Module,
    samples: torch.Tensor,
    lora: LoraSettings | None,
    train: TrainSettings,
    device: torch.device,
    on_step: Callable[[int, float], None] | None = None,
    distill: Distill | None = None,
    full_targets: tuple[str, ...] = (),
) -> tuple[nn.Module, TrainResult]:
    """Fine-tunes LoRA adapters on `samples` [N, L] and returns the merged model (on the CPU). With
    `lora` None, trains the weights of the block linears named `full_targets` themselves instead,
    every zero weight staying zero. With `distill`, the loss is the teacher's (Distill)."""
    torch.manual_seed(train.seed)
    if lora is not None:
        from peft import LoraConfig, get_peft_model

        modules = target_modules(model, lora)
        config = LoraConfig(
            r=lora.rank,
            lora_alpha=lora.alpha,  # type: ignore[arg-type]  # peft annotates an int; a float scales alike (alpha / r)
            lora_dropout=lora.dropout,
            target_modules=modules,
            bias="none",
            task_type="CAUSAL_LM",
        )
        with warnings.catch_warnings():  # transformers 5 deprecates a name peft still reads
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            peft_model: nn.Module = get_peft_model(model, config)
        masks: list[tuple[nn.Parameter, torch.Tensor, torch.Tensor]] = []
    else:
        modules = target_modules(model, LoraSettings(0, 0.0, 0.0, full_targets, targets_given=False))
        peft_model = model
        for p in model.parameters():
            p.requires_grad_(False)
        masks = []
        for m in modules:
            w = cast(nn.Parameter, model.get_submodule(m).weight)
            w.requires_grad_(True)
            masks.append((w, w.detach() != 0, w.detach().clone()))
    peft_model.to(device).train()
    masks = [(w, keep.to(device), orig) for w, keep, orig in masks]
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=train.lr, weight_decay=0.0)
    precision, autocast = _precision(device)
    losses: list[float] = []
    tokens = 0
    first: torch.Tensor | None = None
    t0 = time.perf_counter()
    for step, idx in enumerate(batch_indices(samples.shape[0], train.batch_size, train.steps, train.seed), 1):
        first = idx if first is None else first
        with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
            loss = _loss(peft_model, samples, idx, device, distill)
        value = float(loss.detach())
        if not math.isfinite(value):  # checked before this step's update
            raise UsageError(f"training diverged: the loss became {value} at step {step}; nothing was written", hint=_lr_hint(train.lr))
        loss.backward()
        with torch.no_grad():
            for w, keep, _ in masks:
                w.grad.mul_(keep)  # type: ignore[union-attr]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for w, keep, _ in masks:
                w.mul_(keep)
        losses.append(value)
        tokens += int(samples[idx].numel())
        if on_step is not None:
            on_step(step, value)
    seconds = time.perf_counter() - t0
    assert first is not None  # at least one step
    # the last update is checked too: the first batch again, dropout off (the adapters start at zero,
    # so the first step's loss is the model's own on that batch, whatever the dropout)
    peft_model.eval()
    with torch.no_grad(), torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
        after = float(_loss(peft_model, samples, first, device, distill))
    check_converged(losses[0], after, len(losses), train.lr)
    if lora is not None:
        check_updates(peft_model, train.lr)
        merged = cast(Any, peft_model).merge_and_unload().to("cpu").eval()
    else:
        for (w, _, orig), name in zip(masks, modules):
            _check_update(name + ".weight", (w.detach().cpu() - orig.cpu()).norm(), orig.norm(), train.lr)
            w.requires_grad_(False)
        merged = peft_model.to("cpu").eval()
    result = TrainResult(losses, tokens, seconds, precision, modules, sum(p.numel() for p in params), after)
    return merged, result


def _lr_hint(lr: float) -> str:
    return f"use a smaller --lr than {lr:g}"


def check_converged(before: float, after: float, steps: int, lr: float) -> None:
    """The first batch's loss after the last step against its loss before the first: not finite, or
    far above it, is divergence (an error: the merged model would be destroyed)."""
    if not math.isfinite(after) or after > max(DIVERGED_FACTOR * before, before + DIVERGED_MARGIN):
        raise UsageError(
            f"training diverged: the loss of the first batch went from {before:.4f} to {after:.4g} in {steps} step{'s' if steps != 1 else ''}; "
            "nothing was written",
            hint=_lr_hint(lr),
        )


def check_updates(peft_model: nn.Module, lr: float) -> None:
    """Every LoRA update (scale x B A, what merging adds) finite and at most MAX_RELATIVE_UPDATE
    times the size (Frobenius norm) of the weight it is added to."""
    with torch.no_grad():
        for name, mod in peft_model.named_modules():
            base = getattr(mod, "base_layer", None)
            get_delta = getattr(mod, "get_delta_weight", None)
            if base is None or get_delta is None or not hasattr(base, "weight"):
                continue
            for adapter in getattr(mod, "active_adapters", ["default"]):
                _check_update(name.removeprefix("base_model.model.") + ".weight", get_delta(adapter).float().norm(), base.weight.float().norm(), lr)


def _check_update(weight: str, delta_norm: torch.Tensor, size_norm: torch.Tensor, lr: float) -> None:
    """An update finite and at most MAX_RELATIVE_UPDATE times the weight's size."""
    delta, size = float(delta_norm), float(size_norm)
    if not math.isfinite(delta) or (size > 0 and delta > MAX_RELATIVE_UPDATE * size):
        what = "is not finite" if not math.isfinite(delta) else f"is {delta / size:.3g} times the size of the weight"
        raise UsageError(f"training diverged: the update of {weight} {what}; nothing was written", hint=_lr_hint(lr))


def check_weights(changed: Mapping[str, torch.Tensor], ckpt: Checkpoint, lr: float) -> None:
    """Every merged weight finite, also once cast to its tensor's dtype in the checkpoint."""
    for name, t in changed.items():
        dtype = _DTYPES.get(ckpt.entries[name][1]) if name in ckpt.entries else None
        cast = t.detach().to(dtype) if dtype is not None else t.detach()
        if not bool(torch.isfinite(cast).all()):
            what = "not finite" if not bool(torch.isfinite(t).all()) else f"beyond the range of {ckpt.entries[name][1]}"
            raise UsageError(f"training diverged: merged weights of {name} are {what}; nothing was written", hint=_lr_hint(lr))


_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64}


# --------------------------------------------------------------------------------------------
# The output checkpoint
# --------------------------------------------------------------------------------------------


def changed_weights(model: nn.Module, modules: list[str], ckpt: Checkpoint) -> dict[str, torch.Tensor]:
    """Checkpoint tensor name -> merged weight of every LoRA-targeted module."""
    from llmprune.model.pruned import checkpoint_names

    keys = {f"{m}.weight" for m in modules}
    state = model.state_dict()
    mapping = checkpoint_names(model, set(ckpt.entries))
    missing = sorted(keys - mapping.keys())
    if missing:
        raise RuntimeError(f"tensor {missing[0]} of the model has no counterpart in {ckpt.dir}")
    return {mapping[k]: state[k] for k in sorted(keys)}


def write_checkpoint(
    ckpt: Checkpoint,
    changed: Mapping[str, torch.Tensor],
    out_dir: Path,
    provenance: dict[str, Any],
    after_shard: Callable[[list[str]], None] | None = None,
) -> None:
    """The input's shards with the `changed` tensors replaced (each cast to the input tensor's dtype),
    and every other file of the input (index, config, tokenizer) copied. `after_shard(names)` is told,
    after each shard is written, which of the changed tensors it held (so their copies can go)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from llmprune import _core

    for f in ckpt.files:
        tensors: dict[str, torch.Tensor] = {}
        with safe_open(str(ckpt.dir / f), framework="pt", device="cpu") as st:
            meta = dict(st.metadata() or {})
            for name in st.keys():
                t = st.get_tensor(name)
                tensors[name] = changed[name].detach().to(t.dtype).contiguous() if name in changed else t
        meta["llmprune"] = json.dumps(_with_parent(provenance, meta.get("llmprune")))
        (out_dir / f).parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(out_dir / f), metadata=meta)
        _give_plain_mode(out_dir / f)
        if after_shard is not None:
            after_shard([name for name in tensors if name in changed])
        del tensors
    _core.copy_model_files(str(ckpt.dir), str(out_dir), with_index=True)


def _give_plain_mode(path: Path) -> None:
    """The mode a plain open() would give (safetensors' save_file leaves its files private)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def _with_parent(provenance: dict[str, Any], previous: str | None) -> dict[str, Any]:
    """The input's own provenance (e.g. how it was pruned) kept under "input"."""
    if not previous:
        return provenance
    try:
        parent: Any = json.loads(previous)
    except ValueError:
        parent = previous
    return {**provenance, "input": parent}


def check_same_layout(ckpt: Checkpoint, out_dir: Path) -> None:
    """Merged LoRA changes values only: every tensor keeps its name, shard, dtype and shape."""
    out = Checkpoint(out_dir)
    if out.entries == ckpt.entries:
        return
    for name in sorted(set(ckpt.entries) | set(out.entries)):
        a, b = ckpt.entries.get(name), out.entries.get(name)
        if a != b:
            raise RuntimeError(f"the output's tensor {name} is {b}, the input's is {a}")
