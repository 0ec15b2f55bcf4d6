"""Schedule: which groups a decomposition step decomposes, with staggered decompositions.

By default every ``inv_update_steps`` steps every group is decomposed at once
(the reference's schedule), and that step costs all the decompositions. With
``stagger_decompositions`` the groups are spread over the interval instead:
the phases are ``min(inv_update_steps, groups)`` sets of groups balanced by
decomposition cost (largest first, each to the phase with the least, as the
placement balances devices), and step ``s`` decomposes phase ``s mod
inv_update_steps``; step 0 decomposes every group, so that none runs on the
identity factors it starts from. Each group is still decomposed once per
interval, from its factors of that step.
"""

from __future__ import annotations

from kaisa_jax._src import groups as groups_lib


def decomposition_cost(group: groups_lib.LayerGroup) -> int:
  """Blocks times side cubed, A and G (a diagonal A is its own decomposition)."""
  a = 0 if group.a_diagonal else group.a_blocks * group.a_size ** 3
  return a + group.blocks * group.g_size ** 3


def decomposition_phases(groups: tuple[groups_lib.LayerGroup, ...],
                         period: int) -> tuple[tuple[groups_lib.LayerGroup, ...], ...]:
  """The groups of each phase of a staggered interval of ``period`` steps.

  Args:
    groups: the placement's groups.
    period: ``inv_update_steps``.

  Returns:
    ``min(period, len(groups))`` tuples of groups, each in the order of
    ``groups``; phase p is decomposed at the steps ``s`` with ``s % period
    == p`` (and every group at step 0).

  Example:
    >>> [[g.name for g in phase] for phase in decomposition_phases(plan.groups, 2)]
    [['a513_g512'], ['a65_g512', 'a513_g10']]
  """
  count = max(1, min(period, len(groups)))
  load = [0] * count
  members: list[list[int]] = [[] for _ in range(count)]
  # Largest first, ties in group order: a deterministic plan.
  for i in sorted(range(len(groups)), key=lambda i: (-decomposition_cost(groups[i]), i)):
    phase = min(range(count), key=lambda p: (load[p], p))
    load[phase] += decomposition_cost(groups[i])
    members[phase].append(i)
  return tuple(tuple(groups[i] for i in sorted(m)) for m in members)
