"""``reco evaluate``: zero-shot and retrieval evaluation of frozen CLIP vs reco."""
from __future__ import annotations

import argparse

from reco.evaluation.config import INFERENCE_MODES
from reco.options import MAX_K, flag_range, value_flags


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("evaluate")
    value_flags(g, ("--heads", "PATH", "heads folder (default: WORKDIR/heads); any fsspec path (a URL is "
                                       "mirrored into WORKDIR/cache/)"),
                ("--memory", "PATH", "memory index folder used at inference (default: WORKDIR/index); any "
                                     "fsspec path"),
                ("--output", "PATH", "also publish the eval folder there (any fsspec path)"))
    g.add_argument("--modes", default=None,
                   help=f"comma-separated inference modes among {','.join(INFERENCE_MODES)} "
                        "(default: eval.modes)")
    g.add_argument("--k", type=flag_range(1, MAX_K), default=None,
                   help="neighbours at inference (default: as trained)")
    d = parser.add_argument_group("labelled data (any of them; the work directory's embedded "
                                  "test split, when present, is evaluated first)")
    value_flags(d, ("--image-folder", "DIR", "zero-shot on an ImageFolder layout: DIR/<class>/*.jpg"),
                ("--webdataset", "PATH", "zero-shot on webdataset tar shards of {key}.jpg|png|webp + "
                                         "{key}.cls: a folder, .tar, glob or {0..9} pattern, local or fsspec URL"),
                ("--dataset", "NAME", "a CLIP_benchmark data set read offline from --dataset-root, e.g. "
                                      "wds/cifar10, mnist, stl10 (README: which names work offline)"),
                ("--dataset-root", "DIR", "local root of --dataset (as CLIP_benchmark's --dataset_root)"))
    d.add_argument("--split", default="test", help="split of --dataset / a wds layout (default test)")
    value_flags(d, ("--classnames", "FILE", "class names, one per line (line i = class i), of the data given "
                                            "above (default: the folder names / the set's own); with no data, "
                                            "of the test split (default WORKDIR/world/classnames.txt)"),
                ("--templates", "FILE", "prompt templates, one per line with {c} for the class name "
                                        "(default: the set's own, else eval.templates)"),
                ("--groups", "FILE", 'JSON {"seen": [class ids], "unseen": [...]}: metrics per group on the '
                                     "main set (default for the test split: WORKDIR/world/species.json)"))
    g.add_argument("--no-gallery", action="store_true", help="do not write gallery.html")


def data_specs(args: argparse.Namespace) -> list:
    """The labelled sets named by the flags (class names / templates files go with them)."""
    from reco.errors import ConfigError
    from reco.evaluation.sources import DataSpec

    common = {"classnames": args.classnames, "templates": args.templates, "split": args.split}
    specs = []
    if args.image_folder:
        specs.append(DataSpec("image-folder", args.image_folder, **common))
    if args.webdataset:
        specs.append(DataSpec("webdataset", args.webdataset, **common))
    if args.dataset:
        if not args.dataset_root:
            raise ConfigError(f"--dataset {args.dataset}: give --dataset-root DIR (read offline)")
        specs.append(DataSpec("clip-benchmark", args.dataset_root, name=args.dataset, **common))
    elif args.dataset_root:
        raise ConfigError("--dataset-root: give the data set name too (--dataset NAME)")
    if len(specs) > 1 and args.classnames:
        raise ConfigError("--classnames names the classes of one data set: give one of "
                          "--image-folder, --webdataset, --dataset")
    return specs


def main(cfg, args: argparse.Namespace) -> int:
    from reco.console import json_summaries, print_summary
    from reco.evaluation.evaluate import evaluate, markdown_table
    from reco.remote import local_input, published, staged

    modes = tuple(m.strip() for m in args.modes.split(",") if m.strip()) if args.modes else None
    specs = data_specs(args)
    heads = local_input(cfg.workdir, args.heads, "heads")
    memory = local_input(cfg.workdir, args.memory, "memory")
    with staged(outputs={cfg.paths.eval: ("output", args.output)}):
        results = evaluate(cfg, heads_dir=heads, memory_dir=memory, modes=modes, k=args.k,
                           data=specs, classnames=None if specs else args.classnames,
                           templates=args.templates, groups=args.groups,
                           gallery=not args.no_gallery)
    print_summary("evaluate", summary(results, published(cfg.paths.eval, args.output)), data=results)
    if not json_summaries():
        print(markdown_table(results["modes"]))
    return 0


def summary(results: dict, folder) -> dict:
    """The stage summary (reco.console.print_summary); the table follows it."""
    if results.get("skipped"):
        return {"status": "up to date (same heads, memory, test split and options), skipped",
                "output": folder}
    return {"test": f"{results.get('n_test')} images, {results.get('n_classes')} classes "
                    f"({results.get('data') or 'test split'}); memory of "
                    f"{results.get('memory_size')} items, k {results.get('k')}",
            "output": folder}
