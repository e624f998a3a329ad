"""Moving an embedded (SQLite) MLflow store with its home: `rehome_artifacts` re-roots the absolute
artifact locations MLflow keeps when a home was copied or moved."""

from __future__ import annotations

from pathlib import Path


# Where MLflow's SQL store keeps absolute artifact locations: (table, column).
_ARTIFACT_COLUMNS = (("experiments", "artifact_location"), ("runs", "artifact_uri"),
                     ("logged_models", "artifact_location"), ("model_versions", "storage_location"))


def rehome_artifacts(db: Path, root: str) -> dict[str, int]:
    """Re-root the artifact locations of an embedded (SQLite) MLflow store at `root`, its artifact folder
    in this home; returns the rows changed per table (empty when nothing pointed elsewhere).

    MLflow stores every artifact location as an absolute URI (per experiment, run, logged model and model
    version). In a copied home they would still point into the original: a model loaded from the copy
    would be the original's files, and a run logged in the copy would write its artifacts there. recloop
    creates each experiment at `<root>/<name>`, so an experiment whose location is `<other>/<name>` names
    the root the store was written under; every location under it is moved to `root` — when `root` holds
    artifacts (a copied or moved home brings its `artifacts/` along; a database copied alone keeps
    pointing at the files it was written with). Idempotent, and one read of the experiments table when
    nothing moved."""
    import sqlite3
    from urllib.parse import urlsplit
    from urllib.request import url2pathname

    root = root.rstrip("/")
    if not db.is_file() or not Path(url2pathname(urlsplit(root).path)).is_dir():
        return {}
    con = sqlite3.connect(db, timeout=60)
    try:
        try:
            experiments = con.execute("SELECT name, artifact_location FROM experiments").fetchall()
        except sqlite3.OperationalError:  # not (yet) an MLflow store
            return {}
        old_roots = {loc[: -len(name) - 1] for name, loc in experiments
                     if loc and name and loc.startswith("file://") and loc.endswith(f"/{name}")} - {root}
        changed: dict[str, int] = {}
        with con:
            for old in sorted(old_roots):
                for table, column in _ARTIFACT_COLUMNS:
                    try:
                        cursor = con.execute(
                            f"UPDATE {table} SET {column} = ? || substr({column}, ?) WHERE substr({column}, 1, ?) = ?",
                            (root, len(old) + 1, len(old) + 1, f"{old}/"))
                    except sqlite3.OperationalError:  # an older schema without this table
                        continue
                    if cursor.rowcount:
                        changed[table] = changed.get(table, 0) + cursor.rowcount
        if changed:
            import logging

            logging.getLogger(__name__).warning("MLflow store %s re-rooted from %s to %s: %s", db,
                                                ", ".join(sorted(old_roots)), root, changed)
        return changed
    finally:
        con.close()
