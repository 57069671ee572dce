"""``obfuscator``: DeepObfuscator's mode (Li et al., 2019), features O(φ1(S_k)) through one shared obfuscator.

Step 1's party trains the obfuscator O once (:meth:`ObfuscatorMode.publish`) on the images it pretrained
Φ on: jointly with a copy of φ2 on the task's classes, against a reconstructor that learns at the same
time (:func:`entities.obfuscator.train_obfuscator`; a classification task has no private attributes, so
only the reconstructor fights). It publishes O with φ1, φ2 and ψ, and every entity shares O(φ1(S_k)).
The recipe is Table 4's: ``table4.obfuscator_blocks``, ``obfuscator_init``, ``obfuscator_epochs``,
``obfuscator_lr`` and ``reconstruction_weight``.

That is DeepObfuscator's design and its weakness in Deep Poisoning's setting: every collaborator holds O,
so each can make (O(φ1(x)), x) pairs from its own images and train a decoder that reverses it (Table 4's
image-sharing column). The disclosure a sender reports is ψ's, which O never saw: a lower bound.
"""

from __future__ import annotations

import copy

import numpy as np
import torch

from entities.config import Config
from entities.data import TaskSplit
from entities.entity import Entity
from entities.files import artefact_key, load_torch, module_digest, save_torch
from entities.metrics import disclosure
from entities.obfuscator import DeepObfuscator, Obfuscator, ObfuscatorSettings, train_obfuscator
from entities.pipeline import ArtefactStore, SharedModules, pretrain_set
from entities.reconstructors import build_reconstructor
from entities.runtime import key_part
from entities.sharing.base import Contribution, FeatureMode
from entities.train import evaluate_reconstruction, extract_features, infer


def build_obfuscator(cfg: Config, channels: int) -> Obfuscator:
    """An untrained obfuscator of the configured shape (receivers rebuild the published one with it)."""
    return Obfuscator(channels, cfg.table4.obfuscator_blocks, cfg.table4.obfuscator_init)


class ObfuscatorMode(FeatureMode):
    name = "obfuscator"
    disclosure_by = "ψ only"

    def title(self, rounds: int) -> str:
        return "DeepObfuscator"

    def explain(self, cfg: Config) -> str:
        t = cfg.table4
        return (f"features through one obfuscator shared by all ({t.obfuscator_blocks} blocks, trained by Step 1's "
                f"party against a reconstructor, β = {t.reconstruction_weight})")

    def shared_text(self, sender: str, rounds: int) -> str:
        return f"O(φ1(S{sender[1:]}))"

    def publish(self, cfg: Config, split: TaskSplit, store: ArtefactStore, shared: SharedModules) -> SharedModules:
        """Train (or load) the shared obfuscator on the pretraining images and add it to what Step 1 hands out."""
        t, seed = cfg.table4, cfg.data.seed
        images, labels = pretrain_set(cfg, split)
        d = cfg.to_dict()
        key = artefact_key({"table4": d["table4"], "reconstructor": d["reconstructor"], "dpm": d["dpm"], "seed": seed,
                            "shared": module_digest(shared.phi1, shared.phi2, shared.psi),
                            **key_part(cfg.device, cfg.precision)})
        path = store.shared(f"obfuscator-{key}.pt")
        features = extract_features(shared.phi1, images)
        torch.manual_seed(seed)
        obfuscator = build_obfuscator(cfg, features.shape[1])
        if path.is_file():
            obfuscator.load_state_dict(load_torch(path, "the shared obfuscator"))
        else:
            deep = DeepObfuscator(obfuscator, copy.deepcopy(shared.phi2), None,
                                  build_reconstructor(cfg.reconstructor.name, tuple(features.shape[1:]),
                                                      images.shape[1:]))
            train_obfuscator(deep, features, images, labels, None,
                             ObfuscatorSettings(t.obfuscator_epochs, cfg.dpm.batch_size, t.obfuscator_lr, 0.0,
                                                t.reconstruction_weight), seed=seed, what="shared obfuscator")
            save_torch(obfuscator.state_dict(), path)
        shared.obfuscator = obfuscator.eval()
        return shared

    def contribute(self, entity: Entity, shared: SharedModules, cfg: Config, seed: int) -> Contribution:
        """O(φ1(S_k)) with the shard's labels; ψ's disclosure of it as the sender's report."""
        if shared.obfuscator is None:
            raise ValueError("collab.share = obfuscator, but Step 1's shared modules carry no obfuscator: were they "
                             "made (or packed) under another sharing mode?")
        own = entity.featurize(shared)
        data = infer(shared.obfuscator, own.features)
        shown = disclosure(evaluate_reconstruction(shared.psi, data, entity.images))
        rows = np.arange(len(data))
        return Contribution(self.name, data, np.asarray(own.labels), shown, shown, rows, rows)

    def key_settings(self, settings: dict) -> dict:
        # key_dict leaves [table4] out while it holds its defaults
        return {"reconstructor": settings["reconstructor"], "dpm": settings["dpm"],
                "table4": settings.get("table4", {})}
