"""``python -m workbench.studies``: list, run, export, check and verify studies.

    python -m workbench.studies list
    python -m workbench.studies status NAME [--store DIR] [--results DIR]
    python -m workbench.studies run NAME [--executor local|processes|ray] [--store DIR] [--limit K]
                                         [--filter KEY=VALUE[,VALUE...]]... [--workers W] [--threads T]
                                         [--backbone DIR] [--backbone-option KEY=VALUE]...
                                         [--task NAME]... [--task-option KEY=VALUE]... [--set FIELD=VALUE]...
    python -m workbench.studies export NAME [--store DIR] [--results DIR]
    python -m workbench.studies verify NAME [--sample K] [--seed S] [--run HASH]... [--max-wall-s S]
                                            [--tolerance T] [--results DIR]

``run`` trains what neither the store nor the study's bundle holds yet (a second ``run`` trains
nothing; ``--limit`` spreads a long study over sessions); ``export`` writes the bundle under
``results/NAME/`` (partial bundles are fine: it says how many of the grid's runs are present);
``--backbone`` / ``--task`` run the same grid on another backbone and on real data (a VQA task
replaces the grid's VQA tasks, a caption task its caption tasks; ``--set`` changes any other field);
``verify`` re-trains a sample of the bundle and exits 1 if a run does not reproduce.
Exit status: 0 on success, 1 when verification fails or a run failed, 2 on bad usage or input.
"""

from __future__ import annotations

import argparse
import sys


def _parser() -> argparse.ArgumentParser:
    from ..train.sweeps import EXECUTORS

    p = argparse.ArgumentParser(prog="python -m workbench.studies",
                                description="Run, export, check and re-verify the workbench's studies.")
    sub = p.add_subparsers(dest="command", required=True, metavar="{list,status,run,export,verify}")

    def common(sp, store=True):
        if store:
            sp.add_argument("--store", default=None, metavar="DIR",
                            help="the run store (default: runs/ or $WORKBENCH_RUNS)")
        sp.add_argument("--results", default=None, metavar="DIR",
                        help="the folder of bundles (default: results/ or $WORKBENCH_RESULTS)")

    sp = sub.add_parser("list", help="the registered studies")
    sp.add_argument("--names", action="store_true", help="names only, one per line")

    sp = sub.add_parser("status", help="how many of the grid's runs are in the store and in the bundle")
    sp.add_argument("name")
    common(sp)

    sp = sub.add_parser("run", help="train the study's runs that are not finished yet (resumes)")
    sp.add_argument("name")
    sp.add_argument("--executor", choices=EXECUTORS, default="local")
    sp.add_argument("--limit", type=int, default=None, metavar="K",
                    help="train at most K of the runs still to do (in grid order)")
    sp.add_argument("--filter", action="append", default=[], metavar="KEY=VALUE[,VALUE...]",
                    help="only configs whose field matches (repeatable), e.g. method=lora,dora or n_shots=16")
    sp.add_argument("--workers", type=int, default=None, help="process pool size (--executor processes)")
    sp.add_argument("--threads", type=int, default=None, help="torch threads per worker (processes, ray)")
    sp.add_argument("--no-progress", action="store_true", help="no progress bar")
    sp.add_argument("--backbone", default=None, metavar="DIR",
                    help="run the grid on this backbone (a checkpoint directory or a registered name)")
    sp.add_argument("--backbone-option", action="append", default=[], metavar="KEY=VALUE",
                    help="an option of --backbone (repeatable), e.g. feat_dim=2048")
    sp.add_argument("--task", action="append", default=[], metavar="NAME",
                    help="replace the grid's tasks of this task's kind (vqa or caption) with it (repeatable), "
                         "e.g. --task vqa-v2 --task coco-caption")
    sp.add_argument("--task-option", action="append", default=[], metavar="KEY=VALUE",
                    help="an option of the --task tasks (repeatable), e.g. root=data/vqa_v2 "
                         "features=data/features/vqa.h5")
    sp.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="set a RunConfig field on every config (repeatable), e.g. n_shots=2 max_steps=4 "
                         "pool_size=null")
    common(sp)

    sp = sub.add_parser("export", help="write the bundle results/NAME/ from the run store")
    sp.add_argument("name")
    common(sp)

    sp = sub.add_parser("verify", help="re-train a sample of the bundle's runs and compare the metrics")
    sp.add_argument("name")
    sp.add_argument("--sample", type=int, default=2, metavar="K", help="how many runs to re-train (default 2)")
    sp.add_argument("--all", action="store_true", help="re-train every run of the bundle")
    sp.add_argument("--seed", type=int, default=0, help="the sampling seed (default 0)")
    sp.add_argument("--run", action="append", default=None, metavar="HASH", help="verify this run (repeatable)")
    sp.add_argument("--max-wall-s", type=float, default=None, metavar="S",
                    help="sample only runs whose recorded wall time is at most S seconds")
    sp.add_argument("--tolerance", type=float, default=None, help="override the tolerance")
    common(sp, store=False)
    return p


def _options(items, flag):
    """``["feat_dim=2048", "root=data"]`` -> ``{"feat_dim": 2048, "root": "data"}`` (None when empty),
    values read as :func:`~workbench.studies.study.parse_value` reads them."""
    from .study import parse_value

    out = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{flag} takes KEY=VALUE, got {item!r}")
        out[key.strip()] = parse_value(raw)
    return out or None


def main(argv=None) -> int:
    """The CLI; returns the exit status (``python -m workbench.studies`` exits with it)."""
    from . import (
        DamagedBundleError,
        export_study,
        get_study,
        list_studies,
        run_study,
        study_status,
        verify_study,
    )
    from .study import parse_filters

    args = _parser().parse_args(argv)
    try:
        if args.command == "list":
            for name in list_studies():
                print(name if args.names else f"{name}: {get_study(name).description}")
            return 0
        if args.command == "status":
            print(study_status(args.name, store=args.store, root=args.results))
            return 0
        if args.command == "run":
            df = run_study(args.name, executor=args.executor, store=args.store, results=args.results,
                           filters=parse_filters(args.filter), limit=args.limit, workers=args.workers,
                           threads=args.threads, progress=not args.no_progress, backbone=args.backbone,
                           backbone_options=_options(args.backbone_option, "--backbone-option"),
                           tasks=args.task or None,
                           task_options=_options(args.task_option, "--task-option"),
                           changes=_options(args.set, "--set"))
            counts = df["status"].value_counts().to_dict() if len(df) else {}
            shared = df.attrs.get("elsewhere", 0)
            print(f"study {args.name}: {counts.get('done', 0)} trained, {counts.get('reused', 0)} reused, "
                  f"{counts.get('failed', 0)} failed"
                  + (f", {shared} in other studies' bundles (export takes them from there)" if shared else "")
                  + f"; {df.attrs['finished']} of {df.attrs['grid']} grid runs finished")
            failed = df[df["status"] == "failed"] if len(df) else df
            for _, row in failed.iterrows():
                print(f"  failed: {row['method']} N={row['n_shots']} seed={row['seed']}: {row['error']}",
                      file=sys.stderr)
            return 1 if len(failed) else 0
        if args.command == "export":
            print(export_study(args.name, store=args.store, root=args.results))
            return 0
        if args.command == "verify":
            report = verify_study(args.name, sample=None if args.all else args.sample, seed=args.seed,
                                  root=args.results, runs=args.run, max_wall_s=args.max_wall_s,
                                  tolerance=args.tolerance)
            print(report.summary())
            return 0 if report.ok else 1
    except (ValueError, TypeError, FileNotFoundError, DamagedBundleError, ImportError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 2


if __name__ == "__main__":
    sys.exit(main())
