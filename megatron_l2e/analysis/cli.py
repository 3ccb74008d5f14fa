"""``python -m megatron_l2e.analysis <command> --model DIR [--model DIR ...] --features FILE --out DIR``.

Defaults are the paper's Section 3 settings (``--preset paper``); ``--preset quick`` restores the
toolkit's small settings for the smoke model. An option given explicitly always wins over the preset.

Every argument is checked (model folders, feature file, layers, ratios, run files) before any
model is loaded; a bad one is a one-line ``error: …`` on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .activations import NEURON_KINDS, ModelSpec, read_model_spec
from .commands import ALL_NEURONS, COMMANDS, DEFAULT_NEURONS, DEFAULT_RATIOS, PRESETS, Section, Settings
from .features import FeatureError, RawFeatures, read_features

__all__ = ["main", "build_parser", "apply_preset", "settings_from_args", "UsageError"]

MODEL_COMMANDS = ("probe", "validate", "ks", "layers", "fkr")
REPORT_ORDER = ("probe", "validate", "ks", "layers", "fkr", "trajectory")


class UsageError(Exception):
    """Bad user input: printed as one line, exit status 2."""


# ------------------------------------------------------------------------------------------- parser

class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (``prog: error: …``, exit 2) instead of the usage dump."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be ≥ 1, got {v}")
    return v


def _count_or_all(text: str) -> int:
    """A random-neuron count: a positive integer, or 'all' / 0 for every scored neuron (no draw)."""
    if text == "all":
        return ALL_NEURONS
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a count or 'all', got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be ≥ 0 (0 = all), got {v}")
    return v


def _ratios(text: str) -> tuple[float, ...]:
    out = []
    for part in text.split(","):
        try:
            r = float(part)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {part!r}") from None
        if not 0 < r <= 1:
            raise argparse.ArgumentTypeError(f"ratio {part} outside (0, 1]")
        out.append(r)
    return tuple(sorted(set(out)))


def _layers(text: str) -> list[int] | None:
    if text == "all":
        return None
    try:
        layers = sorted({int(p) for p in text.split(",")})
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'all' or comma-separated block indices, got {text!r}") from None
    if layers[0] < 0:
        raise argparse.ArgumentTypeError(f"negative layer index in {text!r}")
    return layers


def _nonneg_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not v >= 0:
        raise argparse.ArgumentTypeError(f"must be ≥ 0, got {text}")
    return v


def _preset_default(value_of) -> str:
    """'default X; Y with --preset quick' for help texts, read from PRESETS so they stay true."""
    return f"default {value_of(PRESETS['paper'])}; {value_of(PRESETS['quick'])} with --preset quick"


def _count_text(n: int) -> str:
    return "all" if n == ALL_NEURONS else str(n)


# Which figure each command's random neurons feed, for --help.
_RANDOM_HELP = {
    "validate": "random neurons of the φ_ℓ* box plot (Fig. 3b), drawn over all analysed layers",
    "ks": "random neurons of the K-S test (Fig. 4), drawn over all analysed layers",
    "layers": "random neurons drawn in each layer for Fig. 5",
}


def build_parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    common.add_argument("--out", required=True, type=Path, help="folder for the JSON, PNGs (and report.md)")
    common.add_argument("--json", type=Path, help="also write the command's JSON to this file")
    common.add_argument("--seed", type=int, default=0, help="seed of every random draw (default 0)")

    model = _Parser(add_help=False)
    g = model.add_argument_group("models and data")
    g.add_argument("--model", action="extend", nargs="+", required=True, type=Path, metavar="DIR",
                   help="Hugging Face GPT-NeoX folder(s); repeat for cross-model figures")
    g.add_argument("--features", required=True, type=Path,
                   help="jsonl with 'text' and 'label', or a datasets.save_to_disk folder with 'tokens'")
    g.add_argument("--label-column", default="label", help="label column of a save_to_disk folder")
    # Options a preset sets default to None here and are filled in by apply_preset, so that an
    # explicit value (even one equal to a preset's) always wins.
    g.add_argument("--preset", choices=tuple(PRESETS), default="paper",
                   help="paper (default): the paper's Section 3 settings; quick: small settings for the "
                        "smoke model (seq length, top-k, random neurons, compensation)")
    g.add_argument("--seq-length", type=_positive_int,
                   help=f"tokens per sequence, crop/pad ({_preset_default(lambda p: p.seq_length)})")
    g.add_argument("--max-sequences", type=_positive_int, help="seeded random subset of the dataset")
    g.add_argument("--layers", type=_layers, default=None, help="'all' (default) or e.g. 0,2,5")
    g.add_argument("--neurons", choices=NEURON_KINDS,
                   help="mlp: MLP post-activation channels (mean over valid tokens); block: block "
                        "outputs per (position, channel). Default: block for fkr, mlp otherwise")
    g.add_argument("--compensation", type=_nonneg_float,
                   help="MS variance compensation c; 0 is the paper's eq. 1, 0.01 MEmeL's "
                        f"({_preset_default(lambda p: format(p.compensation, 'g'))})")
    g.add_argument("--batch-size", type=_positive_int, default=16)
    g.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:1, …")
    g.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")

    top_k = _Parser(add_help=False)
    top_k.add_argument("--top-k", type=_positive_int,
                       help=f"probed neurons kept per feature ({_preset_default(lambda p: p.top_k)})")

    def random_parser(command: str | None) -> argparse.ArgumentParser:
        # Per command, so that each --help shows that command's own default.
        parser = _Parser(add_help=False)
        if command is None:     # report: one count for every section that draws
            names = tuple(_RANDOM_HELP)
            each = _preset_default(lambda pre: " / ".join(_count_text(pre.random_neurons[c]) for c in names))
            text = f"one count for {', '.join(names)} (otherwise each section's own, {each})"
        else:
            default = _preset_default(lambda pre: _count_text(pre.random_neurons[command]))
            text = f"{_RANDOM_HELP[command]} ({default})"
        parser.add_argument("--random-neurons", type=_count_or_all, metavar="R",
                            help=text + "; 'all' or 0: every scored neuron")
        return parser

    pooled = _Parser(add_help=False)
    pooled.add_argument("--pooled", action="store_true",
                        help="ks: also one K-S test per model on the drawn neurons' samples pooled")
    fkr = _Parser(add_help=False)
    fkr.add_argument("--ratios", type=_ratios, default=DEFAULT_RATIOS,
                     help="comma-separated inhibition ratios in (0, 1] (default 0.001 … 0.1)")

    def runs_args(p, required: bool):
        p.add_argument("--runs", nargs="+", type=Path, default=[], required=required, metavar="RUN",
                       help="run folders (or metrics.jsonl files), drawn solid")
        p.add_argument("--baseline-runs", nargs="+", type=Path, default=[], metavar="RUN",
                       help="runs drawn dashed (e.g. without L2E)")

    parser = _Parser(prog="python -m megatron_l2e.analysis",
                     description="Monosemanticity analysis of GPT-NeoX checkpoints (L2E paper §3, App. B). "
                                 "Defaults are the paper's settings (--preset paper); --preset quick "
                                 "keeps the small ones for the smoke model.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    helps = {
        "probe": "single-neuron sparse probing: top-k monosemantic neurons per feature",
        "validate": "φ_ℓ vs φ_ℓ⁻ of probed neurons; φ_ℓ* probed vs random (Fig. 3, 7/8)",
        "ks": "K-S statistic of ℓ* inputs vs all inputs over random neurons, across models (Fig. 4)",
        "layers": "mean φ_ℓ* of random neurons per layer per model (Fig. 5/9)",
        "fkr": "False Killing Rate vs inhibition ratio per layer (Fig. 6/11)",
    }
    extra = {"probe": [top_k], "validate": [top_k, random_parser("validate")],
             "ks": [random_parser("ks"), pooled], "layers": [random_parser("layers")], "fkr": [fkr]}
    for name in MODEL_COMMANDS:
        sub.add_parser(name, parents=[common, model, *extra[name]], help=helps[name])
    runs_args(sub.add_parser("trajectory", parents=[common], help="τ per site over training (Fig. 12)"), True)
    rep = sub.add_parser("report", parents=[common, model, top_k, random_parser(None), pooled, fkr],
                         help="all of the above into one Markdown page")
    runs_args(rep, False)
    return parser


# --------------------------------------------------------------------------------------- validation

@dataclass
class Plan:
    command: str
    settings: Settings
    specs: list[ModelSpec]
    raw: RawFeatures | None
    layers: dict[str, list[int]]       # model name → layers
    kinds: set[str]


def _model_specs(paths: list[Path]) -> list[ModelSpec]:
    specs = []
    for p in paths:
        try:
            specs.append(read_model_spec(p))
        except (ValueError, KeyError) as e:
            raise UsageError(f"--model {p}: {e}") from None
    names = [s.name for s in specs]
    if len(set(names)) < len(names):
        # Same folder name (e.g. .../early/hf and .../late/hf): prefix the parent, then number.
        names = [f"{s.path.resolve().parent.name}/{s.name}" for s in specs]
        names = [f"{n}#{i}" if names.count(n) > 1 else n for i, n in enumerate(names)]
        specs = [read_model_spec(s.path, n) for s, n in zip(specs, names)]
    return specs


def _check_device(text: str) -> None:
    import torch

    if text in ("auto", "cpu"):
        return
    if not text.startswith("cuda"):
        raise UsageError(f"--device {text}: expected auto, cpu or cuda[:i]")
    if not torch.cuda.is_available():
        raise UsageError(f"--device {text}: CUDA is not available on this machine")


def apply_preset(args: argparse.Namespace) -> set[str]:
    """Fill the preset's options the user left unset (in place); return the names so filled.

    ``--random-neurons`` stays None when unset: its default is per command (see Settings.n_random).
    """
    if not hasattr(args, "preset"):     # trajectory: no model, nothing to preset
        return set()
    preset = PRESETS[args.preset]
    filled = set()
    for name in ("seq_length", "top_k", "compensation"):
        if hasattr(args, name) and getattr(args, name) is None:
            setattr(args, name, getattr(preset, name))
            filled.add(name)
    return filled


def settings_from_args(args: argparse.Namespace) -> Settings:
    """The commands' settings from parsed (and :func:`apply_preset`-filled) arguments.

    A command without an option (e.g. ``ks`` has no ``--top-k``) gets the paper preset's value, which
    it never reads.
    """
    return Settings(out=args.out, neurons=getattr(args, "neurons", None),
                    preset=getattr(args, "preset", "paper"),
                    compensation=getattr(args, "compensation", PRESETS["paper"].compensation),
                    top_k=getattr(args, "top_k", PRESETS["paper"].top_k),
                    random_neurons=getattr(args, "random_neurons", None),
                    pooled=getattr(args, "pooled", False),
                    ratios=getattr(args, "ratios", DEFAULT_RATIOS), seed=args.seed,
                    runs=tuple(getattr(args, "runs", ()) or ()),
                    baseline_runs=tuple(getattr(args, "baseline_runs", ()) or ()))


def plan_from_args(args: argparse.Namespace) -> Plan:
    """Check every argument; raise :class:`UsageError` naming the culprit."""
    from_preset = apply_preset(args)
    if args.out.exists() and not args.out.is_dir():
        raise UsageError(f"--out {args.out}: exists and is not a folder")
    if args.json is not None and args.json.is_dir():
        raise UsageError(f"--json {args.json}: is a folder")
    from .trajectory import read_tau_series

    settings = settings_from_args(args)
    for flag, paths in (("--runs", settings.runs), ("--baseline-runs", settings.baseline_runs)):
        for p in paths:
            try:
                read_tau_series(p)
            except ValueError as e:
                raise UsageError(f"{flag}: {e}") from None
    if args.command == "trajectory":
        return Plan(args.command, settings, [], None, {}, set())

    specs = _model_specs(args.model)
    for s in specs:
        if args.seq_length > s.max_positions:
            msg = f"--seq-length {args.seq_length}: {s.path} has only {s.max_positions} positions"
            if "seq_length" in from_preset:
                # The user did not ask for this length: say where it came from and what fits.
                fits = " or --preset quick" if s.max_positions >= PRESETS["quick"].seq_length else ""
                msg += f" (the {args.preset} preset's default; pass --seq-length ≤ {s.max_positions}{fits})"
            raise UsageError(msg)
    layers = {}
    for s in specs:
        if args.layers is not None and args.layers[-1] >= s.n_layers:
            raise UsageError(f"--layers: block {args.layers[-1]} does not exist in {s.path} ({s.n_layers} blocks)")
        layers[s.name] = args.layers if args.layers is not None else list(range(s.n_layers))
    _check_device(args.device)
    try:
        raw = read_features(args.features, args.label_column, args.max_sequences, args.seed)
    except FeatureError as e:
        raise UsageError(f"--features: {e}") from None
    if raw.texts is not None:
        for s in specs:
            if not any((s.path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
                raise UsageError(f"--model {s.path}: no tokenizer files, needed to tokenize {args.features}")
    commands = MODEL_COMMANDS if args.command == "report" else (args.command,)
    kinds = {settings.neurons or DEFAULT_NEURONS[c] for c in commands}
    return Plan(args.command, settings, specs, raw, layers, kinds)


# ------------------------------------------------------------------------------------------ running

def _build_context(plan: Plan, args: argparse.Namespace):
    import torch

    from .activations import capture_activations, load_model
    from .commands import Context, ModelData
    from .features import encode_features

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else "cpu" if args.device == "auto" else args.device)
    dtype = getattr(torch, args.dtype)
    models = []
    for spec in plan.specs:
        try:
            model, tok = load_model(spec.path, device, dtype, need_tokenizer=plan.raw.texts is not None,
                                  progress=not args.no_progress)
        except (OSError, ValueError) as e:
            raise UsageError(f"--model {spec.path}: cannot load ({str(e).splitlines()[0]})") from None
        pad = 0 if tok is None else (tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id or 0)
        try:
            feats = encode_features(plan.raw, args.seq_length, tok, pad)
        except FeatureError as e:
            raise UsageError(f"--features: {e}") from None
        cap = capture_activations(model, feats, plan.layers[spec.name], plan.kinds, args.batch_size,
                                  spec.name, progress=not args.no_progress)
        del model
        models.append(ModelData(cap, feats, plan.settings.compensation))
    return Context(models=models, classes=plan.raw.classes, settings=plan.settings, features=plan.raw.source)


def _meta(plan: Plan, ctx, args) -> dict:
    meta = {"seed": plan.settings.seed}
    if ctx.models:
        meta.update(preset=plan.settings.preset, features=ctx.features, classes=ctx.classes,
                    seq_length=args.seq_length,
                    compensation=plan.settings.compensation,
                    n_sequences=int(len(ctx.models[0].feats.labels)),
                    class_counts={c: int((ctx.models[0].feats.labels == i).sum()) for i, c in enumerate(ctx.classes)},
                    models={m.name: {"path": str(s.path), "n_params": m.capture.n_params, "layers": m.layers}
                            for m, s in zip(ctx.models, plan.specs)})
    return meta


def _section_json(section: Section) -> dict:
    return {**section.data, "figures": section.figures}


def _report_markdown(sections: list[Section], meta: dict) -> str:
    lines = ["# Monosemanticity report", ""]
    for name, info in meta.get("models", {}).items():
        lines.append(f"- model **{name}**: `{info['path']}`, {info['n_params']:,} parameters, layers {info['layers']}")
    if "features" in meta:
        counts = ", ".join(f"{c} {n}" for c, n in meta["class_counts"].items())
        lines += [f"- features: `{meta['features']}` — {meta['n_sequences']} sequences of ≤ {meta['seq_length']} "
                  f"tokens; classes: {counts}",
                  f"- preset `{meta['preset']}`; MS compensation c = {meta['compensation']}, seed {meta['seed']}"]
    for s in sections:
        lines += ["", f"## {s.command}", "", s.markdown, ""]
        lines += [f"![{f['title']}]({f['path']})" for f in s.figures]
    return "\n".join(lines) + "\n"


def _write_json(obj: dict, *paths: Path | None) -> None:
    text = json.dumps(obj, indent=1, allow_nan=False)
    for p in paths:
        if p is not None:
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(text + "\n")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        plan = plan_from_args(args)
        start = time.perf_counter()
        args.out.mkdir(parents=True, exist_ok=True)
        if plan.command == "trajectory":
            from .commands import Context

            ctx = Context(models=[], classes=[], settings=plan.settings)
        else:
            ctx = _build_context(plan, args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    meta = _meta(plan, ctx, args)
    if plan.command == "report":
        names = [c for c in REPORT_ORDER if c != "trajectory" or plan.settings.runs or plan.settings.baseline_runs]
        sections = [COMMANDS[c](ctx) for c in names]
        out = {"command": "report", "meta": meta, "sections": {s.command: _section_json(s) for s in sections}}
        (args.out / "report.md").write_text(_report_markdown(sections, meta))
        written = args.out / "report.md"
    else:
        section = COMMANDS[plan.command](ctx)
        out = {"command": plan.command, "meta": meta, **_section_json(section)}
        written = args.out / f"{plan.command}.json"
    # No timing in the JSON: same inputs and --seed give byte-identical files.
    _write_json(out, args.out / f"{plan.command}.json", args.json)
    print(f"{plan.command}: wrote {written} in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
