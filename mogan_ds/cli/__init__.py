"""The `python -m mogan_ds` commands (info, demo, export), the local DeepSpeed launcher, and how
user errors become one stderr line and exit code 2."""
