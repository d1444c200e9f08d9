"""Filtered-stream rules, reconciled idempotently.

X keeps the rules on its side, per app, between connections. Running the
ingester with the same ``--rule`` flags twice must change nothing, and changing
the flags must leave exactly the new set: stale rules are deleted first (X
caps how many an app may hold), then missing ones are added.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import tweepy

_LOG = logging.getLogger(__name__)


class RulePlan(NamedTuple):
    """What reconciling would do."""

    keep: list[tweepy.StreamRule]
    add: list[str]
    delete: list[tweepy.StreamRule]

    @property
    def changes(self) -> bool:
        return bool(self.add or self.delete)

    def describe(self) -> str:
        lines = [f"  keep   {r.value!r} (id {r.id})" for r in self.keep]
        lines += [f"  delete {r.value!r} (id {r.id})" for r in self.delete]
        lines += [f"  add    {v!r}" for v in self.add]
        return "\n".join(lines) or "  (no rules)"


def plan_rules(current: list[tweepy.StreamRule], wanted: list[str]) -> RulePlan:
    """Compares rule values; tags and ids do not make two rules different."""
    wanted = list(dict.fromkeys(v.strip() for v in wanted if v.strip()))
    have = {r.value for r in current}
    keep = [r for r in current if r.value in wanted]
    delete = [r for r in current if r.value not in wanted]
    add = [v for v in wanted if v not in have]
    return RulePlan(keep, add, delete)


def fetch_rules(client: tweepy.StreamingClient) -> list[tweepy.StreamRule]:
    """The rules X holds for this app now."""
    response = client.get_rules()
    return list(response.data or [])


def _raise_on_errors(response: tweepy.Response, what: str) -> None:
    errors = response.errors or []
    if errors:
        details = "; ".join(
            f"{e.get('value', '')!r}: {e.get('title', '')} {e.get('details') or e.get('detail') or ''}"
            .strip() for e in errors)
        raise ValueError(f"X refused to {what} (fix the --rule flags): {details}")


def reconcile(client: tweepy.StreamingClient, wanted: list[str], dry_run: bool = False
              ) -> RulePlan:
    """Makes X's rule set equal ``wanted``.

    Args:
      client: an authenticated StreamingClient.
      wanted: rule values, as given with ``--rule``.
      dry_run: only plan, and let X check the new rules' syntax (its own
        ``dry_run`` parameter); nothing changes.

    Returns:
      The plan that was (or, with dry_run, would be) applied.
    """
    plan = plan_rules(fetch_rules(client), wanted)
    _LOG.info("stream rules%s:\n%s", " (dry run)" if dry_run else "", plan.describe())
    if plan.delete and not dry_run:
        response = client.delete_rules([r.id for r in plan.delete])
        _raise_on_errors(response, "delete stale rules")
    if plan.add:
        # requests would send a Python bool as "True"; X expects "true".
        params = {"dry_run": "true"} if dry_run else {}
        response = client.add_rules([tweepy.StreamRule(value=v) for v in plan.add], **params)
        _raise_on_errors(response, "add rules")
    return plan
