"""The few-shot evaluation loop: for each task, number of shots and seed, build every prompt, answer it
(beam search or candidate ranking), score, and record the run in a resumable results JSON.

Per query, in this order: choose shots (random from the support set, RICES, or for 0 shots the paper's
two text-only examples), call ``task.episode`` (it may rewrite the examples), format the prompt
(shots then query), answer, and score against the (rewritten) query.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from pathlib import Path
from collections.abc import Callable, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from ..inference import MediaEncoder, candidate_log_likelihoods, generate_texts, rank_scores
from .prompts import build_prompt
from .protocol import Protocol, get_protocol
from .shots import RICES, ShotPool, sample_random_shots, shot_permutations
from .task import Example, Prediction, Task

RESULTS_VERSION = 1
MAX_SCORES_KEPT = 10  # candidate scores written per example (rank tasks); more: the best 5


def _run_key(run: dict) -> tuple:
    return run["task"], run["shots"], run["seed"], run["selection"]


def _write_json(path: str | os.PathLike, data: dict | list) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)  # atomic: an interrupted run never leaves a broken results file


def _jsonable(value: Any) -> Any:
    try:
        json.dumps(value)
        return value
    except TypeError:
        return str(value)


def _reference(task: Task, query: Example) -> Any:
    try:
        return _jsonable(task.reference(query))
    except (KeyError, NotImplementedError):  # a custom task without a single reference answer
        return None


def summarize(runs: list[dict]) -> list[dict]:
    """Mean and (population) standard deviation over seeds of every metric, per (task, shots, selection)."""
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        groups.setdefault((run["task"], run["shots"], run["selection"]), []).append(run)
    summary = []
    for (task, shots, selection), group in groups.items():
        group = sorted(group, key=lambda r: r["seed"])
        metrics = {}
        for name in group[0]["scores"]:
            values = [r["scores"].get(name) for r in group]
            values = [v for v in values if v is not None and math.isfinite(v)]
            mean = sum(values) / len(values) if values else None  # None: undefined in every run
            std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values)) if values else None
            metrics[name] = {"mean": mean, "std": std, "values": values}
        main = group[0]["metric"]
        summary.append({
            "task": task, "shots": shots, "selection": selection, "metric": main,
            "mean": metrics[main]["mean"] if main in metrics else None, "std": metrics[main]["std"] if main in metrics else None,
            "seeds": [r["seed"] for r in group], "metrics": metrics,
            "zero_shot_text_examples": any(r.get("zero_shot_text_examples") for r in group),
            "num_examples": group[0]["num_examples"],
        })
    return summary


def format_results_table(results: dict) -> str:
    """A plain-text table: one row per (task, metric), one column per number of shots, "mean ± std (seeds)"."""
    summary = results.get("summary") or summarize(results.get("runs", []))
    if not summary:
        return "(no results)"
    shots = sorted({s["shots"] for s in summary})
    rows: dict[tuple, dict[int, str]] = {}
    marked = False
    for s in summary:
        for name, m in s["metrics"].items():
            cell = f"{m['mean']:.2f}" if m["mean"] is not None else "n/a"
            if len(m["values"]) > 1:
                cell += f" ± {m['std']:.2f} ({len(m['values'])})"
            if s["zero_shot_text_examples"]:
                cell += "*"
                marked = True
            label = s["task"] if s["selection"] == "random" else f"{s['task']} [{s['selection']}]"
            rows.setdefault((label, name if name == s["metric"] else f"  {name}"), {})[s["shots"]] = cell
    header = ["task", "metric"] + [f"{n}-shot" for n in shots]
    lines = [header] + [[task, metric] + [cells.get(n, "-") for n in shots] for (task, metric), cells in rows.items()]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = [" | ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines]
    text.insert(1, "-+-".join("-" * w for w in widths))
    if marked:
        text.append("* 0-shot prompts hold two text-only examples (images removed), as in the paper.")
    return "\n".join(text)


class _Runner:
    """State shared by the runs of one :func:`evaluate` call: the model, the media cache, RICES indexes."""

    def __init__(self, model, processor, *, batch_size: int, ensemble: int, max_rows: int, rices_cache_dir, progress: bool, protocol: Protocol):
        self.protocol = protocol
        self.model = model
        self.processor = processor
        self.media = MediaEncoder(model, processor)
        self.batch_size = batch_size
        self.ensemble = ensemble
        self.max_rows = max_rows
        self.rices_cache_dir = rices_cache_dir
        self.progress = progress
        self.rices: dict[str, RICES] = {}

    def _rices(self, task: Task, support: list[Example]) -> RICES:
        if task.name not in self.rices:
            self.rices[task.name] = RICES(task, self.media, support=support, cache_dir=self.rices_cache_dir, progress=self.progress)
        return self.rices[task.name]

    def _prompts_for(self, task: Task, query: Example, shots: list[Example], text_only: bool, rng: random.Random) -> list[list]:
        orders = shot_permutations(shots, self.ensemble, rng) if task.kind == "rank" and self.ensemble > 1 and len(shots) > 1 else [shots]
        return [build_prompt(task, query, order, text_only_shots=text_only) for order in orders]

    def _answer(self, task: Task, queries: list[Example], prompts: list[list[list]]) -> list[Prediction]:
        """queries[i] with its prompts[i] (one, or several ensembled orders) -> predictions."""
        flat = [p for ps in prompts for p in ps]
        if task.kind == "generate":
            kwargs = dict(task.generate_kwargs or {})
            if task.length_penalty is not None:
                kwargs.setdefault("length_penalty", task.length_penalty)
            texts = generate_texts(
                self.model, self.processor, flat, media=self.media, num_frames=task.num_frames,
                max_new_tokens=task.max_new_tokens, num_beams=task.num_beams, **kwargs,
            )
            return [Prediction(task.postprocess(t), raw=t) for t in texts]
        if task.kind != "rank":
            raise ValueError(f"task {task.name!r}: kind must be 'generate' or 'rank', got {task.kind!r}")
        candidates = [task.candidates(q) for q in queries]
        continuations = [[task.continuation(c) for c in cands] for cands, ps in zip(candidates, prompts) for _ in ps]
        lls = candidate_log_likelihoods(
            self.model, self.processor, flat, continuations, media=self.media, num_frames=task.num_frames, max_rows=self.max_rows,
            tokenize_alone=task.tokenize_candidates_alone,
        )
        scores = rank_scores(lls, task.length_normalize)
        out, k = [], 0
        for cands, ps in zip(candidates, prompts):
            mean = torch.stack(scores[k : k + len(ps)]).mean(0)  # prompt ensembling: average over orders
            k += len(ps)
            out.append(Prediction(cands[int(mean.argmax())], scores=dict(zip(cands, mean.tolist()))))
        return out

    def run(
        self, task: Task, queries: list[Example], support: list[Example], n: int, seed: int, selection: str,
        pool: list[Example] | None = None,
    ) -> dict:
        """One (task, shots, seed) run. pool: the examples random shots come from (default: ``support``);
        RICES always retrieves from the whole ``support``."""
        start_time = time.time()
        text_only = n == 0 and task.zero_shot_text_examples
        if (n > 0 or text_only) and not support:
            raise ValueError(f"task {task.name!r} has an empty support set: cannot build {n}-shot prompts")
        # indexed once: each query's random shots cost O(n), not O(support set)
        pool = ShotPool(support if pool is None else pool)
        # 0-shot text-only examples: retrieved like shots under RICES when the protocol says so (OpenFlamingo)
        retrieve = selection == "rices" and (n > 0 or (text_only and self.protocol.retrieve_text_examples))
        rices = self._rices(task, support) if retrieve else None
        predictions: list[Prediction] = []
        scored: list[Example] = []
        records: list[dict] = []
        bar = tqdm(total=len(queries), desc=f"{task.name} {n}-shot seed {seed}", disable=not self.progress, unit="ex")
        for start in range(0, len(queries), self.batch_size):
            batch = queries[start : start + self.batch_size]
            retrieved = rices.select(batch, n if n > 0 else task.num_text_examples) if rices is not None else None
            episode_queries, prompts, shot_ids = [], [], []
            for j, query in enumerate(batch):
                # one generator per query: its shots do not depend on the batch size or on other queries
                rng = random.Random(f"{seed}/{task.name}/{n}/{start + j}")
                if retrieved is not None:
                    shots = retrieved[j]
                elif text_only:
                    shots = sample_random_shots(pool, task.num_text_examples, rng, exclude_id=query.id)
                elif n == 0:
                    shots = []
                else:
                    shots = sample_random_shots(pool, n, rng, exclude_id=query.id)
                query, shots = task.episode(query, shots, rng)
                episode_queries.append(query)
                prompts.append(self._prompts_for(task, query, shots, text_only, rng))
                shot_ids.append([_jsonable(s.id) for s in shots])
            answers = self._answer(task, episode_queries, prompts)
            for query, pred, ids in zip(episode_queries, answers, shot_ids):
                record = {"id": _jsonable(query.id), "prediction": str(pred), "reference": _reference(task, query), "shots": ids}
                if pred.raw is not None and pred.raw != str(pred):
                    record["raw"] = pred.raw
                if pred.scores is not None:
                    best = sorted(pred.scores.items(), key=lambda kv: -kv[1])
                    record["scores"] = {c: round(s, 5) for c, s in (best if len(best) <= MAX_SCORES_KEPT else best[:5])}
                records.append(record)
            predictions += answers
            scored += episode_queries
            bar.update(len(batch))
        bar.close()
        # an undefined metric (e.g. ROC-AUC of one class) is NaN from the task and null in the JSON
        scores = {k: (float(v) if v is not None and math.isfinite(v) else None) for k, v in task.score(predictions, scored).items()}
        if task.metric not in scores:
            raise ValueError(f"task {task.name!r}: score() returned {sorted(scores)} without its main metric {task.metric!r}")
        run = {
            "task": task.name, "kind": task.kind, "shots": n, "seed": seed, "selection": selection, "metric": task.metric,
            "value": scores[task.metric], "scores": scores, "num_examples": len(queries),
            "zero_shot_text_examples": bool(text_only), "ensemble": self.ensemble if task.kind == "rank" else 1,
            "prompt": task.prompt, "protocol": self.protocol.name, "protocol_settings": _jsonable(task.protocol_record()),
            "time_s": round(time.time() - start_time, 2), "predictions": records,
        }
        submission = task.submission([str(p) for p in predictions], scored)
        if submission is not None:
            run["submission"] = submission  # written to its own file by evaluate()
        return run


def _write_submission(results_path: str | os.PathLike, run: dict, submission: list) -> Path:
    """A test split's result file for the benchmark's server (EvalAI), beside the results JSON:
    ``<results>.submissions/<task>_<shots>shot_<selection>_seed<seed>.json``."""
    path = Path(results_path)
    path = path.with_name(f"{path.stem}.submissions") / f"{run['task']}_{run['shots']}shot_{run['selection']}_seed{run['seed']}.json"
    _write_json(path, submission)
    return path


def evaluate(
    model,
    processor,
    tasks: Sequence[Task],
    shots: Sequence[int] = (0, 4, 8),
    seeds: Sequence[int] = (0,),
    selection: str = "random",
    batch_size: int = 8,
    limit: int | dict[str, int] | None = None,
    results_path: str | os.PathLike | None = None,
    resume: bool = True,
    progress: bool = True,
    *,
    ensemble: int = 1,
    max_rows: int = 64,
    rices_cache_dir: str | os.PathLike | None = None,
    model_name: str | None = None,
    config: dict | None = None,
    protocol: str | Protocol = "paper",
    on_run: Callable[[dict, dict], None] | None = None,
) -> dict:
    """Evaluate ``model`` on every task at every number of shots and seed; return (and write) the results.

    selection: "random" (shots drawn per seed) or "rices" (retrieved; deterministic, so only the first
    seed runs). ensemble: rank tasks average their candidate scores over this many orders of the shots.
    max_rows: rank tasks score at most this many (prompt, candidate) rows per forward; each row holds a
    copy of its prompt's KV cache, so this bounds memory.
    limit: evaluate the first ``limit`` queries of each task (a dict {task name: limit} caps the tasks it
    names); under a protocol with ``random_limit`` (openflamingo), a seeded random subset per seed.
    protocol: "paper" (default) or "openflamingo" (:mod:`flamingo_vlm.evaluation.protocol`); it is applied
    to every task (:meth:`Task.use_protocol`, settings given to a task's constructor kept) and recorded. results_path: the JSON written after every run; with ``resume``, runs already in it (same task,
    shots, seed, selection, limit, ensemble) are skipped. on_run(run, results): called after each run is
    scored (e.g. to show a task's row as soon as it is complete). Returns {"model", "config", "runs": [per run:
    scores, per-example predictions, ...], "summary": [per (task, shots): mean/std over seeds]}.
    """
    proto = get_protocol(protocol)
    if selection not in ("random", "rices"):
        raise ValueError(f"selection must be 'random' or 'rices', got {selection!r}")
    if any(n < 0 for n in shots):
        raise ValueError(f"shots must be >= 0, got {list(shots)}")
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise ValueError(f"task names must be unique (they key the results), got {names}")
    model_name = model_name or getattr(model.config, "lm_name_or_path", None) or type(model).__name__
    settings = {
        "shots": list(shots), "seeds": list(seeds), "selection": selection, "batch_size": batch_size, "limit": limit,
        "ensemble": ensemble, "protocol": proto.name,
    }
    results = {
        "version": RESULTS_VERSION, "model": model_name, "config": {**(config or {}), **settings}, "protocol": proto.describe(),
        "runs": [], "summary": [],
    }
    if results_path is not None and resume and Path(results_path).is_file():
        previous = json.loads(Path(results_path).read_text())
        if previous.get("model") not in (None, model_name):
            raise ValueError(
                f"{results_path} holds results of model {previous.get('model')!r}, not {model_name!r}: "
                "choose another results path or pass resume=False (--no-resume)"
            )
        results["runs"] = previous.get("runs", [])
    done = {_run_key(r): r for r in results["runs"]}

    runner = _Runner(
        model, processor, batch_size=batch_size, ensemble=ensemble, max_rows=max_rows, rices_cache_dir=rices_cache_dir, progress=progress,
        protocol=proto,
    )
    was_training = model.training
    model.eval()
    try:
        for task in tasks:
            task.use_protocol(proto.name)
            all_queries = task.queries()
            cap = limit.get(task.name) if isinstance(limit, dict) else limit
            support: list[Example] | None = None  # read on first need (0-shot without text examples has none)
            for n in shots:
                for seed in seeds if selection == "random" else list(seeds)[:1]:
                    key = (task.name, n, seed, selection)
                    old = done.get(key)
                    expected = len(all_queries) if cap is None else min(cap, len(all_queries))
                    if (
                        old is not None and old.get("num_examples") == expected and old.get("protocol", "paper") == proto.name
                        and old.get("ensemble", 1) == (ensemble if task.kind == "rank" else 1)
                    ):
                        continue
                    if support is None and (n > 0 or task.zero_shot_text_examples):
                        support = task.support()
                    # which queries and which random-shot pool: fixed per seed by the protocol
                    query_index, pool_index = proto.subsets(len(all_queries), len(support or []), cap, seed)
                    queries = [all_queries[i] for i in query_index]
                    pool = [support[i] for i in pool_index] if pool_index is not None and selection == "random" else None
                    run = runner.run(task, queries, support or [], n, seed, selection, pool=pool)
                    submission = run.pop("submission", None)
                    if submission is not None and results_path is not None:
                        run["submission_file"] = str(_write_submission(results_path, run, submission))
                    results["runs"] = [r for r in results["runs"] if _run_key(r) != key] + [run]
                    done[key] = run
                    results["summary"] = summarize(results["runs"])
                    if results_path is not None:
                        _write_json(results_path, results)
                    if on_run is not None:
                        on_run(run, results)
    finally:
        model.train(was_training)
    results["summary"] = summarize(results["runs"])
    if results_path is not None:
        _write_json(results_path, results)
    return results
