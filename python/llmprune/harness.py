"""lm-evaluation-harness tasks on a layer-streamed model, with their results cached by checkpoint.

`StreamedLM` is an lm-eval backend (registered as model `llmprune`). Its `loglikelihood` and
`loglikelihood_rolling` take all of a run's requests at once and run them through the model one
decoder block at a time (model/stream.py): the requests' token sequences are made exactly as
lm-eval's `hf` backend makes them (the same tokenization, the same left truncation to the model's
context), identical sequences are run once, the rest sorted longest first and cut into batches, each
batch right-padded to its longest sequence. The model is causal and padding only ever follows a
sequence's tokens, so padding changes no logit a request reads, and results do not depend on the
batch size. The embeddings of every batch are taken first; then each block is loaded once, run over
every batch and dropped; the final norm and LM head run last. Peak memory is one block, the
activations of all the sequences (float32; on the device, in CPU memory, or spilled to a file-backed
map when neither has room: model/buffers.py) and the logits of one batch.

`generate_until` needs the whole model: it is loaded (`load_pruned` for structured outputs whose
layers differ in size, transformers' loader otherwise) and
lm-eval's `hf` backend generates with its KV cache, greedily unless the task says otherwise. A model
that does not fit in memory is refused with its size.

`run_tasks` resolves task names as lm-eval's command line does (registered names, YAML paths,
`--include-path` folders; `paper` and `offline` expand to lists, tasks/__init__.py), evaluates the
tasks not yet cached, and returns one row per (task, metric). The cache is a JSON file beside the
model (`MODEL.llmprune-tasks.json`), keyed by the checkpoint's identity (`checkpoint_identity`), the
task and its configuration and documents, the number of few-shot examples, the limit, the dtype and
the versions of llmprune and lm-eval.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import io
import json
import logging
import math
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import lm_eval
import torch
import torch.nn.functional as F
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import resolve_max_length

from llmprune.console import BlockProgress
from llmprune.errors import UsageError
from llmprune.model.buffers import Activations, available_memory
from llmprune.model.stream import LayerStreamer
from llmprune.tasks import TASKS_DIR, cache_path, expand

BACKEND = "llmprune"
DEFAULT_BATCH_SIZE = 8
DEFAULT_MAX_LENGTH = 2048  # lm-eval's, for a config and tokenizer that state none
ARGS_BUDGET = 256 << 20  # bytes of recorded block arguments (masks, rotary tables) kept per pass
LOGITS_BUDGET = 1 << 30  # bytes of float32 logits computed at once
CACHE_FORMAT = "llmprune-task-cache"
# bytes read from each shard, at evenly spaced offsets, for the checkpoint's identity
IDENTITY_SAMPLES, IDENTITY_SAMPLE_BYTES = 64, 16 << 10


# --------------------------------------------------------------------------------------------
# The backend
# --------------------------------------------------------------------------------------------


@register_model(BACKEND)
class StreamedLM(TemplateLM):
    """lm-eval's LM interface on a checkpoint streamed one decoder block at a time.

    `pretrained`: the checkpoint directory; `device`, `dtype` as for `llmprune eval`; `batch_size`:
    sequences per batch; `max_length`: the context (default: as lm-eval's `hf` backend finds it);
    `add_bos_token`: as lm-eval's `hf` backend; `tokenizer`: instead of the checkpoint's own."""

    def __init__(
        self,
        pretrained: str | Path,
        device: str | None = "auto",
        dtype: str | None = "auto",
        batch_size: int | str | None = DEFAULT_BATCH_SIZE,
        max_length: int | None = None,
        add_bos_token: bool | None = None,
        progress: bool = False,
        tokenizer: Any = None,
        **_ignored: Any,
    ):
        from llmprune.data.tokenizer import load_tokenizer

        super().__init__()
        self.model_dir = Path(pretrained)
        self.streamer = LayerStreamer(self.model_dir, device=device or "auto", dtype=dtype or "auto", with_head=True)
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(self.model_dir)
        self.batch_size_per_gpu = _batch_size(batch_size)
        self.add_bos_token = add_bos_token
        self.progress = progress
        self._max_length = max_length
        self._generator: Any = None
        self.passes = 0  # block-streamed passes run (each reads every block once)

    # ---- what lm-eval asks of a backend -------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return int(self.tokenizer.eos_token_id)

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return int(bos if bos is not None else self.tokenizer.eos_token_id)

    @property
    def max_length(self) -> int:
        if self._max_length:
            return int(self._max_length)
        return int(resolve_max_length(self.streamer.config, self.tokenizer, default=DEFAULT_MAX_LENGTH))

    @property
    def device(self) -> torch.device:
        return self.streamer.device

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        """As lm-eval's `hf` backend encodes (so both score the same tokens)."""
        if add_special_tokens is not None:
            special = {"add_special_tokens": add_special_tokens}
        elif self.add_bos_token is not None:
            special = {"add_special_tokens": self.add_bos_token}
        else:
            special = {}
        if add_special_tokens is None and string.startswith(self.tokenizer.decode(self.prefix_token_id)):
            special["add_special_tokens"] = False
        return list(self.tokenizer.encode(string, **special))

    def tok_decode(self, tokens: Sequence[int], skip_special_tokens: bool = True) -> str:
        return str(self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens))

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return super().loglikelihood(requests, disable_tqdm=True)

    def _loglikelihood_tokens(self, requests: list[tuple[tuple[str, str], list[int], list[int]]], **kwargs: Any) -> list[tuple[float, bool]]:
        answers = self.score([(ctx, cont) for _, ctx, cont in requests])
        for (key, _, _), answer in zip(requests, answers):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
        return answers

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Each text's log-likelihood in lm-eval's disjoint rolling windows, all windows of all texts
        in one pass."""
        windows: list[tuple[list[int], list[int]]] = []
        owner: list[int] = []
        for k, req in enumerate(requests):
            (text,) = req.args
            tokens = self.tok_encode(text)
            rolling = lm_utils.get_rolling_token_windows(token_list=tokens, prefix_token=self.prefix_token_id, max_seq_len=self.max_length, context_len=1)
            for ctx, cont in map(lm_utils.make_disjoint_window, rolling):
                windows.append((list(ctx), list(cont)))
                owner.append(k)
        totals = [0.0] * len(requests)
        for k, (logprob, _) in zip(owner, self.score(windows)):
            totals[k] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        if not requests:
            return []
        return list(self.generator(requests[0].task_name).generate_until(requests, disable_tqdm=disable_tqdm))

    # ---- generation: the whole model -----------------------------------------------------------

    def generator(self, task: str | None = None) -> Any:
        """lm-eval's `hf` backend on the whole model (loaded once), for generation."""
        if self._generator is None:
            from lm_eval.models.huggingface import HFLM

            check_fits_in_memory(self.model_dir, self.streamer, task)
            model = load_whole_model(self.model_dir, self.streamer.dtype, self.streamer.device)
            self._generator = HFLM(
                pretrained=model,
                tokenizer=self.tokenizer,
                batch_size=self.batch_size_per_gpu,
                device=str(self.streamer.device),
                max_length=self.max_length,
                add_bos_token=self.add_bos_token,
            )
        return self._generator

    # ---- scoring, layer-streamed ----------------------------------------------------------------

    def score(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]]) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), whether every continuation token is the greedy one)
        of each (context tokens, continuation tokens): lm-eval's `hf` backend's answer."""
        if not pairs:
            return []
        inputs: list[tuple[int, ...]] = []
        for ctx, cont in pairs:
            if not ctx or not cont:
                raise ValueError("every request needs a context and a continuation of at least one token")
            if len(cont) > self.max_length:
                raise UsageError(
                    f"a request's continuation has {len(cont)} tokens, more than the model's context of {self.max_length}",
                    hint="the task's targets must fit in the context window",
                )
            inputs.append(tuple((list(ctx) + list(cont))[-(self.max_length + 1) :][:-1]))
        rows = sorted(set(inputs), key=lambda t: (-len(t), t))
        row_of = {t: k for k, t in enumerate(rows)}
        users: list[list[int]] = [[] for _ in rows]
        for r, inp in enumerate(inputs):
            users[row_of[inp]].append(r)
        bs = self.batch_size_per_gpu
        batches = [list(range(s, min(s + bs, len(rows)))) for s in range(0, len(rows), bs)]
        answers: list[tuple[float, bool] | None] = [None] * len(pairs)

        def finish(batch: list[int], logprobs: list[torch.Tensor]) -> None:
            for k, lp in zip(batch, logprobs):
                for r in users[k]:
                    cont = torch.tensor(list(pairs[r][1]), dtype=torch.long)
                    part = lp[lp.shape[0] - cont.numel() :]
                    greedy = bool((part.argmax(-1) == cont).all())
                    answers[r] = (float(part.gather(1, cont[:, None]).sum()), greedy)

        self._stream([rows[b[0] : b[-1] + 1] for b in batches], [max(len(pairs[r][1]) for r in users[k]) for k in range(len(rows))], batches, finish)
        self.passes += 1
        done = [a for a in answers if a is not None]
        assert len(done) == len(pairs), "a request was left unanswered"
        return done

    def _stream(self, batch_rows: list[list[tuple[int, ...]]], tail: list[int], batches: list[list[int]], finish: Any) -> None:
        """Run every batch through the model block by block; finish(batch, log-probs of each row's
        last `tail` positions, float32 on the CPU) per batch once the head has run."""
        s = self.streamer
        hidden = int(getattr(s.config, "hidden_size", 0) or 0)
        lengths = [len(rows[0]) for rows in batch_rows]
        offsets = [0]
        for rows, length in zip(batch_rows, lengths):
            offsets.append(offsets[-1] + len(rows) * length)
        ids = [_padded(rows, length) for rows, length in zip(batch_rows, lengths)]
        args = _BlockArgs(s)
        acts = Activations((offsets[-1], hidden or 1), 1, s.device, prefix="llmprune-tasks-")
        nb = len(batch_rows)
        try:
            with BlockProgress(self.progress, s.num_blocks, "batches", nb) as bar, torch.no_grad():
                buf: torch.Tensor | None = None
                bar.phase("embeddings")
                for b in range(nb):
                    h = s.capture(ids[b])
                    args.keep(lengths[b])
                    if buf is None:
                        acts.shape = (offsets[-1], h.shape[-1])
                        buf = acts.new()
                    buf[offsets[b] : offsets[b + 1]] = h.reshape(-1, h.shape[-1])
                    bar.step()
                assert buf is not None
                for i in range(s.num_blocks):
                    bar.phase(f"block {i}")
                    s.load_block(i)
                    try:
                        for b in range(nb):
                            args.use(lengths[b], ids[b])
                            x = buf[offsets[b] : offsets[b + 1]].view(ids[b].shape[0], lengths[b], -1).to(s.device, s.dtype)
                            buf[offsets[b] : offsets[b + 1]] = s.run_block(i, x).reshape(-1, x.shape[-1])
                            bar.step()
                    finally:
                        s.free_block(i)
                    bar.block_done(i)
                bar.phase("log-probabilities")
                vocab = int(getattr(s.config, "vocab_size", 0) or 1)
                for b in range(nb):
                    n, length = ids[b].shape
                    x = buf[offsets[b] : offsets[b + 1]].view(n, length, -1)
                    per = max(1, LOGITS_BUDGET // max(1, length * vocab * 4))
                    out = []
                    for j in range(0, n, per):
                        logits = s.logits(ids[b][j : j + per], x[j : j + per].to(s.device, s.dtype))
                        for k in range(logits.shape[0]):
                            need = tail[batches[b][j + k]]
                            row_len = len(batch_rows[b][j + k])
                            out.append(F.log_softmax(logits[k, row_len - need : row_len].float(), dim=-1).cpu())
                    finish(batches[b], out)
                    bar.step()
        finally:
            acts.close()


class _BlockArgs:
    """What the model passes each block besides the hidden state (masks, rotary tables, ...), per
    sequence length, as `capture` records it: kept while they fit in ARGS_BUDGET, recorded again
    (an embeddings pass over one sequence) when needed otherwise."""

    def __init__(self, streamer: LayerStreamer):
        self.s = streamer
        self.by_length: dict[int, list[tuple[tuple, dict] | None]] = {}
        self.bytes = 0
        self.current: int | None = None

    def keep(self, length: int) -> None:
        self.current = length
        if length in self.by_length:
            return
        size = sum(t.numel() * t.element_size() for t in _tensors(self.s.block_args))
        if self.bytes + size <= ARGS_BUDGET:
            self.by_length[length] = list(self.s.block_args)
            self.bytes += size

    def use(self, length: int, ids: torch.Tensor) -> None:
        if length in self.by_length:
            self.s.block_args = self.by_length[length]
        elif self.current != length:
            self.s.capture(ids[:1])
        self.current = length


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for x in obj:
            yield from _tensors(x)
    elif isinstance(obj, dict):
        for x in obj.values():
            yield from _tensors(x)


def _padded(rows: list[tuple[int, ...]], length: int) -> torch.Tensor:
    """Token ids [len(rows), length], each row right-padded with 0 (as lm-eval's `hf` backend pads)."""
    out = torch.zeros((len(rows), length), dtype=torch.long)
    for k, row in enumerate(rows):
        out[k, : len(row)] = torch.tensor(row, dtype=torch.long)
    return out


def _batch_size(value: int | str | None) -> int:
    if value is None or value == "auto" or (isinstance(value, str) and value.startswith("auto")):
        return DEFAULT_BATCH_SIZE
    n = int(value)
    if n < 1:
        raise UsageError(f"--batch-size must be at least 1, not {n}")
    return n


def load_whole_model(model_dir: Path, dtype: torch.dtype, device: torch.device) -> Any:
    """The whole model in memory: `load_pruned` for structured outputs whose layers differ in size,
    transformers' own loader for every other checkpoint (its MoE layouts and renamings included)."""
    from transformers import AutoModelForCausalLM

    from llmprune.model.pruned import load_pruned, needs_load_pruned

    if needs_load_pruned(model_dir):
        return load_pruned(model_dir, dtype=dtype, device=device)
    model: Any = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype)
    return model.to(device).eval()


def model_bytes(streamer: LayerStreamer) -> int:
    """Bytes of the whole model's parameters: floating tensors (MXFP4 pairs dequantized) in the
    compute dtype, the others as stored."""
    ckpt = streamer.ckpt
    elem = torch.empty((), dtype=streamer.dtype).element_size()
    packed = {n for pair in ckpt.mxfp4.values() for n in pair}
    total = sum(math.prod(ckpt.shape(name)) * elem for name in ckpt.mxfp4)
    for name, (_, dt, shape) in ckpt.entries.items():
        if name not in packed:
            total += math.prod(shape) * (elem if dt in ("BF16", "F16", "F32", "F64") else _STORED_BYTES.get(dt, 8))
    return total


_STORED_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "I32": 4, "U32": 4, "I64": 8, "U64": 8}


def free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    return available_memory()


def check_fits_in_memory(model_dir: Path, streamer: LayerStreamer, task: str | None = None) -> None:
    """Generation holds the whole model: refuse, with its size, when it does not fit."""
    need, have = model_bytes(streamer), free_bytes(streamer.device)
    if need > 0.8 * have:
        what = f"task {task} generates text" if task else "generation"
        raise UsageError(
            f"{what}, which needs the whole model in memory: {model_dir} takes {need / 2**30:.1f} GiB in {str(streamer.dtype).replace('torch.', '')}, "
            f"{have / 2**30:.1f} GiB are free on {streamer.device}",
            hint="run generation tasks with lm-eval's vLLM backend (lm_eval --model vllm --model_args pretrained=MODEL ...) or on a larger machine; "
            "loglikelihood tasks run here one block at a time",
        )


# --------------------------------------------------------------------------------------------
# Tasks: names, loading, running, results
# --------------------------------------------------------------------------------------------


@dataclass
class TaskRow:
    task: str
    metric: str
    value: float
    stderr: float | None
    n: int | None
    higher_is_better: bool | None
    cached: bool = False

    def doc(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items()}


@dataclass
class TaskRun:
    rows: list[TaskRow]
    num_fewshot: int | None
    limit: int | None
    batch_size: int
    seconds: float
    cache: str | None
    cached: list[str] = field(default_factory=list)
    evaluated: list[str] = field(default_factory=list)

    def doc(self) -> dict[str, Any]:
        return {
            "results": [r.doc() for r in self.rows],
            "num_fewshot": self.num_fewshot,
            "limit": self.limit,
            "batch_size": self.batch_size,
            "seconds": round(self.seconds, 3),
            "cache": self.cache,
            "cached": self.cached,
            "evaluated": self.evaluated,
        }


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """lm-eval's and datasets' logs, prints and progress bars off (LLMPRUNE_DEBUG=1 keeps them): its
    bootstrap of standard errors runs serially without a bar (the same draws as its parallel path),
    and its `git describe` of the working directory is skipped."""
    if os.environ.get("LLMPRUNE_DEBUG") == "1":
        yield
        return
    import datasets
    from lm_eval import evaluator
    from lm_eval.api import metrics

    logger = logging.getLogger("lm_eval")
    level = logger.level
    bars = datasets.utils.logging.is_progress_bar_enabled()
    logger.setLevel(logging.ERROR)
    datasets.disable_progress_bars()
    patches = [(metrics, "bootstrap_stderr", _bootstrap_quietly), (evaluator, "get_git_commit_hash", lambda: None)]
    saved = [(mod, name, getattr(mod, name)) for mod, name, _ in patches]
    for mod, name, value in patches:
        setattr(mod, name, value)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        for mod, name, value in saved:
            setattr(mod, name, value)
        logger.setLevel(level)
        if bars:
            datasets.enable_progress_bars()


def _bootstrap_quietly(f: Any, xs: Sequence[Any], iters: int) -> float:
    """lm-eval's bootstrap standard error (chunks of up to 1000 draws, chunk i seeded with i),
    serially and silently."""
    from lm_eval.api import metrics

    chunk = min(1000, iters)
    draws: list[float] = []
    for i in range(iters // chunk):
        draws.extend(metrics._bootstrap_internal(f, chunk)((i, xs)))
    return float(metrics.sample_stddev(draws))


def task_manager(names: list[str], include_paths: Sequence[str | Path] = ()) -> Any:
    """lm-eval's TaskManager that knows every name: the packaged offline tasks and the user's
    folders first (fast: lm-eval's own index of thousands of tasks is read only when needed)."""
    from lm_eval.tasks import TaskManager

    for p in include_paths:
        if not Path(p).is_dir():
            raise UsageError(f"--include-path {p} is not a folder", hint="pass a folder of lm-eval task YAML files")
    paths = [str(TASKS_DIR)] + [str(p) for p in include_paths]
    names_only = [n for n in names if not n.endswith(".yaml")]
    tm = TaskManager(include_path=paths, include_defaults=False)
    if all(tm.match_tasks([n]) for n in names_only):
        tm.llmprune_local = True
        return tm
    tm = TaskManager(include_path=paths)
    tm.llmprune_local = False
    return tm


def resolve_specs(names: list[str], tm: Any) -> list[Any]:
    """Task names, globs and YAML paths, as lm-eval's command line resolves them (a YAML path becomes
    its config; a glob its matches); an unknown one is a UsageError."""
    from lm_eval.tasks._yaml_loader import load_yaml

    specs: list[Any] = []
    for name in names:
        if name.endswith(".yaml"):
            path = Path(name)
            if not path.is_file():
                raise UsageError(f"task file {name} not found", hint="pass a lm-eval task YAML file, or a task name")
            try:
                specs.append(load_yaml(str(path.absolute()), resolve_func=True))
            except Exception as exc:  # noqa: BLE001 - YAML and import errors of the user's file
                raise UsageError(f"cannot read task file {name}: {_first_line(exc)}") from None
            continue
        matches = tm.match_tasks([name])
        if not matches:
            raise UsageError(
                f"unknown task {name!r}",
                hint="list lm-eval's tasks with `lm-eval ls tasks`; offline: --tasks offline (sotu_cloze, sotu_next); your own YAMLs: --include-path DIR",
            )
        specs.extend(m for m in matches if m not in specs)
    return specs


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def load_spec(tm: Any, spec: Any, offline: bool = False) -> tuple[str, list[Any], list[Any]]:
    """(display name, the objects to evaluate, their leaf tasks) of one resolved spec; a task whose
    data cannot be loaded is a UsageError naming it. `offline`: the hub is out of reach, so datasets
    come from the local cache only (instead of retrying the network)."""
    from llmprune.data.sources import _offline_mode

    name = spec if isinstance(spec, str) else str(spec.get("task") or spec.get("group") or spec)
    try:
        with _offline_mode(offline):
            loaded = tm.load([spec])
    except Exception as exc:  # noqa: BLE001 - datasets and lm-eval raise many kinds here
        where = " (the Hugging Face hub is out of reach and its data is not in the local cache)" if offline else ""
        raise UsageError(
            f"task {name} cannot be loaded{where}: {_first_line(exc)}",
            hint="check the task's data files (a task of the hub needs the network or the datasets cache); offline: --tasks offline",
        ) from None
    groups, tasks = loaded["groups"], loaded["tasks"]
    top = [groups[name]] if name in groups else list(tasks.values())
    return name, top, list(tasks.values())


# ---- the cache -----------------------------------------------------------------------------------


def checkpoint_identity(model_dir: Path) -> str:
    """sha256 of what decides the model's answers: the fingerprint (tensor names, dtypes, shapes),
    config.json and the tokenizer files, and each shard's size and IDENTITY_SAMPLES samples of
    IDENTITY_SAMPLE_BYTES at evenly spaced offsets (pruned copies of one model share their shapes,
    never their bytes)."""
    from llmprune.data.tokenizer import TOKENIZER_FILES
    from llmprune.model.checkpoint import Checkpoint

    ckpt = Checkpoint(model_dir)
    h = hashlib.sha256(ckpt.fingerprint.encode())
    for extra in ("config.json", "special_tokens_map.json", *TOKENIZER_FILES):
        p = model_dir / extra
        if p.is_file():
            h.update(extra.encode() + b"\0" + p.read_bytes())
    for name in sorted(ckpt.files):
        path = model_dir / name
        size = path.stat().st_size
        h.update(f"{name}\0{size}\0".encode())
        with open(path, "rb") as f:
            for k in range(IDENTITY_SAMPLES):
                f.seek(size * k // IDENTITY_SAMPLES)
                h.update(f.read(IDENTITY_SAMPLE_BYTES))
    return h.hexdigest()


def _stable(obj: Any) -> Any:
    """A JSON stand-in for what a task config holds besides data: functions by name and source."""
    if callable(obj):
        try:
            src = inspect.getsource(obj)
        except (OSError, TypeError):
            src = ""
        return f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', type(obj).__name__)}:{hashlib.sha256(src.encode()).hexdigest()[:16]}"
    return str(obj)


def task_hash(tasks: list[Any], with_fewshot: bool) -> str:
    """sha256 of the leaf tasks' configurations and documents (and few-shot documents when used)."""
    h = hashlib.sha256()
    for task in sorted(tasks, key=lambda t: t.task_name):
        h.update(json.dumps(task.dump_config(), sort_keys=True, default=_stable).encode())
        for doc in task.eval_docs:
            h.update(json.dumps(doc, sort_keys=True, default=_stable).encode())
        if with_fewshot:
            try:
                shots = list(task.fewshot_docs() or [])
            except Exception:  # noqa: BLE001 - a task without a few-shot source fails when it runs
                shots = []
            for doc in shots:
                h.update(json.dumps(doc, sort_keys=True, default=_stable).encode())
    return h.hexdigest()


def read_cache(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(doc, dict) or doc.get("format") != CACHE_FORMAT or not isinstance(doc.get("entries"), dict):
        return {}
    return doc["entries"]


def write_cache(path: Path, entries: dict[str, Any]) -> bool:
    """Atomically (a temporary file renamed); False when the folder is not writable."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps({"format": CACHE_FORMAT, "format_version": 1, "entries": entries}, indent=1) + "\n")
        os.replace(tmp, path)
        return True
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()
        return False


def run_tasks(
    model_dir: str | Path,
    names: list[str],
    *,
    num_fewshot: int | None = None,
    limit: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: str = "auto",
    dtype: str = "auto",
    include_paths: Sequence[str | Path] = (),
    use_cache: bool = True,
    progress: bool = False,
    bootstrap_iters: int = 1000,
    lm: Any = None,
) -> TaskRun:
    """Evaluate lm-eval tasks on the checkpoint, layer-streamed (or with `lm`, any lm-eval backend,
    uncached): one row per (task, metric)."""
    from llmprune import __version__

    t0 = time.perf_counter()
    model_dir = Path(model_dir)
    if num_fewshot is not None and num_fewshot < 0:
        raise UsageError(f"--num-fewshot must be 0 or more, not {num_fewshot}")
    if limit is not None and limit < 1:
        raise UsageError(f"--limit must be at least 1, not {limit}")
    names = expand(names)
    if not names:
        raise UsageError("--tasks names no task", hint="e.g. --tasks offline, --tasks paper or --tasks boolq,piqa")
    with _quiet():
        tm = task_manager(names, include_paths)
        resolved = resolve_specs(names, tm)
        offline = False
        if not tm.llmprune_local:  # tasks of lm-eval's own index: their data may come from the hub
            from llmprune.data.sources import _env_offline, hub_reachable

            offline = _env_offline() or not hub_reachable()
        specs = [load_spec(tm, s, offline) for s in resolved]
        use_cache = use_cache and lm is None
        cache = cache_path(model_dir) if use_cache else None
        entries = read_cache(cache) if cache is not None else {}
        identity = checkpoint_identity(model_dir) if use_cache else ""
        from llmprune.model.checkpoint import Checkpoint
        from llmprune.model.devices import resolve_device, resolve_dtype

        dev = resolve_device(device)
        streamer_dtype = str(resolve_dtype(dtype, Checkpoint(model_dir).float_dtype(), dev)).replace("torch.", "")
        keys: dict[str, str] = {}
        for name, _, leaves in specs:
            key_doc = {
                "model": identity,
                "task": name,
                "tasks": task_hash(leaves, bool(num_fewshot)),
                "num_fewshot": num_fewshot,
                "limit": limit,
                "dtype": streamer_dtype,
                "llmprune": __version__,
                "lm_eval": getattr(lm_eval, "__version__", ""),
            }
            keys[name] = hashlib.sha256(json.dumps(key_doc, sort_keys=True).encode()).hexdigest()
        rows: dict[str, list[TaskRow]] = {}
        for name, _, _ in specs:
            hit = entries.get(keys[name]) if use_cache else None
            if hit is not None:
                rows[name] = [TaskRow(**{**r, "cached": True}) for r in hit["rows"]]
        todo = [s for s in specs if s[0] not in rows]
        if todo:
            if lm is None:
                lm = StreamedLM(model_dir, device=device, dtype=dtype, batch_size=batch_size, progress=progress)
                generating = [t.task_name for _, _, leaves in todo for t in leaves if t.get_config("output_type") == "generate_until"]
                if generating:  # refused before any other task runs
                    check_fits_in_memory(model_dir, lm.streamer, generating[0])
            results = lm_eval.simple_evaluate(
                model=lm,
                tasks=[obj for _, objs, _ in todo for obj in objs],
                num_fewshot=num_fewshot,
                limit=limit,
                task_manager=tm,
                bootstrap_iters=bootstrap_iters,
                log_samples=False,
            )
            assert results is not None
            for name, objs, leaves in todo:
                shown = [o.name if hasattr(o, "name") else o.task_name for o in objs]
                shown += [t.task_name for t in leaves if t.task_name not in shown]
                rows[name] = [row for n in shown for row in _rows(results, n)]
                if cache is not None:
                    entries[keys[name]] = {
                        "task": name,
                        "model_fingerprint": Checkpoint(model_dir).fingerprint,
                        "num_fewshot": num_fewshot,
                        "limit": limit,
                        "dtype": streamer_dtype,
                        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                        "rows": [{k: v for k, v in r.doc().items() if k != "cached"} for r in rows[name]],
                    }
            if cache is not None and not write_cache(cache, entries):
                from llmprune.console import warn

                warn(f"cannot write the task cache {cache}; results are not kept")
    ordered = [row for name, _, _ in specs for row in rows[name]]
    return TaskRun(
        rows=ordered,
        num_fewshot=num_fewshot,
        limit=limit,
        batch_size=batch_size,
        seconds=time.perf_counter() - t0,
        cache=str(cache) if cache is not None else None,
        cached=[n for n, _, _ in specs if n not in [t[0] for t in todo]],
        evaluated=[t[0] for t in todo],
    )


def _rows(results: dict[str, Any], name: str) -> list[TaskRow]:
    metrics = results.get("results", {}).get(name, {})
    better = results.get("higher_is_better", {}).get(name, {})
    n = results.get("n-samples", {}).get(name, {}).get("effective")
    out = []
    for key, value in metrics.items():
        if key in ("alias", "sample_len") or "_stderr," in key or not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        metric, _, filt = key.partition(",")
        stderr = metrics.get(f"{metric}_stderr,{filt}")
        shown = metric if filt in ("", "none") else f"{metric} ({filt})"
        out.append(
            TaskRow(
                task=name,
                metric=shown,
                value=float(value),
                stderr=float(stderr) if isinstance(stderr, (int, float)) and not isinstance(stderr, bool) else None,
                n=int(n) if isinstance(n, int) else None,
                higher_is_better=better.get(metric),
            )
        )
    return out
