"""Supervised fine-tuning data: TRL-format rows -> token ids with shifted targets -> cached, packed, batched.

Rows (jsonl or parquet) come in TRL's two formats:

    conversational     {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}
    prompt-completion  {"prompt": str | messages, "completion": str | messages}
                       (a string prompt is one user message, a string completion one assistant message)

Each row is rendered with the model's own chat template (chat_format.render) and tokenized once. The
result is `ids` and `targets` of the same length, targets already shifted: targets[t] is ids[t + 1]
when that token is trained, else -100, and the last target is -100, so that
`losses.cross_entropy(model(ids), targets)` is the loss (transformers gets the same number from the
unshifted `labels` it shifts internally).

Which tokens are trained (train_on="assistant", the default): each assistant turn's content and the
end-of-turn token that closes it (`<|end|>` for Phi-3/3.5/4-mini, `<|im_end|>` for ChatML templates);
for prompt-completion rows only the completion's assistant turns. System and user text, role markers,
whitespace after the end token and a trailing eos stay -100. The mask comes from character spans,
never from comparing ids with the pad id: when pad == eos == end-of-turn, a mask built from ids would
drop the end token and the fine-tuned model would never stop (a known failure of Phi fine-tunes).
Spans are found in the rendered string (each assistant content, searched from where the
add_generation_prompt=True rendering of the preceding messages ends, then the added token that
follows it) and mapped to tokens through the tokenizers library's character offsets. This works for
SentencePiece with byte fallback (Phi-3: the "▁" the normalizer prepends maps onto the content's
first character, `<|assistant|>` absorbs the newline after it) and for byte-level BPE (Phi-4-mini),
and needs no `{% generation %}` markers in the template (which transformers'
`return_assistant_tokens_mask` requires and the Phi templates lack).

Packing puts several examples in one row of max_len positions (first-fit decreasing); positions restart
at 0 for each example and `segments` tells Phi3.forward to confine attention to each example
(block-diagonal mask), so a packed row gives each example's loss exactly as it would alone. LongRoPE
picks its factor list per row from the largest position, so `pack(..., longrope_switch=cfg.original_max_seq_len)`
keeps examples past the switch in rows of their own; padding sits at position 0 so it never moves the
choice.

References: TRL `SFTTrainer` / `DataCollatorForLanguageModeling` (`assistant_only_loss`,
`completion_only_loss`, padding-free packing with position_ids); transformers
`apply_chat_template(return_assistant_tokens_mask=True)`; Krell et al. 2021, "Efficient sequence
packing without cross-contamination" (arXiv 2107.02027).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..chat_format import VALID_ROLES, ChatFormatError, family_template, guess_family, render
from ..tokenizer import Tokenizer
from ..train.losses import IGNORE_INDEX

FORMAT_VERSION = 1  # bump when the tokenization or the cache layout changes: old cache files are then not read
DEFAULT_CACHE = Path.home() / ".cache" / "phikit" / "sft"
# conversations rendered to find a template's end-of-turn token; the second for templates that demand a system turn
_PROBES = ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
           [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"}])


class SFTDataError(ValueError):
    """Unusable SFT data. The message is one line: `file:line: what is wrong` (`file row n:` for parquet)."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split("\n")))  # one line, whatever a template error said


# ---------------------------------------------------------------------------------------------- reading

def read_rows(path: str | os.PathLike) -> list[dict]:
    """The rows of a .jsonl (one JSON object per line, blank lines skipped) or .parquet file."""
    return [row for _, row in _numbered_rows(Path(path))]


def _check_path(path: Path) -> None:
    if path.suffix not in (".jsonl", ".parquet"):
        raise SFTDataError(f"{path}: not a .jsonl or .parquet file")
    if not path.is_file():
        raise SFTDataError(f"{path}: no such file")


def _numbered_rows(path: Path) -> list[tuple[str, dict]]:
    """(where, row) pairs; `where` names the file and the row for error messages."""
    _check_path(path)
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise SFTDataError(f"{path}: reading parquet needs pyarrow (pip install pyarrow, "
                               "or phikit[data])") from None
        try:
            table = pq.read_table(path)
        except Exception as e:  # pyarrow raises ArrowInvalid and friends
            raise SFTDataError(f"{path}: not a readable parquet file: {e}") from None
        return [(f"{path} row {n}", row) for n, row in enumerate(table.to_pylist(), 1)]
    rows = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if n == 1 else "utf-8")  # a byte-order mark is no JSON error
            except UnicodeDecodeError as e:
                raise SFTDataError(f"{path}:{n}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise SFTDataError(f"{path}:{n}: not valid JSON ({e})") from None
            if not isinstance(row, dict):
                raise SFTDataError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
            rows.append((f"{path}:{n}", row))
    return rows


def _check_messages(messages, name: str) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise SFTDataError(f"{name!r} must be a non-empty list of messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise SFTDataError(f"{name}[{i}] must be an object with 'role' and 'content'")
        if m.get("role") not in VALID_ROLES:
            raise SFTDataError(f"{name}[{i}] has role {m.get('role')!r}; expected one of {', '.join(VALID_ROLES)}")
        if not isinstance(m.get("content"), str):
            raise SFTDataError(f"{name}[{i}] content must be a string, got {type(m.get('content')).__name__}")
    return messages


def to_messages(row: dict) -> tuple[list[dict], int]:
    """(messages, first trained index): assistant turns at or after that index are trained.

    Conversational rows train every assistant turn (index 0); prompt-completion rows only the completion's.
    """
    # a missing key and a null are the same: a parquet file mixing both formats has null columns
    if row.get("messages") is not None:
        messages, first = _check_messages(row["messages"], "messages"), 0
    elif row.get("prompt") is not None and row.get("completion") is not None:
        prompt, completion = row["prompt"], row["completion"]
        prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else _check_messages(prompt, "prompt")
        completion = ([{"role": "assistant", "content": completion}] if isinstance(completion, str)
                      else _check_messages(completion, "completion"))
        messages, first = prompt + completion, len(prompt)
    elif row.get("prompt") is not None:
        raise SFTDataError("row has a 'prompt' but no 'completion'")
    else:
        raise SFTDataError(f"row has no 'messages' (nor 'prompt' and 'completion'); its keys: {sorted(row)}")
    if not any(m["role"] == "assistant" for m in messages[first:]):
        raise SFTDataError("no assistant message to train on" + (" in the completion" if first else ""))
    return messages, first


# ------------------------------------------------------------------------------------------- tokenizing

def _resolve_template(tokenizer: Tokenizer, template: str | None) -> str:
    """The template render() will use: the override, else the tokenizer's own, else its family's built-in."""
    return template or tokenizer.chat_template or family_template(guess_family(tokenizer))


class _Encoder:
    """Rendering and span finding for one (tokenizer, template) pair; the added-token table is built once."""

    def __init__(self, tokenizer: Tokenizer, template: str | None = None):
        self.tok = tokenizer
        self.template = _resolve_template(tokenizer, template)
        added = tokenizer.backend.get_added_tokens_decoder()  # {id: AddedToken}
        self.added_ids = np.array(sorted(added), dtype=np.int64)
        # longest first, so that `<|endoftext|>` is not read as a shorter token it starts with
        names = sorted((t.content for t in added.values()), key=len, reverse=True)
        self.end_token = re.compile("|".join(map(re.escape, names))) if names else None

    def render(self, messages, add_generation_prompt: bool) -> str:
        try:
            return render(messages, self.tok, add_generation_prompt=add_generation_prompt, template=self.template)
        except ChatFormatError as e:
            raise SFTDataError(str(e)) from None

    def spans(self, messages: list[dict], first: int) -> tuple[str, list[tuple[int, int, int, str]]]:
        """The rendered text and, per trained assistant turn, (content start, content end, span end, end token).

        The span [content start, span end) runs from the content's first character through the
        end-of-turn token that immediately follows it in the rendered text.
        """
        text = self.render(messages, add_generation_prompt=False)
        spans, cursor = [], 0  # cursor: end of the previous assistant span, where the next search may start
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            # Where the preceding messages plus the generation prompt render identically to the full text,
            # the content cannot start earlier: this keeps a user message quoting the answer from matching.
            lo = cursor
            if i > 0:
                try:
                    lo = max(lo, len(os.path.commonprefix([self.render(messages[:i], True), text])))
                except SFTDataError:  # a template that refuses this prefix (e.g. it must end with a user turn)
                    pass
            start = end = -1
            for needle in dict.fromkeys((m["content"], m["content"].strip())):  # `| trim` templates strip it
                for origin in dict.fromkeys((lo, cursor)):
                    start = text.find(needle, origin)
                    if start >= 0:
                        end = start + len(needle)
                        break
                if start >= 0:
                    break
            if start < 0:
                raise SFTDataError(f"messages[{i}] (assistant): the chat template does not render its content "
                                   "verbatim, so the tokens to train cannot be found")
            match = self.end_token.match(text, end) if self.end_token else None
            if match is None:
                raise SFTDataError(f"messages[{i}] (assistant): no end-of-turn token follows its content in the "
                                   f"rendered template (found {text[end:end + 20]!r})")
            cursor = match.end()
            if i >= first:
                spans.append((start, end, match.end(), match.group()))
        return text, spans

    def encode(self, row: dict, train_on: str = "assistant") -> tuple[np.ndarray, np.ndarray]:
        """(ids, targets) as int64 arrays."""
        messages, first = to_messages(row)
        if train_on == "all":
            ids = np.array(self.tok.backend.encode(self.render(messages, False), add_special_tokens=False).ids,
                           dtype=np.int64)
            return ids, np.append(ids[1:], IGNORE_INDEX)
        if train_on != "assistant":
            raise ValueError(f"train_on must be 'assistant' or 'all', not {train_on!r}")
        text, spans = self.spans(messages, first)
        enc = self.tok.backend.encode(text, add_special_tokens=False)
        ids = np.array(enc.ids, dtype=np.int64)
        off = np.array(enc.offsets, dtype=np.int64).reshape(-1, 2)
        s, e = off[:, 0], off[:, 1]
        is_added = np.isin(ids, self.added_ids)
        trained = np.zeros(len(ids), dtype=bool)
        for a, content_end, b, end_token in spans:
            # overlap with [a, b); a zero-width token (byte-level BPE's trimmed "Ġ") counts where it starts
            hit = np.where(e > s, (s < b) & (e > a), (s >= a) & (s < b))
            # an added token that starts before the content is the role marker swallowing the content's
            # leading whitespace (`<|assistant|>` has rstrip): never train it
            hit &= ~is_added | (s >= a)
            end_id = self.tok.token_to_id(end_token)
            if not (hit & (ids == end_id) & (s >= content_end)).any():
                raise SFTDataError(f"the end-of-turn token {end_token!r} after an assistant turn is not "
                                   "tokenized as one token")
            trained |= hit
        targets = np.full(len(ids), IGNORE_INDEX, dtype=np.int64)
        targets[:-1] = np.where(trained[1:], ids[1:], IGNORE_INDEX)  # shift: position t predicts token t + 1
        return ids, targets


def tokenize(row: dict, tokenizer: Tokenizer, template: str | None = None,
             train_on: str = "assistant") -> tuple[list[int], list[int]]:
    """(ids, targets) for one row; targets[t] = ids[t + 1] where that token is trained, else -100.

    train_on="assistant": assistant contents and their end-of-turn tokens (completion only for
    prompt-completion rows); "all": every next token. Raises SFTDataError (without the file name).
    """
    ids, targets = _Encoder(tokenizer, template).encode(row, train_on)
    return ids.tolist(), targets.tolist()


def end_of_turn_id(tokenizer: Tokenizer, template: str | None = None) -> int:
    """The id of the token that closes an assistant turn in the template: `<|end|>` (Phi), `<|im_end|>` (ChatML).

    Training teaches the model to emit it and generation must stop at it, so callers check it is a
    stop id. The targets here come from spans, so a pad id equal to it does not untrain it; code that
    masks by comparing ids with the pad id would (hence a recipe's check that the pad id is no stop id).
    """
    enc = _Encoder(tokenizer, template)
    for probe in _PROBES:
        try:
            _, spans = enc.spans(probe, 0)
        except SFTDataError as e:
            error = e
            continue
        return tokenizer.token_to_id(spans[0][3])
    raise SFTDataError(f"cannot find the end-of-turn token of this chat template: {error}")


# --------------------------------------------------------------------------------------- loading, cache

@dataclass
class SFTDataset:
    """Tokenized examples as (ids, targets) int32 tensors, and what loading did (stats)."""
    examples: list[tuple[torch.Tensor, torch.Tensor]]
    stats: dict = field(default_factory=dict)  # rows, kept, dropped_too_long, truncated, dropped_no_target, ...

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.examples[i]

    @property
    def lengths(self) -> list[int]:
        return [len(ids) for ids, _ in self.examples]


def cache_key(path: str | os.PathLike, tokenizer: Tokenizer, template: str | None, train_on: str,
              max_len: int, overflow: str, kind: str = "sft") -> str:
    """sha256 over everything the tokenized result depends on: the file's bytes, the tokenizer, the settings
    (kind: what the file is read as, "sft" here, "preference" in data/preference.py)."""
    h = hashlib.sha256(f"phikit-{kind}-v{FORMAT_VERSION}\0".encode())
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    h.update(tokenizer.backend.to_str().encode())  # vocabulary, merges, added tokens, normalizer, ...
    template = _resolve_template(tokenizer, template)
    # the special-token strings are template variables (bos_token, eos_token): they change the rendered text
    specials = [tokenizer.bos_token, tokenizer.eos_token, tokenizer.unk_token, tokenizer.pad_token]
    h.update(json.dumps([template, specials, train_on, max_len, overflow]).encode())
    return h.hexdigest()


def load_sft_dataset(path: str | os.PathLike, tokenizer: Tokenizer, *, template: str | None = None,
                     train_on: str = "assistant", max_len: int = 2048, overflow: str = "drop",
                     cache_dir: str | os.PathLike | None = None) -> SFTDataset:
    """Tokenize a jsonl/parquet SFT file once; later calls with the same inputs read the cache.

    overflow: an example longer than max_len is dropped ("drop") or cut to max_len ("truncate", the
    cut position's target becomes -100). An example left with no trained target is dropped.
    cache_dir (default ~/.cache/phikit/sft) holds one safetensors file per key (see cache_key).
    """
    if train_on not in ("assistant", "all"):
        raise ValueError(f"train_on must be 'assistant' or 'all', not {train_on!r}")
    if overflow not in ("drop", "truncate"):
        raise ValueError(f"overflow must be 'drop' or 'truncate', not {overflow!r}")
    path = Path(path)
    _check_path(path)
    key = cache_key(path, tokenizer, template, train_on, max_len, overflow)
    cache = Path(cache_dir if cache_dir is not None else DEFAULT_CACHE) / f"{key}.safetensors"
    if cache.exists():
        cached = _read_cache(cache, key)
        if cached is not None:
            return cached

    rows = _numbered_rows(path)
    enc = _Encoder(tokenizer, template)
    stats = dict(rows=len(rows), kept=0, dropped_too_long=0, truncated=0, dropped_no_target=0,
                 tokens=0, trained_tokens=0)
    kept_ids, kept_targets = [], []
    bar = tqdm(rows, desc=f"tokenizing {path.name}", unit="row", file=sys.stderr,
               disable=True if len(rows) < 1000 else None)  # None: off when stderr is not a terminal
    for where, row in bar:
        try:
            ids, targets = enc.encode(row, train_on)
        except SFTDataError as e:
            raise SFTDataError(f"{where}: {e}") from None
        if len(ids) > max_len:
            if overflow == "drop":
                stats["dropped_too_long"] += 1
                continue
            ids, targets = ids[:max_len], targets[:max_len].copy()
            targets[-1] = IGNORE_INDEX  # its next token was cut off
            stats["truncated"] += 1
        n_trained = int((targets != IGNORE_INDEX).sum())
        if n_trained == 0:
            stats["dropped_no_target"] += 1
            continue
        stats["kept"] += 1
        stats["tokens"] += len(ids)
        stats["trained_tokens"] += n_trained
        kept_ids.append(ids.astype(np.int32))
        kept_targets.append(targets.astype(np.int32))
    lengths = np.array([len(x) for x in kept_ids], dtype=np.int64)
    offsets = torch.from_numpy(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))
    flat_ids = torch.from_numpy(np.concatenate(kept_ids) if kept_ids else np.zeros(0, np.int32))
    flat_targets = torch.from_numpy(np.concatenate(kept_targets) if kept_targets else np.zeros(0, np.int32))
    _write_cache(cache, key, flat_ids, flat_targets, offsets, stats)
    return _dataset(flat_ids, flat_targets, offsets, stats)


def _dataset(ids: torch.Tensor, targets: torch.Tensor, offsets: torch.Tensor, stats: dict) -> SFTDataset:
    bounds = offsets.tolist()
    return SFTDataset([(ids[a:b], targets[a:b]) for a, b in zip(bounds, bounds[1:])], stats)  # views, no copies


def _write_cache(path: Path, key: str, ids, targets, offsets, stats) -> None:
    """Write to a temporary name, then rename: a reader never sees a half-written file."""
    from safetensors.torch import save_file

    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem[:16], suffix=".tmp")
        os.close(fd)
        save_file({"ids": ids.contiguous(), "targets": targets.contiguous(), "offsets": offsets}, tmp,
                  metadata={"key": key, "format_version": str(FORMAT_VERSION), "stats": json.dumps(stats)})
        os.replace(tmp, path)
    except OSError as e:  # a read-only or full cache directory costs the next run a re-tokenization, no more
        warnings.warn(f"could not write the SFT cache {path}: {e}")
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)


def _read_cache(path: Path, key: str) -> SFTDataset | None:
    """The cached dataset, or None (with a warning) when the file is unreadable or inconsistent."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            ids, targets, offsets = f.get_tensor("ids"), f.get_tensor("targets"), f.get_tensor("offsets")
        stats = json.loads(meta["stats"])
        ok = (meta.get("key") == key and ids.dtype == targets.dtype == torch.int32 and offsets.dtype == torch.int64
              and len(ids) == len(targets) and len(offsets) == stats.get("sequences", stats["kept"]) + 1
              and int(offsets[0]) == 0
              and int(offsets[-1]) == len(ids) and bool((offsets[1:] >= offsets[:-1]).all()))
        if not ok:
            raise ValueError("inconsistent contents")
    except Exception as e:  # anything wrong with our own cache file means: tokenize again, never fail
        warnings.warn(f"ignoring unreadable SFT cache {path} ({type(e).__name__}: {e}); rebuilding it")
        return None
    return _dataset(ids, targets, offsets, stats)


# ------------------------------------------------------------------------------------ packing, batching

@dataclass
class Row:
    """One packed row of max_len positions: ids, targets, positions, segments (int64), and which examples."""
    ids: torch.Tensor
    targets: torch.Tensor
    positions: torch.Tensor  # restart at 0 for each example; 0 on padding
    segments: torch.Tensor   # example index within the row, 0, 1, ...; -1 on padding
    examples: list[int]      # indices into the packed list, in row order


PAD_SEGMENT = -1  # padding attends only to padding, and nothing real attends to it


def _first_fit(lengths: list[int], capacity: int) -> list[list[int]]:
    """First-fit: item i goes into the first bin with room. A max segment tree over the bins' free
    space finds that bin in O(log n) (a linear scan over bins is quadratic for large datasets)."""
    size = 1 << max(1, (len(lengths) - 1).bit_length())
    free = [capacity] * (2 * size)  # leaves: free space per bin (unopened bins are empty); nodes: max of children
    bins: list[list[int]] = []
    for i, n in enumerate(lengths):
        node = 1
        while node < size:  # descend to the leftmost leaf with room for n
            node = 2 * node if free[2 * node] >= n else 2 * node + 1
        b = node - size
        if b == len(bins):
            bins.append([])
        bins[b].append(i)
        free[node] -= n
        while node > 1:
            node //= 2
            free[node] = max(free[2 * node], free[2 * node + 1])
    return bins


def pack(examples, max_len: int, pad_id: int = 0, longrope_switch: int | None = None) -> list[Row]:
    """Pack (ids, targets) examples into rows of exactly max_len positions, first-fit decreasing by length.

    Deterministic: examples are sorted by length (longest first, ties by index). Run a row as
    `model(ids, input_pos=positions, segments=segments)`. longrope_switch: for a LongRoPE model pass
    cfg.original_max_seq_len; examples longer than it are packed only with each other, because the
    model picks one factor list per row (from its largest position) and an example alone picks by
    its own length.
    """
    lengths = [len(ids) for ids, _ in examples]
    if any(n > max_len for n in lengths):
        raise ValueError(f"an example of {max(lengths)} tokens does not fit max_len={max_len}; "
                         "load with that max_len (examples are dropped or truncated there)")
    groups = [list(range(len(examples)))]
    if longrope_switch is not None:
        groups = [[i for i in groups[0] if lengths[i] <= longrope_switch],
                  [i for i in groups[0] if lengths[i] > longrope_switch]]
    rows = []
    for group in groups:
        order = sorted(group, key=lambda i: (-lengths[i], i))
        for b in _first_fit([lengths[i] for i in order], max_len):
            members = [order[j] for j in b]
            ids = torch.full((max_len,), pad_id, dtype=torch.int64)
            targets = torch.full((max_len,), IGNORE_INDEX, dtype=torch.int64)
            positions = torch.zeros(max_len, dtype=torch.int64)  # padding at 0: never moves LongRoPE's choice
            segments = torch.full((max_len,), PAD_SEGMENT, dtype=torch.int64)
            t = 0
            for seg, i in enumerate(members):
                n = lengths[i]
                ids[t:t + n] = torch.as_tensor(examples[i][0], dtype=torch.int64)
                targets[t:t + n] = torch.as_tensor(examples[i][1], dtype=torch.int64)
                positions[t:t + n] = torch.arange(n)
                segments[t:t + n] = seg
                t += n
            rows.append(Row(ids, targets, positions, segments, members))
    return rows


def collate(items, pad_id: int) -> dict[str, torch.Tensor]:
    """Packed Rows or (ids, targets) examples -> (B, T) int64 ids, targets, positions, segments, T = longest.

    Padding has target -100, position 0 and segment -1. Pass positions and segments to the model
    together (`model(ids, input_pos=positions, segments=segments)`): pads at position 0 would otherwise
    be visible to the causal mask. The pad id never affects the targets, so it may equal eos or
    the end-of-turn id.
    """
    fields = []
    for item in items:
        if isinstance(item, Row):
            fields.append((item.ids, item.targets, item.positions, item.segments))
        else:
            ids, targets = (torch.as_tensor(x, dtype=torch.int64) for x in item)
            fields.append((ids, targets, torch.arange(len(ids)), torch.zeros(len(ids), dtype=torch.int64)))
    B, T = len(fields), max(len(f[0]) for f in fields)
    out = {"ids": torch.full((B, T), pad_id, dtype=torch.int64),
           "targets": torch.full((B, T), IGNORE_INDEX, dtype=torch.int64),
           "positions": torch.zeros(B, T, dtype=torch.int64),
           "segments": torch.full((B, T), PAD_SEGMENT, dtype=torch.int64)}
    for b, f in enumerate(fields):
        for name, x in zip(("ids", "targets", "positions", "segments"), f):
            out[name][b, :len(x)] = torch.as_tensor(x, dtype=torch.int64)
    return out


def epoch_batches(lengths, batch_size: int, seed: int, epoch: int, group_by_length: bool = False,
                  chunk_batches: int = 50) -> list[list[int]]:
    """The batches of one epoch, as lists of item indices: a deterministic function of the arguments.

    The items are shuffled by a NumPy generator seeded with [seed, epoch]; the last len % batch_size
    of them are dropped (a different random few each epoch), so that every optimizer step sees
    exactly batch_size items. group_by_length: within chunks of chunk_batches batches, items are
    sorted by length (longest first) before being cut into batches, so a batch pads little; the
    order of the batches is then shuffled, so long and short batches alternate at random.
    """
    rng = np.random.default_rng([seed, epoch])
    lengths = np.asarray(lengths, dtype=np.int64)
    n_batches = len(lengths) // batch_size
    order = rng.permutation(len(lengths))[:n_batches * batch_size]
    if group_by_length:
        chunk = batch_size * chunk_batches
        order = np.concatenate([c[np.argsort(-lengths[c], kind="stable")]
                                for c in np.split(order, range(chunk, len(order), chunk))])
    batches = order.reshape(n_batches, batch_size)
    if group_by_length:
        batches = batches[rng.permutation(n_batches)]
    return batches.tolist()
