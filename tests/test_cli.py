"""The `tokengate` command-line contract: flags, their TOKENGATE_* variables, --version, serve --dry-run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from app import __version__
from app.auth import hash_key
from app.cli import _SETTINGS_FLAGS, build_parser, main, settings_from_args
from app.settings import Settings
from bench.fakeworker import ThreadedFakeWorker

from .utils import gateway_process, wait_until


def settings(argv: list[str]):  # type: ignore[no-untyped-def]
    return settings_from_args(build_parser().parse_args(["serve", *argv]))


def test_version() -> None:
    out = subprocess.run([sys.executable, "-m", "app.cli", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"tokengate {__version__}"


def test_flags() -> None:
    s = settings(["--host", "0.0.0.0", "--port", "9000", "--upstream", "http://a:1", "b:2", "--upstream",
                  "fr/h100-2x=http://c:3", "--max-tokens-cap", "100", "--default-max-tokens", "10",
                  "--context-cap", "500", "--cap-policy", "reject"])
    assert (s.host, s.port) == ("0.0.0.0", 9000)
    assert [(u.url, u.region, u.preset) for u in s.upstreams()] == [
        ("http://a:1", None, None), ("http://b:2", None, None), ("http://c:3", "fr", "h100-2x")]
    assert (s.max_tokens_cap, s.default_max_tokens, s.context_cap, s.cap_policy) == (100, 10, 500, "reject")


def test_every_flag_has_an_environment_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {
        "TOKENGATE_HOST": "0.0.0.0", "TOKENGATE_PORT": "9001", "TOKENGATE_UPSTREAM": "http://a:1,http://b:2",
        "TOKENGATE_MAX_TOKENS_CAP": "111", "TOKENGATE_DEFAULT_MAX_TOKENS": "11", "TOKENGATE_CONTEXT_CAP": "222",
        "TOKENGATE_CAP_POLICY": "reject", "TOKENGATE_REGION": "fr", "TOKENGATE_GPUS": "0,1",
        "TOKENGATE_DRAIN_TIMEOUT": "7", "TOKENGATE_PREFIX_AFFINITY_BYTES": "256",
        "TOKENGATE_NON_STREAM_UPSTREAM": "unary",
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    s = settings([])
    assert (s.host, s.port, s.upstream) == ("0.0.0.0", 9001, ["http://a:1", "http://b:2"])
    assert (s.max_tokens_cap, s.default_max_tokens, s.context_cap, s.cap_policy) == (111, 11, 222, "reject")
    assert (s.region, s.gpus, s.drain_timeout, s.prefix_affinity_bytes) == ("fr", [0, 1], 7.0, 256)
    assert s.non_stream_upstream == "unary"
    assert settings(["--non-stream-upstream", "stream"]).non_stream_upstream == "stream"
    # flags win over the environment
    assert settings(["--port", "9002", "--cap-policy", "clamp"]).port == 9002
    assert settings(["--cap-policy", "clamp"]).cap_policy == "clamp"


def test_every_serve_flag_names_its_environment_variable_and_reads_it() -> None:
    serve = next(a for a in build_parser()._subparsers._group_actions[0].choices.values()  # type: ignore[union-attr]
                 if a.prog.endswith(" serve"))
    for action in serve._actions:
        if action.dest == "help":
            continue
        env = "TOKENGATE_" + action.dest.upper()
        assert f"[{env}" in (action.help or ""), (action.option_strings, action.help)
        assert action.dest in _SETTINGS_FLAGS and action.dest in Settings.model_fields, action.dest


def test_dry_run_from_the_environment() -> None:
    # in a process of its own with a deadline: without the variable it would start serving, and never return
    out = subprocess.run([sys.executable, "-m", "app.cli", "serve", "--port", "0", "--upstream", "http://127.0.0.1:9"],
                         capture_output=True, text=True, timeout=60, env={**os.environ, "TOKENGATE_DRY_RUN": "1"})
    assert (out.returncode, out.stdout.strip()) == (0, "# no managed workers"), out.stderr[-2000:]


def test_the_default_region_is_the_one_every_upstream_names() -> None:
    assert Settings(upstream=["fr/h100-1x=http://a:1", "fr=http://b:2"]).default_region == "fr"
    assert Settings(upstream=["fr/h100-1x=http://a:1"], region="uae").default_region == "uae"
    assert Settings(upstream=["fr=http://a:1", "uae=http://b:2"]).default_region == "local"  # no guess between two
    assert Settings(upstream=["fr=http://a:1", "http://b:2"]).default_region == "local"
    assert Settings().default_region == "local"


def test_bad_values_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["serve", "--cap-policy", "sometimes"])
    assert exc.value.code == 2
    assert main(["serve", "--max-tokens-cap", "0", "--dry-run"]) == 2
    assert "max_tokens_cap" in capsys.readouterr().err


@pytest.mark.parametrize("args", [
    ["--drain-timeout", "inf"], ["--read-timeout", "inf"], ["--stream-idle-timeout", "0"],
    ["--upstream", "http://127.0.0.1:99999"], ["--upstream", "http://:80"],
    ["--upstream-api-key", "k\u00e9y"], ["--upstream-api-key", "a\r\nx-evil: 1"],
    ["--redis", "notaurl"], ["--redis", "notaurl", "--redis-fail-open", "--workers", "2"], ["--redis-fail-open"],
    ["--redis", "redis://:secret@127.0.0.1:1/0"],
    ["--keys", "/nonexistent/keys.yaml"], ["--keys", "BADKEYS"],
], ids=str)
def test_settings_that_cannot_work_exit_2_with_one_clear_message(args: list[str], tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "keys.yaml"
    bad.write_text("keys:\n  - name: a\n    hash: sha256:xx\n")
    args = [str(bad) if a == "BADKEYS" else a for a in args]
    upstream = [] if "--upstream" in args else ["--upstream", "http://127.0.0.1:1"]
    assert main(["serve", "--port", "0", *upstream, *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tokengate serve: ") and "Traceback" not in err, err
    assert "secret" not in err


def test_logs_with_a_bad_environment_exits_2(monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("TOKENGATE_PORT", "abc")
    assert main(["logs"]) == 2
    assert "invalid settings" in capsys.readouterr().err


def test_upstreams_in_several_regions_without_a_default_are_warned_of(tmp_path: Path) -> None:
    """Requests without x-tokengate-region go to region "local", where none of them is: every one a 503."""
    import subprocess
    import sys

    argv = [sys.executable, "-m", "app.cli", "serve", "--port", "0", "--upstream", "fr=http://127.0.0.1:9",
            "--upstream", "uae=http://127.0.0.1:9", "--state-dir", str(tmp_path)]
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    try:
        assert proc.stderr is not None
        lines = []
        for line in proc.stderr:
            lines.append(line)
            if "Uvicorn running" in line or "Application startup complete" in line or len(lines) > 40:
                break
        said = "".join(lines)
        assert "no --region" in said and "'local'" in said and "fr, uae" in said, said
    finally:
        proc.terminate()
        proc.wait(20)
        if proc.stderr is not None:
            proc.stderr.close()


def test_dry_run_prints_exact_worker_commands(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code = main(["serve", "--dry-run", "--region", "fr", "--preset", "h100-4x", "--model", "/models/m",
                 "--gpus", "0,1,2,3,4,5,6,7", "--state-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0
    assert out.count("CUDA_VISIBLE_DEVICES=") == 2
    assert "CUDA_VISIBLE_DEVICES=0,1,2,3" in out and "CUDA_VISIBLE_DEVICES=4,5,6,7" in out
    assert out.count("--tensor-parallel-size 4") == 2
    assert "VLLM_API_KEY='<internal key, generated at start>'" in out
    assert "tg-internal-" not in out  # the real key is never printed


@pytest.mark.parametrize("preset,tp", [("h100-1x", 1), ("h100-2x", 2), ("h100-4x", 4), ("h100-8x", 8)])
def test_dry_run_states_both_parallel_sizes_of_the_preset(preset: str, tp: int,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--dry-run", "--region", "fr", "--preset", preset, "--model", "/models/m",
                 "--gpus", "0,1,2,3,4,5,6,7"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "--model" in line and line[0] != "#"]
    assert len(lines) == 8 // tp
    assert all(f"--tensor-parallel-size {tp} " in line and "--pipeline-parallel-size 1 " in line for line in lines)


def _model_dir(path: Path, **config: object) -> Path:
    """A model directory with a small Llama-shaped config.json (fields overridden by ``config``)."""
    path.mkdir()
    (path / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 1024, "intermediate_size": 2048,
        "num_hidden_layers": 4, "num_attention_heads": 16, "num_key_value_heads": 4, "vocab_size": 32000,
        "max_position_embeddings": 4096, "torch_dtype": "bfloat16", **config}))
    return path


def test_a_model_whose_heads_the_preset_cannot_split_fails_at_start(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    model = _model_dir(tmp_path / "m12", hidden_size=768, num_attention_heads=12)
    for dry in (["--dry-run"], []):
        assert main(["serve", *dry, "--region", "fr", "--preset", "h100-8x", "--model", str(model),
                     "--gpus", "0,1,2,3,4,5,6,7", "--state-dir", str(tmp_path / "state")]) == 2
        err = capsys.readouterr().err
        assert "fr.yaml" in err and "preset fr/h100-8x" in err and "field tensor_parallel_size" in err, err
        assert "12 attention heads" in err
    assert main(["serve", "--dry-run", "--region", "fr", "--preset", "h100-4x", "--model", str(model),
                 "--gpus", "0,1,2,3,4,5,6,7"]) == 0  # 12 heads and 4 KV heads split 4 ways


def test_workers_never_get_a_longer_context_than_the_model_has(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """vLLM refuses --max-model-len above what the model's config allows: a preset's longer max_model_len is
    lowered to the model's own (named by its directory or its config.json), unless --max-model-len says otherwise."""
    model = _model_dir(tmp_path / "qwen", architectures=["Qwen2ForCausalLM"], model_type="qwen2",
                       max_position_embeddings=16384)
    for name in (model, model / "config.json"):
        assert main(["serve", "--dry-run", "--region", "fr", "--preset", "h100-1x", "--model", str(name),
                     "--gpus", "0"]) == 0
        out = capsys.readouterr().out
        assert "--max-model-len 16384" in out and "the model's own context is 16384 tokens" in out
        assert f"--model {model} " in out and "--served-model-name qwen" in out
    longer = ["serve", "--dry-run", "--region", "fr", "--preset", "h100-1x", "--model", str(model), "--gpus", "0",
              "--max-model-len", "20000"]
    assert main(longer) == 2  # vLLM would refuse it at every start
    err = capsys.readouterr().err
    assert "above" in err and "VLLM_ALLOW_LONG_MAX_MODEL_LEN=1" in err, err
    assert main([*longer, "--worker-env", "VLLM_ALLOW_LONG_MAX_MODEL_LEN=1"]) == 0  # vLLM's own override
    assert "--max-model-len 20000" in capsys.readouterr().out
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLLM_ALLOW_LONG_MAX_MODEL_LEN", "1")  # the gateway's environment, which workers inherit
        assert main(longer) == 0


def test_a_model_workers_could_not_load_fails_at_start_and_is_a_note_in_a_dry_run(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    cases = [("/nonexistent/model", "no such model directory"), (str(broken), "cannot read"),
             (str(tmp_path), "no config.json"), ("org/not-downloaded", "not in the Hugging Face cache")]
    for model, said in cases:
        argv = ["serve", "--region", "fr", "--preset", "h100-1x", "--model", model, "--gpus", "0",
                "--state-dir", str(tmp_path / "state")]
        assert main(argv) == 2  # before any worker is started
        err = capsys.readouterr().err
        assert err.startswith("tokengate serve: ") and said in err and "Traceback" not in err, err
        assert main(["serve", "--dry-run", *argv[1:]]) == 0
        assert said in capsys.readouterr().out  # the plan still shows, with the warning
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # the gateway's own: workers run offline all the same
    assert main(["serve", "--region", "fr", "--preset", "h100-1x", "--model", "org/not-downloaded", "--gpus", "0",
                 "--state-dir", str(tmp_path / "state")]) == 2
    assert "not in the Hugging Face cache" in capsys.readouterr().err
    for name, folder in (("org/cached", "models--org--cached"), ("gpt2", "models--gpt2")):
        (tmp_path / "hf" / "hub" / folder).mkdir(parents=True)
        assert main(["serve", "--dry-run", "--region", "fr", "--preset", "h100-1x", "--model", name,
                     "--gpus", "0"]) == 0
        assert "Hugging Face cache" not in capsys.readouterr().out


@pytest.mark.parametrize(("args", "said"), [
    (["--worker-arg=--host=0.0.0.0"], "loopback only"),
    (["--worker-arg=--tensor_parallel_size=4"], "from the preset"),
    (["--worker-arg=--port", "--worker-arg=9000"], "free loopback port"),
    (["--worker-arg=--hos=0.0.0.0"], "loopback only"),  # (argparse takes an unambiguous prefix)
    (["--worker-arg=-dp=2"], "one worker per GPU slice"),
    (["--worker-env", "CUDA_VISIBLE_DEVICES=0,1"], "--gpus"),
    (["--gpus=-1,2"], "integers from 0"),
    (["--gpus", "1,1"], "named twice"),
], ids=str)
def test_worker_overrides_may_not_undo_what_the_gateway_sets(args: list[str], said: str, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    model = _model_dir(tmp_path / "m")
    argv = ["serve", "--dry-run", "--region", "fr", "--preset", "h100-1x", "--model", str(model), "--gpus", "0,1"]
    assert main([*argv, *args]) == 2
    err = capsys.readouterr().err
    assert said in err and "pydantic" not in err and "Traceback" not in err, err


def test_gpus_must_exist_and_uuids_are_refused_with_the_way_out(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from app.deployment import plan_deployment
    from app.presets import builtin_presets_dir, load_catalog
    from app.workers.plan import PlanError, detect_gpus

    model = _model_dir(tmp_path / "m")
    catalog = load_catalog([builtin_presets_dir()])
    settings = Settings(region="fr", preset="h100-1x", model=str(model), gpus=[0, 9], state_dir=tmp_path)
    with pytest.raises(PlanError, match="no GPU 9 on this machine"):
        plan_deployment(settings, catalog, gpus=lambda: [0, 1])
    assert len(plan_deployment(settings, catalog, gpus=lambda: []).specs) == 2  # can't tell: as asked
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-5c5d1a4e-2b9f-4c3e")
    with pytest.raises(PlanError, match="--gpus"):
        detect_gpus()
    # with --gpus given there is nothing to detect: each worker gets its own CUDA_VISIBLE_DEVICES
    plan = plan_deployment(settings.model_copy(update={"gpus": [0, 1]}), catalog, gpus=detect_gpus)
    assert [dict(w.env)["CUDA_VISIBLE_DEVICES"] for w in plan.specs] == ["0", "1"]


def test_dry_run_unknown_preset_names_the_valid_ones(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--dry-run", "--region", "fr", "--preset", "h100-3x", "--model", "/m"]) == 2
    err = capsys.readouterr().err
    assert "h100-3x" in err and "h100-2x" in err


def test_preset_needs_a_region(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--dry-run", "--preset", "h100-1x", "--model", "/m"]) == 2
    assert "--region" in capsys.readouterr().err


@pytest.mark.parametrize("keyed", [False, True])
def test_the_printed_examples_work_when_pasted_into_a_plain_shell(tmp_path: Path, keyed: bool) -> None:
    """``make run``'s banner: its curl and SDK examples, run as printed by a shell without the venv activated (with
    --keys, once the key is in $TOKENGATE_KEY as the banner says)."""
    key = "tg-banner-test-key-0123456789"
    keys = tmp_path / "keys.yaml"
    keys.write_text(json.dumps({"keys": [{"name": "me", "hash": hash_key(key)}]}))
    flags = ["--keys", str(keys)] if keyed else []
    with ThreadedFakeWorker(model="tiny") as w, \
            gateway_process("--upstream", w.url, *flags, ready_timeout=30) as gw:
        wait_until(lambda: "EOF\n" in gw.log.read_text(), 10, "the printed examples")
        text = gw.log.read_text()
        curl = text[text.index("curl -N"):]
        curl = curl[:curl.index("\n\n")]
        sdk = text[text.index(" - <<'EOF'") - 200:]
        sdk = sdk[sdk.rindex("\n", 0, 200) + 1: sdk.index("\nEOF\n") + 5].strip()
        env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}  # no venv on the PATH, as in a new terminal
        if keyed:
            assert "export TOKENGATE_KEY=" in text
            env["TOKENGATE_KEY"] = key
        out = subprocess.run(["bash", "-c", curl], capture_output=True, text=True, timeout=30, env=env)
        assert out.returncode == 0 and out.stdout.rstrip().endswith("data: [DONE]"), (curl, out.stdout, out.stderr)
        out = subprocess.run(["bash", "-c", sdk], capture_output=True, text=True, timeout=60, env=env)
        assert out.returncode == 0 and out.stdout.strip(), (sdk, out.stdout, out.stderr[-2000:])
        assert gw.url.removeprefix("http://") in curl and gw.url in sdk

