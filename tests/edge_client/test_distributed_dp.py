"""A site's share of a distributed DP-FedSGD round: noise, accounting, budget, frozen parts."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from opacus.accountants import PRVAccountant, RDPAccountant

from edge_client.distributed_dp import (
    ShareConfig,
    ShareRangeError,
    noisy_clipped_sum,
)
from edge_client.dp_sgd import DPSGDEngine, seeded_generator
from edge_client.errors import PrivacyBudgetExceeded
from edge_client.privacy_ledger import RDP_ORDERS, Mechanism, PrivacyLedger
from shared.models import build_model
from shared.sequences import UserSequences, build_sequences, next_item_examples
from shared.synth import SynthConfig, generate_synthetic
from shared.vocab import ItemVocab

N_ITEMS = 40
MODEL = {"n_items": N_ITEMS, "dim": 8, "hidden": 8, "max_len": 10, "dropout": 0.0}


@pytest.fixture(scope="module")
def train() -> UserSequences:
    events = generate_synthetic(
        SynthConfig(
            n_sites=1,
            shoppers_per_site=30,
            n_items=N_ITEMS,
            n_categories=4,
            events_per_shopper=8.0,
            min_events=5,
            seed=1,
        )
    ).events
    vocab = ItemVocab.from_items(events["item_id"].astype(str))
    return build_sequences(events, vocab)


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("gru", MODEL)


def share_config(**kw: object) -> ShareConfig:
    base: dict[str, object] = {
        "sample_rate": 1.0,
        "noise_multiplier": 2.0,
        "max_grad_norm": 0.5,
        "noise_shares": 4,
        "share_scale": 3.0,
        "share_range": 1e6,
        "epsilon_budget": 1e3,
        "device": "cpu",
    }
    return ShareConfig(**{**base, **kw})  # type: ignore[arg-type]


def clipped_sum(net: torch.nn.Module, train: UserSequences, c: float) -> dict[str, torch.Tensor]:
    """Ground truth: every shopper's clipped gradient, summed, no noise."""
    inputs, targets = next_item_examples(train, int(net.config.max_len))  # type: ignore[union-attr]
    engine = DPSGDEngine(
        net,
        lr=1.0,
        max_grad_norm=c,
        noise_multiplier=0.0,
        expected_batch_size=1.0,
        noise_generator=seeded_generator(0),
        device=torch.device("cpu"),
    )
    engine.accumulate_batch(inputs, targets)
    return {n: p.grad.detach().clone() for n, p in engine.dp_model.named_parameters()}


def test_noise_shares_add_up_to_sigma_c(tmp_path: Path, train: UserSequences) -> None:
    # Arrange: m = 4 sites holding the same shoppers, each sampling all of them (q = 1)
    cfg = share_config()
    net = model()
    truth = clipped_sum(net, train, cfg.max_grad_norm)

    # Act
    shares = []
    for site in range(cfg.noise_shares):
        with PrivacyLedger(tmp_path / f"site-{site}.db") as ledger:
            shares.append(noisy_clipped_sum(net, train, cfg, ledger, secret_seed=100 + site))

    # Assert: sum of shares x scale = m x clipped sum + noise of std sigma C per coordinate
    noise = torch.cat(
        [
            (sum(s.share[name] for s in shares) * cfg.share_scale - cfg.noise_shares * g).flatten()
            for name, g in truth.items()
        ]
    ).double()
    d = noise.numel()
    target = cfg.noise_multiplier * cfg.max_grad_norm
    # sample std of d Gaussians: relative standard error 1/sqrt(2d); allow 5 of them
    assert abs(float(noise.std()) / target - 1) < 5 / math.sqrt(2 * d)
    assert abs(float(noise.mean())) < 5 * target / math.sqrt(d)
    one = torch.cat(
        [(shares[0].share[n] * cfg.share_scale - g).flatten() for n, g in truth.items()]
    ).double()
    assert abs(float(one.std()) / (target / 2) - 1) < 5 / math.sqrt(2 * d)  # sqrt(m) = 2


def test_frozen_parameters_get_no_gradient_and_no_noise(
    tmp_path: Path, train: UserSequences
) -> None:
    cfg = share_config(frozen=frozenset({"item_emb.weight", "head.weight"}))
    with PrivacyLedger(tmp_path / "site.db") as ledger:
        result = noisy_clipped_sum(model(), train, cfg, ledger, secret_seed=1)
    assert not result.share["item_emb.weight"].any()
    assert not result.share["head.weight"].any()
    assert result.share["head.bias"].abs().sum() > 0
    assert result.share["gru.weight_hh_l0"].abs().sum() > 0
    assert set(result.share) == set(model().state_dict())


def test_each_round_is_recorded_as_sigma_q_one_step_and_matches_opacus(
    tmp_path: Path, train: UserSequences
) -> None:
    # Arrange: sigma and q with three significant digits (the ledger merges at that grid)
    cfg = share_config(sample_rate=0.25, noise_multiplier=1.5)
    rounds = 3

    # Act
    with PrivacyLedger(tmp_path / "site.db") as ledger:
        for i in range(rounds):
            last = noisy_clipped_sum(model(), train, cfg, ledger, secret_seed=i)
        history = ledger.mechanisms()

    # Assert: the very figure Opacus' PRV and RDP accountants give for (sigma, q, 3 steps)
    assert history == [Mechanism(1.5, 0.25, 1)] * rounds
    prv, rdp = PRVAccountant(), RDPAccountant()
    prv.history = [(1.5, 0.25, rounds)]
    rdp.history = [(1.5, 0.25, rounds)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected_prv = float(prv.get_epsilon(cfg.delta))
        expected_rdp = float(rdp.get_epsilon(cfg.delta, alphas=RDP_ORDERS))
    assert last.epsilon == pytest.approx(expected_prv, rel=1e-6)
    assert last.epsilon_rdp == pytest.approx(expected_rdp, rel=1e-6)
    assert last.epsilon <= last.epsilon_rdp


def test_a_round_past_the_budget_is_refused_before_anything_runs(
    tmp_path: Path, train: UserSequences
) -> None:
    cfg = share_config(sample_rate=0.5, noise_multiplier=1.0, epsilon_budget=4.0)
    with PrivacyLedger(tmp_path / "site.db") as ledger:
        noisy_clipped_sum(model(), train, cfg, ledger, secret_seed=0)  # 3.54, then 4.86
        with pytest.raises(PrivacyBudgetExceeded, match="refuses"):
            noisy_clipped_sum(model(), train, cfg, ledger, secret_seed=1)
        assert len(ledger.history()) == 1


def test_a_site_too_large_for_the_secagg_range_is_refused(
    tmp_path: Path, train: UserSequences
) -> None:
    # 30 shoppers x C = 0.5 could reach 15 per coordinate; scale x range = 12
    cfg = share_config(share_scale=3.0, share_range=4.0, noise_multiplier=0.01)
    assert cfg.max_shoppers() < 30
    with PrivacyLedger(tmp_path / "site.db") as ledger:
        with pytest.raises(ShareRangeError, match="secagg-max-weight"):
            noisy_clipped_sum(model(), train, cfg, ledger, secret_seed=0)
        assert ledger.history() == []


def test_shares_stay_within_the_range_they_were_sized_for(
    tmp_path: Path, train: UserSequences
) -> None:
    cfg = share_config(share_scale=2.0, share_range=20.0, noise_multiplier=0.5)
    assert cfg.max_shoppers() >= 30
    with PrivacyLedger(tmp_path / "site.db") as ledger:
        result = noisy_clipped_sum(model(), train, cfg, ledger, secret_seed=0)
    worst = max(float(v.abs().max()) for v in result.share.values())
    assert worst <= cfg.share_range
    assert np.isfinite(worst)


# ----------------------------------------------------------------------------- ClientApp
def _distributed_instructions(vocab: ItemVocab) -> dict[str, object]:
    from shared.federated import RoundInstructions

    return RoundInstructions(
        server_round=1,
        model_version="v1",
        model_kind="gru",
        model_config={**MODEL, "n_items": vocab.n_items},
        catalogue=vocab,
        privacy_mode="distributed",
        noise_multiplier=1.0,
        sample_rate=0.5,
        noise_shares=2,
        share_scale=100.0,
    ).to_config()


@pytest.fixture
def app_site(tmp_path: Path) -> tuple[Path, ItemVocab]:
    from edge_client.store import EventStore

    events = generate_synthetic(
        SynthConfig(n_sites=1, shoppers_per_site=12, n_items=N_ITEMS, n_categories=4, seed=2)
    ).events
    root = tmp_path / "store-d"
    (root / "models").mkdir(parents=True)
    store = EventStore(root / "site.db")
    store.import_events(events)
    store.close()
    return root, ItemVocab.from_items([str(i) for i in range(N_ITEMS)])


def test_the_site_never_sends_a_share_unmasked(app_site: tuple[Path, ItemVocab]) -> None:
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
    from flwr.common import FitIns, ndarrays_to_parameters
    from flwr.compat.common import recorddict_compat as compat
    from flwr.supercore.task_identity import TaskIdentity

    from edge_client.client_app import app
    from shared import federated

    root, vocab = app_site
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    try:
        state = build_model("gru", {**MODEL, "n_items": vocab.n_items}).state_dict()
        config = _distributed_instructions(vocab)
        plain = RecordDict(
            {federated.CONFIG: ConfigRecord(config), federated.ARRAYS: ArrayRecord(state)}
        )
        fitins = FitIns(ndarrays_to_parameters([v.numpy() for v in state.values()]), config)
        legacy = compat.fitins_to_recorddict(fitins, keep_input=True)
        for content in (plain, legacy):
            msg = Message(content, dst_node_id=5, message_type=MessageType.TRAIN)
            context = Context(1, 5, {"site-dir": str(root)}, RecordDict(), {})
            # Act / Assert: a Message-API train and a legacy fit outside SecAgg+ are refused
            with pytest.raises(Exception, match="only masked by SecAgg"):
                app(msg, context)
        with PrivacyLedger(root / "site.db") as ledger:
            assert ledger.history() == []  # nothing was computed, nothing spent
    finally:
        TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = None  # type: ignore[assignment]
