"""Checkpoints: writing and restoring (:mod:`~diloco.persist.checkpoint`), the files under them
(:mod:`~diloco.persist.checkpoint_files`), finding and checking one to resume from
(:mod:`~diloco.persist.resume`) and ``diloco export`` (:mod:`~diloco.persist.export`)."""
