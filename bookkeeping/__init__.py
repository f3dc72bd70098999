"""What a run needs but a reader of one run can skip: which device and precision (hardware), torchrun's ranks
(distributed), what defines a run and names its folder (experiment), its files and their checks (runfiles), its
checkpoints and random state (checkpointing), the lock one trainer holds (runlock), where it ran (provenance), and
image-folder archives (imagefolders)."""
