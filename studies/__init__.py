"""Many runs compared: the declared studies and their protocols (catalogue), the process pool that trains them
(workers), the paired statistics (stats), and the tables and figures of studies and comparisons (tables, figures)."""
