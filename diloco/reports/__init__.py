"""Reading run directories back: :mod:`~diloco.reports.runs` (``diloco plot`` and ``diloco
summary`` read runs through it), :mod:`~diloco.reports.plot`, :mod:`~diloco.reports.summary`."""
