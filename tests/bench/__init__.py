"""relayd side by side with a private Postfix instance, on the same machine, in the same run.

Run it as ``make bench`` (or ``PYTHONPATH=tests .venv/bin/python -m bench``
from the repository root); ``--quick`` for a short development run. See
docs/performance.md for what is measured and how to read the table.

Nothing here is collected by pytest: no module is named ``test_*``.
"""
