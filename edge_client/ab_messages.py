"""What the ClientApp's A/B handlers do with a message (`edge_client.client_app` stays thin).

- `sync_content` (``query.ab_sync``): store the experiments the coordinator sent, check which
  arm models the site holds, and build the reply: per-arm counts and per-experiment numbers
  (`edge_client.ab_site.sync_site`), the site record, and the list of arm versions missing
  (names the coordinator itself made). No shopper id, item id or event leaves.
- `models_content` (``query.ab_models``): store each received arm model as
  ``models/<version>/`` (ONNX and explanations included, `federated_site.store_model`) and
  tell the edge service to reload the experiment.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any, cast

from flwr.app import ConfigRecord, MetricRecord, RecordDict

from edge_client.ab_site import ABSite, ABSiteConfig, ABSiteError, sync_site
from edge_client.federated_site import Site
from shared import ab, federated
from shared.errors import ModelError

log = logging.getLogger(__name__)


def model_present(site: Site, version: str) -> bool:
    """Whether ``models/<version>/`` is on the site and verifies."""
    from edge_client.errors import ModelRejectedError
    from edge_client.inference import check_version_name
    from shared.artifacts import verify_model_dir

    try:
        path = site.models_dir / check_version_name(version)
    except ModelRejectedError:
        return False
    if not path.is_dir():
        return False
    try:
        verify_model_dir(path)
    except ModelError as err:
        log.warning("A/B arm %s on %s does not verify: %s", version, site.name, err)
        return False
    return True


def sync_content(
    site: Site, content: RecordDict, node_config: Mapping[str, Any], site_record: ConfigRecord
) -> RecordDict:
    """The reply content of ``query.ab_sync``: aggregate numbers and missing versions only."""
    config = ABSiteConfig.from_node_config(node_config)
    record = content.config_records.get(federated.CONFIG)
    if record is None or not isinstance(record.get(ab.EXPERIMENTS), str):
        raise ABSiteError("an ab_sync message must carry the experiments as JSON")
    specs = ab.decode_experiments(str(record[ab.EXPERIMENTS]))
    site.models_dir.mkdir(parents=True, exist_ok=True)
    present = {a.version: model_present(site, a.version) for s in specs for a in s.arms}
    result = sync_site(site.db_path, present, specs, config)
    return RecordDict(
        {
            federated.METRICS: MetricRecord(cast(dict[str, Any], result.metrics)),
            federated.SITE: site_record,
            "ab": ConfigRecord({ab.MISSING: json.dumps(result.missing)}),
        }
    )


def models_content(site: Site, content: RecordDict, site_record: ConfigRecord) -> RecordDict:
    """The reply content of ``query.ab_models`` after storing every model it carries."""
    from edge_client.federated_site import store_model
    from shared.federated import decode_catalogue
    from shared.models import build_model

    record = content.config_records.get(federated.CONFIG)
    if record is None or not isinstance(record.get(ab.MODELS), str):
        raise ABSiteError("an ab_models message must describe its models as JSON")
    try:
        described = json.loads(str(record[ab.MODELS]))
    except json.JSONDecodeError as err:
        raise ABSiteError(f"the model descriptions are not JSON: {err}") from err
    if not isinstance(described, list):
        raise ABSiteError("the model descriptions must be a JSON list")
    stored = 0
    for j, desc in enumerate(described):
        try:
            version = str(desc["version"])
            blob = record[f"catalogue-gz-{j}"]
            if not isinstance(blob, bytes):
                raise ABSiteError(f"catalogue of model {j} is not bytes")
            vocab = decode_catalogue(blob, str(desc["catalogue-sha256"]))
            module = build_model(str(desc["kind"]), {**desc["config"], "n_items": vocab.n_items})
            state = content.array_records[ab.arm_array_key(j)].to_torch_state_dict()
            module.load_state_dict(state)
        except (KeyError, TypeError, RuntimeError) as err:
            raise ABSiteError(f"model {j} of the ab_models message is malformed: {err!r}") from err
        store_model(site, version, module, vocab, dict(desc.get("meta") or {}))
        stored += 1
    if stored:
        with ABSite(site.db_path) as ab_site:
            ab_site.touch()  # the edge service reloads the running experiment's arms
    return RecordDict(
        {
            federated.METRICS: MetricRecord({"stored": float(stored)}),
            federated.SITE: site_record,
        }
    )
