"""Inner engines other than FSDP2 that can hold a group's fast weights (``inner.engine``)."""
