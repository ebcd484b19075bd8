"""LLM recipes through ``admmprune solve``: a tiny GGUF and tiny texts the test writes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("gguf")
pytest.importorskip("tokenizers")

from test_llm import _config, _metadata, _random_tensors

from admmprune import cli
from admmprune.llm.gguf_io import read_gguf, write_gguf
from admmprune.llm.runner import LLMRecipeError, load_llm_recipe, parse_llm_recipe

TEXT = " = Valkyria = \n\n the cat and the hat sat on the mat in 2024 . \n" * 60


def _recipe(tmp_path: Path, **keys) -> Path:
    config = _config()
    model = tmp_path / "tiny.gguf"
    write_gguf(model, config, _random_tensors(config, seed=5), _metadata(), dtype="F32")
    (tmp_path / "test.raw").write_text(TEXT)
    (tmp_path / "valid.raw").write_text(TEXT.replace("cat", "dog"))
    table = {
        "model": str(model),
        "method": "admm",
        "sparsity": 0.5,
        "eval_text": str(tmp_path / "test.raw"),
        "calib_text": str(tmp_path / "valid.raw"),
        "context": 16,
        "calibration_windows": 8,
        "held_out_windows": 2,
        "eval_tokens": 256,
        "batch": 4,
        "output_type": "Q8_0",
    } | keys
    lines = ["[llm]"] + [f"{k} = {json.dumps(v)}" for k, v in table.items() if v is not None]
    path = tmp_path / "tiny_llm.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_solve_prunes_scores_and_writes_a_loadable_gguf(tmp_path, capsys):
    recipe = _recipe(tmp_path)
    out = tmp_path / "out"
    assert cli.main(["solve", str(recipe), "--out", str(out), "--quiet"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "admm" and report["sparsity"] == "50% unstructured"
    assert report["kept_fraction"] == pytest.approx(0.5, abs=1e-3)
    assert len(report["layers"]) == 2 * 7
    assert report["eval_tokens"] == 16 * 15 and report["calibration_tokens"] == 8 * 16
    assert np.isfinite(report["perplexity"]) and report["mean_held_out_error"] is not None
    assert report["peak_memory_mib"] > 0 and report["solver_seconds"] <= report["pruning_seconds"]
    back = read_gguf(out / "model.gguf")
    w = back.tensors["blk.1.ffn_up.weight"]
    assert back.types["blk.1.ffn_up.weight"] == "Q8_0"
    assert np.mean(w == 0) == pytest.approx(0.5, abs=0.01)  # zeros survive Q8_0
    assert not (out / "checkpoint" / "pruned.npz").exists()  # removed once finished


def test_eval_and_calib_texts_come_from_the_command_line(tmp_path, capsys):
    recipe = _recipe(tmp_path, method="magnitude", nm=[2, 4], sparsity=None)
    other = tmp_path / "other.raw"
    other.write_text(TEXT.replace("hat", "bat") * 2)
    args = ["solve", str(recipe), "--out", str(tmp_path / "o"), "--eval-text", str(other)]
    assert cli.main([*args, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["recipe"]["eval_text"] == str(other) and report["sparsity"] == "2:4"


@pytest.mark.parametrize(
    ("keys", "says"),
    [
        ({"sparsity": 1.0}, "outside [0, 1)"),
        ({"method": "obc"}, "one of magnitude, wanda, sparsegpt, admm"),
        ({"context": "long"}, "context = 'long': expected int"),
        ({"rho": 1.0}, "unknown keys ['rho']"),
        ({"nm": [2, 5], "sparsity": None}, "does not divide attn_q's input width 32"),
        ({"eval_text": "/nonexistent/wiki.raw"}, "no such text file"),
        ({"context": 4096}, "fewer than one window of 4096"),
        ({"model": "/nonexistent/model.gguf"}, "no such GGUF file"),
    ],
)
def test_bad_llm_recipes_exit_2_with_the_reason(tmp_path, capsys, keys, says):
    recipe = _recipe(tmp_path, **keys)
    assert cli.main(["solve", str(recipe), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err


@pytest.mark.parametrize(
    "path", sorted(Path("solvers").glob("smollm2_*.toml")), ids=lambda p: p.stem
)
def test_shipped_llm_recipes_parse(path):
    recipe = load_llm_recipe(path)
    method, tag = path.stem.split("_")[1:]
    assert recipe.method == method
    assert (
        recipe.sparsity_set().describe()
        == {
            "50pct": "50% unstructured",
            "70pct": "70% unstructured",
            "80pct": "80% unstructured",
            "2of4": "2:4",
        }[tag]
    )


def test_sparsity_and_nm_together_are_refused():
    with pytest.raises(LLMRecipeError, match="sparsity or nm, not both"):
        parse_llm_recipe({"sparsity": 0.5, "nm": [2, 4]}, name="x")
