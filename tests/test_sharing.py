"""The sharing-mode registry: a mode added as one class and one registry entry reaches every place that
reads ``collab.share`` (settings, policy, the wire codec, the strategy's checks, Table 5's row text and
the receiver's training data), and the four built-in modes keep what they send. No training: fast."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from entities import sharing
from entities.policy import load_policy
from entities.pools import Pool, PoolError, PoolSpec
from entities.presets import load_config
from entities.sharing import FEATURES, IMAGES, get_mode
from entities.sharing.base import Contribution, FeatureMode
from sim.grid import ROWS
from strategies.pool_exchange import PoolExchange
from strategies.records import pack_pool, unpack_pool


class ClearMode(FeatureMode):
    """A toy mode: the entity's own φ1 features, unprotected."""

    name = "clear"
    disclosure_by = "nothing"

    def title(self, rounds: int) -> str:
        return "clear features"

    def shared_text(self, sender: str, rounds: int) -> str:
        return f"φ1(S{sender[1:]})"

    def contribute(self, entity, shared, cfg, seed) -> Contribution:
        pool = entity.featurize(shared)
        rows = np.arange(len(pool))
        return Contribution(self.name, pool.features, pool.labels, 1.0, 1.0, rows, rows)


@pytest.fixture
def clear(monkeypatch):
    monkeypatch.setitem(sharing.SHARING_MODES, ClearMode.name, ClearMode())
    return ClearMode.name


def test_builtin_modes_send_what_their_records_are_named():
    assert {name: mode.sends for name, mode in sharing.SHARING_MODES.items()} == {
        "dpm": FEATURES, "mdp": IMAGES, "augmdp": IMAGES, "raw": IMAGES, "obfuscator": FEATURES,
        "prototypes": FEATURES, "class-stats": FEATURES}
    cfg = load_config("tiny", {"mdp.rounds": 3})
    assert [get_mode(m).items_per_image(cfg) for m in ("dpm", "mdp", "augmdp", "raw")] == [1, 1, 3, 1]


def test_an_unregistered_mode_is_unknown_everywhere():
    with pytest.raises(ValueError, match=r"unknown sharing mode 'clear' \(collab\.share\); valid: dpm, mdp"):
        load_config("tiny", {"collab.share": "clear"})
    with pytest.raises(ValueError, match=r"unknown sharing mode\(s\) \['clear'\]"):
        load_policy({"allow-share": "dpm,clear"})


def test_a_registered_mode_reaches_settings_policy_codec_strategy_and_table5(clear):
    assert load_config("tiny", {"collab.share": clear}).collab.share == clear
    assert load_policy({"allow-share": f"dpm,{clear}"}).allow == ("dpm", clear)
    pool = Pool(torch.rand(6, 4, 2, 2), np.arange(6) % 3)
    record = pack_pool(pool, clear)
    assert set(record) == {"features", "labels"}
    back = unpack_pool(record, clear)
    assert torch.equal(back.data, pool.data) and np.array_equal(back.labels, pool.labels)
    strategy = PoolExchange(["E1", "E2"], "E1", 3, share=clear)
    assert strategy.mode.name == clear
    row7 = next(r for r in ROWS if r.id == "7")
    assert row7.describe(clear) == "φ1(S1) ∪ φ1(S2)"
    with pytest.raises(PoolError, match="above the bound"):
        strategy.mode.validate("E2", Pool(pool.data * 100, pool.labels), PoolSpec((4, 2, 2), 3, bound=10.0))


def test_received_images_go_through_phi1_and_features_do_not():
    phi1 = torch.nn.Conv2d(3, 2, 2, stride=2)
    images = Pool(torch.rand(5, 3, 4, 4), np.arange(5) % 2)
    got = get_mode("raw").training_pool(images, phi1)
    assert isinstance(got, Pool) and got.features.shape == (5, 2, 2, 2)
    with torch.no_grad():
        assert torch.allclose(got.features, phi1(images.data), atol=1e-2)  # bf16 autocast where the CPU has it
    features = Pool(torch.rand(5, 2, 2, 2), np.arange(5) % 2)
    assert get_mode("dpm").training_pool(features, phi1).features is features.data


def test_a_pool_of_the_wrong_kind_is_refused_by_the_mode():
    images = Pool(torch.rand(4, 3, 4, 4), np.arange(4) % 2)
    spec = PoolSpec((2, 2, 2), 2, image_shape=(3, 4, 4))
    get_mode("raw").validate("E2", images, spec)
    with pytest.raises(PoolError, match=r"features of shape \(3, 4, 4\), expected \(2, 2, 2\)"):
        get_mode("dpm").validate("E2", images, spec)
