"""The layering, read from the source with ``ast`` (nothing is imported):

* no stage (``pipelines/``, ``index/``, ``trainer/``), ``reco/model.py`` or the core imports the
  generated world (``reco.world``: a test fixture) or the experiments package (``experiments/``);
* the core (``reco/*.py`` but the command layer that runs the stages) imports no stage, except the
  stages' config declarations, which ``reco.config.RecoConfig`` composes;
* each artefact is read by the stages through its one reader (RELIABILITY.md), the function the
  property tests corrupt files through; ``reco.validate`` keeps no test-only reader.
"""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FOLDERS = {"pipelines": "reco.pipelines", "index": "reco.index", "trainer": "reco.trainer"}
# reco/*.py outside the core: the command layer that runs the stages (CLI, demo) and the
# drop-in model (it loads the index stage's memory and the trainer's heads)
COMMANDS = {"cli.py", "config_cli.py", "demo.py", "embed_cli.py"}
NOT_CORE = COMMANDS | {"model.py"}
STAGES = ("reco.pipelines", "reco.index", "reco.trainer", "reco.evaluation", "reco.react",
          "reco.bench", "reco.world")
FORBIDDEN = ("reco.world", "experiments")


def module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = list(rel.parts)
    if parts[0] in FOLDERS:
        parts = FOLDERS[parts[0]].split(".") + parts[1:]
    return ".".join(p for p in parts if p != "__init__")


def imports(path: Path) -> set[str]:
    """Absolute names of every module ``path`` imports (relative imports resolved; ``from a
    import b`` also yields ``a.b``, which may be a submodule), lazy imports in functions too."""
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[:len(package) - node.level + 1] + [node.module or ""]
                            if node.level else [node.module or ""]).strip(".")
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)
    return out


def under(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def core_files() -> list[Path]:
    return [p for p in sorted((REPO / "reco").glob("*.py")) if p.name not in NOT_CORE]


def stage_files() -> list[Path]:
    files = [p for folder in FOLDERS for p in sorted((REPO / folder).rglob("*.py"))]
    return files + [REPO / "reco" / "model.py"] + core_files()


def test_module_names_resolve_like_the_package_mapping():
    assert module_name(REPO / "pipelines" / "neighbours" / "job.py") == "reco.pipelines.neighbours.job"
    assert module_name(REPO / "reco" / "__init__.py") == "reco"
    assert "reco.pipelines.neighbours.shards" in imports(REPO / "pipelines" / "neighbours" / "job.py")


def test_no_stage_model_or_core_imports_the_world_or_the_experiments():
    bad = {str(p.relative_to(REPO)): sorted(n for n in imports(p) if under(n, FORBIDDEN))
           for p in stage_files()}
    assert not {k: v for k, v in bad.items() if v}


def test_the_core_imports_no_stage_but_their_configs():
    def stage(name: str) -> bool:                     # reco.index.config(.IndexConfig) is fine
        return under(name, STAGES) and "config" not in name.split(".")[2:]
    bad = {str(p.relative_to(REPO)): sorted(n for n in imports(p) if stage(n)) for p in core_files()}
    assert not {k: v for k, v in bad.items() if v}


# the one reader of each artefact (what tests/test_formats_properties.py corrupts files through)
# -> the stage modules that read that artefact with it
READERS = {
    "reco.embedded.read_table": ["reco/evaluation/data.py", "reco/evaluation/query.py",
                                 "reco/react/retrieve.py", "reco/react/images.py", "pipelines/write.py"],
    "reco.embedded.read_shard": ["pipelines/neighbours/job.py", "index/distributed.py"],
    "reco.embedded.open_split": ["index/build.py", "pipelines/neighbours/job.py", "reco/evaluation/evaluate.py"],
    "reco.trainer.tensors.read_row_group": ["trainer/data.py"],
    "reco.trainer.tensors.read_tensors_info": ["trainer/train.py"],
    "reco.index.memory.read_info": ["index/build.py"],
    "reco.pipelines.source_webdataset.read_sidecar": ["reco/react/data.py", "reco/react/download.py"],
}


def test_stages_read_each_artefact_through_its_one_reader():
    missing = {reader: [f for f in files if reader not in imports(REPO / f)]
               for reader, files in READERS.items()}
    assert not {k: v for k, v in missing.items() if v}
    validate = {n.name for n in ast.parse((REPO / "reco" / "validate.py").read_text()).body
                if isinstance(n, ast.FunctionDef)}
    assert not validate & {"read_embedded", "read_neighbours", "read_tensors"}   # no test-only readers
