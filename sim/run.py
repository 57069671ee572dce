"""Run the Flower app and exit non-zero when the run fails.

    python -m sim.run [--config collab] [--set dpm.lam=0.5 ...] [--superlink NAME]

``flwr run sim/`` only submits a run, and ``flwr run --stream`` exits 0 even when the run failed.
This command submits the app (by default to the managed local simulation SuperLink, with one
SuperNode and one CPU per entity; or to a named SuperLink connection), streams the run's logs,
then asks the SuperLink for the run's final status and checks the results the ServerApp wrote.
It exits 0 only for ``finished:completed`` with a completed ``run.json``.

It also sets the two environment variables an offline machine needs:
``FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1`` (no ``uv sync`` of the app's dependencies; the
project is installed already) and ``FLWR_DISABLE_UPDATE_CHECK=1``. The managed SuperLink keeps
running after the run, as with ``flwr run``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from entities.config import parse_overrides
from sim.app_config import FAILED, config_from_run_config, run_dir
from sim.cli import add_config_args, command_parser

SIM_DIR = Path(__file__).resolve().parent
OFFLINE_ENV = {"FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "FLWR_DISABLE_UPDATE_CHECK": "1"}


class RunFailed(RuntimeError):
    """The run could not be submitted, or it ended in another state than completed."""


def flwr(*args: str, capture: bool = True, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """One ``flwr`` CLI call with the offline environment (and ``env`` on top)."""
    exe = shutil.which("flwr")
    if exe is None:
        raise RunFailed("the `flwr` command is not on PATH: install the project with `pip install -e .`")
    env = {**os.environ, **{k: os.environ.get(k, v) for k, v in OFFLINE_ENV.items()}, **(env or {})}
    return subprocess.run([exe, *args], env=env, text=True, capture_output=capture, check=False)


def flwr_json(*args: str, env: dict[str, str] | None = None) -> dict:
    proc = flwr(*args, "--format", "json", env=env)
    try:
        out = json.loads(proc.stdout)
    except json.JSONDecodeError as err:
        raise RunFailed(f"`flwr {' '.join(args)}` printed no JSON (exit {proc.returncode}):\n"
                        f"{proc.stdout}{proc.stderr}") from err
    if not out.get("success", False):
        raise RunFailed(f"`flwr {' '.join(args)}` failed: {out.get('error-message', out)}")
    return out


def toml_run_config(values: dict[str, str | int | float]) -> str:
    """``key="value" key2=3`` for ``flwr run --run-config`` (JSON strings are valid TOML strings)."""
    return " ".join(f"{k}={json.dumps(v)}" for k, v in values.items())


def submit(run_config: dict, superlink: str | None, supernodes: int, cpus: int, node_env: dict[str, str]) -> str:
    """Start the run and return its id; a local simulation gets one SuperNode per entity.

    ``node_env`` is the simulated entities' environment (their policy's data root and private store);
    it reaches them only where this call starts the managed SuperLink.
    """
    args = ["run", str(SIM_DIR), *([superlink] if superlink else []), "--run-config", toml_run_config(run_config)]
    if not superlink:
        args += ["--federation-config", f"num-supernodes={supernodes} client-resources-num-cpus={cpus}"]
    return str(flwr_json(*args, env=node_env)["run-id"])


def wait(run_id: str, superlink: str | None, stream: bool, poll: float = 2.0) -> dict:
    """Follow the run until the SuperLink reports it finished; return its ``flwr list`` entry."""
    where = [superlink] if superlink else []
    if stream:
        flwr("log", run_id, *where, "--stream", capture=False)
    while True:
        run = flwr_json("list", *where, "--run-id", run_id)["runs"][0]
        if str(run["status"]).startswith("finished"):
            return run
        time.sleep(poll)


def read_run(out: Path, run_id: int) -> dict:
    """This run's ``run.json``: in ``<run>`` when it completed, in ``<run>.failed`` when it did not."""
    for folder in (out, out.with_name(out.name + FAILED)):
        path = folder / "run.json"
        written = json.loads(path.read_text()) if path.is_file() else {}
        if written.get("run_id") == run_id:
            return written
    return {}


def main(argv: list[str] | None = None) -> int:
    parser = command_parser("python -m sim.run", __doc__)
    add_config_args(parser)
    parser.set_defaults(config="collab")
    parser.add_argument("--superlink", default=None,
                        help="a SuperLink connection in $FLWR_HOME/config.toml (default: the local simulation)")
    parser.add_argument("--supernodes", type=int, default=0, help="simulated SuperNodes (default: one per entity)")
    parser.add_argument("--cpus-per-supernode", type=int, default=1)
    parser.add_argument("--timeout", type=int, default=3600, help="seconds to wait for each step's replies")
    parser.add_argument("--policy", default="", help="the simulated entities' policy file (entities/policy.py; "
                        "default: dpm only, disclosure ceiling 1: measured and reported only)")
    parser.add_argument("--roster", default="", help="'E1=<node id> ...': which authenticated SuperNode is which "
                        "entity (a deployment with SuperNode authentication, see the README; default: none, "
                        "each node is the entity it claims)")
    parser.add_argument("--no-stream", action="store_true", help="do not print the run's logs")
    args = parser.parse_args(argv)

    # The caller's results root, absolute: the ServerApp runs wherever the SuperLink was started.
    root = getattr(args, "results_root", None) or parse_overrides(args.set).get("results_root") or "results"
    run_config: dict = {"preset": args.config, "overrides": " ".join(args.set), "timeout": args.timeout,
                        "results-root": str(Path(root).resolve())}
    if getattr(args, "run_name", None):
        run_config["run-name"] = args.run_name
    if args.roster:
        run_config["roster"] = args.roster
    try:
        cfg = config_from_run_config(run_config)  # a bad preset or setting fails here, before submitting
        out = run_dir(cfg, run_config)
        # Simulated entities run on this machine for this operator: their store is the results root.
        node_env = {"POISONPOOL_STORE": str(cfg.results_dir())}
        if args.data_root:
            node_env["POISONPOOL_DATA"] = str(Path(args.data_root).resolve())
        if args.policy:
            node_env["POISONPOOL_POLICY"] = str(Path(args.policy).resolve())
        run_id = submit(run_config, args.superlink, args.supernodes or len(cfg.data.shard_fractions),
                        args.cpus_per_supernode, node_env)
        print(f"submitted run {run_id} (preset {cfg.name}); results will be in {out}", flush=True)
        run = wait(run_id, args.superlink, stream=not args.no_stream)
    except (RunFailed, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    status = run["status"]
    written = read_run(out, int(run_id))
    if status != "finished:completed" or written.get("status") != "completed":
        print(f"error: run {run_id} ended as {status}: {written.get('error') or run.get('status-details', '')}"
              f"\n(see `flwr log {run_id} --show` and {out}{FAILED})", file=sys.stderr)
        return 1
    print((out / "summary.md").read_text())
    print(f"run {run_id} completed in {written['seconds']:.0f} s; results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
