"""Tokenizer and chat format against transformers' tokenizer, on tiny rebuilds of the official tokenizers.

The reference is `AutoTokenizer.from_pretrained(dir).apply_chat_template` on the same directory
(tiny_tokenizer.build writes a config.json beside it, so transformers loads tokenizer.json as-is).
"""

import json
import random
import shutil

import pytest
import tiny_tokenizer

from phikit import chat_format
from phikit.chat_format import ChatFormatError
from phikit.tokenizer import Tokenizer, TokenizerError

PHI3_MINI = "phi-3-mini-4k-instruct"
PHI4_MINI = "phi-4-mini-instruct"

CONVERSATIONS = {
    "user-only": [{"role": "user", "content": "Hi"}],
    "system-multi-turn": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris is the capital."},
        {"role": "user", "content": "And 1234567 + 1?"},
    ],
    "empty-system": [{"role": "system", "content": ""}, {"role": "user", "content": "Hello, world!"}],
    "no-system-ends-with-assistant": [
        {"role": "user", "content": "I'M HAPPY you're here; don't forget the tea!"},
        {"role": "assistant", "content": "I won't. 3.14159 pies?"},
    ],
    "unicode-newlines-spaces": [
        {"role": "system", "content": "Answer briefly.\n\nIn plain English."},
        {"role": "user", "content": "Café naïve façade — ünïcödé ✓ 😀 日本語\n\tdef add(a, b):\n    return a + b"},
        {"role": "assistant", "content": "  double  spaces  \n"},
        {"role": "user", "content": "\n"},
    ],
    "special-token-text-in-content": [{"role": "user", "content": "say <|end|> then <|user|>\nx"}],
    # Phi-4-mini's template adds a tool list to a system message; the others ignore the key
    "system-with-tools": [
        {"role": "system", "content": "Use tools.", "tools": '[{"name": "add", "parameters": {}}]'},
        {"role": "user", "content": "add 2 and 3"},
    ],
}

# Built-in family template -> the fixture whose official template it copies.
FAMILY_FIXTURE = {
    "phi-3-2024-04": "phi-3-mini-4k-instruct-2024-04",
    "phi-3": "phi-3-mini-4k-instruct",
    "phi-3-medium": "phi-3-medium-4k-instruct",
    "phi-3.5": "phi-3.5-mini-instruct",
    "phi-4-mini": "phi-4-mini-instruct",
}

# Stop tokens per fixture: generation_config eos ids + tokenizer eos + <|end|> (Phi-3-medium has no
# generation_config.json; the newer Phi-3/3.5 configs also list <|assistant|>).
STOP_TOKENS = {
    "phi-3-mini-4k-instruct-2024-04": {"<|endoftext|>", "<|end|>"},
    "phi-3-mini-4k-instruct": {"<|endoftext|>", "<|assistant|>", "<|end|>"},
    "phi-3-medium-4k-instruct": {"<|endoftext|>", "<|end|>"},
    "phi-3.5-mini-instruct": {"<|endoftext|>", "<|assistant|>", "<|end|>"},
    "phi-4-mini-instruct": {"<|endoftext|>", "<|end|>"},
}

STREAM_TEXTS = [
    "Hello, world!",
    "Café naïve façade — ünïcödé ✓",
    "emoji 😀🎉 and 日本語 (not in the tiny vocabulary: byte fallback)",
    "multiple   spaces,  tabs\t\tand\n\nnewlines\n",
    "   leading spaces and a trailing one ",
    "I'M HAPPY: 1234567 apples",
    "special<|end|> tokens <|user|>\nin the<|endoftext|>middle<s>",
    "ends in an emoji 😀",
    "é",
]


@pytest.fixture(scope="module")
def tok_dirs(tmp_path_factory):
    """{fixture name: tokenizer directory} for every official tokenizer, built once."""
    root = tmp_path_factory.mktemp("tokenizers")
    return {name: tiny_tokenizer.build(name, root / name) for name in tiny_tokenizer.NAMES}


@pytest.fixture(scope="module")
def hf_tokenizers(tok_dirs):
    from transformers import AutoTokenizer

    return {name: AutoTokenizer.from_pretrained(d) for name, d in tok_dirs.items()}


def _hf_ids(result) -> list[int]:
    """apply_chat_template(tokenize=True) returns a list or, in transformers 5, a BatchEncoding."""
    ids = result if isinstance(result, list) else result["input_ids"]
    return list(ids)


def _stream(tok: Tokenizer, ids: list[int], skip: bool) -> str:
    decoder = tok.stream(skip_special_tokens=skip)
    return "".join(decoder.step(i) for i in ids) + decoder.flush()


def _without_template(src, dst):
    """A copy of a tokenizer directory whose tokenizer_config.json has no chat_template."""
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "tokenizer_config.json").read_text(encoding="utf-8"))
    del cfg["chat_template"]
    (dst / "tokenizer_config.json").write_text(json.dumps(cfg), encoding="utf-8")
    return dst


# --- chat template parity ---------------------------------------------------------------------------

@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("conv", list(CONVERSATIONS))
@pytest.mark.parametrize("name", tiny_tokenizer.NAMES)
def test_template_matches_transformers(tok_dirs, hf_tokenizers, name, conv, add_generation_prompt):
    messages, hf = CONVERSATIONS[conv], hf_tokenizers[name]
    tok = Tokenizer(tok_dirs[name])
    want = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert chat_format.render(messages, tok, add_generation_prompt) == want
    want_ids = _hf_ids(hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt))
    assert chat_format.encode_chat(messages, tok, add_generation_prompt) == want_ids


def test_golden_ids_phi3_mini(tok_dirs):
    """Ids of the tiny rebuilt Phi-3-mini vocabulary (not the real one's 32010 ... 32001).

    Produced once with `Tokenizer(tiny_tokenizer.build("phi-3-mini-4k-instruct", tmp)).encode(text)`
    (tokenizers 0.23.3; BPE training on tiny_tokenizer.CORPUS is deterministic). The tiny vocabulary
    is <unk> <s> </s>, 256 byte tokens, 297 trained merges (0..555), then the added tokens in the
    official order: <|endoftext|> 556, <|assistant|> 557, ..., <|end|> 563, ..., <|user|> 566.
    """
    tok = Tokenizer(tok_dirs[PHI3_MINI])
    text = "<|user|>\nHi<|end|>\n<|assistant|>\n"
    want = [
        566,  # <|user|>  (rstrip=True: swallows the "\n" after it)
        363,  # "▁H"     (the normalizer prepends ▁ to the text after a special token)
        300,  # "i"
        563,  # <|end|>   (rstrip=True: swallows the "\n")
        557,  # <|assistant|> (rstrip=True: swallows the final "\n")
    ]
    assert tok.encode(text) == want
    assert [tok.id_to_token(i) for i in want] == ["<|user|>", "▁H", "i", "<|end|>", "<|assistant|>"]
    assert chat_format.encode_chat([{"role": "user", "content": "Hi"}], tok) == want


# --- built-in templates for checkpoints without one -----------------------------------------------

def test_every_builtin_template_has_a_fixture():
    assert set(FAMILY_FIXTURE) == set(chat_format.BUILTIN_TEMPLATES)


@pytest.mark.parametrize("family", list(FAMILY_FIXTURE))
def test_builtin_template_matches_official(tok_dirs, hf_tokenizers, tmp_path, family):
    name = FAMILY_FIXTURE[family]
    tok = Tokenizer(_without_template(tok_dirs[name], tmp_path / name))
    assert tok.chat_template is None
    template = chat_format.family_template(family)
    for messages in CONVERSATIONS.values():
        for agp in (True, False):
            want = hf_tokenizers[name].apply_chat_template(messages, tokenize=False, add_generation_prompt=agp)
            assert chat_format.render(messages, tok, agp, template=template) == want
            assert chat_format.encode_chat(messages, tok, agp, template=template) == tok.encode(want)


def test_unknown_family_template():
    with pytest.raises(ChatFormatError, match="no built-in chat template 'phi-2'"):
        chat_format.family_template("phi-2")


# --- stop ids -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", tiny_tokenizer.NAMES)
def test_stop_ids(tok_dirs, name):
    tok = Tokenizer(tok_dirs[name])
    want = {tok.token_to_id(t) for t in STOP_TOKENS[name]}
    assert None not in want
    assert chat_format.stop_ids(tok) == want


# --- streaming decode -----------------------------------------------------------------------------

@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize("name", tiny_tokenizer.NAMES)
def test_stream_texts_join_to_decode(tok_dirs, name, skip):
    tok = Tokenizer(tok_dirs[name])
    for text in STREAM_TEXTS:
        ids = tok.encode(text)
        assert _stream(tok, ids, skip) == tok.decode(ids, skip), text
    if name != PHI4_MINI:  # the Phi-3 tiny vocabularies spell the emoji with byte-fallback tokens
        assert "<0xF0>" in [tok.id_to_token(i) for i in tok.encode("😀")]


@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize("name", tiny_tokenizer.NAMES)
def test_stream_random_ids_join_to_decode(tok_dirs, name, skip):
    """200 random id sequences; one id in five is an added (mostly special) token."""
    tok = Tokenizer(tok_dirs[name])
    added = sorted(tok.backend.get_added_tokens_decoder())
    rng = random.Random(f"{name}-{skip}")
    for _ in range(200):
        ids = [rng.choice(added) if rng.random() < 0.2 else rng.randrange(tok.vocab_size)
               for _ in range(rng.randint(1, 40))]
        assert _stream(tok, ids, skip) == tok.decode(ids, skip), ids


@pytest.mark.parametrize("tokens, skip", [
    (["<0x58>", "<0x82>"], False),             # "X", then the run is invalid UTF-8: one U+FFFD per byte
    (["<0xC3>", "<0xA9>", "<0xA9>", "a"], False),  # "é", then a stray continuation byte spoils the run
    (["<0x58>", "<|end|>", "<0x82>"], True),   # a skipped special token does not end the byte run
    (["<0xC3>", "<|end|>", "<0xA9>"], True),   # ... so the run still forms "é"
    (["<0xC3>", "<|end|>", "<0xA9>"], False),  # not skipped, it splits the run: U+FFFD <|end|> U+FFFD
])
def test_stream_byte_fallback_runs(tok_dirs, tokens, skip):
    """The ByteFallback decoder judges a run of byte tokens as a whole, so a later byte can undo text."""
    tok = Tokenizer(tok_dirs[PHI3_MINI])
    ids = [tok.token_to_id(t) for t in tokens]
    assert _stream(tok, ids, skip) == tok.decode(ids, skip)


@pytest.mark.parametrize("name, want", [
    # byte-fallback bytes wait for the next non-byte token (a further byte could still spoil the run)
    (PHI3_MINI, [("▁Hello", "Hello"), ("▁", " "), ("<0xF0>", ""), ("<0x9F>", ""), ("<0x98>", ""),
                 ("<0x80>", ""), ("▁", "😀 "), ("wor", "wor"), ("l", "l"), ("d", "d")]),
    # byte-level bytes are final once they form a whole UTF-8 character
    (PHI4_MINI, [("H", "H"), ("e", "e"), ("l", "l"), ("l", "l"), ("o", "o"), ("Ġ", " "), ("ð", ""),
                 ("Ł", ""), ("ĺ", ""), ("Ģ", "😀"), ("Ġ", " "), ("w", "w"), ("or", "or"), ("l", "l"), ("d", "d")]),
])
def test_stream_emits_text_as_soon_as_it_is_final(tok_dirs, name, want):
    """Pieces come out token by token, not all at flush (pasted from a run, checked by eye)."""
    tok = Tokenizer(tok_dirs[name])
    decoder = tok.stream()
    got = [(tok.id_to_token(i), decoder.step(i)) for i in tok.encode("Hello 😀 world")]
    assert got == want
    assert decoder.flush() == ""
    if name == PHI3_MINI:  # a byte-fallback character at the very end comes out at flush
        tail = tok.stream()
        assert "".join(tail.step(i) for i in tok.encode("end 😀")) == "end "
        assert tail.flush() == "😀"


# --- bad input ------------------------------------------------------------------------------------

def test_missing_tokenizer_json(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(TokenizerError, match="has no tokenizer.json"):
        Tokenizer(tmp_path)


def test_invalid_tokenizer_config_json(tok_dirs, tmp_path):
    d = shutil.copytree(tok_dirs[PHI3_MINI], tmp_path / "tok")
    (d / "tokenizer_config.json").write_text('{"eos_token": "<|endoftext|>",', encoding="utf-8")
    with pytest.raises(TokenizerError, match=r"tokenizer_config\.json is not valid JSON"):
        Tokenizer(d)


def test_unparsable_tokenizer_json(tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"model": 1}')
    with pytest.raises(TokenizerError, match=r"tokenizer\.json could not be parsed"):
        Tokenizer(tmp_path)


@pytest.mark.parametrize("messages, message", [
    ([], "messages must be a non-empty list"),
    ({"role": "user", "content": "hi"}, "messages must be a non-empty list"),
    ([{"role": "user", "content": "hi"}, {"role": "tool", "content": "x"}],
     "message 1 has role 'tool'; expected one of system, user, assistant"),
    ([{"content": "hi"}], "message 0 has role None"),
    ([{"role": "user", "content": ["hi"]}], "message 0 content must be a string"),
    ([{"role": "user"}], "message 0 content must be a string"),
    (["hi"], "message 0 must be an object with 'role' and 'content'"),
])
def test_validate_rejects(messages, message):
    with pytest.raises(ChatFormatError) as e:
        chat_format.validate(messages)
    assert message in str(e.value)


def test_render_validates(tok_dirs):
    tok = Tokenizer(tok_dirs[PHI3_MINI])
    with pytest.raises(ChatFormatError, match="message 0 content must be a string"):
        chat_format.render([{"role": "user", "content": None}], tok)


@pytest.mark.parametrize("name, family", [("phi-3.5-mini-instruct", "phi-3.5"), ("phi-4-mini-instruct", "phi-4-mini")])
def test_family_guess_for_checkpoints_without_a_template(tmp_path, name, family):
    from phikit.chat_format import guess_family

    assert guess_family(Tokenizer(tiny_tokenizer.build(name, tmp_path))) == family
