"""The teacher-logit sidecar (docs/sidecar.md): the dense model's top-K next-token log-probabilities
at every position of the calibration windows, with the token ids of those windows and the
probability mass left outside the top K, taken in the layer-streamed statistics pass
(`llmprune stats MODEL --teacher-logits K`). `finetune --distill` trains on exactly these windows
against this distribution, so the teacher and the student are never in memory together.

The KD loss is KL(teacher || student) over the K tokens plus one bucket for the rest of the
vocabulary: with K equal to the vocabulary size it is the full KL divergence.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from llmprune.errors import UsageError

FORMAT = "llmprune-teacher"
VERSION = 1
TEACHER_NAME = "llmprune-teacher.safetensors"


@dataclass
class TeacherLogits:
    """input_ids [N, L] (int64), topk_ids [N, L, K] (int64), topk_logprobs [N, L, K] (float32, the
    teacher's log-softmax, descending), rest_logprob [N, L] (float32, log of the mass outside the
    top K; -inf when there is none) and the metadata."""

    input_ids: torch.Tensor
    topk_ids: torch.Tensor
    topk_logprobs: torch.Tensor
    rest_logprob: torch.Tensor
    meta: dict[str, Any]

    @property
    def k(self) -> int:
        return int(self.topk_ids.shape[-1])


def top_k(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, log-probabilities, log of the remaining mass) of the k most likely tokens of
    logits [..., V], in float32 (computed in float64 for the remaining mass)."""
    logp = torch.log_softmax(logits.double(), dim=-1)
    values, ids = torch.topk(logp, k, dim=-1)
    kept = torch.logsumexp(values, dim=-1)
    rest = torch.log(-torch.expm1(kept.clamp(max=0.0)))  # log(1 - sum of the top k)
    if k >= logits.shape[-1]:  # the whole vocabulary: nothing outside it (not a rounding residue)
        rest = torch.full_like(rest, -math.inf)
    return ids.long(), values.float(), rest.float()


class TeacherCollector:
    """Collects top-K log-probabilities window by window from the last block's outputs (the
    statistics pass's on_hidden callback). The streamer must have its LM head loaded."""

    def __init__(self, streamer: Any, samples: torch.Tensor, k: int):
        vocab = int(getattr(streamer.config, "vocab_size", 0) or 0)
        if vocab and k > vocab:
            raise UsageError(f"--teacher-logits {k} exceeds the model's vocabulary of {vocab} tokens", hint=f"pass --teacher-logits {vocab} or less")
        self.streamer, self.samples, self.k = streamer, samples, k
        n, length = samples.shape
        self.topk_ids = torch.empty((n, length, k), dtype=torch.int64)
        self.topk_logprobs = torch.empty((n, length, k), dtype=torch.float32)
        self.rest = torch.empty((n, length), dtype=torch.float32)

    def __call__(self, i: int, hidden: torch.Tensor) -> None:
        if i != self.streamer.num_blocks:
            return
        for j in range(hidden.shape[0]):
            logits = self.streamer.logits(self.samples[j : j + 1], hidden[j : j + 1])[0]
            ids, lp, rest = top_k(logits, self.k)
            self.topk_ids[j], self.topk_logprobs[j], self.rest[j] = ids.cpu(), lp.cpu(), rest.cpu()

    def result(self, meta: dict[str, Any]) -> TeacherLogits:
        return TeacherLogits(self.samples.clone(), self.topk_ids, self.topk_logprobs, self.rest, meta)


def write(path: Path, teacher: TeacherLogits) -> int:
    """Writes the sidecar atomically (a temporary file beside it, then a rename); returns its size."""
    from safetensors.torch import save_file

    from llmprune import _core

    _core.check_file_destination(str(path))
    meta = {"format": FORMAT, "format_version": str(VERSION), **{k: json.dumps(v) for k, v in teacher.meta.items()}}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file(
            {
                "input_ids": teacher.input_ids.to(torch.int64).contiguous(),
                "topk_ids": teacher.topk_ids.to(torch.int32).contiguous(),
                "topk_logprobs": teacher.topk_logprobs.contiguous(),
                "rest_logprob": teacher.rest_logprob.contiguous(),
            },
            str(tmp),
            metadata=meta,
        )
        read(tmp)  # what is published is checked first: the same validation a reader applies
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path.stat().st_size


def read(path: Path) -> TeacherLogits:
    """Reads and validates a teacher sidecar: its format, the tensors' shapes and dtypes, ids within
    the vocabulary it records, finite descending log-probabilities."""
    from safetensors import SafetensorError, safe_open

    bad = f"{path} is not a valid teacher-logit sidecar"
    hint = "write one with: llmprune stats MODEL --teacher-logits K"
    if path.is_dir():
        raise UsageError(f"{path} is a directory, not a teacher-logit sidecar", hint=hint)
    if not path.is_file():
        raise UsageError(f"teacher-logit sidecar {path} not found", hint=hint)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as st:
            raw = dict(st.metadata() or {})
            if raw.get("format") != FORMAT:
                what = "a stats or Gram sidecar" if str(raw.get("format", "")).startswith("llmprune") or "layers" in raw else "another file"
                raise UsageError(f"{bad}: it is {what} (format {raw.get('format')!r})", hint=hint)
            if raw.get("format_version") != str(VERSION):
                raise UsageError(f"{bad}: format version {raw.get('format_version')!r} (this llmprune reads {VERSION})", hint=hint)
            keys = set(st.keys())
            want = {"input_ids", "topk_ids", "topk_logprobs", "rest_logprob"}
            if keys != want:
                raise UsageError(f"{bad}: tensors {sorted(keys)} (expected {sorted(want)})", hint=hint)
            t = {k: st.get_tensor(k) for k in want}
            meta = {k: json.loads(v) for k, v in raw.items() if k not in ("format", "format_version")}
    except SafetensorError as exc:
        raise UsageError(f"{bad}: {exc}", hint=hint) from None
    except ValueError as exc:
        raise UsageError(f"{bad}: {exc}", hint=hint) from None
    ids, tids, lp, rest = t["input_ids"], t["topk_ids"], t["topk_logprobs"], t["rest_logprob"]
    ok = ids.dim() == 2 and ids.dtype == torch.int64 and tids.dim() == 3 and tids.shape[:2] == ids.shape and lp.shape == tids.shape
    ok = ok and rest.shape == ids.shape and lp.dtype == torch.float32 and rest.dtype == torch.float32 and tids.dtype == torch.int32
    if not ok or ids.shape[0] < 1 or ids.shape[1] < 2 or tids.shape[2] < 1:
        raise UsageError(f"{bad}: inconsistent tensor shapes or dtypes", hint=hint)
    vocab = meta.get("vocab_size")
    if not isinstance(vocab, int) or not (0 <= int(tids.min()) and int(tids.max()) < vocab and 0 <= int(ids.min()) and int(ids.max()) < vocab):
        raise UsageError(f"{bad}: token ids outside the vocabulary it records ({vocab})", hint=hint)
    if not bool(torch.isfinite(lp).all()) or bool((lp > 1e-6).any()) or bool((lp[..., 1:] > lp[..., :-1] + 1e-6).any()):
        raise UsageError(f"{bad}: its log-probabilities are not finite, descending and at most 0", hint=hint)
    if not isinstance(meta.get("model_fingerprint"), str):
        raise UsageError(f"{bad}: it records no model fingerprint", hint=hint)
    return TeacherLogits(ids, tids.long(), lp, rest, meta)


def kd_loss(student_logits: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor, rest_logprob: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(teacher || student) on the teacher's top K tokens and one bucket for
    the rest: Σ_k p_k (log p_k − log q_k) + p_rest (log p_rest − log q_rest), q the student's softmax
    and q_rest its mass outside the teacher's top K. Equals the full KL when K is the vocabulary."""
    logq = torch.log_softmax(student_logits.float(), dim=-1)
    logq_k = torch.gather(logq, -1, topk_ids)
    p_k = topk_logprobs.exp()
    kl = (p_k * (topk_logprobs - logq_k)).sum(-1)
    has_rest = torch.isfinite(rest_logprob)
    rest = torch.where(has_rest, rest_logprob, torch.zeros_like(rest_logprob))
    q_in = torch.logsumexp(logq_k, dim=-1)
    logq_rest = torch.log(-torch.expm1(q_in.clamp(max=-1e-7)))
    rest_term = torch.where(has_rest, rest.exp() * (rest - logq_rest), torch.zeros_like(kl))
    return (kl + rest_term).mean()
