"""phikit as an lm-eval-harness model: `--model phikit --model_args pretrained=PATH[,dtype=...,adapter=...]`.

Importing this module registers the name `phikit` in lm-eval's model registry (lm-eval is an optional
dependency: `pip install phikit[eval]`). lm-eval 0.4 finds models only in its own registry and has no
plugin entry point, so its `lm_eval` executable does not know phikit; `python -m phikit.eval.harness`
is that same command line with phikit registered first:

    python -m phikit.eval.harness run --model phikit --model_args pretrained=PATH --tasks TASKS

Tokenization follows lm-eval's `hf` backend (its TemplateLM splits context and continuation the same
way; special tokens are added as transformers adds them), so the two give the same numbers: the
tests compare per-sample log-likelihoods and generations on random-weight checkpoints. The scoring
itself is phikit's (loglik.py: a context once per question, logits only where they are scored).
"""

from __future__ import annotations

import sys

import lm_eval.models  # noqa: F401  lm-eval's own models first: it fills its registry only while the registry is empty
import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from ..generate import Sampling
from .generation import generate_texts
from .loglik import loglikelihoods
from .model_io import encode_like_transformers, load_for_eval


@register_model("phikit")
class PhikitLM(TemplateLM):
    """lm-eval's LM interface over a phikit model: loglikelihood, loglikelihood_rolling, generate_until."""

    def __init__(self, pretrained: str | None = None, dtype: str | None = None, adapter: str | None = None,
                 batch_size: int | str = 1, max_length: int | None = None, batch_tokens: int = 4096,
                 add_bos_token: bool | None = None, max_gen_toks: int = 256, **kwargs):
        super().__init__()
        if kwargs:
            print(f"[phikit] ignoring model_args lm-eval passed that phikit does not use: {sorted(kwargs)}",
                  file=sys.stderr)
        self.model, self.tokenizer, self.source = load_for_eval(pretrained, dtype=dtype, adapter=adapter)
        self._max_length = int(max_length) if max_length else self.model.cfg.max_seq_len
        self.batch_tokens = int(batch_tokens)
        self.gen_batch = 8 if str(batch_size) == "auto" else max(int(batch_size), 1)
        self.add_bos_token = add_bos_token if not isinstance(add_bos_token, str) else add_bos_token.lower() == "true"
        self._max_gen_toks = int(max_gen_toks)

    @classmethod
    def from_loaded(cls, model, tokenizer, source: str, **kwargs) -> "PhikitLM":
        """Wrap a model already loaded (phikit eval's), without loading it again."""
        lm = cls.__new__(cls)
        TemplateLM.__init__(lm)
        lm.model, lm.tokenizer, lm.source = model, tokenizer, source
        lm._max_length = model.cfg.max_seq_len
        lm.batch_tokens, lm.gen_batch = int(kwargs.get("batch_tokens", 4096)), int(kwargs.get("gen_batch", 8))
        lm.add_bos_token, lm._max_gen_toks = None, 256
        return lm

    # what lm-eval asks of a model ----------------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tokenizer.bos_id if self.tokenizer.bos_id is not None else self.tokenizer.eos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def device(self):
        return self.model.norm.weight.device

    @property
    def tokenizer_name(self) -> str:
        return self.source.replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        from ..chat_format import family_template, guess_family

        return self.tokenizer.chat_template or family_template(guess_family(self.tokenizer))

    def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
        from ..chat_format import render

        text = render(chat_history, self.tokenizer, add_generation_prompt=add_generation_prompt)
        if not add_generation_prompt and chat_history and chat_history[-1]["role"] == "assistant":
            # transformers' continue_final_message: the text stops where the last message's content does
            text = text[:text.rindex(chat_history[-1]["content"]) + len(chat_history[-1]["content"])]
        return text

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs) -> list[int]:
        if add_special_tokens is None:
            add_special_tokens = True if self.add_bos_token is None else self.add_bos_token
            bos = self.tokenizer.decode([self.prefix_token_id])
            if bos and string.startswith(bos):  # the text carries its BOS already (a chat template put it there)
                add_special_tokens = False
        ids = encode_like_transformers(self.tokenizer, string, add_special_tokens)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode([tokens] if isinstance(tokens, int) else list(tokens),
                                     skip_special_tokens=skip_special_tokens)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None, **kwargs):
        pbar = tqdm(total=len(requests), disable=disable_tqdm, desc="phikit loglikelihood")
        out = loglikelihoods(self.model, [(ctx, cont) for _, ctx, cont in requests], max_len=self.max_length,
                             batch_tokens=self.batch_tokens, progress=pbar.update)
        pbar.close()
        for (key, _, _), answer in zip(requests, out):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        windows, owner = [], []
        for i, (string,) in enumerate(req.args for req in requests):
            for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, ctx, cont))
                owner.append(i)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for i, (logp, _) in zip(owner, scores):
            totals[i] += logp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs

        eos = self.tok_decode(self.eot_token_id, skip_special_tokens=False)
        by_kwargs: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            by_kwargs.setdefault(repr(sorted(req.args[1].items())), []).append(i)
        out: list[str | None] = [None] * len(requests)
        pbar = tqdm(total=len(requests), disable=disable_tqdm, desc="phikit generate_until")
        for idx in by_kwargs.values():
            kw = normalize_gen_kwargs(dict(requests[idx[0]].args[1]), self.max_gen_toks)
            until = handle_stop_sequences(kw.pop("until", None), eos=eos)
            max_new = int(kw.pop("max_gen_toks"))
            do_sample = bool(kw.get("do_sample")) and float(kw.get("temperature", 0.0)) > 0
            sampling = Sampling(temperature=float(kw.get("temperature", 1.0)), top_p=float(kw.get("top_p", 1.0)),
                                top_k=int(kw.get("top_k", 0) or 0)) if do_sample else Sampling()
            prompts = [self.tok_encode(requests[i].args[0], left_truncate_len=self.max_length - max_new) for i in idx]
            texts = generate_texts(self.model, self.tokenizer, prompts, max_new, until,
                                   self.tokenizer.generation_eos_ids or [self.eot_token_id], sampling,
                                   batch_size=self.gen_batch, max_len=self.max_length, progress=pbar.update)
            for i, text in zip(idx, texts):
                out[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
        pbar.close()
        return out  # type: ignore[return-value]

    def get_model_info(self) -> dict:
        return {"model_source": self.source, "model_num_parameters": sum(p.numel() for p in self.model.parameters()),
                "model_dtype": str(self.model.norm.weight.dtype)}


def main(argv: list[str] | None = None) -> int:
    """lm-eval's command line, with phikit registered."""
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm_eval", *(sys.argv[1:] if argv is None else argv)]
    cli_evaluate()
    return 0


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    sys.exit(main())
