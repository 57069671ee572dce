"""``mdp`` and ``augmdp``: Mapping Distortion Protection's modified images (the second paper).

Each shared image looks like another image x_s of the shard (the selected one) but carries a
target's features and label; AugMDP(T) shares T such sets (``mdp.rounds``). The disclosure a sender
reports is SSIM against x_s, which the modified image is built to resemble; ``label_disclosure``
against the target. Sets are crafted with the shared Φ and stored resumably in the entity's
private store (draw 0 of AugMDP is the MDP set, so building both costs T draws, not T + 1).
"""

from __future__ import annotations

from entities.config import Config
from entities.entity import Entity
from entities.mdp import build_augmented_set, describe_pgd, sets_folder, ssim_to
from entities.pipeline import SharedModules
from entities.sharing.base import Contribution, ImageMode


class MdpMode(ImageMode):
    name = "mdp"

    def title(self, rounds: int) -> str:
        return "MDP"

    def explain(self, cfg: Config) -> str:
        return (f"{self.title(cfg.mdp.rounds)} images crafted with Φ ({describe_pgd(cfg.mdp)}), which the "
                "receiver featurizes with φ1")

    def shared_text(self, sender: str, rounds: int) -> str:
        return f"MDP(S{sender[1:]})"

    def rounds(self, cfg: Config) -> int:
        return 1

    def contribute(self, entity: Entity, shared: SharedModules, cfg: Config, seed: int) -> Contribution:
        mset = build_augmented_set(shared.backbone, entity.images, entity.labels, cfg.mdp, seed=seed,
                                   rounds=self.rounds(cfg),
                                   out_dir=entity.store.private(entity.name, sets_folder(cfg.mdp, seed, entity.view)))
        return Contribution(self.name, mset.images.float(), mset.labels, float(ssim_to(mset, entity.images).mean()),
                            float(ssim_to(mset, entity.images, "target").mean()), mset.selected_index,
                            mset.target_index)

    def key_settings(self, settings: dict) -> dict:
        return {"mdp": settings["mdp"]}

    def items_per_image(self, cfg: Config) -> int:
        return self.rounds(cfg)


class AugMdpMode(MdpMode):
    name = "augmdp"

    def title(self, rounds: int) -> str:
        return f"AugMDP({rounds})"

    def shared_text(self, sender: str, rounds: int) -> str:
        return f"AugMDP{rounds}(S{sender[1:]})"

    def rounds(self, cfg: Config) -> int:
        return cfg.mdp.rounds
