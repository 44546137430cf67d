"""The attack stage: a malicious client poisons its data before training, or its update after it.

Which clients are malicious, and each attack, are ``raysim.adversary``'s (label flipping, backdoors,
sign flipping, scaling and noise). The server half is the defence's, not the attacker's: the robust
rules run as the encoding stage's server half, and the norm bound is its own stage.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from raysim.adversary.clients import MaliciousClients
from raysim.client.pipeline import Chunk, ClientUpdate, Stage

if TYPE_CHECKING:
    import torch


class Attack(Stage):
    def __init__(self, adversary: MaliciousClients) -> None:
        self.adversary = adversary

    def before_training(self, update: ClientUpdate, chunk: Chunk) -> None:
        update.attacker = self.adversary.contains(update.client_id)
        chunk.malicious += int(update.attacker)
        if update.attacker:
            update.x, update.y = self.adversary.poison_data(update.x, update.y, chunk.round_index, update.client_id)

    def client(self, update: ClientUpdate, chunk: Chunk) -> bool:
        import torch

        if update.attacker:
            poisoned = self.adversary.poison_update(update.delta.cpu().numpy(), chunk.round_index, update.client_id)
            update.delta = torch.from_numpy(poisoned).to(update.delta.device)
        return True
