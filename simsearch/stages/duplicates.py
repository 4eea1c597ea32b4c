"""`simsearch duplicates`: groups of near-identical items of the store in run.dir, or its leakage into
`duplicates.against` (`simsearch.duplicates`), written as JSON and drawn as a contact sheet."""

from __future__ import annotations

import logging

from omegaconf import DictConfig

from simsearch.drawing import draw_groups
from simsearch.duplicates import cosines_to_first, default_threshold, find_duplicates, find_leaks, same_model
from simsearch.errors import SimsearchError
from simsearch.files import replace_atomically, write_json_atomically
from simsearch.index import open_searcher
from simsearch.items import ItemImages, output_path
from simsearch.store import Store

log = logging.getLogger(__name__)


def duplicates(cfg: DictConfig) -> list[list[str]]:
    """`simsearch duplicates`: duplicates.json (a list of groups of item ids), a summary, a PNG of the top groups.

    With `duplicates.against=OTHER_RUN_DIR`, each group is an item of this store followed by its
    near-duplicates in the other store (test-vs-train leakage).
    """
    settings = cfg.duplicates
    store = Store.open(cfg.run.dir)
    output, picture = output_path(store, "duplicates.output", settings.output), output_path(store, "duplicates.image", settings.image)
    threshold = default_threshold(store) if settings.threshold is None else float(settings.threshold)
    if not -1.0 <= threshold <= 1.0 or settings.k < 1:
        raise SimsearchError(f"duplicates.threshold must be a cosine in [-1, 1] and duplicates.k >= 1, "
                             f"not {threshold} and {settings.k}")
    images = ItemImages(store)
    if settings.against:
        other = Store.open(settings.against)
        if other.dir.resolve() == store.dir.resolve():
            raise SimsearchError("duplicates.against names this store itself: leave it out to find duplicates within it")
        same_model(store, other)
        other_images = ItemImages(other)
        leaks = find_leaks(store, other, open_searcher(other, cfg.index, cfg.run.seed), settings.k, threshold)
        groups = [[store.items[row]["id"], *(other.items[r]["id"] for r in rows)] for row, rows, _ in leaks]
        drawn = [[(images, row, str(store.items[row]["id"]), None)]
                 + [(other_images, r, f"other: {other.items[r]['id']}", float(score)) for r, score in zip(rows, scores)]
                 for row, rows, scores in leaks]
        headings = [f"{store.items[row]['id']}: {len(rows)} near-duplicate{'s' if len(rows) > 1 else ''} in {other.dir}"
                    for row, rows, _ in leaks]
        print(f"{len(leaks)} of {len(store)} items of {store.dir} have a near-duplicate in {other.dir} "
              f"(cosine >= {threshold}, top {settings.k})")
        for row, rows, scores in leaks[: settings.show_groups]:
            print(f"  {store.items[row]['id']}  ~  " + ", ".join(f"{other.items[r]['id']} ({s:.4f})"
                                                                 for r, s in zip(rows, scores)))
    else:
        row_groups = find_duplicates(store, open_searcher(store, cfg.index, cfg.run.seed), settings.k, threshold)
        groups = [[store.items[row]["id"] for row in rows] for rows in row_groups]
        drawn = [[(images, row, str(store.items[row]["id"]), None if number == 0 else float(score))
                  for number, (row, score) in enumerate(zip(rows, cosines_to_first(store, rows)))] for rows in row_groups]
        headings = [f"group {number + 1}: {len(rows)} items (cosine >= {threshold})" for number, rows in enumerate(row_groups)]
        in_groups = sum(len(g) for g in groups)
        print(f"{len(groups)} groups of near-duplicates in {store.dir}: {in_groups} of {len(store)} items, "
              f"{in_groups - len(groups)} removable (cosine >= {threshold}, top {settings.k})")
        for group in groups[: settings.show_groups]:
            print(f"  {len(group)}: " + ", ".join(str(i) for i in group[:8]) + (" ..." if len(group) > 8 else ""))
    write_json_atomically(output, groups, indent=1)
    print(f"Saved: {output}")
    picture.unlink(missing_ok=True)  # a picture of an earlier run's groups would mislead
    if drawn:
        sheet = draw_groups(drawn[: settings.show_groups], headings=headings[: settings.show_groups])
        replace_atomically(picture, sheet.save)
        print(f"Saved image: {picture}")
    return groups
