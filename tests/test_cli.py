"""The command line: help texts, `phikit generate` and `phikit chat` end to end on a tiny checkpoint."""

import subprocess
import sys

import pytest
from tiny import tiny_config, write_checkpoint
from tiny_tokenizer import build

import phikit
from phikit.__main__ import COMMANDS
from phikit.chat_format import encode_chat, stop_ids
from phikit.generate import stream_text


def run(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "phikit", *args], input=stdin, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli")
    write_checkpoint(tiny_config("phi-3.5-mini-instruct"), path)
    build("phi-3.5-mini-instruct", path)
    return path


def test_help_lists_every_command():
    out = run("--help")
    assert out.returncode == 0
    for name in COMMANDS:
        assert name in out.stdout


@pytest.mark.parametrize("command", list(COMMANDS))
def test_each_command_explains_its_flags(command):
    out = run(command, "--help")
    assert out.returncode == 0
    assert "default" in out.stdout
    if command in ("data", "pretrain", "sft", "dpo", "lora"):  # no --model flag: their own flags are tested with them
        return
    flags = ["--model", "--dtype", "--threads", "--revision"]
    if command in ("generate", "chat"):
        flags += ["--max-new-tokens", "--temperature", "--top-p", "--top-k", "--min-p", "--seed", "--stop", "--system"]
    if command == "convert":
        flags += ["--to", "--out", "--type"]
    for flag in flags:
        assert flag in out.stdout, flag
    assert "default" in out.stdout


def test_generate_prints_only_the_completion(ckpt):
    model, tok = phikit.load(ckpt)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    want = "".join(stream_text(model, tok, encode_chat(messages, tok), 12, stop_ids=stop_ids(tok)))
    out = run("generate", "--model", str(ckpt), "--prompt", "What is the capital of France?", "--chat",
              "--max-new-tokens", "12", "--verbose", "--threads", "1")
    assert out.returncode == 0, out.stderr
    assert out.stdout == want + "\n"
    assert "new tokens" in out.stderr and "tok/s" in out.stderr


def test_generate_with_an_int8_cache_and_a_compiled_step(ckpt):
    """--kv-cache int8 and --compile reach the model: the compiled step gives the eager tokens (int8 cache)."""
    import torch

    model, tok = phikit.load(ckpt)
    model.kv_cache_dtype = torch.int8
    ids = tok.encode("Hello there", add_special_tokens=True)
    want = "".join(stream_text(model, tok, ids, 12, stop_ids=stop_ids(tok)))
    out = run("generate", "--model", str(ckpt), "--prompt", "Hello there", "--max-new-tokens", "12",
              "--kv-cache", "int8", "--compile", "--threads", "1")
    assert out.returncode == 0, out.stderr
    assert out.stdout == want + "\n"


def test_generate_sampling_is_reproducible_with_a_seed(ckpt):
    args = ("generate", "--model", str(ckpt), "--prompt", "Hello", "--temperature", "1.0", "--top-k", "50",
            "--seed", "3", "--max-new-tokens", "8")
    assert run(*args).stdout == run(*args).stdout


def test_chat_multi_turn_with_reset_and_exit(ckpt):
    model, tok = phikit.load(ckpt)

    def reply(messages):
        return "".join(stream_text(model, tok, encode_chat(messages, tok), 6, stop_ids=stop_ids(tok)))

    system = {"role": "system", "content": "Be brief."}
    r1 = reply([system, {"role": "user", "content": "Hi there"}])
    r2 = reply([system, {"role": "user", "content": "Hi there"}, {"role": "assistant", "content": r1},
                {"role": "user", "content": "And again?"}])
    out = run("chat", "--model", str(ckpt), "--system", "Be brief.", "--max-new-tokens", "6",
              stdin="Hi there\nAnd again?\n/reset\nHi there\n/exit\nnever read\n")
    assert out.returncode == 0, out.stderr
    assert out.stdout == f"{r1}\n{r2}\n{r1}\n"  # the history is kept, /reset clears it, /exit stops
    assert "[conversation cleared]" in out.stderr


def test_bad_model_path_is_one_clear_line(tmp_path):
    out = run("generate", "--model", str(tmp_path / "missing"), "--prompt", "x")
    assert out.returncode != 0
    assert "no such directory" in out.stderr and "Traceback" not in out.stderr


def test_bad_sampling_value_is_refused(ckpt):
    out = run("generate", "--model", str(ckpt), "--prompt", "x", "--top-p", "1.5")
    assert out.returncode != 0 and "top_p must be in (0, 1]" in out.stderr


def test_unknown_command():
    out = run("frobnicate")
    assert out.returncode == 2 and "unknown command" in out.stderr


def test_a_context_that_does_not_fit_is_refused_in_one_line(ckpt, monkeypatch, capsys):
    """generate and chat size the KV cache against the RAM available before loading, next to the weights:
    a context that does not fit is one line naming what fits (chat drops that turn and goes on)."""
    import io

    from phikit import memory
    from phikit.commands import chat, generate

    model, _ = phikit.load(ckpt)
    per_position = memory.kv_cache_bytes(model.cfg, 1, 1, 4)  # float32 cache
    ram = int((memory.model_bytes(model) + 100 * per_position) / 0.9) + 1  # room for ~100 positions
    monkeypatch.setattr(memory, "available_bytes", lambda: ram)
    with pytest.raises(SystemExit, match=r"a context of \d+ positions needs .* at most 10\d positions fit"):
        generate.main(["--model", str(ckpt), "--prompt", "Hello", "--max-new-tokens", "300"])
    assert generate.main(["--model", str(ckpt), "--prompt", "Hello", "--max-new-tokens", "20"]) == 0
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello\n"))
    assert chat.main(["--model", str(ckpt), "--max-new-tokens", "300"]) == 0
    err = capsys.readouterr().err
    assert "at most 10" in err and "/reset clears the conversation" in err
