"""`gemma4-jax` command line: clean one-line errors (exit 2) and the generate output formats."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from gemma4_jax import cli

DEMO = os.path.isdir(cli.DEMO_TARGET) and os.path.isdir(cli.DEMO_DRAFTER)


def _run(*args, env=None, stdin=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "gemma4_jax.cli", *args], capture_output=True, text=True,
                          env=env, input=stdin, timeout=600)


@pytest.mark.parametrize("args,needle", [
    (["generate", "x", "--temperature", "-1"], "--temperature"),
    (["generate", "x", "--temperature", "abc"], "--temperature"),
    (["generate", "x", "--temperature", "1e-40"], "--temperature"),  # would sample NaNs
    (["generate", "x", "--top-p", "1.5"], "--top-p"),
    (["generate", "x", "--top-p", "0"], "--top-p"),
    (["generate", "x", "--num-draft-tokens", "0"], "--num-draft-tokens"),
    (["generate", "x", "--max-new-tokens", "-5"], "--max-new-tokens"),
    (["generate", "x", "--top-k", "0"], "--top-k"),
    (["generate", "x", "--bogus"], "--bogus"),
    (["generate", "x", "--system", "be brief"], "--chat"),
    (["generate", "x", "--top-k", "5"], "--temperature"),
    (["generate", "--prompt-file", "/nonexistent/prompt.txt"], "/nonexistent/prompt.txt"),
    (["generate", "x", "--model", "nobody/no-such-model-xyz"], "nobody/no-such-model-xyz"),
    (["generate", "x", "--model", "/nonexistent/dir/or/id/x"], "/nonexistent/dir/or/id/x"),
    ([], "generate"),
])
def test_bad_command_lines_give_one_line_errors_and_exit_2(args, needle):
    r = _run(*args)
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("gemma4-jax: error:"), r.stderr
    assert needle in lines[0]
    assert "Traceback" not in r.stderr


def test_offline_hub_id_says_what_to_download():
    r = _run("generate", "x", "--model", "google/gemma-4-E2B-it")
    assert r.returncode == 2
    assert "huggingface-cli download google/gemma-4-E2B-it" in r.stderr


def test_a_checkpoint_without_a_tokenizer_is_a_clean_error(hf_target):
    _, path = hf_target("e2b")
    r = _run("generate", "x", "--model", path, "--no-draft")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "tokenizer" in r.stderr


@pytest.mark.skipif(not DEMO, reason="the demo pair is not installed in gemma4_jax/demo")
@pytest.mark.parametrize("case", ["drafter_as_model", "target_as_drafter", "corrupt_tokenizer"])
def test_wrong_or_broken_checkpoints_give_one_line_errors(case, tmp_path):
    if case == "corrupt_tokenizer":
        shutil.copytree(cli.DEMO_TARGET, tmp_path / "t")
        (tmp_path / "t" / "tokenizer.model").write_bytes(b"garbage")
        args, needle = ["--model", str(tmp_path / "t"), "--no-draft"], "tokenizer.model"
    elif case == "drafter_as_model":
        args, needle = ["--model", cli.DEMO_DRAFTER, "--no-draft"], "not a target model"
    else:
        args, needle = ["--drafter", cli.DEMO_TARGET], "not a drafter"
    r = _run("generate", "x", "--max-new-tokens", "2", *args)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("gemma4-jax: error:") and needle in lines[0], r.stderr


@pytest.mark.skipif(not DEMO, reason="the demo pair is not installed in gemma4_jax/demo")
def test_a_local_models_assistant_sibling_is_its_default_drafter(tmp_path):
    os.symlink(cli.DEMO_TARGET, tmp_path / "tiny")
    os.symlink(cli.DEMO_DRAFTER, tmp_path / "tiny-assistant")
    r = _run("generate", "def f(x):", "--model", str(tmp_path / "tiny"), "--max-new-tokens", "16", "--json")
    assert r.returncode == 0, r.stderr
    stats = json.loads(r.stdout)["stats"]
    assert len(stats["accept_histogram"]) > 1 and stats["proposed_drafts"] > 0  # speculative, with the sibling
    assert "no drafter" not in r.stderr


@pytest.mark.skipif(not DEMO, reason="the demo pair is not installed in gemma4_jax/demo")
def test_generate_with_the_shipped_pair_prints_text_and_stats():
    r = _run("generate", "def fibonacci(n):", "--max-new-tokens", "24")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("def fibonacci(n):") and len(r.stdout) > len("def fibonacci(n):\n")
    assert "tok/s" in r.stderr and "tokens/verify step" in r.stderr and "acceptance" in r.stderr


@pytest.mark.skipif(not DEMO, reason="the demo pair is not installed in gemma4_jax/demo")
def test_generate_json_has_text_tokens_and_the_generate_stats():
    r = _run("generate", "import os\n", "--max-new-tokens", "16", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert set(out) == {"text", "tokens", "stats"}
    assert len(out["tokens"]) == out["stats"]["new_tokens"] <= 16
    for key in ("new_tokens", "verify_steps", "accepted_drafts", "mean_tokens_per_step", "accept_histogram",
                "seconds", "tokens_per_second", "rows"):
        assert key in out["stats"]


@pytest.mark.skipif(not DEMO, reason="the demo pair is not installed in gemma4_jax/demo")
def test_chat_mode_formats_gemma4_turns_and_generates():
    from gemma4_jax import tokenizer as tok_lib

    text = tok_lib.format_chat([{"role": "system", "content": "You write Python."},
                                {"role": "user", "content": "Write a function"}])
    assert text.startswith("<bos><|turn>system\nYou write Python.<turn|>\n<|turn>user\nWrite a function<turn|>\n")
    assert text.endswith("<|turn>model\n<|channel>thought\n<channel|>")
    r = _run("generate", "Write a function", "--chat", "--system", "You write Python.", "--max-new-tokens", "8",
             "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert 1 <= len(out["tokens"]) <= 8 and out["stats"]["verify_steps"] >= 1


def test_a_closed_pipe_ends_quietly(monkeypatch, capsys):
    def closed(args):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(cli, "run_generate", closed)
    assert cli.main(["generate", "x"]) == 1
    assert capsys.readouterr().err == ""
