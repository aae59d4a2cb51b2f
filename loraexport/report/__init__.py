"""``report.json`` / ``report.md`` (``contents``) and writing them beside an export (``files``)."""
