"""The ServerApp: runs :class:`~strategies.pool_exchange.PoolExchange` and writes ``results/flower/<run>/``.

The run directory holds ``config.json`` (settings, Flower run config, artefact key and digest),
``summary.csv``/``summary.md`` (one row per entity, with the sharing mode and what each entity's
pool discloses), ``run.json`` (status, sharing mode, phases and durations, failures),
``messages.csv`` (every message that crossed, see :mod:`sim.audit`) and each validated pool as
``artefacts/pools/E{k}.pt`` (features in ``dpm`` mode, which the Table 5 grid can reuse; images in
the other modes, with the mode in the file's metadata).

Nothing lost, nothing stale: the run holds its results root's lock, writes into a staging folder of
its own and moves it into place when it ends, so a rerun keeps the previous results until it has
completed; a failed run goes to ``<run>.failed`` beside them. Any exception marks the run failed. A
run killed outright leaves its staging folder, which the next run on that root removes.
"""

from __future__ import annotations

import logging
import shutil
import time
import uuid
from pathlib import Path

import pandas as pd
from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp

from entities.attacks.card import find_worst
from entities.config import Config
from entities.files import results_lock
from entities.pipeline import ArtefactStore, entity_names
from entities.pools import save_pool
from entities.provenance import write_provenance
from entities.report import markdown_table, write_json, write_table
from entities.sharing import get_mode, mode_name
from sim.app_config import FAILED, config_from_run_config, run_dir, setup_app_logging
from sim.audit import AuditedGrid
from sim.columns import explain
from strategies.pool_exchange import CollaborationError, CollaborationResult, EntityStatus, PoolExchange

log = logging.getLogger("poisonpool")

app = ServerApp()

# Per-entity columns of the summary, in the order of the three steps.
COLUMNS = ["num-examples", "items_shared", "pool_bytes_per_image", "disclosure_ssim", "label_ssim",
           "local_disclosure_ssim", "disclosure_ceiling", "top1_original", "top1_poisoned", "ssim_pool",
           "ssim_pool_inverted", "l1_pool", "ssim_clean", "received_images", "pools_refused",
           "top1_own", "top5_own", "top1_refined", "top5_refined", "pretrain_seconds", "pool_seconds",
           "refine_seconds"]


@app.main()
def main(grid: Grid, context: Context) -> None:
    setup_app_logging()
    t0 = time.time()
    cfg = config_from_run_config(context.run_config)
    out = run_dir(cfg, context.run_config)
    log.info("Flower run %d, preset %s, sharing mode %s: results go to %s", context.run_id, cfg.name,
             cfg.collab.share, out)
    share = cfg.collab.share
    with results_lock(cfg.results_dir()):
        recover(out)
        stage = out.parent / f".{out.name}.staging-{uuid.uuid4().hex[:8]}"
        audited = AuditedGrid(grid)
        result = CollaborationResult({n: EntityStatus(n) for n in entity_names(cfg)}, share)  # until a strategy runs
        error = ""
        try:
            strategy = PoolExchange(entity_names(cfg), cfg.backbone.pretrain_on, len(cfg.data.task_classes),
                                    node_wait=float(context.run_config.get("node-wait", 120)), share=share,
                                    roster=parse_roster(str(context.run_config.get("roster", ""))),
                                    max_pool=cfg.collab.max_pool, feature_bound=cfg.collab.feature_bound,
                                    items_per_image=get_mode(share).items_per_image(cfg) * cfg.decider.views)
            result = strategy.result
            strategy.start(audited, ArrayRecord(), timeout=float(context.run_config.get("timeout", 3600)))
        except BaseException as err:  # any failure, not only the strategy's own, marks the run failed
            error = str(err) if isinstance(err, CollaborationError) else f"{type(err).__name__}: {err}"
            raise
        finally:
            write_results(stage, cfg, context, result, audited, error, time.time() - t0)
            write_provenance(stage, t0)
            publish(stage, out, failed=bool(error))


def parse_roster(text: str) -> dict[int, str] | None:
    """``"E1=123 E2=456"`` (run-config key ``roster``) as {node id: entity}; empty: no roster."""
    roster: dict[int, str] = {}
    for item in text.replace(",", " ").split():
        name, _, node = item.partition("=")
        if not node.strip().isdigit() or not name.strip():
            raise ValueError(f"roster entry {item!r} is not of the form E<k>=<node id> (run-config key roster)")
        if int(node) in roster:
            raise ValueError(f"roster lists node {node} twice (run-config key roster)")
        roster[int(node)] = name.strip()
    if len(set(roster.values())) < len(roster):
        raise ValueError(f"roster gives one entity several nodes: {text!r} (run-config key roster)")
    return roster or None


def _old(dest: Path) -> list[Path]:
    return sorted(dest.parent.glob(f".{dest.name}.old-*"), key=lambda p: p.stat().st_mtime)


def recover(out: Path) -> None:
    """Under the results lock: put back results a killed run had moved aside, drop its staging folders."""
    for dest in (out, out.with_name(out.name + FAILED)):
        old = _old(dest)
        if old and not dest.exists():
            old.pop().rename(dest)
        for stale in old:
            shutil.rmtree(stale)
    for stale in out.parent.glob(f".{out.name}.staging-*"):
        shutil.rmtree(stale)


def publish(stage: Path, out: Path, failed: bool) -> Path:
    """Move a finished run's folder into place: ``<run>`` when it completed (the previous results stay
    until then), ``<run>.failed`` when it did not (the previous results stay, untouched)."""
    dest = out.with_name(out.name + FAILED) if failed else out
    old = dest.parent / f".{dest.name}.old-{uuid.uuid4().hex[:8]}"
    if dest.exists():
        dest.rename(old)
    stage.rename(dest)
    shutil.rmtree(old, ignore_errors=True)
    if not failed:
        shutil.rmtree(out.with_name(out.name + FAILED), ignore_errors=True)  # an earlier attempt's record
    log.info("results in %s", dest)
    return dest


def summary_frame(result: CollaborationResult) -> pd.DataFrame:
    rows = []
    for name, status in result.entities.items():
        row = {"entity": name, "node_id": status.node_id, "status": status.failure or "ok", "share": result.share,
               **status.metrics}
        if name in result.pool_bytes:
            row["pool_bytes_per_image"] = round(result.pool_bytes[name] / len(result.pools[name]))
        rows.append(row)
    df = pd.DataFrame(rows)
    return df[["entity", "node_id", "status", "share"] + [c for c in COLUMNS if c in df.columns]]


def with_worst_case(df: pd.DataFrame, cfg: Config) -> str:
    """Label what ``disclosure_ssim`` measures and, where an attack report for the same settings exists,
    put its worst case for each attacked entity beside it; returns that report's folder ('' if none)."""
    share = cfg.collab.share
    at = list(df.columns).index("disclosure_ssim") + 1 if "disclosure_ssim" in df.columns else len(df.columns)
    df.insert(at, "disclosure_by", get_mode(share).disclosure_by)
    worst = find_worst(cfg, cfg.results_dir()).get(share, {})
    if not worst:
        return ""
    for offset, (column, field) in enumerate([("worst_attack_ssim", "disclosure"), ("worst_attacker", "attacker"),
                                              ("worst_identification", "identification")], start=1):
        df.insert(at + offset, column, [worst[e][field] if e in worst else None for e in df["entity"]])
    return ", ".join(sorted({w["report"] for w in worst.values()}))


def write_results(out: Path, cfg: Config, context: Context, result: CollaborationResult, audited: AuditedGrid,
                  error: str, seconds: float) -> None:
    """Everything the run produced, also when it stopped early (``error`` says why)."""
    store_key = ArtefactStore(cfg).key
    share = cfg.collab.share
    meta = {"store_key": store_key, "config_digest": cfg.digest(), "preset": cfg.name, "run_id": context.run_id,
            "share": share}
    write_json({**meta, "run_config": dict(context.run_config), "config": cfg.to_dict()}, out / "config.json")

    pool_dir = out / "artefacts" / "pools"
    for name, pool in result.pools.items():
        save_pool(pool, pool_dir / f"{name}.pt", {**meta, "entity": name, "feature_shape": list(result.feature_shape),
                                                   "shape": list(pool.data.shape[1:])})

    phases = pd.DataFrame(result.phases, columns=["phase", "seconds"])
    failures = {n: s.failure for n, s in result.entities.items() if s.failure}
    status = "failed" if error else "completed"
    write_json({**meta, "status": status, "error": error, "seconds": seconds, "phases": result.phases,
                "failures": failures, "refused": result.refused,
                "pools_refused": result.screening, "feature_shape": list(result.feature_shape),
                "nodes": {n: s.node_id for n, s in result.entities.items()}}, out / "run.json")
    audited.write(out / "messages.csv")

    df = summary_frame(result)
    worst = with_worst_case(df, cfg)
    per_image = df["pool_bytes_per_image"].dropna() if "pool_bytes_per_image" in df else pd.Series(dtype=float)
    item_shape = "x".join(map(str, result.image_shape if result.image_shape else result.feature_shape))
    items = get_mode(share).sends
    notes = [
        f"Flower run {context.run_id}: {status} in {seconds:.0f} s (preset `{cfg.name}`, config digest "
        f"{cfg.digest()}, artefact key {store_key}).",
        f"Sharing mode `{share}` ({mode_name(share, cfg.mdp.rounds)}).",
        f"{'Error: ' + error if error else ''}",
        f"Pool per shared image: {per_image.mean():,.0f} bytes ({items} {item_shape} float32 and an int64 label, "
        "as sent)." if len(per_image) else "",
        explain(df.columns),
        (f"Worst case: the attack report(s) {worst}." if worst else
         "No `python -m sim.attack` report for these settings yet: the worst case over adaptive attackers is "
         "unknown here, only ψ's figure."),
        f"Refused at step 0: {'; '.join(result.refused)}." if result.refused else "",
        "Phases:\n\n" + markdown_table(phases, ".1f"),
    ]
    title = f"Flower collaboration: {cfg.name}, sharing {mode_name(share, cfg.mdp.rounds)}"
    md = write_table(df, out, "summary", title, "\n\n".join(n for n in notes if n))
    log.info("wrote %s (and config.json, run.json, messages.csv, %d pools)", md, len(result.pools))
