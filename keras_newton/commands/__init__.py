"""Sub-commands of the ``keras-newton`` CLI that belong to no feature package."""
