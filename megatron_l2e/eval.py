"""Evaluate GPT-NeoX checkpoints with lm-evaluation-harness (``lm_eval.simple_evaluate``, model ``hf``).

    python -m megatron_l2e.eval --checkpoint runs/l2e-70m/checkpoints/global_step14300 \
        --tasks paper --num-fewshot 0,5
    python -m megatron_l2e.eval --model runs/l2e-70m/hf/global_step14300 --tasks mmlu,bigbench_lite

One results JSON per (model, shots) is written next to the run (``RUN/eval/<TAG>/results_<k>shot.json``
for a training checkpoint): the dict ``simple_evaluate`` returns, plus a ``megatron_l2e`` record with
the lm-eval version, the task versions, the seed, the evaluation arguments and the training config.

Offline by default: ``HF_HUB_OFFLINE``/``HF_DATASETS_OFFLINE`` are set, so a task whose data are not in
the Hugging Face cache fails at once with a one-line error instead of a retry loop. ``--online`` lets
lm-eval download the data (do it once on a machine with internet access; later runs read the cache).

The metric is ``acc`` (lm-eval's length-unnormalised multiple-choice accuracy) unless ``--metric
acc_norm``; the paper does not say which it reports. See docs/eval.md for the task list.

Heavy imports (torch, transformers, lm_eval) happen inside the functions that need them, so argument
errors are reported instantly and tools can import the path helpers cheaply.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import json
import logging
import os
import random
import sys
import time
from pathlib import Path
from typing import Any, Iterator

# ----------------------------------------------------------------------------------------------
# Task names
# ----------------------------------------------------------------------------------------------

# The paper's Table 1 tasks (ARC-Challenge, PIQA, SciQ).
PAPER_TASKS = ["arc_challenge", "piqa", "sciq"]

# BIG-bench Lite (BBL24, google/BIG-bench bigbench/bbseqio/bigbench_lite.py). lm-eval 0.4.13 ships a
# multiple-choice variant (`bigbench_<name>_multiple_choice`, metric acc) for 18 of them; the other 6
# are generative only (auto_debugging, conlang_translation, linguistics_puzzles, operators,
# parsinlu_reading_comprehension, repeat_copy_logic) and are not in the accuracy group.
BIGBENCH_LITE = [
    "auto_debugging", "bbq_lite_json", "code_line_description", "conceptual_combinations",
    "conlang_translation", "emoji_movie", "formal_fallacies_syllogisms_negation", "hindu_knowledge",
    "known_unknowns", "language_identification", "linguistics_puzzles", "logic_grid_puzzle",
    "logical_deduction", "misconceptions_russian", "novel_concepts", "operators",
    "parsinlu_reading_comprehension", "play_dialog_same_or_different", "repeat_copy_logic",
    "strange_stories", "strategyqa", "symbol_interpretation", "vitaminc_fact_verification", "winowhy",
]
BIGBENCH_LITE_GENERATIVE_ONLY = {"auto_debugging", "conlang_translation", "linguistics_puzzles",
                                 "operators", "parsinlu_reading_comprehension", "repeat_copy_logic"}
BIGBENCH_LITE_MC = [f"bigbench_{t}_multiple_choice" for t in BIGBENCH_LITE
                    if t not in BIGBENCH_LITE_GENERATIVE_ONLY]

# Names accepted by --tasks besides lm-eval's own task/group/tag names.
TASK_PRESETS: dict[str, list[str]] = {
    "paper": PAPER_TASKS,
    "all": PAPER_TASKS + ["arc_easy", "mmlu", "bigbench_lite"],
}

# Our own lm-eval task YAMLs (the `bigbench_lite` group); always on the include path.
TASKS_DIR = Path(__file__).with_name("eval_tasks")

METRICS = ("acc", "acc_norm")


class EvalError(Exception):
    """A one-line error for the user (bad argument, missing data); ``exit_code`` for the CLI."""

    exit_code = 2


class DataUnavailable(EvalError):
    """The dataset of a task cannot be loaded (offline and not cached, or no network)."""

    exit_code = 1


def expand_tasks(names: list[str]) -> list[str]:
    """Expand presets (``paper``, ``all``) and drop duplicates, keeping order."""
    out: list[str] = []
    for n in names:
        for t in TASK_PRESETS.get(n, [n]):
            if t not in out:
                out.append(t)
    return out


# ----------------------------------------------------------------------------------------------
# Output layout (imported by tools/sweep.py: keep these free of heavy imports)
# ----------------------------------------------------------------------------------------------

def results_filename(num_fewshot: int) -> str:
    return f"results_{num_fewshot}shot.json"


def checkpoint_paths(checkpoint: str | Path) -> tuple[Path, Path]:
    """(export dir, results dir) for a training checkpoint ``RUN/checkpoints/TAG``:
    ``RUN/hf/TAG`` and ``RUN/eval/TAG``."""
    ckpt = Path(checkpoint)
    tag = ckpt.resolve().name
    run = ckpt.resolve().parent.parent if ckpt.resolve().parent.name == "checkpoints" else ckpt.resolve().parent
    return run / "hf" / tag, run / "eval" / tag


def _find_run_config(checkpoint: Path) -> dict | None:
    """The training run's resolved config, if the run saved one as YAML next to its checkpoints."""
    import yaml

    run = checkpoint.parent.parent
    for p in (checkpoint / "config.yaml", run / "config.yaml", run / "resolved_config.yaml"):
        if p.is_file():
            try:
                return {"path": str(p), "config": yaml.safe_load(p.read_text())}
            except yaml.YAMLError:
                return {"path": str(p), "config": None}
    return None


# ----------------------------------------------------------------------------------------------
# Offline mode
# ----------------------------------------------------------------------------------------------

_OFFLINE_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


@contextlib.contextmanager
def hub_mode(offline: bool) -> Iterator[None]:
    """Set (then restore) the Hugging Face offline flags.

    huggingface_hub and datasets read the environment once at import time, so when they are
    already imported (in-process use, e.g. the training loop) their module constants are set too.
    """
    import datasets.config as dcfg
    import huggingface_hub.constants as hcst

    old_env = {k: os.environ.get(k) for k in _OFFLINE_ENV}
    old_consts = (hcst.HF_HUB_OFFLINE, dcfg.HF_HUB_OFFLINE, dcfg.HF_DATASETS_OFFLINE)
    val = "1" if offline else "0"
    for k in _OFFLINE_ENV:
        os.environ[k] = val
    hcst.HF_HUB_OFFLINE = dcfg.HF_HUB_OFFLINE = dcfg.HF_DATASETS_OFFLINE = offline
    try:
        yield
    finally:
        for k, v in old_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        hcst.HF_HUB_OFFLINE, dcfg.HF_HUB_OFFLINE, dcfg.HF_DATASETS_OFFLINE = old_consts


# ----------------------------------------------------------------------------------------------
# Tasks
# ----------------------------------------------------------------------------------------------

# lm-eval's folders (under lm_eval/tasks) holding the tasks we name most: indexing only these
# takes a fraction of a second instead of the many seconds of all ~10k YAMLs.
_TASK_DIRS = {"arc_challenge": ["arc"], "arc_easy": ["arc"], "piqa": ["piqa"], "sciq": ["sciq"],
              "mmlu": ["mmlu/default"], "bigbench_lite": ["bigbench/multiple_choice"]}


def task_manager(tasks: list[str], include_path: str | Path | None = None, metadata: dict | None = None):
    """An lm-eval ``TaskManager`` that knows ``tasks``; unknown names → :class:`EvalError`.

    Cached per (tasks, include_path and its YAML files' mtimes, metadata): in-training evaluation
    asks for the same one every ``eval.interval`` steps (``load`` builds fresh Task objects each
    time, so sharing it is safe).
    """
    yamls = sorted((str(f), f.stat().st_mtime_ns) for f in Path(include_path).rglob("*.y*ml")) \
        if include_path is not None and Path(include_path).is_dir() else []
    key = (tuple(tasks), str(include_path), tuple(yamls), json.dumps(metadata, sort_keys=True, default=str))
    if key not in _TM_CACHE:
        _TM_CACHE[key] = _new_task_manager(tasks, include_path, metadata)
    return _TM_CACHE[key]


_TM_CACHE: dict[tuple, Any] = {}


def _new_task_manager(tasks: list[str], include_path: str | Path | None, metadata: dict | None):
    """Build the ``TaskManager`` (see :func:`task_manager`).

    Indexing lm-eval's own ~10k task YAMLs takes 10-30 s on a busy CPU; when every task is one of
    :data:`_TASK_DIRS` or lives in ``include_path`` (local tasks, the smoke test), only those
    folders are indexed; otherwise everything is.
    """
    import lm_eval
    from lm_eval.tasks import TaskManager

    if include_path is not None and not Path(include_path).is_dir():
        raise EvalError(f"--include-path {include_path}: not a directory")
    user = [str(include_path)] if include_path is not None else []
    if all(t in _TASK_DIRS for t in tasks) or (user and not set(tasks) & set(_TASK_DIRS)):
        lm_tasks = Path(lm_eval.__file__).parent / "tasks"
        dirs = sorted({str(lm_tasks / d) for t in tasks for d in _TASK_DIRS.get(t, [])})
        extra = [str(TASKS_DIR)] if "bigbench_lite" in tasks else []
        tm = TaskManager(include_path=dirs + extra + user, include_defaults=False, metadata=metadata)
        if all(t in tm.all_tasks for t in tasks):
            return tm
    paths = [str(TASKS_DIR)] + user
    tm = TaskManager(include_path=paths, metadata=metadata)
    for t in tasks:
        if t not in tm.all_tasks:
            close = difflib.get_close_matches(t, tm.all_tasks, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            where = " or --include-path" if include_path is not None else ""
            raise EvalError(f"--tasks: unknown task '{t}': not in lm-eval's registry{where}{hint}")
    return tm


def load_tasks(tm, tasks: list[str], offline: bool) -> list:
    """Build the lm-eval Task/Group objects (this loads the datasets), one name at a time so a
    missing dataset is reported with the task that needs it."""
    objs: list = []
    for name in tasks:
        try:
            loaded = tm.load([name])
        except ConnectionError as exc:      # datasets' OfflineModeIsEnabled is a ConnectionError
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            if offline:
                raise DataUnavailable(
                    f"task '{name}': its data are not available offline (not in the Hugging Face "
                    f"cache: {first}); run once with --online on a machine with internet access") from None
            raise DataUnavailable(f"task '{name}': could not download its data ({first})") from None
        if name in loaded["groups"]:
            objs.append(loaded["groups"][name])
        else:                                # a task, or a tag (expands to its tasks)
            objs.extend(loaded["tasks"].values())
    return objs


# ----------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------

def evaluate(model, tokenizer, tasks: list[str], num_fewshot: int, *, limit: int | float | None = None,
             batch_size: int | str = 8, device: str = "cpu", include_path: str | Path | None = None,
             seed: int = 1234, offline: bool = True, bootstrap_iters: int = 100_000) -> dict:
    """Run ``lm_eval.simple_evaluate`` and return its results dict.

    ``model``: an HF folder (str/Path, loaded by lm-eval's ``hf`` model) or an in-memory
    ``transformers`` causal LM (wrapped in ``HFLM``). ``tokenizer``: a folder, a tokenizer object, or
    None (the model folder's). All four lm-eval seeds (python, numpy, torch, few-shot sampler) are
    ``seed``. ``tasks`` may use the presets of :data:`TASK_PRESETS`.
    """
    import lm_eval

    if num_fewshot < 0:
        raise EvalError(f"num_fewshot must be ≥ 0, got {num_fewshot}")
    tasks = expand_tasks(list(tasks))
    seeds = dict(random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed)
    with hub_mode(offline):
        if isinstance(model, (str, Path)):
            lm: Any = "hf"
            model_args: dict | None = {"pretrained": str(model), "dtype": "auto"}
            if tokenizer is not None:
                model_args["tokenizer"] = tokenizer if not isinstance(tokenizer, Path) else str(tokenizer)
            metadata = {"pretrained": str(model)}
        else:
            from lm_eval.models.huggingface import HFLM

            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
            model_args, metadata = None, None
        tm = task_manager(tasks, include_path, metadata=metadata)
        # Fresh Task objects per call: simple_evaluate writes num_fewshot into them, and refuses to
        # raise it again once a task's num_fewshot is 0.
        task_objs = load_tasks(tm, tasks, offline)
        results = lm_eval.simple_evaluate(
            model=lm, model_args=model_args, tasks=task_objs, num_fewshot=num_fewshot,
            batch_size=batch_size, device=device, limit=limit, task_manager=tm,
            log_samples=False, bootstrap_iters=bootstrap_iters, **seeds)
    return results


def metrics_of(results: dict, metrics: tuple[str, ...] = METRICS) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} for every task and group in a ``simple_evaluate`` results dict."""
    out: dict[str, dict[str, float]] = {}
    for task, row in results.get("results", {}).items():
        vals = {m: float(row[f"{m},none"]) for m in metrics
                if isinstance(row.get(f"{m},none"), (int, float))}
        if vals:
            out[task] = vals
    return out


@contextlib.contextmanager
def _preserved_rng() -> Iterator[None]:
    """lm-eval reseeds python/numpy/torch global RNGs; training must not notice (bit-identical resume)."""
    import numpy as np
    import torch

    py, np_state, cpu = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(np_state)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def in_training_eval(model, tokenizer, cfg) -> dict[str, float]:
    """lm-eval on the in-memory model (rank 0, every ``eval.interval`` steps).

    ``cfg``: anything with ``.tasks``, ``.num_fewshot``, ``.limit``, ``.include_path`` (the config's
    ``eval`` section). Returns ``{"eval/<task>/<metric>": value}`` for acc and acc_norm of every task
    and group. The model is put in eval mode (dropout and L2E sites off) and restored; global RNG
    states are restored, so training continues exactly as without evaluation.
    """
    was_training = model.training
    device = str(next(model.parameters()).device)
    model.eval()
    try:
        with _preserved_rng():
            results = evaluate(model, tokenizer, list(cfg.tasks), int(cfg.num_fewshot), limit=cfg.limit,
                               include_path=cfg.include_path, device=device,
                               batch_size=getattr(cfg, "batch_size", 8), bootstrap_iters=0)
    finally:
        model.train(was_training)
    return {f"eval/{task}/{m}": v for task, vals in metrics_of(results).items() for m, v in vals.items()}


def write_results(results: dict, path: str | Path) -> Path:
    """Write a results dict as JSON atomically (a crash never leaves a half file the sweep trusts)."""
    from lm_eval.utils import handle_non_serializable

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False))
    os.replace(tmp, path)
    return path


def provenance(results: dict, *, seed: int, num_fewshot: int, tasks: list[str], args: dict,
               model_dir: Path, checkpoint: Path | None) -> dict:
    """What makes a results file reproducible: versions, seed, arguments, the training config."""
    from importlib.metadata import version

    return {
        "lm_eval_version": version("lm_eval"),
        "transformers_version": version("transformers"),
        "torch_version": version("torch"),
        "task_versions": results.get("versions", {}),
        "seed": seed,
        "num_fewshot": num_fewshot,
        "tasks": tasks,
        "model_dir": str(model_dir),
        "checkpoint": str(checkpoint) if checkpoint else None,
        "eval_args": args,
        "train_config": _find_run_config(checkpoint) if checkpoint else None,
        "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


# ----------------------------------------------------------------------------------------------
# A small local multiple-choice task (tests and `make smoke`)
# ----------------------------------------------------------------------------------------------

def _stdlib_docs() -> list[tuple[str, str, str]]:
    """(module, function name, first docstring line) for public stdlib functions: text that is on
    every machine with this Python, in a deterministic order."""
    import importlib
    import inspect

    mods = ["os.path", "shutil", "string", "textwrap", "json", "random", "statistics", "heapq",
            "bisect", "fnmatch", "glob", "base64", "copy", "calendar", "difflib", "html", "zlib",
            "functools", "itertools", "operator", "math", "pathlib", "tempfile", "re"]
    out = []
    for m in mods:
        mod = importlib.import_module(m)
        for name in sorted(dir(mod)):
            obj = getattr(mod, name)
            if name.startswith("_") or not callable(obj) or inspect.isclass(obj):
                continue
            doc = (inspect.getdoc(obj) or "").strip().splitlines()
            line = next((ln.strip() for ln in doc if ln.strip() and "(" not in ln[:len(name) + 1]), "")
            if 20 <= len(line) <= 160 and name.lower() not in line.lower():
                out.append((m, name, line))
    return out


def write_local_mc_task(out_dir: str | Path, *, n_docs: int = 60, seed: int = 0) -> tuple[str, str]:
    """Write a small multiple-choice lm-eval task built from Python stdlib docstrings.

    Each document asks which function a docstring line describes (four names from the same pool).
    Prompts come from lm-eval's installed ``sciq.yaml`` (``include:``); data are JSON lines with
    absolute ``data_files``. Returns ``(include_path, task_name)`` for ``--include-path``/``--tasks``.
    Splits: test (``n_docs`` documents, evaluated) and train/validation (few-shot examples).
    """
    import lm_eval

    if n_docs < 1:
        raise ValueError(f"n_docs must be ≥ 1, got {n_docs}")
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    pool = _stdlib_docs()
    rng = random.Random(seed)
    rng.shuffle(pool)
    n_train = 20
    if len(pool) < n_docs + 2 * n_train:
        raise ValueError(f"n_docs={n_docs} exceeds the {len(pool) - 2 * n_train} documents available")
    names = sorted({name for _, name, _ in pool})

    def doc(module: str, name: str, line: str) -> dict:
        wrong = rng.sample([n for n in names if n != name], 3)
        return {"support": f"The Python module {module} has a function for this.",
                "question": f"Which function does this: {line}",
                "distractor1": wrong[0], "distractor2": wrong[1], "distractor3": wrong[2],
                "correct_answer": name}

    splits = {"train": pool[:n_train], "validation": pool[n_train:2 * n_train],
              "test": pool[2 * n_train:2 * n_train + n_docs]}
    files = {}
    for split, items in splits.items():
        p = out / f"{split}.jsonl"
        p.write_text("".join(json.dumps(doc(*it)) + "\n" for it in items))
        files[split] = str(p)
    task = "local_stdlib_mc"
    sciq_yaml = Path(lm_eval.__file__).parent / "tasks" / "sciq" / "sciq.yaml"
    yaml_text = "\n".join([
        f"include: {sciq_yaml}",            # sciq's prompt, choices, target and acc/acc_norm metrics
        f"task: {task}",
        "dataset_path: json",
        "dataset_name: null",
        "dataset_kwargs:",
        "  data_files:",
        *[f"    {s}: {f}" for s, f in files.items()],
        "metadata:",
        "  version: 1.0",
        "",
    ])
    (out / f"{task}.yaml").write_text(yaml_text)
    return str(out), task


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    def error(self, message: str):            # one line, exit 2 (argparse prints usage + message)
        self.exit(2, f"{self.prog}: error: {message}\n")


def _shots(text: str) -> list[int]:
    try:
        shots = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 0,5, got {text!r}") from None
    if not shots or any(s < 0 for s in shots):
        raise argparse.ArgumentTypeError(f"expected integers ≥ 0 like 0,5, got {text!r}")
    return sorted(set(shots))


def _limit(text: str) -> int | float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0 (an example count, or a fraction < 1), got {text!r}")
    return int(v) if v >= 1 and v == int(v) else v


def _batch_size(text: str) -> int | str:
    if text == "auto" or text.startswith("auto:"):
        return text
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'auto', got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be ≥ 1, got {v}")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m megatron_l2e.eval", description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", type=Path, help="a Hugging Face model folder")
    src.add_argument("--checkpoint", type=Path,
                     help="a training checkpoint RUN/checkpoints/TAG (exported to RUN/hf/TAG first; a "
                          "weights-only RUN/checkpoints/hf_step<N> is used as is)")
    p.add_argument("--tasks", default="paper",
                   help="comma-separated lm-eval tasks/groups or presets: paper (arc_challenge,piqa,sciq), "
                        "all (+arc_easy,mmlu,bigbench_lite) [paper]")
    p.add_argument("--num-fewshot", type=_shots, default=[0, 5], help="comma-separated shot counts [0,5]")
    p.add_argument("--limit", type=_limit, default=None, help="examples per task (or a fraction < 1)")
    p.add_argument("--batch-size", type=_batch_size, default=8, help="integer or 'auto' [8]")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... [cuda if available, else cpu]")
    p.add_argument("--include-path", type=Path, default=None, help="folder of extra lm-eval task YAMLs")
    p.add_argument("--out", type=Path, default=None,
                   help="results folder [RUN/eval/TAG for --checkpoint, MODEL/eval for --model]")
    p.add_argument("--metric", choices=METRICS, default="acc", help="accuracy printed in the summary [acc]")
    p.add_argument("--seed", type=int, default=1234, help="python/numpy/torch/few-shot seed [1234]")
    p.add_argument("--online", action="store_true",
                   help="allow downloads from the Hugging Face hub (default: offline, cached data only)")
    p.add_argument("--verbose", action="store_true", help="lm-eval's INFO logging")
    return p


def _check_model_dir(d: Path, flag: str) -> None:
    if not d.is_dir():
        raise EvalError(f"{flag} {d}: no such directory")
    if not (d / "config.json").is_file():
        raise EvalError(f"{flag} {d}: not a Hugging Face model folder (no config.json)")


def _is_exported(d: Path) -> bool:
    """A complete HF folder: config and weights (single file or the sharded index)."""
    return (d / "config.json").is_file() and any(
        (d / f).is_file() for f in ("model.safetensors", "model.safetensors.index.json"))


def _export(checkpoint: Path, out_dir: Path) -> Path:
    try:
        from megatron_l2e.export import export_checkpoint
    except ImportError as exc:
        raise EvalError(f"--checkpoint needs megatron_l2e.export, which cannot be imported ({exc})") from None
    if _is_exported(checkpoint):
        return checkpoint                    # a weights-only save (RUN/checkpoints/hf_step<N>): already one
    if _is_exported(out_dir):
        return out_dir                       # exported before: export is deterministic
    return Path(export_checkpoint(checkpoint, out_dir))


def run(args: argparse.Namespace) -> list[Path]:
    """The CLI's work: check everything, export if needed, evaluate once per shot count."""
    if args.seed < 0:
        raise EvalError(f"--seed must be ≥ 0, got {args.seed}")
    tasks = expand_tasks([t.strip() for t in args.tasks.split(",") if t.strip()])
    if not tasks:
        raise EvalError("--tasks: no task given")
    checkpoint = None
    if args.checkpoint is not None:
        checkpoint = args.checkpoint
        if not checkpoint.is_dir():
            raise EvalError(f"--checkpoint {checkpoint}: no such directory")
        model_dir, default_out = checkpoint_paths(checkpoint)
    else:
        _check_model_dir(args.model, "--model")
        model_dir, default_out = args.model, args.model / "eval"
    out_dir = args.out or default_out

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise EvalError(f"--device {device}: CUDA is not available on this machine")
    offline = not args.online

    # Fail before exporting or loading the model: unknown task names, then unavailable data.
    with hub_mode(offline):
        load_tasks(task_manager(tasks, args.include_path), tasks, offline)
    if checkpoint is not None:
        model_dir = _export(checkpoint, model_dir)
        _check_model_dir(model_dir, "exported")

    arg_record = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    written = []
    for k in args.num_fewshot:
        results = evaluate(model_dir, None, tasks, k, limit=args.limit, batch_size=args.batch_size,
                           device=device, include_path=args.include_path, seed=args.seed, offline=offline)
        results["megatron_l2e"] = provenance(results, seed=args.seed, num_fewshot=k, tasks=tasks,
                                             args=arg_record, model_dir=model_dir, checkpoint=checkpoint)
        path = write_results(results, Path(out_dir) / results_filename(k))
        written.append(path)
        for task, vals in metrics_of(results, (args.metric,)).items():
            stderr = results["results"][task].get(f"{args.metric}_stderr,none")
            pm = f" ± {stderr:.4f}" if isinstance(stderr, float) else ""
            print(f"{task:40s} {k}-shot {args.metric} {vals[args.metric]:.4f}{pm}")
        print(f"wrote {path}")
    return written


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.verbose:
        logging.getLogger("lm_eval").setLevel(logging.ERROR)
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        run(args)
    except EvalError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
