"""``python -m settings``: print the settings table; ``--write`` rewrites it in docs/settings.md."""

import sys

from settings.docs import markdown_table, update_table

if sys.argv[1:] == ["--write"]:
    update_table()
else:
    sys.stdout.write(markdown_table() + "\n")
