"""A replay buffer of generated responses (DistiLLM v1's adaptive off-policy data).

Generating from the student is the expensive part of on-policy distillation; the buffer keeps the responses
it generated so later batches can reuse them. Fixed capacity: once full, each new response replaces the oldest
(a ring). Sampling is without replacement within a batch and uses the caller's RNG, so a run is reproducible
and a resumed run (the buffer is part of the method's checkpointed state) continues identically.
"""

from __future__ import annotations

import random


class ReplayBuffer:
    def __init__(self, capacity: int = 1000):
        if capacity < 1:
            raise ValueError(f"replay buffer capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.items: list[dict] = []
        self._next = 0  # the slot the next push overwrites once the buffer is full
        self.pushed = 0  # responses pushed over the buffer's life
        self.replayed = 0  # responses handed out again

    def __len__(self) -> int:
        return len(self.items)

    def push(self, rows: list[dict]) -> None:
        for row in rows:
            item = {"id": row["id"], "prompt_ids": list(row["prompt_ids"]), "response_ids": list(row["response_ids"])}
            if len(self.items) < self.capacity:
                self.items.append(item)
            else:
                self.items[self._next] = item
                self._next = (self._next + 1) % self.capacity
            self.pushed += 1

    def sample(self, n: int, rng: random.Random) -> list[dict]:
        """n responses drawn uniformly without replacement (needs len(self) >= n)."""
        if n > len(self.items):
            raise ValueError(f"cannot sample {n} responses from a replay buffer holding {len(self.items)}")
        self.replayed += n
        return [dict(item, source="replay") for item in rng.sample(self.items, n)]

    def state_dict(self) -> dict:
        return {"capacity": self.capacity, "items": self.items, "next": self._next, "pushed": self.pushed,
                "replayed": self.replayed}

    def load_state_dict(self, state: dict) -> None:
        self.capacity = state["capacity"]
        self.items = [dict(item) for item in state["items"]]
        self._next, self.pushed, self.replayed = state["next"], state["pushed"], state["replayed"]
