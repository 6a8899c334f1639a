"""Does a reproduced group follow the images' views or their random half instead of a state?

Two independent runs can reproduce a group that is no state: the images of one state split by
viewing direction (a map built from some views fits those views' images a little better, and
the views are fixed, so every run finds the same split), or by random half (the halves build
the maps the other half is scored against). A state's images see the particle from the same
directions as any other's and fall in both halves alike, so a group is taken for a state only
if neither its images' views nor their halves tell it from the rest (bench/README.md, "Groups
that follow the views": the measured values).

Limits: states that lie on the grid in different orientations would be taken for a view split
once their views alone tell them half-way apart; views are compared as given, without the
point group's equivalent directions. Not tested: defocus. Users merge data sets in which states
do differ by micrograph and so by defocus; a test on defocus would reject those true states."""

import numpy as np
from scipy.spatial import cKDTree

VIEW_NEIGHBOURS = 10  # nearest views each image's group is compared with
CONFIDENCE_Z = 3.0  # a dependence counts this many of its sd (under independence) below the
# measured value: a group of 20 images splits 14/6 between the halves by chance
SAMPLE = 4000  # images of a subset the views are compared on (every n-th: the same on every rank)


def _sign_free(views):
    """Unit directions d as points whose distances depend on (d . e)^2 only: a view and its
    opposite are the same central section."""
    x, y, z = np.asarray(views, np.float64).T
    r2 = np.sqrt(2.0)
    return np.stack([x * x, y * y, z * z, r2 * x * y, r2 * x * z, r2 * y * z], axis=1)


class NuisanceTest:
    """The views and halves of the images of `subset` (sorted global indices), to test groups
    of them with `follows`. data: preprocess.SortingData (its views and half, global)."""

    def __init__(self, data, subset):
        subset = np.asarray(subset, np.int64)
        self.sample = subset[:: max(1, -(-len(subset) // SAMPLE))]
        self.half = np.asarray(data.half[self.sample])
        self.neighbours = None
        if data.views is not None and len(self.sample) > VIEW_NEIGHBOURS:
            points = _sign_free(data.views[self.sample])
            _, nn = cKDTree(points).query(points, k=VIEW_NEIGHBOURS + 1)
            self.neighbours = _without_self(nn)

    def follows(self, members):
        """(what, how much at least) for the nuisance the group `members` follows the most:
        'views' (the share of its members' nearest views inside the group, from what
        independence gives, 0, to all of them, 1) or 'halves' (share_dependence); each less
        CONFIDENCE_Z of its sd under independence. No member in the sample, or all:
        ('views', 0.0)."""
        inside = np.isin(self.sample, members)
        n, m = len(inside), int(inside.sum())
        if m == 0 or m == n:
            return "views", 0.0
        found = [("halves", share_dependence(self.half, inside))]
        if self.neighbours is not None and m > 1:
            share = inside[self.neighbours[inside]].mean()
            e = (m - 1) / (n - 1)
            sd = np.sqrt(e * (1.0 - e) / (m * VIEW_NEIGHBOURS)) / (1.0 - e)
            found.append(("views", (share - e) / (1.0 - e) - CONFIDENCE_Z * sd))
        return max(found, key=lambda f: f[1])


def share_dependence(half, inside):
    """How far the group's share of half 1 (of any yes/no of the images, 0 or 1) is from the
    whole sample's (0) towards all or none (1), less CONFIDENCE_Z sd of that under
    independence."""
    whole, group = half.mean(), half[inside].mean()
    room = (1.0 - whole) if group > whole else whole
    if room <= 0:
        return 0.0
    sd = np.sqrt(whole * (1.0 - whole) / inside.sum())
    return float((abs(group - whole) - CONFIDENCE_Z * sd) / room)


def _without_self(nn):
    """The neighbour table less each row's own index (or its last column when a duplicate
    view came first)."""
    rows = np.arange(nn.shape[0])[:, None]
    own = nn == rows
    drop = np.where(own.any(axis=1), own.argmax(axis=1), nn.shape[1] - 1)
    keep = np.ones(nn.shape, bool)
    keep[np.arange(nn.shape[0]), drop] = False
    return nn[keep].reshape(nn.shape[0], nn.shape[1] - 1)
