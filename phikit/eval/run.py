"""Run evaluation tasks on a model: prompts (base or chat), scoring, metrics with standard errors.

`Evaluator(model, tokenizer, chat=...)` runs the tasks of tasks.py and returns, per task, a result
dict: {"metrics": {name: {"value", "stderr"}}, "n", "seconds", "settings"} and the per-sample records
(`--log-samples`). The settings say how the prompts were made (chat template or plain text, its stop
ids, the shots, the prompt format), so that two runs can be compared.

A chat model is evaluated as a chat model: its template renders the question as the user's turn
(shots as earlier turns), the options of a multiple-choice question are scored as the assistant's
first tokens, and generation stops on the template's end-of-turn ids. Without a chat template (or
with chat=False) the prompt is plain text, as lm-eval writes it, and generation stops on eos.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable

from ..chat_format import render, stop_ids as chat_stop_ids
from ..generate import Sampling
from ..model import Phi3
from ..tokenizer import Tokenizer
from .generation import generate_texts
from .loglik import loglikelihoods
from .model_io import encode_like_transformers
from .tasks import Doc, Generation, MultipleChoice, Perplexity, TaskError


def mean_stderr(values: list[float]) -> dict:
    """Mean and its standard error (sample standard deviation / sqrt(n)), as lm-eval reports them."""
    n = len(values)
    mean = sum(values) / n if n else float("nan")
    if n < 2:
        return {"value": mean, "stderr": 0.0}
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return {"value": mean, "stderr": math.sqrt(var / n)}


class Evaluator:
    def __init__(self, model: Phi3, tokenizer: Tokenizer, chat: bool, batch_tokens: int = 4096, gen_batch: int = 8,
                 progress: Callable[[str, int], Callable[[int], None]] | None = None):
        self.model, self.tokenizer, self.chat = model, tokenizer, chat
        self.batch_tokens, self.gen_batch = batch_tokens, gen_batch
        self.progress = progress or (lambda desc, total: (lambda n: None))

    # prompts ---------------------------------------------------------------------------------------------------------
    def settings(self, task, shots: int) -> dict:
        s = {"chat": self.chat, "shots": shots, "prompt_format": "chat template" if self.chat else "plain text"}
        if self.chat:
            template = self.tokenizer.chat_template or "(built-in family template)"
            s["template_sha256"] = hashlib.sha256(template.encode()).hexdigest()[:16]
            s["stop_ids"] = sorted(chat_stop_ids(self.tokenizer))
        else:
            s["stop_ids"] = sorted(self._eos_ids())
        if isinstance(task, MultipleChoice):
            s["delimiter"] = "" if self.chat else task.delimiter
            s["description"] = task.description
        if isinstance(task, Generation):
            s["stop_strings"] = task.chat_stop if self.chat else task.stop
            s["max_new_tokens"] = task.max_new_tokens
        return s

    def _eos_ids(self) -> list[int]:
        return [self.tokenizer.eos_id]  # plain text: the end of a document only, not a chat template's end of turn

    def _shots(self, task, doc: Doc, k: int, pools: dict[str, list[Doc]]) -> list[Doc]:
        if k == 0:
            return []
        pool = pools[doc.group]
        if len(pool) - 1 < k:
            where = f" (subject {doc.group!r})" if doc.group else ""
            raise TaskError(f"--shots {k} is larger than the pool{where}: {len(pool) - 1} other questions to draw from")
        return [d for d in pool[:k + 1] if d is not doc][:k]

    def _context(self, task, doc: Doc, shots: list[Doc], shot_sep: str = "\n\n") -> str:
        description = task.description.format(group=doc.group)
        if not self.chat:
            delim = getattr(task, "delimiter", " ")
            return description + "".join(f"{s.question}{delim}{s.shot_answer}{shot_sep}" for s in shots) + doc.question
        messages = []
        for s in shots:
            messages += [{"role": "user", "content": s.question}, {"role": "assistant", "content": s.shot_answer}]
        messages.append({"role": "user", "content": doc.question})
        messages[0] = {"role": "user", "content": description + messages[0]["content"]}
        return render(messages, self.tokenizer, add_generation_prompt=True)

    def _encode(self, text: str, chat: bool | None = None) -> list[int]:
        # plain text gets the special tokens transformers adds (lm-eval's hf default); a chat prompt carries its own
        return encode_like_transformers(self.tokenizer, text, add_special_tokens=not (self.chat if chat is None else chat))

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """lm-eval's split: trailing spaces move to the continuation; the context's tokens are a prefix of the whole's."""
        n = len(context) - len(context.rstrip())
        if n:
            context, continuation = context[:-n], context[-n:] + continuation
        whole, ctx = self._encode(context + continuation), self._encode(context)
        return ctx, whole[len(ctx):]

    # tasks -----------------------------------------------------------------------------------------------------------
    def run(self, task, shots: int = 0, limit: int | None = None) -> tuple[dict, list[dict]]:
        t0 = time.perf_counter()
        if isinstance(task, Perplexity):
            result, samples = self.perplexity(task)
        else:
            docs = task.docs[:limit] if limit else task.docs
            pools: dict[str, list[Doc]] = {}
            for d in task.docs:
                pools.setdefault(d.group, []).append(d)
            shot_lists = [self._shots(task, d, shots, pools) for d in docs]  # refuses too many shots before any work
            if isinstance(task, MultipleChoice):
                result, samples = self.multiple_choice(task, docs, shot_lists)
            else:
                result, samples = self.generation(task, docs, shot_lists)
        result["seconds"] = round(time.perf_counter() - t0, 2)
        result["settings"] = self.settings(task, shots) if not isinstance(task, Perplexity) else {"source": task.source}
        return result, samples

    def multiple_choice(self, task: MultipleChoice, docs: list[Doc], shot_lists: list[list[Doc]]):
        requests, owners = [], []
        for d, shots in zip(docs, shot_lists):
            context = self._context(task, d, shots)
            for c in d.choices:
                requests.append(self._encode_pair(context, c if self.chat else task.delimiter + c))
                owners.append(d)
        scores = loglikelihoods(self.model, requests, batch_tokens=self.batch_tokens,
                                progress=self.progress(task.name, len(requests)))
        acc, acc_norm, samples, i = [], [], [], 0
        for d in docs:
            lls = [s[0] for s in scores[i:i + len(d.choices)]]
            i += len(d.choices)
            norm = [ll / len(c) for ll, c in zip(lls, d.choices)]  # lm-eval: by the option's length in characters
            pred, pred_norm = lls.index(max(lls)), norm.index(max(norm))
            acc.append(float(pred == d.target))
            acc_norm.append(float(pred_norm == d.target))
            samples.append({"id": d.id, "group": d.group, "target": d.target, "loglikelihoods": lls, "pred": pred,
                            "acc": acc[-1], "acc_norm": acc_norm[-1]})
        return {"metrics": {"acc": mean_stderr(acc), "acc_norm": mean_stderr(acc_norm)}, "n": len(docs)}, samples

    def generation(self, task: Generation, docs: list[Doc], shot_lists: list[list[Doc]]):
        from . import school_math

        prompts = []
        for d, shots in zip(docs, shot_lists):
            if task.scorer == "number":
                text = (render(school_math.chat_messages_for(d.question, _shot_rows(shots)), self.tokenizer)
                        if self.chat else school_math.prompt_for(d.question, _shot_rows(shots)))
            elif task.scorer == "code" and self.chat:
                from .tasks import HUMANEVAL_CHAT

                text = render([{"role": "user", "content": HUMANEVAL_CHAT.format(prompt=d.question)}], self.tokenizer)
            else:
                text = self._context(task, d, shots)
            prompts.append(self._encode(text))
        stops = task.chat_stop if self.chat else task.stop
        stop_ids = sorted(chat_stop_ids(self.tokenizer)) if self.chat else self._eos_ids()
        texts = generate_texts(self.model, self.tokenizer, prompts, task.max_new_tokens, stops, stop_ids, Sampling(),
                               batch_size=self.gen_batch, progress=self.progress(task.name, len(prompts)))
        if task.scorer == "code":
            correct = self._run_code(docs, texts)
        else:
            correct = [_score_answer(task.scorer, t, str(d.target)) for d, t in zip(docs, texts)]
        samples = [{"id": d.id, "target": d.target if task.scorer != "code" else None, "completion": t,
                    "correct": c} for d, t, c in zip(docs, texts, correct)]
        metric = "pass@1" if task.scorer == "code" else "exact_match"
        return {"metrics": {metric: mean_stderr([float(c) for c in correct])}, "n": len(docs)}, samples

    def safety(self, judge, limit: int | None = None, max_new_tokens: int = 160) -> tuple[dict, list[dict]]:
        """The safety prompt set (safety.py) answered through the chat template, each response judged."""
        from . import safety

        t0 = time.perf_counter()
        prompts = safety.load_prompts()[:limit] if limit else safety.load_prompts()
        ids = [self._encode(render(p.messages, self.tokenizer), chat=True) for p in prompts]
        responses = generate_texts(self.model, self.tokenizer, ids, max_new_tokens, (), sorted(chat_stop_ids(self.tokenizer)),
                                   Sampling(), batch_size=self.gen_batch, progress=self.progress("safety", len(ids)))
        verdicts = safety.judge_all(judge, prompts, responses)
        scores = safety.score(prompts, responses, verdicts)
        settings = {"chat": True, "prompt_format": "chat template (always, whatever --no-chat says)",
                    "stop_ids": sorted(chat_stop_ids(self.tokenizer)), "max_new_tokens": max_new_tokens,
                    "judge": getattr(judge, "url", None) or "built-in (refusal detection)",
                    "judge_errors": scores["judge_errors"], "empty_responses": scores["empty_responses"]}
        result = {"metrics": safety.metrics(scores), "n": len(prompts), "n_harmful": scores["n_harmful"],
                  "n_benign": scores["n_benign"], "seconds": round(time.perf_counter() - t0, 2), "settings": settings}
        return result, safety.samples(prompts, responses, verdicts)

    def _run_code(self, docs: list[Doc], texts: list[str]) -> list[bool]:
        from .sandbox import run_programs

        programs = [program_for(d, t, self.chat) for d, t in zip(docs, texts)]
        return [r.passed for r in run_programs(programs, timeout=10.0)]

    def perplexity(self, task: Perplexity):
        ids = self.tokenizer.encode(task.text)
        prefix = self.tokenizer.bos_id if self.tokenizer.bos_id is not None else self.tokenizer.eos_id
        W = self.model.cfg.max_seq_len if self.model.cfg.max_seq_len <= 4096 else 4096
        windows = [([prefix] if s == 0 else [ids[s - 1]], ids[s:s + W]) for s in range(0, len(ids), W)]
        scores = loglikelihoods(self.model, windows, batch_tokens=self.batch_tokens,
                                progress=self.progress(task.name, len(windows)))
        nll = -sum(s[0] for s in scores)
        n_bytes = len(task.text.encode("utf-8"))
        metrics = {"bits_per_byte": {"value": nll / math.log(2) / n_bytes, "stderr": 0.0},
                   "token_perplexity": {"value": math.exp(nll / len(ids)), "stderr": 0.0}}
        return {"metrics": metrics, "n": len(ids), "bytes": n_bytes}, [{"window": i, "loglikelihood": s[0]}
                                                                       for i, s in enumerate(scores)]


def _shot_rows(shots: list[Doc]) -> list[dict]:
    return [{"question": s.question, "answer": s.shot_answer} for s in shots]


def _score_answer(scorer: str, completion: str, target: str) -> bool:
    if scorer == "number":
        from .school_math import extract_number, numbers_equal

        return numbers_equal(extract_number(completion), target)
    if scorer == "contains":
        return target.strip() in completion
    return completion.strip() == target.strip()


def program_for(doc: Doc, completion: str, chat: bool) -> str:
    """The HumanEval program: the function (the prompt + its completion, or the chat reply's code block) + its tests."""
    code = doc.question + completion
    if chat:
        code = _code_block(completion).split("\nif __name__")[0]  # a demo block of the reply is not the tests'
        entry = doc.extra["entry_point"]
        if f"def {entry}" not in code:  # the reply gave only the body: put it under the prompt's signature
            code = doc.question + completion
        else:  # keep the prompt's imports and helpers above the reply's function
            head = doc.question[:doc.question.find(f"def {entry}")]
            code = head + code
    return f"{code}\n\n{doc.extra['test']}\n\ncheck({doc.extra['entry_point']})\n"


def _code_block(text: str) -> str:
    """The first fenced code block of a reply (``` or ```python), else the reply itself."""
    start = text.find("```")
    if start < 0:
        return text
    body = text[start + 3:]
    if body.startswith("python"):
        body = body[len("python"):]
    end = body.find("```")
    return body[:end] if end >= 0 else body
