"""A run's running totals: tokens, sub-calls, where it ran, its deadline, whether it ended."""

from __future__ import annotations

from kowalski.controller.rlm.events import TokenCount


class RunLedger:
    """What one run has used so far; the loop and its sub-calls both write to it."""

    def __init__(self) -> None:
        # The root model's calls and folding summaries.
        self.tokens = TokenCount()
        # Sub-calls, those of child runs included.
        self.sub_call_tokens = TokenCount()
        # Answers the cache gave, root and sub-calls: reported, not spent.
        self.cached_tokens = TokenCount()
        self.sub_calls = 0
        # Agents (session device ids) and model endpoints, in order of first use.
        self.agents: dict[str, None] = {}
        self.endpoints: dict[str, None] = {}
        self.iteration = 0
        # On the event loop's clock; set when the run starts.
        self.deadline = 0.0
        self.finished = False

    @property
    def tokens_used(self) -> int:
        """Tokens spent so far, sub-calls included."""
        return self.tokens.total_tokens + self.sub_call_tokens.total_tokens

    def note_agent(self, name: str) -> None:
        if name:
            self.agents.setdefault(name, None)

    def note_endpoint(self, name: str) -> None:
        if name:
            self.endpoints.setdefault(name, None)
