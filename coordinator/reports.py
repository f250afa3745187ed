"""Status and privacy reports built from the registry (JSON-ready dicts; the CLI renders them)."""

from __future__ import annotations

from typing import Any

from coordinator.registry import Registry

STATUS_ROUNDS = 10


def status_report(registry: Registry, rounds: int = STATUS_ROUNDS) -> dict[str, Any]:
    """Runs, recent rounds, sites (last contact, epsilon spent of budget), served version."""
    runs = registry.runs()
    recent = registry.rounds(limit=rounds)
    all_rounds = registry.rounds()
    published = registry.published()
    head = registry.head()
    by_status: dict[str, int] = {}
    for r in all_rounds:
        by_status[r["status"]] = by_status.get(r["status"], 0) + 1
    return {
        "registry": str(registry.path),
        "last_run": _run_summary(runs[0]) if runs else None,
        "runs": len(runs),
        "rounds": {"total": len(all_rounds), "by_status": by_status},
        "recent_rounds": [_round_summary(r) for r in recent],
        "published_version": published.version if published else None,
        "newest_version": head.version if head else None,
        "sites": [_site_summary(s) for s in registry.sites()],
    }


def privacy_report(registry: Registry) -> dict[str, Any]:
    """Who is protected, by what mechanism, and how much epsilon has been spent."""
    runs = registry.runs()
    modes = sorted({r["privacy_mode"] for r in runs})
    sites = registry.sites()
    app_eps, app_delta, app_releases = registry.app_privacy_spent()
    versions = [
        {
            "version": m.version,
            "round": m.round,
            "privacy_mode": m.privacy_mode,
            "accountant": m.accountant,
            "epsilon_max": m.epsilon_max,
            "epsilon_mean": m.epsilon_mean,
            "delta": m.delta,
            "published": m.published,
        }
        for m in registry.models()
    ]
    return {
        "registry": str(registry.path),
        "privacy_modes_used": modes,
        "secagg_used": any(bool(r["secagg"]) for r in runs),
        "store_mode": {
            "unit": "one shopper (all their events at the site)",
            "mechanism": "DP-SGD at each site (Opacus, Poisson sampling, per-shopper clipping)",
            "accountant": "PRV (RDP cross-check), per site, persisted in site.db",
            "sites": [
                {
                    "site": s["name"],
                    "epsilon_spent": s["epsilon_spent"],
                    "epsilon_budget": s["epsilon_budget"],
                    "share_of_budget": _share(s["epsilon_spent"], s["epsilon_budget"]),
                    "delta": s["delta"],
                    "rounds_trained": s["rounds_trained"],
                }
                for s in sites
            ],
        },
        "app_mode": {
            "unit": "one shopper (one device)",
            "mechanism": "client-level DP: fixed clipping on the device, Gaussian noise on "
            "the aggregate (Flower DifferentialPrivacyClientSideFixedClipping)",
            "accountant": "RDP (Flower RdpAccountant), no sampling amplification",
            "epsilon": app_eps if app_releases else None,
            "delta": app_delta if app_releases else None,
            "releases": app_releases,
        },
        "versions": versions,
    }


def _share(spent: float | None, budget: float | None) -> float | None:
    if spent is None or not budget:
        return None
    return spent / budget


def _run_summary(run: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": run["id"],
        "flwr_run_id": run["flwr_run_id"],
        "status": run["status"],
        "mode": run["mode"],
        "privacy_mode": run["privacy_mode"],
        "strategy": run["strategy"],
        "secagg": bool(run["secagg"]),
        "started_at": run["started_at"],
        "finished_at": run["finished_at"],
        "detail": run["detail"],
    }


def _round_summary(r: dict[str, Any]) -> dict[str, Any]:
    keys = (
        "number",
        "status",
        "started_at",
        "seconds",
        "sites_asked",
        "sites_answered",
        "sites_accepted",
        "sites_rejected",
        "sites_refused",
        "sites_failed",
        "bytes_down",
        "bytes_up",
        "model_version",
        "epsilon_max",
        "epsilon_mean",
        "train_metrics",
        "eval_metrics",
        "detail",
    )
    return {k: r.get(k) for k in keys}


def _site_summary(s: dict[str, Any]) -> dict[str, Any]:
    return {
        "site": s["name"],
        "node_id": s["node_id"],
        "first_seen": s["first_seen"],
        "last_contact": s["last_contact"],
        "last_outcome": s["last_outcome"],
        "rounds_trained": s["rounds_trained"],
        "new_events": s["new_events"],
        "epsilon_spent": s["epsilon_spent"],
        "epsilon_budget": s["epsilon_budget"],
        "share_of_budget": _share(s["epsilon_spent"], s["epsilon_budget"]),
        "serving_version": s["serving_version"],
    }
