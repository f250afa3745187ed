"""Prometheus gauges of the design's indicators (R, I_u), computed from ``site.db`` at scrape time.

The SQL behind them (`edge_client.outcomes.indicators`) reads the impressions and events of
the indicator window, so a scrape recomputes it at most every ``ttl_s`` seconds.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Gauge

from edge_client.outcomes import Indicators


class CachedIndicators:
    """`Indicators` recomputed at most every ``ttl_s`` seconds (thread-safe)."""

    def __init__(self, compute: Callable[[], Indicators], ttl_s: float = 30.0) -> None:
        self.compute = compute
        self.ttl_s = ttl_s
        self._value: Indicators | None = None
        self._at = 0.0
        self._lock = threading.Lock()

    def get(self) -> Indicators:
        """The latest indicators, recomputed when older than the TTL."""
        with self._lock:
            if self._value is None or time.monotonic() - self._at >= self.ttl_s:
                self._value = self.compute()
                self._at = time.monotonic()
            return self._value


def register_indicator_metrics(registry: CollectorRegistry, indicators: CachedIndicators) -> None:
    """Gauges ``fedrec_edge_recommendation_effect``, ``fedrec_edge_user_interest`` and counts."""
    effect = Gauge(
        "fedrec_edge_recommendation_effect",
        "R = sum(r_i [r_i > 0]) / N over the (shopper, item) pairs recommended in the indicator "
        "window; explicit: the shopper's later rating, implicit: strongest later event (1-4)",
        ["ratings"],
        registry=registry,
    )
    interest = Gauge(
        "fedrec_edge_user_interest",
        "Mean over shoppers of I_u = sum(r_i [r_i > 0]) / M over their items in the indicator "
        "window; explicit: latest rating, implicit: strongest event (1-4)",
        ["ratings"],
        registry=registry,
    )
    effect.labels("explicit").set_function(lambda: indicators.get().recommendation_effect)
    effect.labels("implicit").set_function(lambda: indicators.get().recommendation_effect_implicit)
    interest.labels("explicit").set_function(lambda: indicators.get().user_interest)
    interest.labels("implicit").set_function(lambda: indicators.get().user_interest_implicit)
    Gauge(
        "fedrec_edge_indicator_recommended_pairs",
        "N: distinct (shopper, item) pairs recommended in the indicator window",
        registry=registry,
    ).set_function(lambda: indicators.get().recommended_pairs)
    Gauge(
        "fedrec_edge_indicator_raters",
        "Shoppers who rated an item in the indicator window (those I_u explicit averages)",
        registry=registry,
    ).set_function(lambda: indicators.get().raters)
