"""``tokengate presets list|show|pick``, driven through argparse the way app/cli.py dispatches: ``args.func(args)``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from app.cli_presets import add_presets_parser

from .test_picker import LLAMA_31_8B, LLAMA_31_70B

CANDIDATE_KEYS = {
    "preset",
    "gpu_type",
    "gpus",
    "nodes",
    "tensor_parallel_size",
    "pipeline_parallel_size",
    "max_model_len",
    "max_num_seqs",
    "dtype",
    "quantization",
    "weights_bytes_per_gpu",
    "kv_cache_bytes_per_token",
    "kv_cache_bytes_per_token_per_gpu",
    "kv_cache_bytes_per_token_model",
    "budget_bytes_per_gpu",
    "reserve_bytes_per_gpu",
    "kv_capacity_tokens",
    "max_concurrency",
    "max_concurrency_limited_by",
    "fits",
    "reasons",
}
PICK_KEYS = (CANDIDATE_KEYS - {"preset", "fits", "reasons"}) | {
    "preset",
    "region",
    "context",
    "concurrency",
    "model_params",
    "reserve_formula",
    "suggestions",
    "candidates",
}


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser(prog="tokengate")
    add_presets_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    rc = args.func(args)
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture
def llama_8b(tmp_path: Path) -> Path:
    model = tmp_path / "llama-3.1-8b"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(LLAMA_31_8B))
    return model


def test_list(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(["presets", "list"], capsys)
    assert rc == 0
    lines = out.splitlines()
    assert (
        lines[0].split() == "REGION PRESET GPUS TP PP MAX_MODEL_LEN MAX_SEQS MAX_TOKENS DEFAULT CONTEXT POLICY".split()
    )
    assert lines[1].split() == ["fr", "h100-1x", "1×h100", "1", "1", "32768", "256", "4096", "512", "32768", "clamp"]
    assert any(line.split()[:6] == ["fr", "h100-16x", "16×h100", "(2", "nodes)", "8"] for line in lines)
    assert sum(line.startswith("uae ") for line in lines) == 8
    assert lines[-1] == "default region: fr (France)"


def test_list_one_region(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(["presets", "list", "--region", "uae"], capsys)
    assert rc == 0
    rows = out.splitlines()[1:-1]
    assert len(rows) == 8 and all(r.startswith("uae ") for r in rows)
    rc, _, err = run(["presets", "list", "--region", "de"], capsys)
    assert rc == 2 and "unknown region 'de'; regions: fr, uae" in err


def test_show(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(["presets", "show", "fr/h100-16x"], capsys)
    assert rc == 0
    fields = dict(line.split(":", 1) for line in out.splitlines())
    assert {k: v.strip() for k, v in fields.items() if k in ("nodes", "tensor_parallel_size", "caps.cap_policy")} == {
        "nodes": "2",
        "tensor_parallel_size": "8",
        "caps.cap_policy": "clamp",
    }
    assert fields["pipeline_parallel_size"].strip() == "2"
    assert fields["source"].strip().endswith("presets/fr.yaml")
    assert "85017493504 bytes" in fields["gpu_type"]


def test_show_bare_name_uses_default_region(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(["presets", "show", "h200-2x"], capsys)
    assert rc == 0 and out.splitlines()[0].split() == ["preset:", "fr/h200-2x"]
    rc, _, err = run(["presets", "show", "uae/h100-16x"], capsys)
    assert rc == 2 and "unknown preset 'h100-16x' in region 'uae'; presets: h100-1x" in err


def test_pick_text(llama_8b: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["presets", "pick", "--model", str(llama_8b), "--region", "fr", "--gpu", "h100"]
    rc, out, _ = run([*argv, "--context", "8192", "--concurrency", "32"], capsys)
    assert rc == 0
    assert "8.03B params" in out and "128.0 KiB/token" in out
    assert "2 GiB + 5%" in out
    marked = [line.split() for line in out.splitlines() if line.startswith("*")]
    assert marked == [
        ["*", "h100-1x", "1×h100", "1", "1", "14.96", "GiB", "5.56", "GiB", "128.0", "KiB", "415,664"]
        + ["50", "(kv_cache)", "yes"]
    ]
    assert out.rstrip().endswith("pick: fr/h100-1x")


def test_pick_json(llama_8b: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["presets", "pick", "--model", str(llama_8b / "config.json"), "--region", "fr", "--gpu", "h100"]
    rc, out, _ = run([*argv, "--context", "8192", "--concurrency", "32", "--json"], capsys)
    assert rc == 0
    doc = json.loads(out)
    assert set(doc) == PICK_KEYS
    assert {k: doc[k] for k in ("preset", "region", "gpus", "tensor_parallel_size", "pipeline_parallel_size")} == {
        "preset": "h100-1x",
        "region": "fr",
        "gpus": 1,
        "tensor_parallel_size": 1,
        "pipeline_parallel_size": 1,
    }
    assert doc["weights_bytes_per_gpu"] == 16_060_522_496
    assert doc["kv_cache_bytes_per_token"] == doc["kv_cache_bytes_per_token_per_gpu"] == 131_072
    assert doc["reserve_bytes_per_gpu"] == 5_973_270_855
    assert (doc["kv_capacity_tokens"], doc["max_concurrency"]) == (415_664, 50)
    assert doc["model_params"] == 8_030_261_248
    assert doc["suggestions"] == []
    assert [c["preset"] for c in doc["candidates"]] == ["h100-1x", "h100-2x", "h100-4x", "h100-8x", "h100-16x"]
    assert all(set(c) == CANDIDATE_KEYS for c in doc["candidates"])
    two = doc["candidates"][1]  # TP 2: each GPU holds half of every token's KV cache (the "split over TP")
    assert two["kv_cache_bytes_per_token"] == two["kv_cache_bytes_per_token_per_gpu"] == 65_536
    assert two["kv_cache_bytes_per_token_model"] == 131_072


def test_pick_nothing_fits_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_31_70B))
    argv = ["presets", "pick", "--model", str(tmp_path), "--region", "uae", "--gpu", "h100"]
    rc, out, _ = run([*argv, "--context", "131072", "--concurrency", "64", "--json"], capsys)
    assert rc == 1
    doc = json.loads(out)
    assert set(doc) == PICK_KEYS
    assert doc["preset"] is None
    assert (doc["gpus"], doc["kv_capacity_tokens"], doc["max_concurrency"]) == (8, 1_291_600, 9)  # largest candidate
    assert doc["suggestions"][0] == "a shorter context: up to 20176 tokens at concurrency 64 fits on uae/h100-8x"

    rc, out, _ = run([*argv, "--context", "131072", "--concurrency", "64"], capsys)
    assert rc == 1
    assert "nothing fits in uae. What would:" in out
    assert "  - lower concurrency: up to 9 requests of 131072 tokens fit on uae/h100-8x" in out.splitlines()


def test_user_presets_before_or_after_the_subcommand(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "de.yaml").write_text(
        "regions:\n  de:\n    display_name: Germany\n    presets:\n      h100-1x:\n"
        "        {gpu_type: h100, gpus: 1, tensor_parallel_size: 1, gpu_memory_utilization: 0.9,\n"
        "         max_model_len: 8192, max_num_seqs: 32, caps: {max_tokens_cap: 1024, default_max_tokens: 256}}\n"
    )
    for argv in (["presets", "--presets", str(tmp_path), "list"], ["presets", "list", "--presets", str(tmp_path)]):
        rc, out, _ = run([*argv, "--region", "de"], capsys)
        assert rc == 0
        assert out.splitlines()[1].split()[:2] == ["de", "h100-1x"]


def test_tokengate_presets_is_read_as_serve_reads_it(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "de.yaml").write_text(
        "regions:\n  de:\n    display_name: Germany\n    presets:\n      h100-1x:\n"
        "        {gpu_type: h100, gpus: 1, tensor_parallel_size: 1, gpu_memory_utilization: 0.9,\n"
        "         max_model_len: 8192, max_num_seqs: 32, caps: {max_tokens_cap: 1024, default_max_tokens: 256}}\n"
    )
    monkeypatch.setenv("TOKENGATE_PRESETS", str(tmp_path))
    rc, out, _ = run(["presets", "list", "--region", "de"], capsys)
    assert rc == 0 and out.splitlines()[1].split()[:2] == ["de", "h100-1x"]


def test_bad_inputs_exit_2(tmp_path: Path, llama_8b: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.yaml").write_text("regions:\n  fr:\n    presets:\n      h100-1x: {gpus: 1, tensor_parallel_size: 2}\n")
    rc, _, err = run(["presets", "--presets", str(bad), "show", "fr/h100-1x"], capsys)
    assert rc == 2 and str(bad / "x.yaml") in err and "fr/h100-1x" in err and "field" in err

    pick = ["presets", "pick", "--region", "fr", "--context", "1024", "--concurrency", "1"]
    rc, _, err = run([*pick, "--model", str(tmp_path / "nowhere")], capsys)
    assert rc == 2 and "cannot read the model config" in err
    rc, _, err = run([*pick, "--model", str(llama_8b), "--gpu", "a100"], capsys)
    assert rc == 2 and "unknown GPU type 'a100'; known: h100, h200" in err
    with pytest.raises(SystemExit) as exit_:
        run(
            ["presets", "pick", "--model", str(llama_8b), "--region", "fr", "--context", "0", "--concurrency", "1"],
            capsys,
        )
    assert exit_.value.code == 2
