"""Starting jobs: local processes and torchrun (:mod:`~diloco.launchers.local`) and
``diloco launch ray`` (:mod:`~diloco.launchers.ray_launcher`, :mod:`~diloco.launchers.ray_plan`,
:mod:`~diloco.launchers.ray_worker`)."""
