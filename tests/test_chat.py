"""`eqxlm chat`: the session keeps its KV cache across turns, and the terminal loop as a person uses it."""

import os
import pty
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

import eqxlm
from eqxlm.chat import ChatSession
from eqxlm.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = ["What is a list?", "And a tuple?", "How do I open a file?"]


@pytest.fixture(scope="module")
def default():
    return eqxlm.from_pretrained("eqxlm/default"), load_tokenizer("eqxlm/default")


@pytest.fixture(scope="module")
def conversation(default):
    """Three greedy turns, with the compiles each one triggered."""
    model, tok = default
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, duration, **kw: compiles.append(event) if event == "/jax/core/compile/backend_compile_duration" else None
    )
    session = ChatSession(model, tok, max_new_tokens=20)
    replies, per_turn, streamed = [], [], []
    for question in QUESTIONS:
        before = len(compiles)
        pieces = []
        replies.append(session.reply(question, on_text=pieces.append))
        streamed.append(pieces)
        per_turn.append(len(compiles) - before)
    return session, replies, per_turn, streamed


def test_later_turns_prefill_only_their_new_tokens(default, conversation):
    _, tok = default
    session, _, _, _ = conversation
    first, second, third = session.turn_stats
    assert not (first.reprefilled or second.reprefilled or third.reprefilled)
    # turn 1 prefills the whole rendered prompt
    assert first.prefilled == len(
        tok.apply_chat_template([{"role": "user", "content": QUESTIONS[0]}], add_generation_prompt=True)
    )
    # turn 2: only the closing of the assistant turn and the new user turn (the default template's text)
    new_text = f"\n<|endoftext|>User: {QUESTIONS[1]}\n<|endoftext|>Assistant:"
    assert second.prefilled == len(tok.encode(new_text, add_special_tokens=False))
    assert session.history[second.prompt_end - second.prefilled : second.prompt_end] == tok.encode(
        new_text, add_special_tokens=False
    )
    # the cache holds exactly the history: everything fed, and nothing twice
    fed = lambda s: s.prefilled + len(s.generated) - (s.generated[-1] in session.stop_ids)  # noqa: E731
    assert second.prompt_end == first.cache_end + second.prefilled
    assert session.cache_end == len(session.history) == sum(fed(s) for s in session.turn_stats)
    full = tok.apply_chat_template(session.messages[:-1], add_generation_prompt=True)
    assert third.prefilled < len(full) / 3  # the whole conversation would be ~3x more


def test_reused_cache_gives_the_same_reply_as_a_fresh_prompt(default, conversation):
    """Turn 3's reply (cache reused twice; the history exceeds the 64-token sliding window, so
    the rolling buffer wrapped) equals greedy generation from the same tokens, prefilled at once."""
    model, _ = default
    session, _, _, _ = conversation
    for stats in session.turn_stats[1:]:
        prompt = np.asarray([session.history[: stats.prompt_end]], np.int32)
        tokens = eqxlm.generate(model, prompt, max_new_tokens=len(stats.generated), eos_token_id=[])
        assert np.asarray(tokens)[0, prompt.shape[1] :].tolist() == stats.generated
    assert session.turn_stats[-1].prompt_end > 64


def test_repetition_penalty_counts_the_whole_conversation(default):
    """With a repetition penalty, a later turn's reply (cache reused) equals `generate` with
    the same `SamplingConfig` on the conversation's tokens prefilled at once: the penalty sees
    every token the cache holds, both turns' prompts and replies."""
    model, tok = default
    sampling = eqxlm.SamplingConfig(repetition_penalty=1.5)
    session = ChatSession(model, tok, max_new_tokens=20, sampling=sampling)
    for question in QUESTIONS[:2]:
        session.reply(question)
    stats = session.turn_stats[-1]
    prompt = np.asarray([session.history[: stats.prompt_end]], np.int32)
    kw = dict(max_new_tokens=len(stats.generated), eos_token_id=[])
    penalized = np.asarray(eqxlm.generate(model, prompt, sampling=sampling, **kw))[0, prompt.shape[1] :]
    assert penalized.tolist() == stats.generated
    assert penalized.tolist() != np.asarray(eqxlm.generate(model, prompt, **kw))[0, prompt.shape[1] :].tolist()


def test_streams_and_compiles_once(conversation):
    _, replies, per_turn, streamed = conversation
    assert per_turn[1] == per_turn[2] == 0, per_turn  # later turns compile nothing
    for reply, pieces in zip(replies, streamed, strict=True):
        assert "".join(pieces) == reply and len(pieces) > 3


def test_context_limit_is_a_clear_error(default):
    model, tok = default
    session = ChatSession(model, tok, max_length=40, max_new_tokens=20)
    with pytest.raises(ValueError, match="would exceed 40 tokens"):
        session.reply("What is a list? " * 5)


class Terminal:
    """`eqxlm chat` in a pseudo-terminal: what a person types, what the screen shows."""

    def __init__(self, *args):
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # child: the command, with the pty as its terminal
            os.chdir(ROOT)
            os.execv(sys.executable, [sys.executable, "-m", "eqxlm.cli", "chat", *args])
        self.screen = ""

    def read_until(self, text: str, timeout: float = 120) -> str:
        deadline = time.monotonic() + timeout
        start = len(self.screen)
        while text not in self.screen[start:]:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{text!r} did not appear; screen:\n{self.screen}")
            ready, _, _ = select.select([self.fd], [], [], left)
            if ready:
                try:
                    data = os.read(self.fd, 4096)
                except OSError:  # the child closed the terminal
                    data = b""
                if not data:
                    raise AssertionError(f"the program ended before {text!r}; screen:\n{self.screen}")
                self.screen += data.decode("utf-8", "replace").replace("\r\n", "\n")
        return self.screen[start:]

    def type(self, keys: str) -> None:
        time.sleep(0.5)  # as a person would: a key pressed the instant the prompt is drawn can beat readline's setup
        os.write(self.fd, keys.encode())

    def wait(self, timeout: float = 30) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                try:
                    while select.select([self.fd], [], [], 0.1)[0] and (data := os.read(self.fd, 4096)):
                        self.screen += data.decode("utf-8", "replace").replace("\r\n", "\n")
                except OSError:
                    pass
                return os.waitstatus_to_exitcode(status)
            time.sleep(0.05)
        os.kill(self.pid, signal.SIGKILL)
        raise AssertionError(f"still running after {timeout} s; screen:\n{self.screen}")


# pty.fork in a process with JAX's threads: the child only changes directory and execs, so it is safe.
@pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning")
def test_a_conversation_in_a_real_terminal(conversation):
    """Type two questions, read the streamed replies on screen, quit with Ctrl-D."""
    _, replies, _, _ = conversation
    term = Terminal("--max-new-tokens", "20")
    banner = term.read_until(">>> ")
    assert "eqxlm chat: eqxlm/default" in banner and "Ctrl-D" in banner
    for question, reply in zip(QUESTIONS[:2], replies[:2], strict=True):
        term.type(question + "\r")
        shown = term.read_until(">>> ")
        assert shown.startswith(question + "\n")  # the terminal echoes what was typed
        assert reply.strip() and reply.replace("\r\n", "\n") in shown  # the greedy reply, as the session gives it
    term.type("\x04")  # Ctrl-D
    assert term.wait() == 0
    assert "Traceback" not in term.screen


@pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning")
def test_ctrl_c_quits_cleanly():
    term = Terminal()
    term.read_until(">>> ")
    term.type("\x03")  # Ctrl-C
    assert term.wait() == 0
    assert "Traceback" not in term.screen and "KeyboardInterrupt" not in term.screen


def test_chat_needs_a_template(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json"):
        (folder / name).symlink_to(eqxlm.default_model_path() / name)
    out = subprocess.run([sys.executable, "-m", "eqxlm.cli", "chat", str(folder)], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 2 and "has no chat template" in out.stderr and "Traceback" not in out.stderr


def test_a_template_that_is_not_incremental_reprefills(default):
    """A template whose renderings are not prefixes of each other (here: a message count up
    front) makes the session prefill the whole conversation again, and still answer right."""
    import dataclasses

    model, tok = default
    counting = dataclasses.replace(
        tok, chat_template="{{ messages | length }}{% for m in messages %} {{ m['content'] }}\n{% endfor %}{{ eos_token }}"
    )
    session = ChatSession(model, counting, max_new_tokens=8)
    session.reply(QUESTIONS[0])
    session.reply(QUESTIONS[1])
    stats = session.turn_stats[-1]
    assert stats.reprefilled and stats.prefilled == stats.prompt_end == len(
        counting.apply_chat_template(session.messages[:-1], add_generation_prompt=True)
    )
    prompt = np.asarray([session.history[: stats.prompt_end]], np.int32)
    tokens = eqxlm.generate(model, prompt, max_new_tokens=len(stats.generated), eos_token_id=[])
    assert np.asarray(tokens)[0, prompt.shape[1] :].tolist() == stats.generated
