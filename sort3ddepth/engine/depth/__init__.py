"""Reproducibility by depth: boxes of paired MGSK-means runs, layers of boxes, generations.

generation -> layers -> boxes -> runs -> box iterations -> one pair of runs (MGSK-means, then
the membership model's refinement).
* policy: every threshold (DepthPolicy), each with its reason.
* partition: Partition, size bounds and schedules, random starts, swap and refill.
* pair: one pair of independent runs, each MGSK-means refined by the membership model.
* accept: which matched groups a box keeps, and which two boxes agree on.
* search: search mode's coarse limit, cuts, rebuilt starts, K probes, settling.
* box: one box (runs of box iterations, K resets).
* layers: layers of boxes, the between-box comparison, one generation.
* nuisance: whether a reproduced group follows its images' views or halves (no state).
* members: the generation's member check and the run's final assignment.
* split: the split check of a generation's groups (two states merged in one; search mode),
  before and after the member check; a state found twice (found_again: two clusters whose
  union splits in no reproducible way that follows them);
  rigid: whether a split is one map moved (shifted, turned: pose errors).
Unaccounted images go on to the next generation.
All random choices come from the one generator in the context, drawn on every rank in the same
order (the data they depend on are identical on every rank), so results do not depend on the
number of ranks.
"""

from .accept import between_box_keeps, fragments, not_tiny, sure_groups, within_box_accept
from .box import run_box
from .context import SortContext
from .layers import between_boxes, run_generation
from .members import assign_members, could_hold_a_group, final_assignment, grown_clusters
from .partition import (
    Partition,
    pair_schedules,
    random_equal_assignment,
    size_bounds,
    swap_and_refill,
)
from .policy import POLICY, DepthPolicy, policy_of
from .search import coarse_rmax, cut, probe_k, rebuild_starts, settle_groups
from .split import found_again, merge_moved, split_check, two_states

MIN_CLUSTER_SIZE = POLICY.min_cluster_size  # never report smaller clusters (sorter.py)

__all__ = [
    "DepthPolicy",
    "POLICY",
    "policy_of",
    "MIN_CLUSTER_SIZE",
    "SortContext",
    "Partition",
    "size_bounds",
    "pair_schedules",
    "random_equal_assignment",
    "swap_and_refill",
    "within_box_accept",
    "sure_groups",
    "fragments",
    "not_tiny",
    "between_box_keeps",
    "coarse_rmax",
    "cut",
    "rebuild_starts",
    "probe_k",
    "settle_groups",
    "run_box",
    "between_boxes",
    "run_generation",
    "assign_members",
    "could_hold_a_group",
    "final_assignment",
    "grown_clusters",
    "merge_moved",
    "split_check",
    "two_states",
    "found_again",
]
