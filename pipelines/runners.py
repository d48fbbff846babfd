"""Where reco's Beam jobs run: runner names, engine presets and option checks, in one place.

Every Beam job of reco (``embed-memory``, ``precompute-neighbours``) builds its PipelineOptions
through :func:`pipeline_options`, so each runs unchanged on any engine below. The engine is
chosen by ``--runner`` (a name or alias); :data:`ENGINES` says which options each one needs,
and a missing one is a :class:`~reco.errors.ConfigError` naming it, raised before any work.

=========  =====================  ==========================================================
engine     ``--runner``           required (one of each group)
=========  =====================  ==========================================================
direct     DirectRunner, direct   --  (``--direct_running_mode`` in_memory|multi_processing)
portable   PortableRunner         ``--job_endpoint`` (any Beam job service; LOOPBACK workers
                                  by default, ``--environment_type`` for remote workers)
spark      SparkRunner            ``--job_endpoint`` or ``--spark_job_server_jar``
flink      FlinkRunner            ``--job_endpoint`` or ``--flink_job_server_jar``
dataflow   DataflowRunner         ``--project``, ``--region``, ``--temp_location=gs://...``,
                                  worker code: ``--setup_file`` | ``--requirements_file`` |
                                  ``--sdk_container_image`` (default: the repo's setup.py)
dask       DaskRunner             refused: Beam's DaskRunner drops what DoFns emit from
                                  finish_bundle (see docs/SCALE_OUT.md)
=========  =====================  ==========================================================

"DirectRunner" means Beam's Python FnApiRunner, which honours ``direct_running_mode`` and
``direct_num_workers``; Beam's own DirectRunner first tries to download the Go Prism runner.
``multi_threading`` is refused: it silently lost rows in measured runs.

``python -m reco.pipelines.runners job-service [--port N]`` serves Beam's portable Job API
(Beam's LocalJobServicer) on 127.0.0.1, the same API Spark and Flink job servers speak.
"""
from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions, StandardOptions

from reco.errors import ConfigError

log = logging.getLogger(__name__)
FN_API_RUNNER = "apache_beam.runners.portability.fn_api_runner.FnApiRunner"
RUNNING_MODES = ("in_memory", "multi_processing")
DEPENDENCY_FLAGS = ("setup_file", "requirements_file", "sdk_container_image")
REPO_SETUP = Path(__file__).resolve().parents[1] / "setup.py"


@dataclass(frozen=True)
class Engine:
    """One execution engine: the Beam runner it uses and what it needs."""

    name: str
    runner: str                                    # value given to Beam's --runner
    aliases: tuple[str, ...]                       # lower-case names accepted for --runner
    required: tuple[tuple[str, ...], ...] = ()     # option groups: one option of each is needed
    defaults: dict[str, str] = field(default_factory=dict)   # set unless the caller sets them
    refused: str = ""                              # non-empty: why this engine is not supported
    doc: str = ""


ENGINES: dict[str, Engine] = {e.name: e for e in (
    Engine("direct", FN_API_RUNNER, ("direct", "directrunner", "fnapirunner", FN_API_RUNNER.lower()),
           doc="this machine; --direct_running_mode=multi_processing --direct_num_workers=N"),
    Engine("portable", "PortableRunner", ("portable", "portablerunner"), (("job_endpoint",),),
           defaults={"environment_type": "LOOPBACK"},
           doc="any Beam job service (--job_endpoint=HOST:PORT); workers run in the submitting "
               "process (LOOPBACK) unless --environment_type=DOCKER|PROCESS|EXTERNAL"),
    Engine("spark", "SparkRunner", ("spark", "sparkrunner"),
           (("job_endpoint", "spark_job_server_jar"),),
           doc="a running Spark job server (--job_endpoint) or its jar (--spark_job_server_jar; "
               "Beam would otherwise download it from Maven at run time)"),
    Engine("flink", "FlinkRunner", ("flink", "flinkrunner"),
           (("job_endpoint", "flink_job_server_jar"),),
           doc="a running Flink job server (--job_endpoint) or its jar (--flink_job_server_jar) "
               "with --flink_master=HOST:PORT"),
    Engine("dataflow", "DataflowRunner", ("dataflow", "dataflowrunner"),
           (("project",), ("region",), ("temp_location",), DEPENDENCY_FLAGS),
           doc="Google Cloud Dataflow; worker code from --setup_file (the repo's setup.py), "
               "--requirements_file or --sdk_container_image (GPU workers: a container)"),
    Engine("dask", "DaskRunner", ("dask", "daskrunner"),
           refused="Beam's DaskRunner (2.77) reports success but drops every element a DoFn "
                   "emits from finish_bundle (WriteToParquet, BatchElements, RunInference lose "
                   "data with no error); see docs/SCALE_OUT.md"),
)}


def engine_for(runner: str) -> Engine:
    """The engine of a ``--runner`` value (name, alias or dotted path); ConfigError if unknown."""
    key = str(runner or "direct").strip().lower()
    for engine in ENGINES.values():
        if key == engine.name or key in engine.aliases or key == engine.runner.lower():
            return engine
    known = ", ".join(f"{e.name} ({e.runner})" for e in ENGINES.values())
    raise ConfigError(f"--runner={runner}: unknown runner; use one of {known}")


def as_args(beam_options=None) -> list[str]:
    """Beam flags as a list of ``--flag=value`` strings (from a list or PipelineOptions)."""
    if beam_options is None:
        return []
    if isinstance(beam_options, PipelineOptions):
        user = beam_options.get_all_options(drop_default=True, retain_unknown_options=True)
        out = []
        for key, value in user.items():
            if value is None or isinstance(value, dict):
                continue
            for item in value if isinstance(value, list) else [value]:
                out.append(f"--{key}={item}")
        return out
    return [str(a) for a in beam_options if a != "--"]


def pipeline_options(beam_options=None, *, runner: str = "DirectRunner",
                     direct_running_mode: str = "in_memory", direct_num_workers: int = 1,
                     check: bool = True) -> PipelineOptions:
    """PipelineOptions for a reco job: the config's defaults, the engine's defaults, then the
    caller's flags (the caller's win).

    Args:
        beam_options: Beam flags (list of ``--flag=value``) or PipelineOptions.
        runner, direct_running_mode, direct_num_workers: the stage config's defaults.
        check: resolve the runner alias and check the engine's required options (ConfigError).
    """
    user = as_args(beam_options)
    defaults = [f"--runner={runner}", f"--direct_running_mode={direct_running_mode}",
                f"--direct_num_workers={direct_num_workers}"]
    options = PipelineOptions(defaults + user)
    if not check:
        return options
    engine = engine_for(options.view_as(StandardOptions).runner)
    extra = [f"--{k}={v}" for k, v in engine_defaults(engine, options).items()]
    if extra:
        options = PipelineOptions(defaults + extra + user)
    resolve(options)
    return options


def _given(options: PipelineOptions, name: str) -> bool:
    value = options.get_all_options(retain_unknown_options=True).get(name)
    return value not in (None, "", [])


def engine_defaults(engine: Engine, options: PipelineOptions) -> dict[str, str]:
    """The engine's default options that ``options`` does not set (Dataflow: the repo's
    setup.py ships reco to the workers when no other way is given)."""
    out = {k: v for k, v in engine.defaults.items() if not _given(options, k)}
    if engine.name == "dataflow" and not any(_given(options, f) for f in DEPENDENCY_FLAGS) \
            and REPO_SETUP.is_file():
        out["setup_file"] = str(REPO_SETUP)
    return out


def resolve(options: PipelineOptions) -> Engine:
    """Replace the runner alias by the engine's runner (in place) and check the engine's
    required options; returns the engine. ConfigError names what is missing."""
    standard = options.view_as(StandardOptions)
    engine = engine_for(standard.runner)
    if engine.refused:
        raise ConfigError(f"--runner={standard.runner}: not supported: {engine.refused}")
    standard.runner = engine.runner
    if engine.name == "direct":
        mode = options.view_as(DirectOptions).direct_running_mode
        if mode not in RUNNING_MODES:
            raise ConfigError(f"--direct_running_mode={mode}: not supported (it lost rows silently "
                              f"in measured runs); use one of {RUNNING_MODES}")
    missing = [group for group in engine.required if not any(_given(options, f) for f in group)]
    if missing:
        need = "; ".join(" or ".join(f"--{f}" for f in group) for group in missing)
        raise ConfigError(f"--runner={engine.runner} ({engine.name}) needs {need}. {engine.doc}")
    if engine.name == "dataflow":
        _check_dataflow(options)
    endpoint = options.get_all_options(retain_unknown_options=True).get("job_endpoint")
    if endpoint and not is_loopback(endpoint) and options.get_all_options().get("environment_type") \
            in (None, "LOOPBACK"):
        log.warning("--job_endpoint=%s is not on this machine: its workers cannot reach LOOPBACK "
                    "workers here; pass --environment_type=DOCKER|PROCESS|EXTERNAL", endpoint)
    return engine


def _check_dataflow(options: PipelineOptions) -> None:
    from apache_beam.options.pipeline_options import GoogleCloudOptions

    gcp = options.view_as(GoogleCloudOptions)
    for name in ("temp_location", "staging_location"):
        value = getattr(gcp, name)
        if value and not str(value).startswith("gs://"):
            raise ConfigError(f"--{name}={value}: Dataflow needs a gs:// path")


def is_loopback(endpoint: str) -> bool:
    host = endpoint.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# --------------------------------------------------------------------------------------------
# Beam's portable job service on 127.0.0.1
# --------------------------------------------------------------------------------------------

def start_job_service(port: int = 0, staging_dir: str | None = None):
    """Beam's LocalJobServicer serving the portable Job API on 127.0.0.1; returns (servicer,
    port). ``servicer.stop()`` ends it."""
    from apache_beam.runners.portability import local_job_service

    class LoopbackJobServicer(local_job_service.LocalJobServicer):
        def get_service_address(self):
            return "127.0.0.1"

    servicer = LoopbackJobServicer(staging_dir)
    return servicer, servicer.start_grpc_server(port)


def _serve(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m reco.pipelines.runners job-service",
                                     description="Beam portable Job API on 127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: a free port")
    parser.add_argument("--port_file", default=None, help="write the port here once listening")
    parser.add_argument("--staging_dir", default=None)
    args = parser.parse_args(argv)
    servicer, port = start_job_service(args.port, args.staging_dir)
    if args.port_file:
        tmp = f"{args.port_file}.tmp-{os.getpid()}"
        Path(tmp).write_text(str(port))
        os.replace(tmp, args.port_file)
    print(f"Beam job service listening on 127.0.0.1:{port}", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        while True:
            time.sleep(3600)
    except (KeyboardInterrupt, SystemExit):
        return 0
    finally:
        servicer.stop()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    if sys.argv[1:2] != ["job-service"]:
        sys.exit("usage: python -m reco.pipelines.runners job-service [--port N] [--port_file F]")
    sys.exit(_serve(sys.argv[2:]))
