"""Fault injection (issue 9): each stage's CLI is SIGKILLed mid-run, rerun with the same command,
and its final outputs compared with an uninterrupted run's.

Per stage, ``reco <stage> --preset tiny`` runs in a subprocess (through ``tests.fault_tools``,
which is ``reco`` plus a commit hook) on a copy of the previous stage's session-fixture output.
The kill point is drawn from a seeded RNG among the stage's commits (the rename of a temporary
file or checkpoint folder to its final name), just before or just after one, so it always lands
mid-run. After each kill: every visible final-named file is complete, every visible manifest
lists only complete shards (a watcher also checks this over and over while the stage runs).
Then the same command reruns to completion and the outputs are compared with the reference:
the session fixture's own output where the configuration is the same (embed-memory,
build-index, precompute-neighbours), else an uninterrupted run of the same command (train with
a CI-sized schedule, evaluate). ``pytest -s`` prints the per-stage table (faults, reruns, rows
lost, duplicates). The ``slow`` variants add more seeds, each with a second, time-based kill
(a random delay after a commit: mid-write, mid-step) during the resumed run.
"""
from __future__ import annotations

import fnmatch
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from reco.formats import decode_vectors, embedded_dim
from tests.fault_tools import KillAt, check_tree, run_stage
from tests.fixtures.index import ALL_FIELDS

FP16_ATOL = 2e-3                      # unit vectors stored as float16
TRAIN = ["train.steps=24", "train.checkpoint_every=6", "train.batch_size=64", "train.warmup_steps=4",
         "train.shuffle_buffer=512"]
SUMMARY: list[dict] = []
# seconds after a commit within which the slow tests' time-based kill lands (rough stage pace)
TIMED_SPREAD = {"embed-memory": 8.0, "build-index": 0.5, "precompute-neighbours": 1.0,
                "train": 3.0, "evaluate": 1.5}


@pytest.fixture(scope="module", autouse=True)
def summary_table():
    yield
    if not SUMMARY:
        return
    cols = ["stage", "seed", "faults", "reruns", "rows", "lost", "duplicates", "watch scans",
            "files checked", "tmp left", "kill points"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in SUMMARY:
        lines.append("| " + " | ".join(str(r[c]) for c in cols) + " |")
    print("\n\nFault injection (SIGKILL/resume):\n" + "\n".join(lines))


def _args(stage: str, workdir: Path, *sets: str, extra=()) -> list[str]:
    return [stage, "--preset", "tiny", "--workdir", str(workdir), *extra,
            *[f"--set={s}" for s in sets]]


def _model(fixture_cfg) -> list[str]:
    """Every copied workdir uses the fixture's CLIP: model ids record its local-dir path."""
    return ["--model", f"local-dir:{fixture_cfg.paths.base_clip}"]


def _copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(src, dst)


def inject(stage: str, args: list[str], workdir: Path, watch: list[Path], candidates: list[KillAt],
           seed: int, *, timed: bool = False, faults: int = 1, sweeps: bool = True,
           resumes: str | None = None) -> dict:
    """Kill ``faults`` runs at commits drawn from ``candidates`` (then, if ``timed``, one more
    at a random delay), rerun to completion; assert nothing half-written was ever visible, that
    a stage that ``resumes`` did not redo what a killed run had committed (committed paths
    matching that glob: complete shards, checkpoints) and, if the stage ``sweeps``, that the rerun
    removed the killed runs' temporaries."""
    rng = np.random.default_rng([seed, sum(map(ord, stage))])
    log = workdir / "faults.log"
    picks = [candidates[i] for i in rng.choice(len(candidates), size=faults, replace=False)]
    runs = []
    for kill in picks:
        runs.append(_checked(stage, watch, run_stage(args, log=log, watch=watch, kill=kill)))
        assert runs[-1].killed, f"{stage}: not killed at {kill} (rc {runs[-1].rc})\n{runs[-1].output}"
    if timed:
        runs.append(_checked(stage, watch, run_stage(args, log=log, watch=watch, kill_after_commits=1,
                                                     delay=float(rng.uniform(0, TIMED_SPREAD[stage])))))
        assert runs[-1].rc in (0, -9), runs[-1].output
    final = run_stage(args, log=log, watch=watch)
    assert final.rc == 0, f"{stage}: rerun failed\n{final.output}"
    _, problems, temps = check_tree(watch)
    assert not final.problems and not problems, (final.problems, problems)
    assert not (sweeps and temps), f"{stage}: temporaries left after the rerun: {temps}"
    done = {c for r in runs for c in r.commits if resumes and fnmatch.fnmatch(c, resumes)}
    assert not done & set(final.commits), f"{stage}: redone {done & set(final.commits)}"
    killed = [r for r in runs if r.killed]
    return {"stage": stage, "seed": seed, "faults": len(killed), "reruns": len(runs),
            "watch scans": sum(r.watch_scans for r in runs + [final]),
            "files checked": sum(r.watch_checks for r in runs + [final]), "tmp left": len(temps),
            "kill points": "; ".join(_where(r.killed_at) for r in killed), "runs": runs, "final": final}


def _checked(stage: str, watch: list[Path], run):
    """Nothing half-written was visible while it ran, nor is after its end or kill."""
    assert not run.problems, f"{stage}: visible while running: {run.problems}"
    _, problems, _ = check_tree(watch)
    assert not problems, f"{stage}: visible after the kill: {problems}"
    return run


def _where(path: str | None) -> str:
    return "/".join(Path(path).parts[-2:]) if path and path.startswith("/") else str(path)


def _record(info: dict, rows: int, got_ids: list, ref_ids: list) -> None:
    lost = len(set(ref_ids) - set(got_ids))
    dups = len(got_ids) - len(set(got_ids))
    SUMMARY.append({**{k: v for k, v in info.items() if k not in ("runs", "final")},
                    "rows": rows, "lost": lost, "duplicates": dups})
    assert lost == 0 and dups == 0 and len(got_ids) == len(ref_ids)


def _rows(folder: Path) -> pa.Table:
    """The rows of the shards a manifest lists, by id."""
    manifest = json.loads((folder / "manifest.json").read_text())
    table = pa.concat_tables([pq.read_table(folder / s) for s in manifest["shards"]])
    return table.take(pa.compute.sort_indices(table, [("id", "ascending")]))


def _commit_kills(pattern: str, n: int) -> list[KillAt]:
    """Kill just before commit 1..n or just after commit 1..n-1 of files matching ``pattern``."""
    return [KillAt(pattern, i, w) for i in range(1, n + 1) for w in ("before", "after")
            if not (w == "after" and i == n)]


# ---------------------------------------------------------------------------------------------
# stages
# ---------------------------------------------------------------------------------------------

def embed_case(cfg, tmp_path, seed, timed=False):
    work = tmp_path / "w"
    (work / "world").mkdir(parents=True)
    shutil.copytree(cfg.paths.world / "urls", work / "world" / "urls")      # served by the fixture,
    for name in ("world.json", ".server.json"):                             # whose token is checked
        shutil.copy(cfg.paths.world / name, work / "world" / name)
    out = work / "embeddings" / "memory"
    args = _args("embed-memory", work, f"world.port={cfg.world.port}", "embed.torch_threads=1",
                 extra=[*_model(cfg), "--split", "memory"])
    ref = _rows(cfg.paths.embedded("memory"))
    shards = -(-ref.num_rows // cfg.embed.shard_size)
    info = inject("embed-memory", args, work, [out], _commit_kills("part-*.parquet", shards), seed,
                  timed=timed, resumes="*/part-*.parquet")
    got = _rows(out)
    _record(info, ref.num_rows, got.column("id").to_pylist(), ref.column("id").to_pylist())
    for col in ("id", "url", "caption", "label", "status"):
        assert got.column(col).equals(ref.column(col)), col
    for col in ("image_emb", "text_emb"):
        dim = embedded_dim(ref.schema, "reference shards")
        a, b = (decode_vectors(t.column(col), dim) for t in (got, ref))
        np.testing.assert_allclose(a, b, atol=FP16_ATOL)
    assert json.loads((out / "manifest.json").read_text())["counts"] == \
        json.loads((cfg.paths.embedded("memory") / "manifest.json").read_text())["counts"]


def _index_inputs(cfg, work: Path) -> None:
    for split in ("memory", "test"):
        _copy(cfg.paths.embedded(split), work / "embeddings" / split)


def _same_index(cfg, folder: Path) -> list:
    from reco.index.memory import Memory

    ref, got = Memory.load(cfg.paths.index), Memory.load(folder)
    assert np.array_equal(got.ids, ref.ids)
    assert np.array_equal(got.image_emb, ref.image_emb) and np.array_equal(got.text_emb, ref.text_emb)
    for key in ("n", "keys", "nprobe", "recall", "model_id", "n_removed_eval_duplicates"):
        assert got.info[key] == ref.info[key], key
    queries = np.asarray(ref.image_emb[:64], np.float32)
    for index in ("img", "txt"):
        (s1, p1), (s2, p2) = got.search(queries, index, 10), ref.search(queries, index, 10)
        assert np.array_equal(p1, p2) and np.allclose(s1, s2, atol=1e-6)
    return list(ref.ids)


def index_case(cfg, tmp_path, seed, timed=False):
    work = tmp_path / "w"
    _index_inputs(cfg, work)
    out = work / "index"
    info = inject("build-index", _args("build-index", work), work, [out], _commit_kills("*", 6), seed,
                  timed=timed)                               # all or nothing (~1 s at tiny)
    ref_ids = _same_index(cfg, out)
    _record(info, len(ref_ids), list(np.load(out / "memory_ids.npy")), ref_ids)


def test_index_rebuild_killed_leaves_no_stale_info(tiny_indexed, tmp_path):
    """``build-index --force`` over a complete index, killed after its first new file: info.json
    (the completion marker) must be gone, so nothing reads a mix of old and new files."""
    work = tmp_path / "w"
    _index_inputs(tiny_indexed, work)
    _copy(tiny_indexed.paths.index, work / "index")
    args = _args("build-index", work, extra=["--force"])
    run = _checked("build-index", [work / "index"], run_stage(
        args, log=work / "faults.log", watch=[work / "index"], kill=KillAt("*.index", 1, "after")))
    assert run.killed
    assert not (work / "index" / "info.json").exists()
    final = run_stage(args, log=work / "faults.log", watch=[work / "index"])
    assert final.rc == 0, final.output
    ref_ids = _same_index(tiny_indexed, work / "index")
    _record({"stage": "build-index --force", "seed": 0, "faults": 1, "reruns": 1,
             "watch scans": run.watch_scans + final.watch_scans,
             "files checked": run.watch_checks + final.watch_checks,
             "tmp left": len(check_tree([work / "index"])[2]), "kill points": _where(run.killed_at)},
            len(ref_ids), list(np.load(work / "index" / "memory_ids.npy")), ref_ids)


def neighbours_case(cfg, tmp_path, seed, timed=False):
    work = tmp_path / "w"
    _copy(cfg.paths.embedded("train"), work / "embeddings" / "train")
    _copy(cfg.paths.index, work / "index")
    out = work / "neighbours"
    args = _args("precompute-neighbours", work, "neighbours.fields=" + ",".join(ALL_FIELDS),
                 "neighbours.shard_size=500")
    ref_t, ref_i = _rows(cfg.paths.neighbours / "tensors"), _rows(cfg.paths.neighbours / "ids")
    shards = -(-ref_t.num_rows // 500)
    info = inject("precompute-neighbours", args, work, [out], _commit_kills("part-*.parquet", 2 * shards),
                  seed, timed=timed, resumes="*/tensors/part-*.parquet")
    got_t, got_i = _rows(out / "tensors"), _rows(out / "ids")
    _record(info, ref_t.num_rows, got_t.column("id").to_pylist(), ref_t.column("id").to_pylist())
    for name in got_i.column_names:
        if name.endswith("_scores"):
            np.testing.assert_allclose(np.asarray(got_i.column(name).to_pylist()),
                                       np.asarray(ref_i.column(name).to_pylist()), atol=1e-6)
        else:
            assert got_i.column(name).equals(ref_i.column(name)), name
    for name in ref_t.column_names:
        assert got_t.column(name).equals(ref_t.column(name)), name


def _train_workdir(cfg, work: Path) -> Path:
    _copy(cfg.paths.neighbours / "tensors", work / "neighbours" / "tensors")
    return work


@pytest.fixture(scope="module")
def train_reference(tiny_neighbours, tmp_path_factory):
    """An uninterrupted ``reco train`` with the CI-sized schedule (TRAIN)."""
    work = _train_workdir(tiny_neighbours, tmp_path_factory.mktemp("train_ref"))
    run = run_stage(_args("train", work, *TRAIN, extra=["--resume"]), log=work / "log", watch=[])
    assert run.rc == 0, run.output
    return work / "heads"


def train_case(cfg, ref: Path, tmp_path, seed, timed=False):
    from safetensors.numpy import load_file

    work = _train_workdir(cfg, tmp_path / "w")
    out = work / "heads"
    args = _args("train", work, *TRAIN, extra=["--resume"])
    kills = _commit_kills("step-*", 4) + [KillAt("heads.safetensors", 1, "after")]
    info = inject("train", args, work, [out], kills, seed, timed=timed, resumes="*/checkpoints/step-*")
    history, want = (json.loads((d / "history.json").read_text()) for d in (out, ref))
    assert history == want                                     # every loss, bit for bit
    assert json.loads((out / "heads.json").read_text()) == json.loads((ref / "heads.json").read_text())
    a, b = load_file(str(out / "heads.safetensors")), load_file(str(ref / "heads.safetensors"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == \
        sorted(p.name for p in (ref / "checkpoints").glob("step-*"))
    _record(info, len(want), [s for s, _ in history], [s for s, _ in want])


def _eval_workdir(cfg, heads: Path, work: Path) -> Path:
    work.mkdir(parents=True)
    os.symlink(cfg.paths.world, work / "world")                # read-only input (53 MB of images)
    for split in ("test", "memory"):                          # memory: captions in the gallery
        _copy(cfg.paths.embedded(split), work / "embeddings" / split)
    _copy(cfg.paths.index, work / "index")
    (work / "heads").mkdir()
    for name in ("heads.safetensors", "heads.json"):
        shutil.copy(heads / name, work / "heads" / name)
    return work


@pytest.fixture(scope="module")
def eval_reference(tiny_neighbours, train_reference, tmp_path_factory):
    work = _eval_workdir(tiny_neighbours, train_reference, tmp_path_factory.mktemp("eval_ref") / "w")
    run = run_stage(_args("evaluate", work, extra=_model(tiny_neighbours)), log=work / "log", watch=[])
    assert run.rc == 0, run.output
    return json.loads((work / "eval" / "results.json").read_text())


def _comparable(results: dict) -> dict:
    return {k: v for k, v in results.items() if k not in ("heads", "memory", "data")}   # workdir paths


def eval_case(cfg, heads: Path, want: dict, tmp_path, seed, timed=False):
    work = _eval_workdir(cfg, heads, tmp_path / "w")
    out = work / "eval"
    args = _args("evaluate", work, extra=_model(cfg))
    info = inject("evaluate", args, work, [out], _commit_kills("*", 4), seed, timed=timed)
    # once more over the complete outputs, killed at its first commit: results.json (the
    # completion marker, written last) is withdrawn until the rerun finishes
    again = _checked("evaluate", [out], run_stage(args, log=work / "faults.log", watch=[out],
                                                  kill=KillAt("*", 1, "after")))
    assert again.killed and not (out / "results.json").exists()
    final = _checked("evaluate", [out], run_stage(args, log=work / "faults.log", watch=[out]))
    assert final.rc == 0, final.output
    info["faults"] += 1
    info["reruns"] += 2
    info["kill points"] += "; " + _where(again.killed_at)
    got = json.loads((out / "results.json").read_text())
    assert _comparable(got) == _comparable(want)
    rows = [(m, i) for m in want["modes"] for i in range(want["n_test"])]
    _record(info, len(rows), [(m, i) for m in got["modes"] for i in range(got["n_test"])], rows)


# ---------------------------------------------------------------------------------------------
# one kill per stage (default suite) and more seeds + a time-based kill (slow)
# ---------------------------------------------------------------------------------------------

def test_embed_memory_survives_sigkill(tiny_embedded, tmp_path):
    embed_case(tiny_embedded, tmp_path, seed=0)


def test_build_index_survives_sigkill(tiny_indexed, tmp_path):
    index_case(tiny_indexed, tmp_path, seed=0)


def test_precompute_neighbours_survives_sigkill(tiny_neighbours, tmp_path):
    neighbours_case(tiny_neighbours, tmp_path, seed=0)


def test_train_resume_after_sigkill_matches_uninterrupted(tiny_neighbours, train_reference, tmp_path):
    train_case(tiny_neighbours, train_reference, tmp_path, seed=0)


def test_evaluate_survives_sigkill(tiny_neighbours, train_reference, eval_reference, tmp_path):
    eval_case(tiny_neighbours, train_reference, eval_reference, tmp_path, seed=0)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("stage", ["embed-memory", "build-index", "precompute-neighbours", "train",
                                   "evaluate"])
def test_stage_survives_repeated_sigkills(stage, seed, request, tmp_path):
    cfg = request.getfixturevalue("tiny_neighbours")
    ref = (lambda name: request.getfixturevalue(name))
    cases = {"embed-memory": lambda: embed_case(cfg, tmp_path, seed, timed=True),
             "build-index": lambda: index_case(cfg, tmp_path, seed, timed=True),
             "precompute-neighbours": lambda: neighbours_case(cfg, tmp_path, seed, timed=True),
             "train": lambda: train_case(cfg, ref("train_reference"), tmp_path, seed, timed=True),
             "evaluate": lambda: eval_case(cfg, ref("train_reference"), ref("eval_reference"),
                                           tmp_path, seed, timed=True)}
    cases[stage]()
