"""`inspect` lists tensors in natural order (layer 2 before layer 10) and never cuts a name, in its
table at 80 columns and in --json."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

import reference as R
from llmprune import cli

LONG = "model.layers.2.self_attn.a_projection_whose_name_is_too_long_for_eighty_columns.weight"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """Twelve layers written in text order (0, 1, 10, 11, 2, ...), and one name longer than a line."""
    d = tmp_path_factory.mktemp("order") / "m"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    names = sorted(f"model.layers.{i}.mlp.up_proj.weight" for i in range(12)) + [LONG, "model.embed_tokens.weight"]
    data = np.zeros((8, 8), dtype=np.float32).tobytes()
    R.write_safetensors(d / "model.safetensors", [(n, "F32", (8, 8), data) for n in names], {"format": "pt"})
    return d


def layer_numbers(names: list[str]) -> list[int]:
    return [int(m.group(1)) for m in (re.search(r"\.layers\.(\d+)\.", n) for n in names) if m]


def table_names(out: str) -> list[str]:
    """The tensor column of the table, a name folded over several lines joined again."""
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("tensor"))
    width = lines[header].index("shape")
    names: list[str] = []
    for line in lines[header + 1 :]:
        if not line.strip() or line.startswith(("prunable weights:", "all tensors:", "provenance:")):
            break
        cell, rest = line[:width].strip(), line[width:].strip()
        if rest:
            names.append(cell)
        else:  # the continuation of a folded name
            names[-1] += cell
    return names


def test_json_lists_tensors_in_natural_order(model, capsys):
    assert cli.main(["inspect", str(model), "--json"]) == 0
    names = [t["name"] for t in json.loads(capsys.readouterr().out)["tensors"]]
    assert LONG in names
    assert layer_numbers(names) == sorted(layer_numbers(names))


def test_table_at_80_columns_is_in_natural_order_and_cuts_no_name(model, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    assert cli.main(["inspect", str(model), "--json"]) == 0
    want = [t["name"] for t in json.loads(capsys.readouterr().out)["tensors"]]
    assert cli.main(["inspect", str(model)]) == 0
    out = capsys.readouterr().out
    assert "…" not in out and max(len(line) for line in out.splitlines()) <= 80
    assert table_names(out) == want
