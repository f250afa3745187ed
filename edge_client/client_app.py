"""fedrec: the site's Flower ClientApp (a SuperNode runs it beside the site's data).

Handlers only unpack the Message and call `edge_client.federated_site`. DP mods are
registered on ``train`` only (a global mod breaks evaluate, see stack findings), and each
applies only when the server asked for it: Flower's ``fixedclipping_mod`` when the round
config carries a clipping norm (app mode), ``secaggplus_mod`` when the message is a SecAgg+
stage. A failure leaves the site as an error reply naming the error class only.

torch is imported by the handlers, not here: Flower starts one process per message, and
the SecAgg+ key-exchange stages and the event-count queries never need it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, cast

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable

from shared import ab, federated
from shared.federated import RoundInstructions

if TYPE_CHECKING:
    from edge_client.federated_site import Site

log = logging.getLogger(__name__)

app = ClientApp()

# Keys of Flower's legacy (SecAgg+) messages.
LEGACY_FIT_PARAMETERS = "fitins.parameters"
SECAGG_CONFIGS = "secaggplus_configs"
CLIPPING_NORM_KEY = "clipping_norm"


def secaggplus_when_requested(
    msg: Message, context: Context, call_next: ClientAppCallable
) -> Message:
    """Flower's ``secaggplus_mod`` for SecAgg+ stage messages; others pass through."""
    if SECAGG_CONFIGS in msg.content.config_records:
        from flwr.client.mod import secaggplus_mod

        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


def fixedclipping_when_requested(
    msg: Message, context: Context, call_next: ClientAppCallable
) -> Message:
    """Flower's ``fixedclipping_mod`` when the server sent a clipping norm (app mode)."""
    config = msg.content.config_records.get(federated.CONFIG)
    if config is not None and CLIPPING_NORM_KEY in config:
        return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)


@app.train(mods=[secaggplus_when_requested, fixedclipping_when_requested])
def train(msg: Message, context: Context) -> Message:
    """Train on the site's events; reply with new weights and aggregate numbers only."""
    from edge_client.federated_site import Site, train_site

    site = Site.from_node_config(context.node_config)
    with _public_errors(site):
        if LEGACY_FIT_PARAMETERS in msg.content.array_records:
            masked = SECAGG_CONFIGS in msg.content.config_records
            return Message(_legacy_train(site, msg.content, masked=masked), reply_to=msg)
        instr = RoundInstructions.from_config(msg.content.config_records[federated.CONFIG])
        if instr.privacy_mode == "distributed":
            raise _unmasked_share_refusal()
        state = msg.content.array_records[federated.ARRAYS].to_torch_state_dict()
        outcome = train_site(site, instr, state)
        content = RecordDict(
            {
                federated.METRICS: MetricRecord(cast(dict[str, Any], outcome.metrics)),
                federated.SITE: _site_record(site, reason=outcome.reason),
            }
        )
        if outcome.weights is not None:
            content[federated.ARRAYS] = ArrayRecord(outcome.weights)
        return Message(content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Store and serve the received version; reply with HR@k/NDCG@k on held-out items."""
    from edge_client.federated_site import Site, evaluate_site

    site = Site.from_node_config(context.node_config)
    with _public_errors(site):
        instr = RoundInstructions.from_config(msg.content.config_records[federated.CONFIG])
        state = msg.content.array_records[federated.ARRAYS].to_torch_state_dict()
        serve = msg.content.array_records.get(federated.SERVE_ARRAYS)
        metrics = evaluate_site(
            site, instr, state, serve.to_torch_state_dict() if serve is not None else None
        )
        content = RecordDict(
            {
                federated.METRICS: MetricRecord(cast(dict[str, Any], metrics)),
                federated.SITE: _site_record(site),
            }
        )
        return Message(content, reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Event counts since the site's previous round (the feedback loop's trigger)."""
    from edge_client.federated_site import Site, SiteRefusedError, event_counts

    site = Site.from_node_config(context.node_config)
    with _public_errors(site):
        config = msg.content.config_records.get(federated.CONFIG, ConfigRecord())
        if config.get("ask") != federated.QUERY_EVENT_COUNTS:
            raise SiteRefusedError(f"unknown query {config.get('ask')!r}")
        counts = event_counts(site)
        content = RecordDict(
            {
                federated.METRICS: MetricRecord(cast(dict[str, Any], counts)),
                federated.SITE: _site_record(site),
            }
        )
        return Message(content, reply_to=msg)


@app.query(ab.AB_SYNC)
def ab_sync(msg: Message, context: Context) -> Message:
    """A/B testing: store the experiments; reply with per-arm aggregate counts only."""
    from edge_client.ab_messages import sync_content
    from edge_client.federated_site import Site

    site = Site.from_node_config(context.node_config)
    with _public_errors(site):
        content = sync_content(site, msg.content, context.node_config, _site_record(site))
        return Message(content, reply_to=msg)


@app.query(ab.AB_MODELS)
def ab_models(msg: Message, context: Context) -> Message:
    """A/B testing: store the arm models the site lacked; reply with how many."""
    from edge_client.ab_messages import models_content
    from edge_client.federated_site import Site

    site = Site.from_node_config(context.node_config)
    with _public_errors(site):
        return Message(models_content(site, msg.content, _site_record(site)), reply_to=msg)


def _unmasked_share_refusal() -> Exception:
    from edge_client.federated_site import SiteRefusedError

    # A distributed-DP share carries only 1/m of the noise: sent in the clear, the
    # coordinator could learn far more than the (epsilon, delta) the site accounts for.
    return SiteRefusedError(
        "distributed DP: the site sends its share only masked by SecAgg+ (secagg = true)"
    )


def _legacy_train(site: Site, content: RecordDict, *, masked: bool) -> RecordDict:
    """Train for a SecAgg+ round, which speaks Flower's legacy FitIns/FitRes.

    Legacy weights are unnamed: they travel in the model's state_dict order. ``masked``:
    the message came through ``secaggplus_mod`` (its stage configs are present), so what
    this returns is masked before it leaves; a distributed-DP share is refused otherwise.
    """
    import torch
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.compat.common import recorddict_compat as compat

    from edge_client.federated_site import SiteRefusedError, share_site, train_site
    from shared.models import build_model

    fitins = compat.recorddict_to_fitins(content, keep_input=True)
    instr = RoundInstructions.from_config(fitins.config)
    distributed = instr.privacy_mode == "distributed"
    if distributed and not masked:
        raise _unmasked_share_refusal()
    template = build_model(
        instr.model_kind, {**instr.model_config, "n_items": instr.catalogue.n_items}
    )
    keys = list(template.state_dict().keys())
    arrays = parameters_to_ndarrays(fitins.parameters)
    if len(arrays) != len(keys):
        raise SiteRefusedError(f"received {len(arrays)} arrays, the model has {len(keys)}")
    state = {k: torch.from_numpy(a.copy()) for k, a in zip(keys, arrays, strict=True)}
    outcome = share_site(site, instr, state) if distributed else train_site(site, instr, state)
    if outcome.weights is None:
        # A refusal cannot be a masked vector; SecAgg+ treats this site as dropped out.
        raise SiteRefusedError(outcome.reason)
    metrics: dict[str, Any] = dict(outcome.metrics)
    metrics["site-name"] = site.name
    fitres = FitRes(
        status=Status(code=Code.OK, message="ok"),
        parameters=ndarrays_to_parameters([outcome.weights[k].numpy() for k in keys]),
        num_examples=int(outcome.metrics["num-examples"]),
        metrics=metrics,
    )
    return compat.fitres_to_recorddict(fitres, keep_input=False)


def _site_record(site: Site, reason: str = "") -> ConfigRecord:
    from edge_client.federated_site import current_version

    return ConfigRecord({"name": site.name, "serving": current_version(site), "reason": reason})


@contextmanager
def _public_errors(site: Site) -> Iterator[None]:
    """Log any failure in full on the site; re-raise it with a reason safe to send."""
    from edge_client.federated_site import SiteRefusedError, public_reason

    try:
        yield
    except SiteRefusedError:
        raise
    except Exception as err:
        log.error("site %s: %s", site.name, err, exc_info=err)
        raise SiteRefusedError(public_reason(err)) from None
